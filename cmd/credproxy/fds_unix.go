//go:build unix

package main

import (
	"os"
	"runtime"
	"strconv"

	"github.com/credproxy/credproxy"
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

// capabilityFile returns descriptor 3 when LLXPRT_CAPABILITY_FD says it
// holds the session's capability token and it is a pipe or a file, as the
// client requires, so that a wrapper (forward) can pass it on to its
// command; else nil. Descriptor 3 is checked because the Go runtime may
// have put one of its own there when none was inherited.
func capabilityFile() *os.File {
	if os.Getenv(credproxy.CapabilityFDEnv) == "" {
		return nil
	}
	var st unix.Stat_t
	if unix.Fstat(3, &st) != nil {
		return nil
	}
	if mode := st.Mode & unix.S_IFMT; mode != unix.S_IFREG && mode != unix.S_IFIFO {
		return nil
	}
	return os.NewFile(3, "capability token")
}
