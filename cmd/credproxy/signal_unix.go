//go:build unix

package main

import (
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// terminalSentToo reports whether CMD (pid) already got sig from the
// terminal, so that run must not forward it: sig is one the terminal sends
// its foreground process group (SIGINT for Ctrl-C, SIGQUIT for Ctrl-\),
// run's process group is that group, and CMD is still in it. A CMD that
// moved to a group or session of its own, or a run in the background or
// without a terminal (signalled by kill), gets run's copy instead.
//
// run keeps CMD in its own process group rather than giving CMD one of its
// own and forwarding everything: CMD then stays in the terminal's
// foreground group, so it can read the terminal, and Ctrl-Z and fg work
// as the shell expects, with no tcsetpgrp juggling in run.
func terminalSentToo(sig os.Signal, pid int) bool {
	if sig != syscall.SIGINT && sig != syscall.SIGQUIT {
		return false
	}
	tty, err := os.Open("/dev/tty")
	if err != nil {
		return false // no controlling terminal
	}
	defer tty.Close()
	fg, err := unix.IoctlGetInt(int(tty.Fd()), unix.TIOCGPGRP)
	if err != nil {
		return false
	}
	own := unix.Getpgrp()
	cmdGroup, err := unix.Getpgid(pid)
	return err == nil && fg == own && cmdGroup == own
}
