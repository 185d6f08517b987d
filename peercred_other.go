//go:build !linux && !darwin

package credproxy

import (
	"errors"
	"net"
	"runtime"
)

// peerCreds cannot identify the peer on this platform. The server logs a
// warning once and serves the connection as an unknown [Peer]; the socket's
// file mode and its unguessable name are the defence.
func peerCreds(*net.UnixConn) (Peer, error) {
	return Peer{}, errorf("peer credentials on %s: %w", runtime.GOOS, errors.ErrUnsupported)
}
