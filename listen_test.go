package credproxy

import (
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// Issue 15, item 8: ListenPath replaces only a socket that does not
// answer. A regular file, a directory or a link at the path is someone's
// data, or a trap, and is left alone, with an error saying what is there.
func TestListenPathRemovesOnlyAStaleSocket(t *testing.T) {
	dir := testSocketDir(t)
	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("data"), 0o600)
	empty := filepath.Join(dir, "empty")
	os.Mkdir(empty, 0o700)
	link := filepath.Join(dir, "link")
	os.Symlink(file, link)
	for _, tc := range []struct{ path, want string }{
		{file, "is a regular file"},
		{empty, "is a directory"},
		{link, "is a symbolic link"},
	} {
		before, _ := os.Lstat(tc.path)
		ln, err := ListenPath(tc.path)
		if err == nil {
			ln.Close()
			t.Errorf("ListenPath(%s) succeeded over what %s", tc.path, tc.want)
		} else if !strings.Contains(err.Error(), tc.path) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ListenPath(%s): %v, want the path and %q", tc.path, err, tc.want)
		}
		if after, err := os.Lstat(tc.path); err != nil || !os.SameFile(before, after) || after.Mode() != before.Mode() {
			t.Errorf("%s was replaced or removed: %v", tc.path, err)
		}
	}
	if data, _ := os.ReadFile(file); string(data) != "data" {
		t.Errorf("the file now holds %q", data)
	}
}

// Issue 15, item 8: a test author can listen in t.TempDir(), which is
// 0755 and, with an ordinary subtest name, too long for the usual socket
// name. A directory the caller owns that nobody else may write to is safe
// for a socket that is itself 0600; one that others may write to is not.
func TestListenInTestTempDir(t *testing.T) {
	t.Run("an ordinary subtest, named as people name them/with a part", func(t *testing.T) {
		dir := t.TempDir()
		ln, err := Listen(dir)
		if err != nil {
			t.Fatalf("Listen(%s), a %d-byte directory: %v", dir, len(dir), err)
		}
		defer ln.Close()
		si, err := os.Stat(ln.Addr().String())
		if err != nil || si.Mode()&fs.ModeSocket == 0 || si.Mode().Perm() != 0o600 {
			t.Errorf("socket %s: %v, %v; want a socket with mode 0600", ln.Addr(), si.Mode(), err)
		}
		c, err := net.Dial("unix", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	})
	t.Run("others may write", func(t *testing.T) {
		dir := t.TempDir()
		for _, mode := range []os.FileMode{0o775, 0o757} {
			os.Chmod(dir, mode)
			if ln, err := Listen(dir); err == nil {
				ln.Close()
				t.Errorf("Listen in a %#o directory succeeded", mode)
			} else if want := "writable by group or others"; !strings.Contains(err.Error(), want) {
				t.Errorf("Listen in a %#o directory: %v, want %q", mode, err, want)
			}
		}
	})
	t.Run("too long even for the short name", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), strings.Repeat("d", maxSocketPathLen))
		_, err := Listen(dir)
		if err == nil || !strings.Contains(err.Error(), strconv.Itoa(maxSocketPathLen)+"-byte limit") {
			t.Errorf("Listen in a %d-byte directory: %v, want the limit named", len(dir), err)
		}
	})
}
