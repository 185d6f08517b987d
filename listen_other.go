//go:build !unix

package credproxy

import "os"

// maxSocketPathLen is the longest usable socket path: sun_path is 108
// bytes on Windows, terminating NUL included.
const maxSocketPathLen = 107

// fileOwner cannot tell a file's owner on this platform.
func fileOwner(os.FileInfo) (uid int, ok bool) { return 0, false }
