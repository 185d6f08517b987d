package credproxy

import (
	"net"

	"golang.org/x/sys/unix"
)

// peerCreds reads the credentials the kernel recorded for the process that
// connected c (SO_PEERCRED): its uid, gid and pid at connect time.
func peerCreds(c *net.UnixConn) (Peer, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return Peer{}, errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Peer{}, errorf("peer credentials: %w", err)
	}
	if serr != nil {
		return Peer{}, errorf("getsockopt SO_PEERCRED: %w", serr)
	}
	return Peer{uid: cred.Uid, gid: cred.Gid, pid: cred.Pid, hasIDs: true}, nil
}
