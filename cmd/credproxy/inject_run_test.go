//go:build unix

package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/credproxy/credproxy"
)

// writeInjectFiles writes a providers file whose openai member is the
// built-in one pointed at api (its CA in a ca_file), and an import file
// with the real openai key, and returns their paths.
func writeInjectFiles(t *testing.T, api *fakeAPI, caPEM []byte) (providersFile, credsFile string) {
	t.Helper()
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	openai := builtinInject["openai"]
	openai.Upstream, openai.CAFile = api.URL+"/v1", caFile
	provs, _ := json.Marshal(map[string]any{"providers": map[string]any{"openai": map[string]any{"inject": openai}}})
	for file, data := range map[string]string{"ca.pem": string(caPEM), "providers.json": string(provs),
		"creds.json": `{"keys":{"openai":"` + realOpenAIKey + `"}}`} {
		if err := os.WriteFile(filepath.Join(dir, file), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, "providers.json"), filepath.Join(dir, "creds.json")
}

// run -inject openai, with no sandbox: a plain HTTP request through
// forward, with the phantom run put in OPENAI_API_KEY, reaches the
// upstream with the real key; the key itself stays out of reach over the
// credential socket, since -inject grants the route, not the key.
func TestRunInjectForwardsWithTheRealKeyButGrantsNoKey(t *testing.T) {
	needTool(t, "bash", "bash")
	caPEM, cert := testCA(t)
	api := newFakeAPI(t, cert)
	provs, creds := writeInjectFiles(t, api, caPEM)
	script := `exec 5<>"/dev/tcp/${LLXPRT_INJECT_ADDR%:*}/${LLXPRT_INJECT_ADDR##*:}"
		printf 'POST /openai/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}' "$OPENAI_API_KEY" >&5
		tail -n 1 <&5; exec 5<&-; echo
		echo "base URL: $OPENAI_BASE_URL"
		credproxy key get -raw openai || echo "key refused"`
	env := append(hostEnv(t), "PATH="+filepath.Dir(binary)+":"+os.Getenv("PATH"))
	r := credproxyCmd(t, env, "", "run", "-store", "memory", "-import", creds, "-providers", provs, "-inject", "openai",
		"-inject-addr", "127.0.0.1:9", "--", "credproxy", "forward", "-listen", "127.0.0.1:0", "--", "bash", "-c", script)
	if r.code != 0 || !strings.Contains(r.stdout, "Hi from the fake OpenAI") || !strings.Contains(r.stdout, "key refused") ||
		!strings.Contains(r.stdout, "base URL: http://127.0.0.1:9/openai\n") || !strings.Contains(r.stderr, "API key not allowed") {
		t.Fatalf("run -inject openai: %+v", r)
	}
	if seen, problems := api.credentials(); len(seen["openai"]) != 1 || seen["openai"][0] != "Bearer "+realOpenAIKey || len(problems) > 0 {
		t.Errorf("the upstream got %q (%q); want the real key once", seen, problems)
	}
	if strings.Contains(r.stdout+r.stderr, realOpenAIKey) {
		t.Errorf("the real key was printed")
	}
}

// serve -inject prints, after the socket and the token, the variables a
// launcher gives the sandbox: the front's socket, forward's address, the
// phantom and the route's base URL and key variables.
func TestServeInjectPrintsTheSandboxsVariables(t *testing.T) {
	caPEM, cert := testCA(t)
	provs, creds := writeInjectFiles(t, newFakeAPI(t, cert), caPEM)
	cmd, lines := startCredproxy(t, "serve", "-store", "memory", "-import", creds, "-providers", provs, "-inject", "openai")
	env := []string{lines.Text()}
	for len(env) < 7 && lines.Scan() {
		env = append(env, lines.Text())
	}
	socket := envValue(env, credproxy.InjectSocketEnv)
	phantom := envValue(env, injectPhantomEnv)
	if fi, err := os.Stat(socket); err != nil || fi.Mode()&os.ModeSocket == 0 || !strings.HasPrefix(phantom, "cp-phantom-") ||
		envValue(env, "OPENAI_API_KEY") != phantom || envValue(env, "OPENAI_BASE_URL") != "http://127.0.0.1:8787/openai" ||
		envValue(env, injectAddrEnv) != "127.0.0.1:8787" {
		t.Errorf("serve -inject printed:\n%s", strings.Join(env, "\n"))
	}
	cmd.Process.Kill()
}

// -inject-addr, like forward's -listen, must be a loopback IP address: the
// base URLs given to the sandbox name it.
func TestRunInjectRefusesANonLoopbackAddress(t *testing.T) {
	r := credproxyCmd(t, hostEnv(t), "", "run", "-store", "memory", "-inject", "openai", "-inject-addr", "0.0.0.0:8787", "--", "true")
	if r.code != exitNoProxy || !strings.Contains(r.stderr, "-inject-addr") || !strings.Contains(r.stderr, "loopback") {
		t.Errorf("run -inject-addr 0.0.0.0:8787: %+v", r)
	}
}
