package main

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/credproxy/credproxy"
)

// The README's keyring walk-through works as written: a token and an API
// key put into the file store by one process are served by another, with
// the refresh token kept on the host; SIGTERM stops the server and removes
// its socket.
func TestPutThenServe(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "keyringserver")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	env := append(os.Environ(),
		credproxy.KeyringPasswordEnv+"=fake-store-password", credproxy.KeyringBackendEnv+"=",
		"XDG_CONFIG_HOME="+t.TempDir(), credproxy.SocketEnv+"=")
	command := func(stdin string, args ...string) *exec.Cmd {
		cmd := exec.Command(bin, args...)
		cmd.Env = env
		cmd.Stdin = strings.NewReader(stdin)
		return cmd
	}
	for _, c := range []struct {
		stdin string
		args  []string
	}{
		{`{"access_token":"fake-access","refresh_token":"fake-refresh-stays-home","expiry":4102444800}`, []string{"put-token", "anthropic"}},
		{"sk-fake-key\n", []string{"put-key", "openai"}},
	} {
		if out, err := command(c.stdin, c.args...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", c.args, err, out)
		}
	}

	server := command("", "serve", "-allow-provider", "anthropic")
	stdout, err := server.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := server.Start(); err != nil {
		t.Fatal(err)
	}
	defer server.Process.Kill()
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() {
		t.Fatal("serve printed nothing")
	}
	path, ok := strings.CutPrefix(lines.Text(), credproxy.SocketEnv+"=")
	if !ok {
		t.Fatalf("first line %q", lines.Text())
	}

	ctx := context.Background()
	c, err := credproxy.Dial(ctx, path, credproxy.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tok, err := c.GetToken(ctx, "anthropic", "")
	if err != nil || string(tok.Reveal()) != `{"access_token":"fake-access","expiry":4102444800}` {
		t.Fatalf("GetToken = %s, %v", tok.Reveal(), err)
	}
	if key, err := c.GetAPIKey(ctx, "openai"); err != nil || key != "sk-fake-key" {
		t.Fatalf("GetAPIKey: %v", err)
	}

	server.Process.Signal(syscall.SIGTERM)
	if err := server.Wait(); err != nil {
		t.Fatalf("serve after SIGTERM: %v", err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
}
