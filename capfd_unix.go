//go:build unix

package credproxy

import (
	"errors"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// readCapabilityFD reads descriptor 3 and closes it. A memory file or a
// regular file is read from its start without moving its offset, so that
// other processes sharing it can read it too; a pipe is read to its end.
// A descriptor that is neither is left alone: the runtime may have put
// something of its own at 3 when the launcher passed nothing there.
func readCapabilityFD() ([]byte, error) {
	var st unix.Stat_t
	if err := unix.Fstat(capabilityFD, &st); err != nil {
		return nil, errorf("%s is set, but file descriptor 3 is not open (%w); the launcher must pass the capability token there", CapabilityFDEnv, err)
	}
	if mode := st.Mode & unix.S_IFMT; mode != unix.S_IFREG && mode != unix.S_IFIFO {
		return nil, errorf("%s is set, but file descriptor 3 is neither a pipe nor a file; the launcher must pass the capability token there", CapabilityFDEnv)
	}
	f := os.NewFile(capabilityFD, "capability token")
	defer f.Close()
	const limit = capabilityTokenLen + 2 // enough to tell a token from more
	buf := make([]byte, limit)
	n, err := f.ReadAt(buf, 0)
	if errors.Is(err, syscall.ESPIPE) {
		var data []byte
		data, err = io.ReadAll(io.LimitReader(f, limit))
		n = copy(buf, data)
	}
	if err != nil && err != io.EOF {
		return nil, errorf("read the capability token from file descriptor 3: %w", err)
	}
	return buf[:n], nil
}
