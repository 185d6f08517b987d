package credproxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
)

// makeDir creates the session's directory: dir, or a new one in the
// default socket directory.
func (ss *Session) makeDir(dir string) error {
	if dir == "" {
		base, err := DefaultSocketDir()
		if err != nil {
			return err
		}
		if base, err = ensurePrivateDir(base, "socket directory"); err != nil {
			return err
		}
		removeStale(base)
		dir = filepath.Join(base, "session-"+ss.id)
	}
	dir, err := trustedParent(dir, "session directory")
	if err != nil {
		return err
	}
	if err := ss.checkOwnDir(dir); err != nil {
		return err
	}
	switch err := os.Mkdir(dir, 0o700); {
	case err == nil:
		ss.madeDir = true
		// The umask may have narrowed the mode, never widened it; make
		// it exact anyway, as the checks below expect.
		if err := os.Chmod(dir, 0o700); err != nil {
			os.Remove(dir)
			return errorf("session directory: %w", err)
		}
	case errors.Is(err, os.ErrExist):
		if err := checkPrivateDir(dir, "session directory"); err != nil {
			return err
		}
		if !dirEmpty(dir) {
			return errorf("session directory %s is not empty (a run that was killed may have left it); remove it, or choose another directory", dir)
		}
	default:
		return errorf("create session directory: %w", err)
	}
	ss.dir = dir
	return nil
}

// checkOwnDir refuses a session directory that is, or holds, the per-user
// socket directory, where other sessions' directories are made, or that
// lies in the store's directory: a sandbox that mounts it would see what
// does not belong to it.
func (ss *Session) checkOwnDir(dir string) error {
	if base, err := DefaultSocketDir(); err == nil && within(base, dir) {
		return errorf("session directory %s is, or holds, the per-user socket directory %s, where other sessions' directories are made; choose a directory of its own", dir, base)
	}
	if ks, ok := ss.srv.opts.Store.(*KeyringStore); ok {
		if store, err := filepath.EvalSymlinks(ks.Dir()); err == nil && within(dir, store) {
			return errorf("session directory %s is inside the credential store's directory %s; choose a directory of its own", dir, store)
		}
	}
	return nil
}

// within reports whether path is dir or lies inside it.
func within(path, dir string) bool {
	return path == dir || strings.HasPrefix(path, strings.TrimSuffix(dir, string(filepath.Separator))+string(filepath.Separator))
}

func dirEmpty(dir string) bool {
	f, err := os.Open(dir)
	if err != nil {
		return false
	}
	defer f.Close()
	_, err = f.Readdirnames(1)
	return err == io.EOF
}

// listen listens on the session's socket, llxprt-cred-{pid}-{nonce}.sock
// in its directory, which holds nothing else but, with routes, the
// injection front's socket.
func (ss *Session) listen() (*net.UnixListener, error) {
	path := filepath.Join(ss.dir, fmt.Sprintf("llxprt-cred-%d-%s.sock", os.Getpid(), randomHex(4)))
	if err := checkSocketPathLen(path); err != nil {
		return nil, err
	}
	l, err := listenPrivate(path)
	if err != nil {
		return nil, err
	}
	ss.socket = path
	return l, nil
}

// removeDir removes what is left of the session's socket files and the
// directory, if the session created it.
func (ss *Session) removeDir() {
	sockets := []string{ss.socket}
	if ss.inject != nil {
		sockets = append(sockets, ss.inject.path)
	}
	for _, path := range sockets {
		if path == "" {
			continue
		}
		if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(path)
		}
	}
	if ss.madeDir {
		os.Remove(ss.dir) // only if empty: nothing else of anyone's is removed
	}
}
