package credproxy

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"time"
)

// DefaultSocketDir returns the per-user socket directory, without creating
// it: {realpath(os.TempDir())}/llxprt-cred-{uid}. [Listen] puts sockets
// in it, and [Server.NewSession] puts each session's directory in it.
func DefaultSocketDir() (string, error) {
	tmp, err := filepath.EvalSymlinks(os.TempDir())
	if err != nil {
		return "", errorf("resolve the temp directory: %w", err)
	}
	return filepath.Join(tmp, "llxprt-cred-"+strconv.Itoa(os.Getuid())), nil
}

// Listen creates a socket named llxprt-cred-{pid}-{nonce}.sock in dir, or
// in [DefaultSocketDir] when dir is "", and listens on it; see [ListenPath]
// for the checks it makes. The nonce is 8 hex digits from crypto/rand, so
// the name cannot be guessed. Pass the listener to [Server.Serve] and its
// address (l.Addr().String()) to the client in [SocketEnv].
//
// A directory that holds several sockets must not be mounted into a
// sandbox: the sandbox would reach them all. Give each sandbox a
// [Session] ([Server.NewSession]), whose directory holds its socket only.
func Listen(dir string) (*net.UnixListener, error) {
	if dir == "" {
		var err error
		if dir, err = DefaultSocketDir(); err != nil {
			return nil, err
		}
	}
	var nonce [4]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return nil, errorf("socket nonce: %w", err)
	}
	name := fmt.Sprintf("llxprt-cred-%d-%s.sock", os.Getpid(), hex.EncodeToString(nonce[:]))
	return ListenPath(filepath.Join(dir, name))
}

// ListenPath listens on a Unix socket at path, carefully (PROTOCOL.md,
// "Socket" and "Sessions"):
//   - a relative path is made absolute, and symbolic links in the
//     directories above the socket are resolved;
//   - a path longer than the platform's sun_path allows is refused, never
//     truncated;
//   - the parent directory is created with mode 0700, and if it exists it
//     must be a real directory, owned by the effective uid and closed to
//     group and others, or ListenPath refuses to use it; every directory
//     above it must be owned by root or the effective uid and not be
//     writable by others unless it is sticky (as /tmp is), since whoever
//     can rename a directory on the path can put their own in its place;
//   - if something at path accepts connections, ListenPath fails with
//     "address already in use"; a stale file is removed;
//   - the socket is made 0600 before ListenPath returns. It is never more
//     open: the directory already keeps everyone else out.
//
// Closing the listener removes the socket file. The errors say what to fix,
// so a launcher can report them and stop before it starts a sandbox. A
// process of the same uid can still race the stale-file check; the private
// directory keeps everyone else from doing so.
func ListenPath(path string) (*net.UnixListener, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, errorf("socket path %s: %w", path, err)
	}
	if err := checkSocketPathLen(abs); err != nil {
		return nil, err
	}
	dir, err := ensurePrivateDir(filepath.Dir(abs), "socket directory")
	if err != nil {
		return nil, err
	}
	path = filepath.Join(dir, filepath.Base(abs)) // resolving links may have made it longer
	if err := checkSocketPathLen(path); err != nil {
		return nil, err
	}
	if _, err := os.Lstat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, errorf("listen on %s: address already in use by a running server", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, errorf("remove stale socket: %w", err)
		}
	}
	return listenPrivate(path)
}

// listenPrivate listens on a socket at path, in a private directory, and
// makes it 0600. It is never more open: the directory keeps everyone else
// out meanwhile.
func listenPrivate(path string) (*net.UnixListener, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, errorf("listen: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, errorf("chmod socket: %w", err)
	}
	return l, nil
}

// checkSocketPathLen refuses a socket path that does not fit sun_path,
// which the kernel would otherwise truncate.
func checkSocketPathLen(path string) error {
	if len(path) > maxSocketPathLen {
		return errorf("socket path %s is %d bytes, over the %d-byte limit of %s sockets; choose a shorter directory",
			path, len(path), maxSocketPathLen, runtime.GOOS)
	}
	return nil
}

// socketFile returns the file of a Unix listener's socket, or nil.
func socketFile(l net.Listener) os.FileInfo {
	ul, ok := l.(*net.UnixListener)
	if !ok || ul.Addr().String() == "" || ul.Addr().String()[0] == '@' {
		return nil
	}
	fi, err := os.Stat(ul.Addr().String())
	if err != nil {
		return nil
	}
	return fi
}

// keepReplacement stops closing l from removing its socket path when the
// file there is no longer the socket l listens on: someone deleted it and
// perhaps started another server at the same path, whose socket closing l
// would otherwise unlink.
func keepReplacement(l net.Listener, socket os.FileInfo) {
	ul, ok := l.(*net.UnixListener)
	if !ok || socket == nil {
		return
	}
	if now, err := os.Stat(ul.Addr().String()); err != nil || !os.SameFile(now, socket) {
		ul.SetUnlinkOnClose(false)
	}
}
