//go:build unix

package main

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/credproxy/credproxy"
)

// Issue 15, item 4: when stdin carries the secret, the password prompt
// reads the terminal (/dev/tty), not stdin. In a pty (script), the token
// is piped into token set, and the new store's password is typed at the
// terminal; the token is stored, and reads back with that password.
func TestPasswordPromptReadsTheTerminalWhenStdinCarriesTheSecret(t *testing.T) {
	needTool(t, "script", "util-linux") // for a pty
	env := hostEnv(t)
	var noPassword []string
	for _, kv := range env {
		if !strings.HasPrefix(kv, credproxy.KeyringPasswordEnv+"=") {
			noPassword = append(noPassword, kv)
		}
	}
	shell := `printf '%s' '{"access_token":"fake-at-TTY"}' | ` + binary + ` token set p`
	cmd := exec.Command("script", "-qec", shell, "/dev/null")
	cmd.Env = noPassword
	// What script reads on its stdin is typed at the pty: the password,
	// twice, for a new store.
	cmd.Stdin = strings.NewReader(fakePassword + "\n" + fakePassword + "\n")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "New password") {
		t.Fatalf("token set with the token on stdin, in a pty: %v\n%s", err, out)
	}
	r := credproxyCmd(t, env, "", "token", "get", "p")
	r.want(t, 0, `{"access_token":"fake-at-TTY"}`+"\n")
}
