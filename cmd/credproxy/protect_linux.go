package main

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// protectProcess makes this process non-dumpable: no core dumps, no ptrace
// by processes of the same uid, and its /proc files (environ and mem among
// them) owned by root. It holds the store's password and the session's
// token, and the command it runs, a sandbox launcher, runs as the same
// user: PR_SET_DUMPABLE is what keeps it from reading them.
func protectProcess() error {
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_DUMPABLE, 0): %w; refusing to hold the host's secrets in a process the sandbox's launcher could read", err)
	}
	return nil
}
