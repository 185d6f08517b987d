package main

import (
	"context"
	"fmt"
	"os/signal"
	"strings"
	"syscall"

	"github.com/credproxy/credproxy"
)

const serveSynopsis = `Usage: credproxy serve [flags]

Serves one credential proxy session until SIGINT, SIGTERM or SIGHUP, then
closes it, shuts down gracefully and removes the socket. Stdout gets two lines:
LLXPRT_CREDENTIAL_SOCKET=<path> and LLXPRT_CAPABILITY_TOKEN=<token>. Hand the
token to the sandboxed program on its file descriptor 3, as the 64 characters
and a newline (with LLXPRT_CAPABILITY_FD=3), never in its environment or
arguments, and mount the socket's directory, read-only. Unlike run, serve
cannot keep its own environment (the store password, say) from the sandbox:
start the sandbox with a clean one. Logs go to stderr. As with run, the
tokens of the providers in the providers file are refreshed on the host. serve makes itself
non-dumpable, as run does. With -inject, the lines that follow are the
variables run gives CMD for the injection ('credproxy run -help' says
what they are): give them to the sandbox as they are, and run
'credproxy forward' in it.

Started by systemd socket activation (LISTEN_PID and LISTEN_FDS; the README
has a user unit pair), serve serves the one listening Unix socket systemd
passes instead, prints nothing on stdout, and on SIGINT, SIGTERM or SIGHUP
shuts down and leaves the socket to systemd; -session-dir does not apply.
There is no session and no capability token then: every process that can
connect to the socket gets the grant. The boundary is the socket's
permissions (SocketMode=0600, in a directory only its user can reach:
DirectoryMode=0700) and the peer-uid check, so mount the socket's directory
only into sandboxes of that user, and start a serve of its own, with a
socket of its own, for each grant. serve warns if the socket's mode lets
other users connect.`

const serveExample = `  coproc CP { exec credproxy serve -allow-provider anthropic; }   # exec: $CP_PID is serve
  read -r sock <&"${CP[0]}"; read -r tok <&"${CP[0]}"
  sock=${sock#*=}
  bwrap --unshare-all --die-with-parent --cap-drop ALL --clearenv ... \
    --ro-bind "$(dirname "$sock")" "$(dirname "$sock")" \
    --setenv LLXPRT_CREDENTIAL_SOCKET "$sock" --setenv LLXPRT_CAPABILITY_FD 3 \
    -- agent 3<<<"${tok#*=}"     # bash 5.1 and later: a pipe, not a file
  kill "$CP_PID"; wait "$CP_PID"  # closes the session`

func serveCommand(ctx context.Context, args []string, std stdio) error {
	fs := newFlags("serve", serveSynopsis, serveExample, std)
	var p proxyFlags
	p.register(fs)
	if err := parseProxyFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError("serve takes no arguments; did you mean 'credproxy run -- %s'?", strings.Join(fs.Args(), " "))
	}
	if err := protectProcess(); err != nil {
		return err
	}
	// SIGHUP too: a terminal closing or a shell logging out must not
	// leave the socket and session directory behind.
	ctx, cancel := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer cancel()
	ln, path, err := systemdListener()
	if err != nil {
		return err
	}
	if ln != nil {
		return p.serveActivated(ctx, ln, path, std)
	}
	sess, stop, err := p.start(ctx, std)
	if err != nil {
		return err
	}
	fmt.Fprintf(std.out, "%s=%s\n%s=%s\n", credproxy.SocketEnv, sess.SocketPath(), capabilityTokenLine, string(sess.CapabilityToken()))
	if p.injected != nil {
		for _, kv := range p.injected.environ(sess.InjectSocketPath(), string(sess.Phantom()), p.injectAddr) {
			fmt.Fprintln(std.out, kv)
		}
	}
	<-ctx.Done()
	return stop()
}

// capabilityTokenLine names the token in serve's output, as the reference
// implementation's launcher names it. Clients do not read it from their
// environment: it goes to them on descriptor 3.
const capabilityTokenLine = "LLXPRT_CAPABILITY_TOKEN"
