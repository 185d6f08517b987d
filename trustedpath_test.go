package credproxy

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// needRoot skips a test that must give files or processes to another uid,
// or fails it when CREDPROXY_REQUIRE_ROOT is set, as CI sets it, so that
// CI cannot pass without running it.
func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CREDPROXY_REQUIRE_ROOT") != "" {
		t.Fatal("needs root to act as another uid, and CREDPROXY_REQUIRE_ROOT is set")
	}
	t.Skip("needs root to act as another uid")
}

// S2: a socket directory is trusted only if every directory above it is
// owned by root or this uid and not writable by others unless sticky.
// Whoever owns a directory above it could rename the socket directory away
// after the checks and put their own in its place: a user owning the
// parent of a session directory must be refused, naming that parent.
func TestListenRefusesAnUntrustedAncestor(t *testing.T) {
	needRoot(t)
	base := testSocketDir(t)
	theirs := filepath.Join(base, "theirs")
	open := filepath.Join(base, "open")
	sticky := filepath.Join(base, "sticky")
	for dir, mode := range map[string]os.FileMode{theirs: 0o755, open: 0o777, sticky: 0o777 | os.ModeSticky} {
		os.Mkdir(dir, 0o700)
		os.Chmod(dir, mode)
	}
	if err := os.Chown(theirs, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ dir, want string }{
		{filepath.Join(theirs, "sockets"), "inside " + theirs + ", which is owned by uid 65534"},
		{filepath.Join(theirs, "a", "b"), "inside " + theirs + ", which is owned by uid 65534"},
		{filepath.Join(open, "sockets"), "inside " + open + ", which others may write to (mode 0777, not sticky)"},
	} {
		if ln, err := Listen(tc.dir); err == nil {
			ln.Close()
			t.Errorf("Listen(%s) succeeded", tc.dir)
		} else if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Listen(%s): %v, want it to say %q", tc.dir, err, tc.want)
		}
		srv := sessionServer(t, Options{Store: NewMemoryStore()})
		if _, err := srv.NewSession(SessionOptions{Policy: grantAll, Dir: tc.dir}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewSession in %s: %v", tc.dir, err)
		}
		if _, err := OpenKeyringStore(KeyringOptions{Backend: "file", Dir: tc.dir, Password: fixedPassword(fakeStorePassword)}); err == nil ||
			!strings.Contains(err.Error(), tc.want) {
			t.Errorf("OpenKeyringStore in %s: %v", tc.dir, err)
		}
	}
	ln, err := Listen(filepath.Join(sticky, "sockets"))
	if err != nil {
		t.Fatalf("Listen below a sticky directory like /tmp: %v", err)
	}
	ln.Close()
}

// S2: a relative socket path is made absolute, and symbolic links above
// the socket's directory are resolved, so the path handed to a sandbox
// means the same inside it.
func TestListenPathIsAbsoluteAndResolved(t *testing.T) {
	base := testSocketDir(t)
	real := filepath.Join(base, "real")
	os.Mkdir(real, 0o700)
	os.Symlink(real, filepath.Join(base, "link"))
	t.Chdir(base)
	ln, err := ListenPath(filepath.Join("link", "sockets", "s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	resolved, _ := filepath.EvalSymlinks(real)
	if got, want := ln.Addr().String(), filepath.Join(resolved, "sockets", "s.sock"); got != want {
		t.Errorf("address %s, want %s", got, want)
	}
	// The socket's own directory must be a real one (R3.2).
	if _, err := ListenPath(filepath.Join("link", "s.sock")); err == nil || !strings.Contains(err.Error(), "is a symbolic link") {
		t.Errorf("a socket directory that is a link: %v", err)
	}
}

// runServerHelper is the body of a helper process that serves a
// MemoryStore at path, as whatever uid it was started with, accepting
// root's connections too, until it is killed.
func runServerHelper(path string) int {
	srv, err := NewServer(Options{Store: NewMemoryStore(), AllowedUIDs: []int{0}})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	ln, err := ListenPath(path)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println("listening")
	srv.Serve(ln)
	return 0
}
