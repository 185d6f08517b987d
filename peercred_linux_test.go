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
	// The test binary's own directory is private; copy it where the other
	// uid can run it.
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	helper := filepath.Join(dir, "helper")
	if err := os.WriteFile(helper, self, 0o755); err != nil {
		t.Fatal(err)
	}

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

			cmd := exec.Command(helper)
			cmd.Env = append(os.Environ(), "CREDPROXY_TEST_PEER_SOCKET="+path)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("helper as uid 65534: %v\n%s", err, out)
			}
			if got := strings.TrimSpace(string(out)); got != tc.want {
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
