//go:build unix

package main

import (
	"os"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// inheritNothing marks every descriptor this process inherited, but
// standard input, output and error, close-on-exec, so that none reaches
// the command run starts: a launcher's open files (a store item, a
// socket) must not leak into a sandbox by accident. Go opens its own
// close-on-exec already; the command gets descriptors 0 to 2 and the
// capability token's 3, which run passes on purpose.
func inheritNothing() {
	dir := "/proc/self/fd"
	if runtime.GOOS != "linux" {
		dir = "/dev/fd"
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
			unix.CloseOnExec(fd)
		}
	}
}
