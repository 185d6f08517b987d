//go:build unix

package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// listenFDsStart is the first descriptor systemd passes (SD_LISTEN_FDS_START).
const listenFDsStart = 3

// systemdListener returns the socket systemd passed this process by socket
// activation, with the path it is bound to, or a nil listener when there is
// none. It is sd_listen_fds(3) written out (the protocol is a few lines; a
// library for it would be a dependency for less than this file): the
// socket is ours when LISTEN_PID is our pid, and LISTEN_FDS counts the
// descriptors from 3 on. It unsets LISTEN_PID, LISTEN_FDS and
// LISTEN_FDNAMES whoever they were meant for, so that no process serve
// starts takes them for its own, and marks the passed descriptors
// close-on-exec.
//
// serve takes exactly one socket, a listening Unix stream socket: a TCP
// socket would pass Serve but every connection would then be refused,
// since peer credentials exist for Unix sockets only, and that failure
// belongs at start, in words that name the unit's setting.
func systemdListener() (net.Listener, string, error) {
	pid, fds, names := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS"), os.Getenv("LISTEN_FDNAMES")
	for _, v := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		os.Unsetenv(v)
	}
	if pid == "" || fds == "" {
		return nil, "", nil
	}
	if p, err := strconv.Atoi(pid); err != nil || p != os.Getpid() {
		return nil, "", nil // meant for another process, a parent shell's say
	}
	n, err := strconv.Atoi(fds)
	if err != nil || n < 0 {
		return nil, "", fmt.Errorf("LISTEN_FDS is %q, not a number of sockets", fds)
	}
	for fd := listenFDsStart; fd < listenFDsStart+n; fd++ {
		unix.CloseOnExec(fd)
	}
	switch {
	case n == 0:
		return nil, "", nil
	case n > 1:
		named := ""
		if names != "" {
			named = " (" + strings.ReplaceAll(names, ":", ", ") + ")"
		}
		return nil, "", fmt.Errorf("systemd passed %d sockets%s and serve takes one: give the socket unit exactly one ListenStream=, a path such as %%t/credproxy/credproxy.sock, and no other Listen line", n, named)
	}
	path, err := listeningUnixSocket(listenFDsStart)
	if err != nil {
		return nil, "", fmt.Errorf("descriptor %d from systemd (LISTEN_FDS) %w; serve needs ListenStream= with a path, such as %%t/credproxy/credproxy.sock", listenFDsStart, err)
	}
	f := os.NewFile(listenFDsStart, "systemd socket "+path)
	defer f.Close() // FileListener holds a duplicate
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, "", fmt.Errorf("descriptor %d from systemd: %w", listenFDsStart, err)
	}
	return ln, path, nil
}

// listeningUnixSocket returns the address fd, a listening Unix stream
// socket, is bound to (a path; an abstract socket is refused), or an
// error that completes "descriptor 3 ..." with what it is instead.
func listeningUnixSocket(fd int) (string, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if errors.Is(err, unix.ENOTSOCK) {
		return "", errors.New("is not a socket")
	}
	if err != nil {
		return "", fmt.Errorf("is not a usable socket: getsockopt SO_TYPE: %w", err)
	}
	if typ != unix.SOCK_STREAM {
		return "", errors.New("is not a stream socket (ListenDatagram= or ListenSequentialPacket=?)")
	}
	listening, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	if err != nil {
		return "", fmt.Errorf("is not a usable socket: getsockopt SO_ACCEPTCONN: %w", err)
	}
	if listening == 0 {
		return "", errors.New("is not listening (Accept=yes passes a connection, not the socket)")
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return "", fmt.Errorf("is not a usable socket: getsockname: %w", err)
	}
	ua, ok := sa.(*unix.SockaddrUnix)
	if !ok {
		return "", errors.New("is not a Unix socket (a port or an IP address in ListenStream=?)")
	}
	if ua.Name == "" || ua.Name[0] == '@' || ua.Name[0] == 0 {
		// An abstract socket has no file: no mode to keep others out,
		// and any process in the network namespace reaches it, sandboxes
		// that share the host's network included, with no mount.
		return "", fmt.Errorf("is an abstract or unnamed Unix socket (%q), which any process in the network namespace reaches, with no file mode to stop it", ua.Name)
	}
	return ua.Name, nil
}

// groupOrOthersCanConnect reports whether the socket file at path lets
// processes of other users connect: connecting takes write permission.
// The peer-uid check refuses them anyway; the warning is for a unit whose
// SocketMode= was left at systemd's default, 0666.
func groupOrOthersCanConnect(path string) (os.FileMode, bool) {
	if path == "" || strings.HasPrefix(path, "@") {
		return 0, false // abstract: no file, and no permissions
	}
	fi, err := os.Stat(path)
	if err != nil {
		return 0, false // not reachable from here: nothing to judge
	}
	return fi.Mode().Perm(), fi.Mode().Perm()&0o022 != 0
}
