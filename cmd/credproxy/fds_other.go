//go:build !unix

package main

import "os"

// inheritNothing does nothing here: a process started by os/exec inherits
// only the handles it is given.
func inheritNothing() {}

// capabilityFile returns nil: only on Unix does the client read the
// capability token from descriptor 3.
func capabilityFile() *os.File { return nil }
