//go:build unix

package main

import (
	"fmt"
	"os"
	"syscall"
)

// checkConfigWriters refuses a providers file that someone other than
// this user (or root) could have written: it says where refresh tokens
// and client secrets are sent, so whoever writes it can have them. Its
// owner must be this user or root, and neither group nor others may
// write it, as OpenSSH asks of its configuration.
func checkConfigWriters(path string, fi os.FileInfo) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	if uid := int(st.Uid); uid != os.Geteuid() && uid != 0 {
		return fmt.Errorf("%s belongs to uid %d, not to you: whoever writes it decides where your tokens go; use a file of your own", path, uid)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("%s may be written by others (mode %04o): whoever writes it decides where your tokens go; chmod go-w it", path, fi.Mode().Perm())
	}
	return nil
}
