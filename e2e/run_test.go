package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/credproxy/credproxy/e2e/oidcprovider"
)

// needBwrap skips a test without bubblewrap, or fails it when
// CREDPROXY_REQUIRE_SANDBOXES is set, as CI sets it.
func needBwrap(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("bwrap"); err != nil {
		if os.Getenv("CREDPROXY_REQUIRE_SANDBOXES") != "" {
			t.Fatal("bwrap not found (Debian: apt-get install bubblewrap) and CREDPROXY_REQUIRE_SANDBOXES is set")
		}
		t.Skip("bwrap not found; install bubblewrap to run this sandbox test")
	}
}

// userinfoAccepts reports whether the provider's userinfo endpoint accepts
// accessToken.
func userinfoAccepts(t *testing.T, p *oidcprovider.Provider, accessToken string) bool {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), "GET", p.UserinfoURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+accessToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// acceptedOrSuperseded reports whether the provider accepts accessToken,
// or, if not, whether that is because the host has refreshed it since:
// the provider revokes an access token when the refresh token it came
// with is used (zitadel's example does, as some providers do), and the
// host renews 4 s tokens every 2 s or so, so the token a sandbox read may
// be gone by the time the test asks. The host's token must then be a
// newer one, which the provider accepts.
func acceptedOrSuperseded(t *testing.T, p *oidcprovider.Provider, h *host, accessToken string) bool {
	t.Helper()
	if userinfoAccepts(t, p, accessToken) {
		return true
	}
	now := h.token("demo")
	return now.AccessToken != accessToken && userinfoAccepts(t, p, now.AccessToken)
}

// The "done when": a user logs in, and a command in a bubblewrap
// sandbox with no network keeps getting a working access token past its
// first token's expiry, because run refreshes it on the host from the
// providers file. The provider issues tokens that live 4 s; the sandbox
// reads the token, waits until that token has expired, and reads it again.
// The second token is new, unexpired and accepted by the provider; the
// host's store now holds the rotated refresh token, the provider refuses
// the one login got (rotation), and no refresh token ever reached the
// sandbox.
func TestRunKeepsTheSandboxWorkingPastItsFirstTokensExpiry(t *testing.T) {
	needBwrap(t)
	p := startProvider(t, oidcprovider.Options{AccessTokenLifetime: 4 * time.Second})
	h := newHost(t, publicEntry(p))
	loginDemo(t, h)
	first := h.token("demo")
	if first.Expiry == 0 || first.Expiry > time.Now().Add(5*time.Second).Unix() {
		t.Fatalf("login stored expiry %d, want about 4 s from now", first.Expiry)
	}

	// Not in t.TempDir(): with this test's long name, the session's socket
	// path would pass the 107 bytes a Unix socket's path may have.
	tmp, err := os.MkdirTemp("", "e2e")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(tmp) })
	session := filepath.Join(tmp, "session")
	// Inside: read the token, wait (a bounded poll of the clock) until the
	// first token's expiry has passed, read it again.
	inside := `first=$(/credproxy token get demo) || exit 1
		i=0
		while [ "$(date +%s)" -le ` + strconv.FormatInt(first.Expiry, 10) + ` ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
		asked=$(date +%s)
		second=$(/credproxy token get demo) || exit 1
		echo "$first"; echo "$second"; echo "at $asked $(date +%s)"`
	r := h.run("run", "-session-dir", session, "-allow-provider", "demo", "--",
		"bwrap", "--unshare-all", "--die-with-parent", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr",
		"--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
		"--proc", "/proc", "--dev", "/dev", "--ro-bind", session, session, "--ro-bind", credproxyBin, "/credproxy",
		"--", "/bin/sh", "-c", inside)
	r.want(t, 0)
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 3 {
		t.Fatalf("sandbox printed %q; stderr:\n%s", r.stdout, r.stderr)
	}
	var seen [2]storedToken
	for i := range seen {
		if err := json.Unmarshal([]byte(lines[i]), &seen[i]); err != nil {
			t.Fatalf("token get in the sandbox printed %q: %v", lines[i], err)
		}
		if seen[i].RefreshToken != "" {
			t.Errorf("the sandbox got a refresh token")
		}
	}
	var at, got int64
	if _, err := fmt.Sscanf(lines[2], "at %d %d", &at, &got); err != nil {
		t.Fatalf("sandbox printed %q: %v", lines[2], err)
	}
	if got-at > 2 {
		// The cooldown after a refresh once held get_token's refresh of
		// an expired token: the sandbox waited 27 s.
		t.Errorf("the second token get took %d s", got-at)
	}
	if at <= first.Expiry {
		t.Fatalf("the sandbox read its second token at %d, before the first expired at %d", at, first.Expiry)
	}
	second := seen[1]
	if second.AccessToken == first.AccessToken || second.Expiry < at {
		t.Fatalf("past the first token's expiry (%d) the sandbox got %+v at %d, want a new, unexpired token",
			first.Expiry, second, at)
	}
	if !acceptedOrSuperseded(t, p, h, second.AccessToken) {
		t.Errorf("the provider refuses the token the sandbox got after the first expired, and no newer one replaced it")
	}
	if n := p.TokenCalls("refresh_token"); n < 1 {
		t.Errorf("the provider saw %d refreshes", n)
	}
	for _, secret := range []string{first.RefreshToken, fakePassword} {
		if strings.Contains(r.stdout, secret) {
			t.Errorf("the sandbox's output holds a host secret")
		}
	}
	now := h.token("demo")
	if now.RefreshToken == first.RefreshToken {
		t.Fatalf("the store still holds the refresh token login got; the provider rotates them on refresh")
	}
	_, err = refresh(t.Context(), p, first.RefreshToken)
	wantInvalidGrant(t, err)
	if _, err := refresh(t.Context(), p, now.RefreshToken); err != nil {
		t.Errorf("the refresh token the host saved does not refresh: %v", err)
	}
}

// serve refreshes on the host as run does: a client outside any sandbox,
// holding the session's socket and capability token as a launcher hands
// them over (descriptor 3), reads the token, waits past its expiry, and
// reads a new, valid one; serve then stops on SIGTERM with exit 0.
func TestServeRefreshesOnTheHostToo(t *testing.T) {
	p := startProvider(t, oidcprovider.Options{AccessTokenLifetime: 3 * time.Second})
	h := newHost(t, publicEntry(p))
	loginDemo(t, h)
	first := h.token("demo")

	srv := h.start(credproxyBin, nil, "", "serve", "-allow-provider", "demo")
	srv.await(`session started`)
	// serve prints the two lines once the session has started: wait for
	// the second (a bounded poll of its stdout file).
	for i := 0; i < 200 && strings.Count(srv.out(), "\n") < 2; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	var socket, capability string
	for _, line := range strings.Split(srv.out(), "\n") {
		if v, ok := strings.CutPrefix(line, socketEnv+"="); ok {
			socket = v
		}
		if v, ok := strings.CutPrefix(line, "LLXPRT_CAPABILITY_TOKEN="); ok {
			capability = v
		}
	}
	if socket == "" || capability == "" {
		t.Fatalf("serve printed %q", srv.out())
	}
	get := func() storedToken {
		t.Helper()
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		w.WriteString(capability + "\n")
		w.Close()
		defer r.Close()
		cmd := exec.Command(credproxyBin, "token", "get", "demo")
		cmd.Env = append(h.env, socketEnv+"="+socket, "LLXPRT_CAPABILITY_FD=3")
		cmd.ExtraFiles = []*os.File{r}
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("token get through serve: %v", err)
		}
		var tok storedToken
		if err := json.Unmarshal(out, &tok); err != nil || tok.RefreshToken != "" {
			t.Fatalf("token get through serve printed %q (%v)", out, err)
		}
		return tok
	}
	get()
	for time.Now().Unix() <= first.Expiry { // a bounded wait: 3 s tokens
		time.Sleep(100 * time.Millisecond)
	}
	asked := time.Now().Unix()
	second := get()
	switch {
	case second.AccessToken == first.AccessToken:
		t.Fatalf("past the first token's expiry serve gave it again")
	case second.Expiry < asked:
		t.Fatalf("at %d serve gave a token that expired at %d", asked, second.Expiry)
	case !acceptedOrSuperseded(t, p, h, second.AccessToken):
		t.Fatalf("the provider refuses the token serve gave past the first one's expiry, and no newer one replaced it")
	}
	srv.cmd.Process.Signal(syscall.SIGTERM)
	srv.wait().want(t, 0, "token refreshed")
}
