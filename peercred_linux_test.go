package credproxy

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// R4.1: a process running as another uid is disconnected before anything
// is read or answered, even when the socket's file mode lets it in; with
// that uid in AllowedUIDs it is served.
func TestPeerWithOtherUIDIsDisconnected(t *testing.T) {
	needRoot(t)
	// An open directory and socket, so that only the uid check stands in
	// the way. Listen would refuse such a directory.
	dir, err := os.MkdirTemp("", "cp")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	helper := copyTestBinary(t, dir)

	for _, tc := range []struct {
		name    string
		allowed []int
		want    string
	}{
		{"refused", nil, "closed after 0 bytes"},
		{"allowed", []int{65534}, "reply " + string(handshakeOK)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logger, logs := debugLogger()
			srv, err := NewServer(Options{Store: defaultStore(t), Logger: logger, AllowedUIDs: tc.allowed})
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, tc.name+".sock")
			ln, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, 0o777); err != nil {
				t.Fatal(err)
			}
			served := make(chan error, 1)
			go func() { served <- srv.Serve(ln) }()
			defer func() { srv.Close(); <-served }()

			if got := connectAsNobody(t, helper, path); got != tc.want {
				t.Errorf("helper as uid 65534 saw %q, want %q", got, tc.want)
			}
			refusal := strings.Contains(logs.String(), "peer uid not allowed") && strings.Contains(logs.String(), `"uid":65534`)
			if refusal != (tc.allowed == nil) {
				t.Errorf("refusal logged = %v, want %v; log:\n%s", refusal, tc.allowed == nil, logs)
			}
			// The server's own uid is still served.
			own := dialRaw(t, path)
			own.handshake()
		})
	}
}

// copyTestBinary copies the test binary into dir, where another uid can
// run it (its own directory is private), and returns the copy's path.
func copyTestBinary(t *testing.T, dir string) string {
	t.Helper()
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	helper := filepath.Join(dir, "helper")
	if err := os.WriteFile(helper, self, 0o755); err != nil {
		t.Fatal(err)
	}
	return helper
}

// connectAsNobody runs helper as uid 65534 to connect to the socket at
// path and send a handshake (runPeerHelper), and returns what it saw.
func connectAsNobody(t *testing.T, helper, path string, env ...string) string {
	t.Helper()
	cmd := exec.Command(helper)
	cmd.Env = append(append(os.Environ(), "CREDPROXY_TEST_PEER_SOCKET="+path), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper as uid 65534: %v\n%s", err, out)
	}
	return strings.TrimSpace(string(out))
}

// The injection front identifies its peers as the session's socket does:
// a process of another uid is disconnected before anything is read or
// answered, even when the directory and socket modes let it in; with its
// uid in AllowedUIDs it is answered (404: "/" is no route).
func TestInjectFrontDisconnectsAPeerWithAnotherUID(t *testing.T) {
	needRoot(t)
	for _, allowed := range [][]int{nil, {65534}} {
		up := newUpstream(t, nil)
		srv, logs := injectServer(t, injectStore(t), Options{AllowedUIDs: allowed})
		sess := injectSession(t, srv, tokenRoute(up))
		// Open modes, so that only the uid check stands in the way.
		for path, mode := range map[string]os.FileMode{filepath.Dir(sess.Dir()): 0o755, sess.Dir(): 0o755, sess.InjectSocketPath(): 0o777} {
			if err := os.Chmod(path, mode); err != nil {
				t.Fatal(err)
			}
		}
		got := connectAsNobody(t, copyTestBinary(t, filepath.Dir(sess.Dir())), sess.InjectSocketPath(), "CREDPROXY_TEST_PEER_HTTP=1")
		refused := strings.Contains(logs.String(), `"reason":"peer uid not allowed","socket":"inject.sock"`)
		want := "reply HTTP/1.1 404 Not Found"
		if allowed == nil {
			want = "closed after 0 bytes"
		}
		if got != want || refused != (allowed == nil) {
			t.Errorf("AllowedUIDs %v: uid 65534 saw %q, refusal logged %v", allowed, got, refused)
		}
		if up.requests.Load() != 0 {
			t.Errorf("AllowedUIDs %v: a request reached the upstream", allowed)
		}
	}
}
