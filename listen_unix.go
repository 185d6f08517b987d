//go:build unix

package credproxy

import (
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// maxSocketPathLen is the longest usable socket path: the size of sun_path
// (108 bytes on Linux, 104 on macOS and the BSDs), less its terminating NUL.
const maxSocketPathLen = len(unix.RawSockaddrUnix{}.Path) - 1

// fileOwner returns the uid that owns the file fi describes.
func fileOwner(fi os.FileInfo) (uid int, ok bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return int(st.Uid), true
}
