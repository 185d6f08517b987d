//go:build !unix

package main

import "os"

// terminalSentToo reports false: without Unix process groups, run forwards
// every signal it relays.
func terminalSentToo(os.Signal, int) bool { return false }
