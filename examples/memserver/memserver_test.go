package main

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/credproxy/credproxy"
)

// TestNodeClientConformance runs interop/node/conformance.mjs, a client
// written in JavaScript from PROTOCOL.md alone, against this program: every
// behaviour the document states must hold for a client in another language.
// It needs Node.js 20 or later; without it the test is skipped, unless
// CREDPROXY_REQUIRE_NODE is set (as .ci/run sets it), when it fails.
func TestNodeClientConformance(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		if os.Getenv("CREDPROXY_REQUIRE_NODE") != "" {
			t.Fatal("node not found and CREDPROXY_REQUIRE_NODE is set")
		}
		t.Skip("node not found; install Node.js 20+ to run the cross-language conformance check")
	}
	bin := filepath.Join(t.TempDir(), "memserver")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(node, "../../interop/node/conformance.mjs", bin).CombinedOutput()
	summary := ""
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "not ok") || strings.HasPrefix(line, "conformance:") {
			summary += line + "\n"
		}
	}
	if err != nil {
		t.Fatalf("conformance run failed: %v\n%s", err, out)
	}
	t.Logf("%s", summary)
	if !strings.Contains(summary, " 0 failed") {
		t.Errorf("unexpected summary:\n%s", out)
	}
}

// With -token-url, refresh_token goes to that OAuth2 token endpoint: the
// sandbox gets the new access token, and the host keeps the rotated
// refresh token.
func TestRefreshThroughTokenEndpoint(t *testing.T) {
	var calls atomic.Int32
	endpoint := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		id, secret, ok := r.BasicAuth()
		if r.ParseForm() != nil || r.PostForm.Get("refresh_token") != "fake-refresh-1" || !ok || id != "cli" || secret != "fake-secret" {
			w.WriteHeader(400)
			fmt.Fprint(w, `{"error":"invalid_grant"}`)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"access_token":"fake-access-2","token_type":"Bearer","expires_in":3600,"refresh_token":"fake-refresh-2"}`)
	}))
	defer endpoint.Close()

	dir := t.TempDir()
	bin := filepath.Join(dir, "memserver")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	creds := filepath.Join(dir, "creds.json")
	os.WriteFile(creds, []byte(`{"tokens":{"anthropic":{"default":{"access_token":"fake-access-1","refresh_token":"fake-refresh-1","expiry":1}}}}`), 0o600)
	cmd := exec.Command(bin, "-tokens", creds, "-token-url", endpoint.URL, "-client-id", "cli", "-client-secret", "fake-secret")
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	path, ok := strings.CutPrefix(strings.TrimSpace(line), credproxy.SocketEnv+"=")
	if err != nil || !ok {
		t.Fatalf("first line %q: %v", line, err)
	}
	c, err := credproxy.Dial(context.Background(), path, credproxy.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tok, err := c.RefreshToken(context.Background(), "anthropic", "")
	if err != nil || string(tok.AccessToken()) != "fake-access-2" || tok.RefreshToken() != "" {
		t.Fatalf("RefreshToken = %q, %v", string(tok.AccessToken()), err)
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("token endpoint calls = %d, want 1", n)
	}
}
