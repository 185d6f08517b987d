//go:build !linux

package main

// protectProcess does nothing here: only Linux has PR_SET_DUMPABLE. On
// other systems a process of the same uid may read this one's environment
// (on macOS, ps -E does) and memory, so keep the store's password out of
// the environment there: type it at the prompt instead.
func protectProcess() error { return nil }
