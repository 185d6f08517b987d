//go:build unix

package credproxy

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// S2: the client asks the kernel which uid the server runs as, before the
// handshake that carries the capability token, and refuses a server of
// another user (one who took the socket's path, say) unless told to
// expect that uid. Root is trusted: it can read everything anyway.
func TestClientRefusesAServerOfAnotherUser(t *testing.T) {
	needRoot(t)
	dir := testSocketDir(t)
	os.Chmod(dir, 0o755)
	theirs := filepath.Join(dir, "theirs")
	os.Mkdir(theirs, 0o700)
	os.Chown(theirs, 65534, 65534)
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	helper := filepath.Join(dir, "helper")
	os.WriteFile(helper, self, 0o755)
	path := filepath.Join(theirs, "s.sock")
	cmd := exec.Command(helper, "-test.run=^$")
	cmd.Env = append(os.Environ(), "CREDPROXY_TEST_SERVE_AT="+path, "TMPDIR="+theirs)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "listening\n" {
		t.Fatalf("server helper as uid 65534: %q", line)
	}
	c, err := Dial(t.Context(), path, ClientOptions{CapabilityToken: Secret(strings.Repeat("a", 64))})
	if err == nil {
		c.Close()
		t.Fatal("the client talked to a server running as uid 65534")
	}
	if !errors.Is(err, ErrDenied) || !strings.Contains(err.Error(), "runs as uid 65534") {
		t.Errorf("error %v", err)
	}
	c, err = Dial(t.Context(), path, ClientOptions{ServerUIDs: []int{65534}})
	if err != nil {
		t.Fatalf("with ServerUIDs naming 65534: %v", err)
	}
	c.Close()
}
