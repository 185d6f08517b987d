package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const fakeClientSecret = "fake-client-secret-CCCC"

// writeProviders writes a providers file with mode perm and returns its
// path.
func writeProviders(t *testing.T, perm os.FileMode, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "providers.json")
	if err := os.WriteFile(path, []byte(body), perm); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, perm); err != nil { // past the umask
		t.Fatal(err)
	}
	return path
}

// A providers file that is wrong is refused with a message naming what is
// wrong, never half-read: a misspelt member, a missing one, an endpoint a
// token could leak from over plain HTTP, a secret given twice, a client
// secret in a file others can read, a redirect off the loopback.
func TestProvidersFileRefusesWhatIsWrongNamingIt(t *testing.T) {
	good := `"client_id":"cli","token_url":"https://auth.example/token"`
	for _, tc := range []struct {
		name, body string
		perm       os.FileMode
		want       string
	}{
		{"misspelt member", `{"providers":{"p":{` + good + `,"token_uri":"x"}}}`, 0o600, `unknown field "token_uri"`},
		{"no client_id", `{"providers":{"p":{"token_url":"https://auth.example/token"}}}`, 0o600, "client_id is missing"},
		{"no token_url", `{"providers":{"p":{"client_id":"cli"}}}`, 0o600, "token_url is missing"},
		{"plain http endpoint", `{"providers":{"p":{"client_id":"cli","token_url":"http://auth.example/token"}}}`, 0o600, "token_url: \"http://auth.example/token\" must be https"},
		{"both secrets", `{"providers":{"p":{` + good + `,"client_secret":"s","client_secret_key":"k"}}}`, 0o600, "not both"},
		{"secret readable by others", `{"providers":{"p":{` + good + `,"client_secret":"` + fakeClientSecret + `"}}}`, 0o644, "chmod 600"},
		{"redirect off loopback", `{"providers":{"p":{` + good + `,"redirect_url":"http://example.com:8080/cb"}}}`, 0o600, "redirect_url must be http on a loopback address"},
		{"localhost endpoint", `{"providers":{"p":{"client_id":"cli","token_url":"http://localhost:9998/token"}}}`, 0o600, "not localhost, which may resolve to the other one"},
		{"localhost redirect", `{"providers":{"p":{` + good + `,"redirect_url":"http://localhost:8085/cb"}}}`, 0o600, "not localhost"},
		{"writable by the group", `{"providers":{"p":{` + good + `}}}`, 0o664, "may be written by others (mode 0664)"},
		{"writable by others", `{"providers":{"p":{` + good + `}}}`, 0o602, "may be written by others (mode 0602)"},
		{"bad auth style", `{"providers":{"p":{` + good + `,"auth_style":"basic"}}}`, 0o600, `auth_style is "basic"`},
		{"bad name", `{"providers":{"p/q":{` + good + `}}}`, 0o600, "provider name must match"},
		{"two values", `{"providers":{}} {}`, 0o600, "more than one JSON value"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := loadProviders(writeProviders(t, tc.perm, tc.body), true)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("loadProviders: %v; want an error containing %q", err, tc.want)
			}
			if strings.Contains(err.Error(), fakeClientSecret) {
				t.Fatalf("the error quotes the client secret: %v", err)
			}
		})
	}
}

// A providers file that is not there is an empty one, unless a flag named
// it: run and serve work without providers, but a named file must exist.
func TestMissingProvidersFileIsEmptyUnlessNamed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "providers.json")
	p, err := loadProviders(path, false)
	if err != nil || len(p.byName) != 0 {
		t.Fatalf("default file missing: %v, %v providers", err, len(p.byName))
	}
	if _, err := loadProviders(path, true); err == nil || !strings.Contains(err.Error(), "no providers file "+path) {
		t.Fatalf("named file missing: %v, want it named", err)
	}
}

// credproxy providers lists each provider and each token's state (valid
// until when, refreshable or not and why), and no secret: not the client
// secret, not a token.
func TestProvidersListsTokenStatesWithoutSecrets(t *testing.T) {
	env := hostEnv(t)
	file := writeProviders(t, 0o600, `{"providers":{"anthropic":{"client_id":"cli","client_secret":"`+fakeClientSecret+
		`","token_url":"https://auth.example/token","auth_url":"https://auth.example/authorize"}}}`)
	env = append(env, providersEnv+"="+file)
	r := credproxyCmd(t, env, "", "providers")
	if r.code != 0 || !strings.Contains(r.stdout, "anthropic") || !strings.Contains(r.stdout, "no store yet") {
		t.Fatalf("with no store: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	credproxyCmd(t, env, tokenJSON, "token", "set", "anthropic").want(t, 0, "")
	credproxyCmd(t, env, `{"access_token":"`+fakeAccess+`","expiry":1000}`, "token", "set", "other", "work").want(t, 0, "")
	r = credproxyCmd(t, env, "", "providers")
	for _, want := range []string{
		"anthropic  client cli (secret in the file), token https://auth.example/token, login: browser, no revocation",
		"anthropic/default", "valid until 2100-01-01T00:00:00Z", "refreshable: run and serve refresh it on the host",
		"other/work", "expired 1970-01-01T00:16:40Z", "not refreshable: no refresh token",
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("providers output lacks %q:\n%s", want, r.stdout)
		}
	}
	for _, secret := range []string{fakeClientSecret, fakeAccess, fakeRefresh, fakePassword} {
		if strings.Contains(r.stdout+r.stderr, secret) {
			t.Errorf("providers printed a secret %q:\n%s%s", secret, r.stdout, r.stderr)
		}
	}
}

// run refuses to start a proxy whose provider's client secret, named by
// client_secret_key, is not in the store, and says how to put it there,
// rather than start one whose refreshes are all going to fail. The key
// that holds a client secret never reaches the sandbox: -allow-key '*'
// grants every other key, and naming it is refused.
func TestRunKeepsTheProvidersClientSecretOnTheHost(t *testing.T) {
	env := append(hostEnv(t), "PATH="+filepath.Dir(binary)+":"+os.Getenv("PATH"))
	file := writeProviders(t, 0o644, `{"providers":{"anthropic":{"client_id":"cli","client_secret_key":"anthropic-client",`+
		`"token_url":"https://auth.example/token"}}}`)
	env = append(env, providersEnv+"="+file)
	credproxyCmd(t, env, tokenJSON, "token", "set", "anthropic").want(t, 0, "")
	r := credproxyCmd(t, env, "", "run", "-allow-provider", "anthropic", "--", "true")
	if r.code != exitNoProxy || !strings.Contains(r.stderr, "'credproxy key set anthropic-client' puts it there") {
		t.Fatalf("run with the client secret missing: exit %d, stderr %q", r.code, r.stderr)
	}
	credproxyCmd(t, env, fakeClientSecret, "key", "set", "anthropic-client").want(t, 0, "")
	credproxyCmd(t, env, fakeKey, "key", "set", "openai").want(t, 0, "")
	r = credproxyCmd(t, env, "", "run", "-allow-provider", "anthropic", "-allow-key", "*", "--", "sh", "-c",
		"credproxy key ls; credproxy key get -raw anthropic-client || echo refused")
	if r.code != 0 || r.stdout != "openai\nrefused\n" || !strings.Contains(r.stderr, "API keys: all but anthropic-client") {
		t.Fatalf("run -allow-key '*': exit %d, stdout %q, stderr %q; want openai listed and the client secret refused", r.code, r.stdout, r.stderr)
	}
	if strings.Contains(r.stdout+r.stderr, fakeClientSecret) {
		t.Fatalf("the client secret reached the sandbox or the log")
	}
	r = credproxyCmd(t, env, "", "run", "-allow-provider", "anthropic", "-allow-key", "anthropic-client", "--", "true")
	if r.code != exitNoProxy || !strings.Contains(r.stderr, "that key holds provider anthropic's client secret, which stays on the host") {
		t.Fatalf("run -allow-key anthropic-client: exit %d, stderr %q", r.code, r.stderr)
	}
}

// The example in 'credproxy providers -help' works pasted as it is into a
// shell: it writes a providers file that providers then lists.
func TestProvidersHelpExampleWorksAsPasted(t *testing.T) {
	home := t.TempDir()
	env := append(hostEnv(t), "HOME="+home, "XDG_CONFIG_HOME=", providersEnv+"=",
		"PATH="+filepath.Dir(binary)+":"+os.Getenv("PATH"))
	help := credproxyCmd(t, env, "", "providers", "-help").stdout
	_, example, ok := strings.Cut(help, "\nExample:\n")
	if !ok {
		t.Fatalf("no example in:\n%s", help)
	}
	r := runBinary(t, "sh", env, "", nil, "-euc", example)
	if r.code != 0 || !strings.Contains(r.stdout, "demo  client credproxy-cli (public client), token http://127.0.0.1:9998/oauth/token, login: browser+device, revocation") {
		t.Fatalf("the example: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
}

// A providers file named by CREDPROXY_PROVIDERS (or -providers) must be
// there, so that a misspelt name is not taken for "no providers", and an
// empty one (a provider that failed to start after the shell truncated
// the file it prints to) says it is empty rather than "EOF".
func TestNamedProvidersFileMustExistAndNotBeEmpty(t *testing.T) {
	env := hostEnv(t)
	missing := filepath.Join(t.TempDir(), "provders.json")
	r := credproxyCmd(t, append(env, providersEnv+"="+missing), "", "providers")
	if r.code != 1 || !strings.Contains(r.stderr, "no providers file "+missing) {
		t.Errorf("providers with a misspelt CREDPROXY_PROVIDERS: exit %d, stderr %q", r.code, r.stderr)
	}
	empty := writeProviders(t, 0o600, "")
	r = credproxyCmd(t, append(env, providersEnv+"="+empty), "", "login", "demo")
	if r.code != 1 || !strings.Contains(r.stderr, "the providers file "+empty+" is empty") {
		t.Errorf("login with an empty providers file: exit %d, stderr %q", r.code, r.stderr)
	}
}

// A providers file that belongs to another user is refused: whoever
// writes it decides where the tokens go.
func TestProvidersFileOfAnotherUserIsRefused(t *testing.T) {
	needRoot(t, "making a file another user's needs root")
	path := writeProviders(t, 0o644, `{"providers":{"p":{"client_id":"cli","token_url":"https://auth.example/token"}}}`)
	if err := os.Chown(path, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if _, err := loadProviders(path, true); err == nil || !strings.Contains(err.Error(), "belongs to uid 65534, not to you") {
		t.Fatalf("loadProviders of uid 65534's file: %v", err)
	}
}
