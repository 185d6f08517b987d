package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/credproxy/credproxy"
)

// Inside the sandbox: the injecting front's socket, which run sets from the
// session, and the loopback address forward listens on.
const (
	injectAddrEnv      = "LLXPRT_INJECT_ADDR"
	defaultInjectAddr  = "127.0.0.1:8787"
	maxForwardedConns  = 64
	forwardDialTimeout = 10 * time.Second
)

const forwardSynopsis = `Usage: credproxy forward [-listen ADDR] [-- CMD [ARGS...]]

Runs inside the sandbox, which has no network but its own loopback. It
relays every TCP connection to ADDR to the session's injecting HTTP front,
the Unix socket that LLXPRT_INJECT_SOCKET names, byte for byte in both
directions (a half-close passes through, so streamed responses and
keep-alive work), so that an SDK that wants an http:// base URL reaches the
front: run -inject sets ANTHROPIC_BASE_URL=http://127.0.0.1:8787/anthropic
and the like. ADDR is -listen, else $LLXPRT_INJECT_ADDR (which run sets),
else 127.0.0.1:8787; it must be a loopback address written as one
(127.0.0.1 or [::1], not localhost). At most 64 connections are relayed at
once; more wait to be accepted. forward holds no credential: the SDK sends
the session's phantom credential, and the front, on the host, puts the real
one in its place.

With CMD, forward starts CMD once it listens, with its own environment
(LLXPRT_INJECT_ADDR set to the address it listens on) and, when
LLXPRT_CAPABILITY_FD is set, descriptor 3, forwards SIGINT, SIGTERM, SIGHUP
and SIGQUIT to it, and when CMD exits, closes every relayed connection and
exits with CMD's status (128 + the signal if one killed it; 125 for an error
of forward's own, 126 and 127 when CMD cannot be executed or found, as run).
Without CMD, it prints LLXPRT_INJECT_ADDR=ADDR on stdout once it listens and
serves until SIGINT or SIGTERM.`

const forwardExample = `  # On the host: run sets LLXPRT_INJECT_SOCKET, LLXPRT_INJECT_ADDR, ANTHROPIC_BASE_URL and
  # ANTHROPIC_API_KEY (the phantom); in the sandbox, forward makes the base URL reachable:
  credproxy run -session-dir /tmp/cp-sandbox -inject anthropic -- \
    bwrap --unshare-all --die-with-parent --cap-drop ALL --ro-bind /usr /usr --symlink usr/lib /lib \
      --symlink usr/lib64 /lib64 --symlink usr/bin /bin --proc /proc --dev /dev \
      --ro-bind /tmp/cp-sandbox /tmp/cp-sandbox --ro-bind "$(command -v credproxy)" /credproxy \
      -- /credproxy forward -- sh -c 'curl -sS "$ANTHROPIC_BASE_URL/v1/models" -H "Authorization: Bearer $ANTHROPIC_API_KEY"'`

func forwardCommand(args []string, std stdio) int {
	withCmd := slices.Contains(args, "--")
	fail := func(err error) int {
		if withCmd {
			return reportRun(err, std)
		}
		return report(err, std)
	}
	fs := newFlags("forward", forwardSynopsis, forwardExample, std)
	listen := fs.String("listen", "", "the loopback `address` to listen on (default: $"+injectAddrEnv+", else "+defaultInjectAddr+")")
	if err := parseFlags(fs, args); err != nil {
		return fail(err)
	}
	if fs.NArg() > 0 && !withCmd {
		return fail(usageError("forward takes a command only after --: credproxy forward [-listen ADDR] -- CMD [ARGS...]"))
	}
	addr, err := forwardAddr(*listen)
	if err != nil {
		return fail(err)
	}
	socket := os.Getenv(credproxy.InjectSocketEnv)
	if socket == "" {
		return fail(fmt.Errorf("%s is not set: forward relays to the socket of an injecting front, which 'credproxy run -inject NAME' names there", credproxy.InjectSocketEnv))
	}
	if fi, err := os.Stat(socket); err != nil || fi.Mode()&os.ModeSocket == 0 {
		return fail(fmt.Errorf("%s=%s is not a socket; mount the session's directory into the sandbox", credproxy.InjectSocketEnv, socket))
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fail(err)
	}
	f := newForwarder(socket, maxForwardedConns, std)
	served := make(chan error, 1)
	go func() { served <- f.serve(ln) }()
	defer func() {
		f.close()
		if err := <-served; err != nil {
			fmt.Fprintln(std.err, "credproxy: forward:", err)
		}
	}()
	if !withCmd {
		// Caught before the address is printed: a launcher may signal
		// forward as soon as it has read it.
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
		defer stop()
		fmt.Fprintf(std.out, "%s=%s\n", injectAddrEnv, ln.Addr())
		<-ctx.Done()
		return 0
	}
	return forwardedCommand(fs.Args(), ln.Addr().String(), std)
}

// forwardAddr is the address forward listens on: flag, else
// LLXPRT_INJECT_ADDR, else 127.0.0.1:8787. It must be a loopback IP and a
// port: the relay hands out the session's front to whoever connects, so it
// must not listen where anything outside the sandbox can reach it.
func forwardAddr(flag string) (string, error) {
	addr := flag
	if addr == "" {
		addr = os.Getenv(injectAddrEnv)
	}
	if addr == "" {
		addr = defaultInjectAddr
	}
	if err := checkLoopbackAddr(addr); err != nil {
		return "", fmt.Errorf("forward: %w", err)
	}
	return addr, nil
}

// forwardedCommand starts CMD (args) with LLXPRT_INJECT_ADDR set to addr and
// descriptor 3 passed on when it holds the capability token, relays
// signals to it, and returns the status forward exits with.
func forwardedCommand(args []string, addr string, std stdio) int {
	inheritNothing()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = std.in, std.out, std.err
	cmd.Env = append(withoutEnv(os.Environ(), injectAddrEnv), injectAddrEnv+"="+addr)
	cmd.SysProcAttr = commandAttr()
	if fd3 := capabilityFile(); fd3 != nil {
		cmd.ExtraFiles = []*os.File{fd3}
	}
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(signals)
	if err := cmd.Start(); err != nil {
		return reportStart(err, std)
	}
	return relaySignals(cmd, signals, std)
}

// forwarder relays the TCP connections accepted on its listener to the
// Unix socket at socket, at most cap(slots) at a time. Its methods are
// safe for concurrent use; close stops it and waits for every relay.
type forwarder struct {
	socket string
	std    stdio
	slots  chan struct{} // one per relay in flight
	done   chan struct{} // closed by close

	mu     sync.Mutex
	ln     net.Listener
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

func newForwarder(socket string, max int, std stdio) *forwarder {
	return &forwarder{socket: socket, std: std, slots: make(chan struct{}, max),
		done: make(chan struct{}), conns: make(map[net.Conn]struct{})}
}

// serve accepts connections on ln and relays each, until close; it then
// returns nil. It takes a slot before accepting, so that a connection past
// the cap waits in the listener's backlog rather than being dropped. A
// temporary accept error (out of descriptors) is retried after a pause.
func (f *forwarder) serve(ln net.Listener) error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		ln.Close()
		return nil
	}
	f.ln = ln
	f.mu.Unlock()
	for pause := time.Duration(0); ; {
		select {
		case f.slots <- struct{}{}:
		case <-f.done:
			return nil
		}
		c, err := ln.Accept()
		if err != nil {
			<-f.slots
			select {
			case <-f.done:
				return nil
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				pause = min(max(2*pause, 5*time.Millisecond), time.Second)
				fmt.Fprintf(f.std.err, "credproxy: forward: accept: %v; retrying in %v\n", err, pause)
				time.Sleep(pause)
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		pause = 0
		if !f.track(c, true) {
			c.Close()
			<-f.slots
			return nil
		}
		go func() {
			defer f.wg.Done()
			defer func() { <-f.slots }()
			defer f.untrack(c)
			f.relay(c)
		}()
	}
}

// relay dials the front and copies bytes both ways until both directions
// are done: the end of one direction is passed on as a half-close
// (CloseWrite), so that the other goes on; an error in either closes both
// connections, which ends the other.
func (f *forwarder) relay(c net.Conn) {
	up, err := net.DialTimeout("unix", f.socket, forwardDialTimeout)
	if err != nil {
		fmt.Fprintf(f.std.err, "credproxy: forward: cannot reach the injecting front: %v\n", err)
		return
	}
	if !f.track(up, false) {
		up.Close()
		return
	}
	defer f.untrack(up)
	var wg sync.WaitGroup
	wg.Go(func() { pipe(up, c) })
	pipe(c, up)
	wg.Wait()
}

// pipe copies src to dst, as io.Copy does (each read is written at once),
// then half-closes dst; on an error it closes both, so that the other
// direction's copy ends too.
func pipe(dst, src net.Conn) {
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		src.Close()
		return
	}
	if hc, ok := dst.(interface{ CloseWrite() error }); !ok || hc.CloseWrite() != nil {
		dst.Close()
	}
}

// track registers c, unless the forwarder is closed, and for a relay
// (accepted, a connection from the sandbox) adds it to the wait group,
// under the same lock as close, so that close's Wait never races an Add
// (which is why serve does not use wg.Go).
func (f *forwarder) track(c net.Conn, relay bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.conns[c] = struct{}{}
	if relay {
		f.wg.Add(1)
	}
	return true
}

// untrack closes c and forgets it.
func (f *forwarder) untrack(c net.Conn) {
	c.Close()
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
}

// close stops accepting, closes every relayed connection and waits for
// the relays to end. It may be called more than once.
func (f *forwarder) close() {
	f.mu.Lock()
	if !f.closed {
		f.closed = true
		close(f.done)
		if f.ln != nil {
			f.ln.Close()
		}
		for c := range f.conns {
			c.Close()
		}
	}
	f.mu.Unlock()
	f.wg.Wait()
}
