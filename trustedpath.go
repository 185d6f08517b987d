package credproxy

import (
	"os"
	"path/filepath"
	"runtime"
)

// The directories credproxy keeps sockets and stores in are trusted only if
// nobody but root and this process's uid can change what their paths lead
// to: OpenSSH's StrictModes rule. A user who owns (or may write to) any
// directory above a socket directory can rename it away after it was
// checked and put their own in its place; so every ancestor must be owned
// by root or by the effective uid, and not be writable by group or others
// unless it has the sticky bit, as /tmp does.

// ensurePrivateDir creates dir with mode 0700 if needed, and checks that it
// is a real directory that only the effective uid can use and that every
// directory above it is trusted. It returns dir as an absolute path with
// the symbolic links above it resolved. what names the directory in
// errors.
func ensurePrivateDir(dir, what string) (string, error) {
	return ensureDir(dir, what, checkPrivateDir)
}

// ensureSocketDir is ensurePrivateDir for the directory of a socket that
// [Listen] or [ListenPath] makes: it is created 0700, but one that exists
// may also be readable by group and others (0755, as t.TempDir() makes
// them), provided they cannot write to it. The socket itself is 0600, so
// reading the directory shows them its name and nothing more; writing to
// it would let them remove the socket and put their own in its place.
// Session directories, which sandboxes mount, stay 0700 (checkPrivateDir).
func ensureSocketDir(dir string) (string, error) {
	return ensureDir(dir, "socket directory", checkSocketDir)
}

// ensureDir creates dir with mode 0700 if needed, checks the directories
// above it, and checks dir itself with check.
func ensureDir(dir, what string, check func(dir, what string) error) (string, error) {
	dir, err := trustedParent(dir, what)
	if err != nil {
		return "", err
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !os.IsExist(err) {
		return "", errorf("create %s: %w", what, err)
	}
	return dir, check(dir, what)
}

// trustedParent makes path absolute, creates its parent directories (mode
// 0700) if they are missing, resolves symbolic links in them, and checks
// that each is trusted. It returns the resolved path; path itself is not
// checked.
func trustedParent(path, what string) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", errorf("%s %s: %w", what, path, err)
	}
	parent := filepath.Dir(abs)
	if err := os.MkdirAll(parent, 0o700); err != nil {
		return "", errorf("create the directories above %s %s: %w", what, abs, err)
	}
	if parent, err = filepath.EvalSymlinks(parent); err != nil {
		return "", errorf("%s %s: %w", what, abs, err)
	}
	for dir := parent; ; dir = filepath.Dir(dir) {
		if err := checkTrustedAncestor(dir, what, abs); err != nil {
			return "", err
		}
		if filepath.Dir(dir) == dir {
			break
		}
	}
	return filepath.Join(parent, filepath.Base(abs)), nil
}

// checkTrustedAncestor checks one directory above the directory at path.
func checkTrustedAncestor(dir, what, path string) error {
	if runtime.GOOS == "windows" {
		return nil // no owners or mode bits to check; ACLs are the user's
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return errorf("%s %s: %w", what, path, err)
	}
	if uid, ok := fileOwner(fi); ok && uid != 0 && uid != os.Geteuid() {
		return errorf("%s %s is inside %s, which is owned by uid %d (neither root nor this process's uid %d), who could replace it; choose a directory that only you and root control",
			what, path, dir, uid, os.Geteuid())
	}
	if fi.Mode().Perm()&0o022 != 0 && fi.Mode()&os.ModeSticky == 0 {
		return errorf("%s %s is inside %s, which others may write to (mode %#o, not sticky) and so could replace it; choose a directory that only you and root control",
			what, path, dir, fi.Mode().Perm())
	}
	return nil
}

// checkPrivateDir checks that dir is a real directory that only the
// effective uid can use.
func checkPrivateDir(dir, what string) error {
	return checkDirMode(dir, what, 0o077, "open to group or others; run chmod 700 on it")
}

// checkSocketDir checks that dir is a real directory of the effective uid
// that nobody else may write to (see ensureSocketDir).
func checkSocketDir(dir, what string) error {
	return checkDirMode(dir, what, 0o022, "writable by group or others, who could replace the socket; run chmod go-w on it")
}

// checkDirMode checks that dir is a real directory of the effective uid
// with none of the permission bits in forbidden; problem says what is
// wrong, and what to do, when it has some.
func checkDirMode(dir, what string, forbidden os.FileMode, problem string) error {
	fi, err := checkOwnDir(dir, what)
	if err == nil && runtime.GOOS != "windows" && fi.Mode().Perm()&forbidden != 0 {
		return errorf("%s %s has mode %#o, %s, or choose another directory", what, dir, fi.Mode().Perm(), problem)
	}
	return err
}

// checkOwnDir checks that dir is a real directory, not a symbolic link,
// owned by the effective uid, and returns what it found.
func checkOwnDir(dir, what string) (os.FileInfo, error) {
	fi, err := os.Lstat(dir)
	if err != nil {
		return nil, errorf("%s: %w", what, err)
	}
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		return nil, errorf("%s %s is a symbolic link; remove it, or choose another directory", what, dir)
	case !fi.IsDir():
		return nil, errorf("%s %s is not a directory; remove it, or choose another directory", what, dir)
	}
	if uid, ok := fileOwner(fi); ok && uid != os.Geteuid() {
		return nil, errorf("%s %s is owned by uid %d, not by this process's uid %d; remove it, or choose another directory",
			what, dir, uid, os.Geteuid())
	}
	return fi, nil
}
