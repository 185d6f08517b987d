package credproxy

import (
	"errors"
	"fmt"
	"io/fs"
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
// the name cannot be guessed. When that name would not fit in sun_path (a
// test's t.TempDir() often is that long), the socket is named
// cp-{nonce}.sock instead, which is as hard to guess; if even that does
// not fit, Listen fails with an error naming the limit. Pass the listener
// to [Server.Serve] and its address (l.Addr().String()) to the client in
// [SocketEnv].
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
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, errorf("socket directory %s: %w", dir, err)
	}
	nonce := randomHex(4)
	short := "cp-" + nonce + ".sock"
	if err := checkSocketPathLen(filepath.Join(abs, short)); err != nil {
		return nil, err
	}
	if dir, err = ensureSocketDir(abs); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, fmt.Sprintf("llxprt-cred-%d-%s.sock", os.Getpid(), nonce))
	if len(path) > maxSocketPathLen {
		path = filepath.Join(dir, short)
	}
	return listenAt(path)
}

// ListenPath listens on a Unix socket at path, carefully (PROTOCOL.md,
// "Socket" and "Sessions"):
//   - a relative path is made absolute, and symbolic links in the
//     directories above the socket are resolved;
//   - a path longer than the platform's sun_path allows is refused, never
//     truncated;
//   - the parent directory is created with mode 0700. If it exists it must
//     be a real directory, owned by the effective uid, that group and
//     others may not write to (0700 and 0755 will do, 0775 will not), or
//     ListenPath refuses to use it: whoever may write to it could remove
//     the socket and put their own in its place. Every directory above it
//     must be owned by root or the effective uid and not be writable by
//     others unless it is sticky (as /tmp is), since whoever can rename a
//     directory on the path can put their own in its place;
//   - if a socket at path accepts connections, ListenPath fails with
//     "address already in use"; a socket that does not answer is stale and
//     is replaced. Anything else at path (a regular file, a directory, a
//     symbolic link) is left alone, and ListenPath fails saying what is
//     there;
//   - the socket is made 0600 before ListenPath returns.
//
// A directory others may read (0755) lets them see the socket's name, not
// connect to it: connecting needs write permission on the socket, which
// only the owner has. Between bind and that chmod the socket has the mode
// the umask leaves, which in such a directory a member of the group may
// connect through if the umask lets the group write (002); the server's
// peer check ([Options.AllowedUIDs]) still refuses such a peer. Where that
// is too much, use a 0700 directory, as [DefaultSocketDir] is.
//
// Closing the listener removes the socket file. The errors say what to fix,
// so a launcher can report them and stop before it starts a sandbox. A
// process of the same uid can still race the stale-socket check; a
// directory nobody else may write to keeps everyone else from doing so.
func ListenPath(path string) (*net.UnixListener, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, errorf("socket path %s: %w", path, err)
	}
	if err := checkSocketPathLen(abs); err != nil {
		return nil, err
	}
	dir, err := ensureSocketDir(filepath.Dir(abs))
	if err != nil {
		return nil, err
	}
	return listenAt(filepath.Join(dir, filepath.Base(abs)))
}

// listenAt listens at path, in a checked directory, replacing a stale
// socket there but nothing else.
func listenAt(path string) (*net.UnixListener, error) {
	if err := checkSocketPathLen(path); err != nil { // resolving links may have made it longer
		return nil, err
	}
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return listenPrivate(path)
	case err != nil:
		return nil, errorf("listen on %s: %w", path, err)
	case fi.Mode()&fs.ModeSocket == 0:
		return nil, errorf("listen on %s: the path %s, not a socket; remove it yourself if it is not needed, or choose another path",
			path, describeFile(fi))
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, errorf("listen on %s: address already in use by a running server", path)
	}
	if err := os.Remove(path); err != nil {
		return nil, errorf("remove stale socket: %w", err)
	}
	return listenPrivate(path)
}

// describeFile says what kind of file fi describes, after "the path".
func describeFile(fi fs.FileInfo) string {
	switch m := fi.Mode(); {
	case m.IsRegular():
		return "is a regular file"
	case m.IsDir():
		return "is a directory"
	case m&fs.ModeSymlink != 0:
		return "is a symbolic link"
	default:
		return fmt.Sprintf("holds a file of type %v", m.Type())
	}
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
