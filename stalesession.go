package credproxy

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// abandonedAfter is how old an empty session directory, or a socket that
// refuses connections, must be to be taken for what a killed proxy left:
// younger, another proxy may be about to listen there (a socket refuses
// connections between its bind and its listen).
const abandonedAfter = time.Minute

// removeStale removes from base, the per-user socket directory, what a
// proxy that was killed left there: sockets that nothing listens on,
// session directories that held only such sockets, and empty session
// directories older than abandonedAfter. A socket that answers, and
// anything that is not a socket or a session directory of this user, is
// left alone.
func removeStale(base string) {
	entries, err := os.ReadDir(base)
	if err != nil {
		return
	}
	for _, e := range entries {
		path := filepath.Join(base, e.Name())
		switch {
		case e.Type()&os.ModeSocket != 0 && strings.HasPrefix(e.Name(), "llxprt-cred-"):
			removeIfDead(path)
		case e.IsDir() && strings.HasPrefix(e.Name(), "session-"):
			removeSessionIfStale(path)
		}
	}
}

// removeSessionIfStale removes a session directory whose sockets are all
// dead, or that is empty and old; it leaves one that holds anything else.
func removeSessionIfStale(dir string) {
	if _, err := checkOwnDir(dir, "session directory"); err != nil {
		return
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	if len(entries) == 0 {
		if fi, err := os.Lstat(dir); err == nil && time.Since(fi.ModTime()) > abandonedAfter {
			os.Remove(dir)
		}
		return
	}
	for _, e := range entries {
		if e.Type()&os.ModeSocket == 0 || !removeIfDead(filepath.Join(dir, e.Name())) {
			return
		}
	}
	os.Remove(dir) // fails, harmlessly, if something appeared meanwhile
}

// removeIfDead removes the socket at path if nothing listens on it and it
// is older than abandonedAfter, and reports whether it did.
func removeIfDead(path string) bool {
	if fi, err := os.Lstat(path); err != nil || time.Since(fi.ModTime()) < abandonedAfter {
		return false
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return false
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return false
	}
	return os.Remove(path) == nil
}
