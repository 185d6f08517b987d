//go:build !unix

package main

// inheritNothing does nothing here: a process started by os/exec inherits
// only the handles it is given.
func inheritNothing() {}
