//go:build unix

package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/credproxy/credproxy"
)

// onePrefix fails the test unless every line of stderr that carries the
// credproxy: prefix carries it once; a path ending in /credproxy: (the
// store's directory) is not a prefix.
func onePrefix(t *testing.T, stderr string) {
	t.Helper()
	for line := range strings.Lines(stderr) {
		if strings.Count(line, "credproxy:")-strings.Count(line, "/credproxy:") > 1 {
			t.Errorf("two prefixes in %q", line)
		}
	}
}

// Issue 15, item 3: an error printed by the command carries one
// credproxy: prefix, though the library's errors carry their own, and a
// token that is not there says how to find the ones that are.
func TestErrorsCarryOnePrefix(t *testing.T) {
	env := hostEnv(t)
	r := credproxyCmd(t, env, `{}`, "token", "set", "p")
	r.want(t, 1, "")
	onePrefix(t, r.stderr)
	if !strings.HasPrefix(r.stderr, "credproxy: the token on stdin: invalid token: access_token is required") {
		t.Errorf("token set {}: stderr %q", r.stderr)
	}
	credproxyCmd(t, env, tokenJSON, "token", "set", "anthropic").want(t, 0, "")
	r = credproxyCmd(t, env, "", "token", "get", "nosuch")
	r.want(t, 1, "")
	onePrefix(t, r.stderr)
	if !strings.Contains(r.stderr, "no token for provider nosuch bucket default") || !strings.Contains(r.stderr, "credproxy token ls") {
		t.Errorf("token get nosuch: stderr %q", r.stderr)
	}
	r = credproxyCmd(t, env, "", "key", "get", "nosuch")
	r.want(t, 1, "")
	onePrefix(t, r.stderr)
	if !strings.Contains(r.stderr, "no API key nosuch") || !strings.Contains(r.stderr, "credproxy key ls") {
		t.Errorf("key get nosuch: stderr %q", r.stderr)
	}
}

// Issue 15, item 3: set with nothing on stdin says that stdin is empty,
// rather than that the nothing is not a JSON object.
func TestSetWithEmptyStdinSaysStdinIsEmpty(t *testing.T) {
	env := hostEnv(t)
	for _, tc := range []struct{ stdin, cmd string }{{"", "token"}, {"\n", "token"}, {"", "key"}, {"\n", "key"}} {
		r := credproxyCmd(t, env, tc.stdin, tc.cmd, "set", "p")
		r.want(t, 1, "")
		onePrefix(t, r.stderr)
		if !strings.Contains(r.stderr, "stdin is empty") {
			t.Errorf("%s set with stdin %q: stderr %q", tc.cmd, tc.stdin, r.stderr)
		}
	}
}

// Issue 15, item 6: an unknown token or key command is named, with the
// ones there are, before the arguments are counted or the store opened.
func TestUnknownSubcommandIsNamedFirst(t *testing.T) {
	for _, args := range [][]string{{"token", "bogus"}, {"token", "bogus", "x"}, {"token", "bogus", "x", "y", "z"},
		{"key", "bogus"}, {"key", "bogus", "x", "y"}, {"key", "-raw", "bogus"}} {
		env := hostEnv(t)
		r := credproxyCmd(t, env, "", args...)
		r.want(t, 2, "")
		want := `unknown ` + args[0] + ` command "bogus"; use get, set, rm or ls`
		if !strings.Contains(r.stderr, want) {
			t.Errorf("credproxy %v: stderr %q, want %q", args, r.stderr, want)
		}
		if _, err := os.Stat(filepath.Join(envValue(env, "XDG_CONFIG_HOME"), "credproxy")); !os.IsNotExist(err) {
			t.Errorf("credproxy %v opened the store: %v", args, err)
		}
	}
}

// Issue 15, item 6: help that was asked for goes to stdout and exits 0;
// a usage error goes to stderr and exits 2. --version and version -help
// work.
func TestHelpAskedForGoesToStdout(t *testing.T) {
	for _, args := range [][]string{{"-help"}, {"--help"}, {"-h"}, {"help"}, {"token", "-help"}, {"token", "set", "-help"},
		{"token", "get", "-h"}, {"key", "--help"}, {"key", "ls", "-help"}, {"run", "-help"}, {"serve", "-help"}, {"version", "-help"}, {"help", "providers"}, {"help", "login"}} {
		r := credproxyCmd(t, hostEnv(t), "", args...)
		if r.code != 0 || !strings.Contains(r.stdout, "Usage:") || r.stderr != "" {
			t.Errorf("credproxy %v: exit %d, stdout %q, stderr %q; want exit 0, the help on stdout", args, r.code, r.stdout, r.stderr)
		}
	}
	for _, args := range [][]string{{}, {"bogus"}, {"token"}, {"token", "-bogus"}, {"token", "get"}, {"key", "set", "-raw"},
		{"serve", "-bogus"}, {"version", "x"}, {"help", "nosuch"}} {
		r := credproxyCmd(t, hostEnv(t), "", args...)
		if r.code != 2 || r.stdout != "" || !strings.HasPrefix(r.stderr, "credproxy") {
			t.Errorf("credproxy %v: exit %d, stdout %q, stderr %q; want exit 2, an error on stderr", args, r.code, r.stdout, r.stderr)
		}
		onePrefix(t, r.stderr)
	}
	for _, flag := range []string{"--version", "-version"} {
		if r := credproxyCmd(t, hostEnv(t), "", flag); r.code != 0 || !strings.HasPrefix(r.stdout, "credproxy ") {
			t.Errorf("credproxy %s: %+v", flag, r)
		}
	}
}

// Issue 15, item 6: run exits 125 for its own errors, flag errors
// included, 127 when CMD is not found and 126 when it cannot be executed,
// as container runtimes do; otherwise with CMD's status.
func TestRunExitCodes(t *testing.T) {
	env := pathEnv(t)
	notExec := filepath.Join(t.TempDir(), "script")
	if err := os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{"run", "-bogus", "--", "true"}, 125},
		{[]string{"run", "-store", "memory"}, 125},
		{[]string{"run", "-store", "nosuch", "--", "true"}, 125},
		{[]string{"run", "-store", "memory", "--", "credproxy-no-such-command"}, 127},
		{[]string{"run", "-store", "memory", "--", filepath.Join(t.TempDir(), "missing")}, 127},
		{[]string{"run", "-store", "memory", "--", notExec}, 126},
		{[]string{"run", "-store", "memory", "--", t.TempDir()}, 126},
		{[]string{"run", "-store", "memory", "--", "sh", "-c", "exit 3"}, 3},
	} {
		r := credproxyCmd(t, env, "", tc.args...)
		if r.code != tc.code {
			t.Errorf("credproxy %v: exit %d, want %d; stderr %q", tc.args, r.code, tc.code, r.stderr)
		}
		if tc.code >= 125 && !strings.Contains("\n"+r.stderr, "\ncredproxy: ") {
			t.Errorf("credproxy %v: stderr %q, want a reason", tc.args, r.stderr)
		}
		onePrefix(t, r.stderr)
	}
}

// Issue 15, item 4: a command that only reads, on a machine with no store
// yet, says so and how to make one, instead of creating a store or asking
// for its password. ls lists nothing and succeeds; get fails.
func TestReadOnlyCommandsWithoutAStoreSayThereIsNone(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{"token", "ls"}, 0}, {[]string{"token", "ls", "p"}, 0}, {[]string{"token", "get", "p"}, 1},
		{[]string{"token", "rm", "p"}, 1}, {[]string{"key", "ls"}, 0}, {[]string{"key", "get", "k"}, 1},
	} {
		for _, password := range []string{fakePassword, ""} {
			env := append(hostEnv(t), "CREDPROXY_KEYRING_PASSWORD="+password)
			r := credproxyCmd(t, env, "", tc.args...)
			r.want(t, tc.code, "")
			if !strings.Contains(r.stderr, "no credential store") || !strings.Contains(r.stderr, "set") {
				t.Errorf("credproxy %v (password %q): stderr %q", tc.args, password, r.stderr)
			}
			if _, err := os.Stat(filepath.Join(envValue(env, "XDG_CONFIG_HOME"), "credproxy")); !os.IsNotExist(err) {
				t.Errorf("credproxy %v created the store: %v", tc.args, err)
			}
		}
	}
}

// Issue 15, item 6: a flag after the names is a flag, not a name.
func TestFlagsAfterNamesAreFlags(t *testing.T) {
	env := hostEnv(t)
	credproxyCmd(t, env, tokenJSON, "token", "set", "anthropic").want(t, 0, "")
	credproxyCmd(t, env, fakeKey, "key", "set", "openai").want(t, 0, "")
	credproxyCmd(t, env, "", "token", "get", "anthropic", "-with-refresh-token").want(t, 0, tokenJSON+"\n")
	credproxyCmd(t, env, "", "key", "get", "openai", "-raw").want(t, 0, fakeKey+"\n")
	credproxyCmd(t, env, "", "key", "get", "-raw", "openai").want(t, 0, fakeKey+"\n")
}

// Issue 15, item 3: token set takes the credential file of an agent CLI
// as it is on disk (here Claude Code's, with its expiry in milliseconds),
// stores the token format, and says what it converted.
func TestTokenSetConvertsAnAgentCLIFile(t *testing.T) {
	env := hostEnv(t)
	file := `{"claudeAiOauth":{"accessToken":"fake-at-CLAUDE","refreshToken":"fake-rt-CLAUDE","expiresAt":1893456000123,"subscriptionType":"max"}}`
	r := credproxyCmd(t, env, file, "token", "set", "anthropic")
	r.want(t, 0, "")
	onePrefix(t, r.stderr)
	if !strings.Contains(r.stderr, `took the token inside "claudeAiOauth"`) || !strings.Contains(r.stderr, "from milliseconds") {
		t.Errorf("token set said %q; want it to say what it converted", r.stderr)
	}
	r = credproxyCmd(t, env, "", "token", "get", "anthropic", "-with-refresh-token")
	r.want(t, 0, `{"access_token":"fake-at-CLAUDE","refresh_token":"fake-rt-CLAUDE","expiry":1893456000,"subscriptionType":"max"}`+"\n")
}

// Taking the library's prefixes out of an error leaves the paths in it
// whole: the store's default directory ends in credproxy, and a wrong
// password named ~/.config/ instead of ~/.config/credproxy.
func TestErrorsKeepPathsThatEndInCredproxy(t *testing.T) {
	env := hostEnv(t)
	credproxyCmd(t, env, tokenJSON, "token", "set", "anthropic").want(t, 0, "")
	dir := filepath.Join(envValue(env, "XDG_CONFIG_HOME"), "credproxy")
	wrong := append(env, credproxy.KeyringPasswordEnv+"=not-the-password")
	r := credproxyCmd(t, wrong, "", "token", "ls")
	onePrefix(t, r.stderr)
	if r.code != 1 || !strings.Contains(r.stderr, dir+": ") {
		t.Errorf("token ls with a wrong password: exit %d, stderr %q; want the store's directory %s named whole", r.code, r.stderr, dir)
	}
	for _, tc := range []struct{ in, want string }{
		{"credproxy: a: credproxy: b", "a: b"},
		{"the store in /x/credproxy: it was created", "the store in /x/credproxy: it was created"},
		{"credproxy: open /home/u/.config/credproxy: permission denied", "open /home/u/.config/credproxy: permission denied"},
		{"x; credproxy: y", "x; y"},
	} {
		if got := message(errors.New(tc.in)); got != tc.want {
			t.Errorf("message(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
