package credproxy

import (
	"net"

	"golang.org/x/sys/unix"
)

// peerCreds reads the credentials the kernel recorded for the process that
// connected c: LOCAL_PEERCRED for the uid and primary gid, LOCAL_PEERPID
// for the pid. The pid is informational; a failure to read it leaves it
// unknown rather than failing the connection.
func peerCreds(c *net.UnixConn) (Peer, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return Peer{}, errorf("peer credentials: %w", err)
	}
	var (
		cred    *unix.Xucred
		pid     int
		credErr error
		pidErr  error
	)
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptXucred(int(fd), unix.SOL_LOCAL, unix.LOCAL_PEERCRED)
		pid, pidErr = unix.GetsockoptInt(int(fd), unix.SOL_LOCAL, unix.LOCAL_PEERPID)
	}); err != nil {
		return Peer{}, errorf("peer credentials: %w", err)
	}
	if credErr != nil {
		return Peer{}, errorf("getsockopt LOCAL_PEERCRED: %w", credErr)
	}
	p := Peer{uid: cred.Uid, hasIDs: true}
	if cred.Ngroups > 0 {
		p.gid = cred.Groups[0]
	}
	if pidErr == nil {
		p.pid = int32(pid)
	}
	return p, nil
}
