//go:build unix

package credproxy

import (
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// Issue 15, item 5: the session directories and sockets a killed proxy
// left in the per-user socket directory are removed when the next session
// starts there (an injection front's socket with the session's), but only
// those that do not answer: a live session of another server is left
// alone, and so is an empty directory too young to
// be abandoned (another proxy may be creating its session in it).
func TestNewSessionRemovesWhatAKilledProxyLeft(t *testing.T) {
	t.Setenv("TMPDIR", testSocketDir(t))
	base, err := DefaultSocketDir()
	if err != nil {
		t.Fatal(err)
	}
	if base, err = ensurePrivateDir(base, "socket directory"); err != nil {
		t.Fatal(err)
	}
	// A live session of another server.
	other, err := NewServer(Options{Store: NewMemoryStore()})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	live, err := other.NewSession(SessionOptions{Policy: &Grant{Keys: []string{"k"}},
		Routes: []Route{{Name: "k", Upstream: "https://api.example.com", Key: "k"}}})
	if err != nil {
		t.Fatal(err)
	}
	// What a killed proxy leaves: a session directory with a socket that
	// nothing listens on, a bare stale socket, and an old empty directory.
	dead := filepath.Join(base, "session-deadbeef")
	deadSock := filepath.Join(dead, "llxprt-cred-1-deadbeef.sock")
	deadInject := filepath.Join(dead, "inject.sock")
	bareSock := filepath.Join(base, "llxprt-cred-1-cafebabe.sock")
	oldEmpty := filepath.Join(base, "session-0ldd1r00")
	young := filepath.Join(base, "session-y0un9d1r")
	for _, d := range []string{dead, oldEmpty, young} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{deadSock, deadInject, bareSock} {
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: p, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		l.SetUnlinkOnClose(false)
		l.Close()
	}
	long := time.Now().Add(-time.Hour)
	for _, p := range []string{oldEmpty, deadSock, deadInject, bareSock} {
		os.Chtimes(p, long, long)
	}

	srv, err := NewServer(Options{Store: NewMemoryStore()})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ss, err := srv.NewSession(SessionOptions{Policy: &Grant{}})
	if err != nil {
		t.Fatal(err)
	}
	defer ss.Close()
	for _, gone := range []string{dead, bareSock, oldEmpty} {
		if _, err := os.Lstat(gone); !os.IsNotExist(err) {
			t.Errorf("%s is still there (%v)", gone, err)
		}
	}
	for _, kept := range []string{live.Dir(), live.SocketPath(), live.InjectSocketPath(), young} {
		if _, err := os.Lstat(kept); err != nil {
			t.Errorf("%s was removed: %v", kept, err)
		}
	}
}

// A session that has bound its socket and not yet listened (inside
// net.ListenUnix) refuses connections for a moment, as a dead one does:
// another session's cleanup leaves its socket and directory alone, since
// a refused socket is removed only once it is older than abandonedAfter.
// (Found by a reviewer: the cleanup removed both, and the starting
// session failed.)
func TestStaleCleanupSparesASessionStartingNow(t *testing.T) {
	base := testSocketDir(t)
	dir := filepath.Join(base, "session-starting")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	sock := filepath.Join(dir, "llxprt-cred-1-deadbeef.sock")
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: sock}); err != nil {
		t.Fatal(err)
	}
	removeStale(base) // another session starting now, between bind and listen
	if _, err := os.Lstat(sock); err != nil {
		t.Errorf("the starting session's socket was removed between bind and listen: %v", err)
	}
}
