package main

import (
	"context"
	"fmt"
	"net"
)

// serveActivated serves the socket systemd passed (ln, bound to path)
// under the grant the flags give, until ctx ends, then shuts down
// gracefully. There is no session: the connections Serve accepts need no
// capability token, so the socket's permissions and the peer-uid check
// are all that keeps other processes out, which the help and the README
// say. It prints nothing on stdout, having no token to hand out, and
// leaves the socket file to systemd: a listener made from an inherited
// descriptor does not remove its file when it closes, and systemd keeps
// listening on it to start serve again at the next connection.
func (p *proxyFlags) serveActivated(ctx context.Context, ln net.Listener, path string, std stdio) error {
	if p.sessionDir != "" {
		ln.Close()
		return usageError("-session-dir has no use when systemd passes the socket: serve makes no session then; drop the flag, or the socket unit")
	}
	if len(p.inject) > 0 {
		ln.Close()
		return usageError("-inject needs a session, and serve makes none when systemd passes the socket: use 'credproxy run -inject', or serve without socket activation")
	}
	srv, store, err := p.newServer(ctx, std, &p.grant)
	if err != nil {
		ln.Close()
		return err
	}
	if mode, open := groupOrOthersCanConnect(path); open {
		fmt.Fprintf(std.err, "credproxy: warning: the socket %s has mode %04o, so processes of other users may connect (the peer-uid check still refuses them); set SocketMode=0600 in the socket unit\n", path, mode)
	}
	p.logger(std).Info("credproxy: serving the socket from systemd, without a capability token", "socket", path, "grant", p.grant.String())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
	case err := <-served: // the listener failed, not a shutdown
		shutdown(srv, store)
		return err
	}
	err = shutdown(srv, store)
	<-served // ErrServerClosed, now that Serve has returned
	return err
}
