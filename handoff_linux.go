package credproxy

import (
	"os"

	"golang.org/x/sys/unix"
)

// handoffFile returns a sealed memory file holding content, positioned at
// its start: every process that inherits it can read it, none can change
// it, and it never touches a disk.
func handoffFile(content string) (*os.File, error) {
	fd, err := unix.MemfdCreate("credproxy-capability", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return pipeFile(content)
	}
	f := os.NewFile(uintptr(fd), "credproxy-capability")
	if _, err := f.WriteString(content); err != nil {
		f.Close()
		return nil, errorf("write the capability token: %w", err)
	}
	const seals = unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
		f.Close()
		return nil, errorf("seal the capability token's file: %w", err)
	}
	if _, err := f.Seek(0, 0); err != nil {
		f.Close()
		return nil, errorf("rewind the capability token's file: %w", err)
	}
	return f, nil
}
