package main

import (
	"fmt"
	"syscall"

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

// commandAttr is how run starts CMD: with SIGKILL as its parent-death
// signal (PR_SET_PDEATHSIG), so that CMD dies with run, as bwrap's
// --die-with-parent does, rather than run on with no proxy behind its
// socket and nobody to close its session. The kernel sends it when the
// thread that started CMD ends; the Go runtime ends threads only when a
// goroutine locked to one returns, and run locks none. A run that dies
// before the child sets the signal is caught too: os/exec's child checks
// its parent after the prctl.
func commandAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
