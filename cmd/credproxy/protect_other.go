//go:build !linux

package main

import "syscall"

// protectProcess does nothing here: only Linux has PR_SET_DUMPABLE. On
// other systems a process of the same uid may read this one's environment
// (on macOS, ps -E does) and memory, so keep the store's password out of
// the environment there: type it at the prompt instead.
func protectProcess() error { return nil }

// commandAttr is how run starts CMD: as os/exec would. Only Linux (and
// FreeBSD, not handled here) can have CMD die with run; elsewhere kill
// CMD's process group, or let the sandbox watch its parent.
func commandAttr() *syscall.SysProcAttr { return nil }
