package credproxy

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"log"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httputil"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// InjectSocketEnv is the environment variable a launcher uses to tell a
// forwarder in the sandbox (credproxy forward) where the session's
// injection front listens ([Session.InjectSocketPath]).
const InjectSocketEnv = "LLXPRT_INJECT_SOCKET"

// injectSocketName is the injection front's socket in the session's
// directory.
const injectSocketName = "inject.sock"

// injectReadHeaderTimeout bounds the time from a connection's accept, or
// the end of its last request, to the end of a request's headers: a
// client trickling its headers (slowloris) is cut off after it. A
// variable so that a test can shorten it.
var injectReadHeaderTimeout = 10 * time.Second

// The injection front's bounds.
const (
	// injectMaxHeaderBytes bounds a request's headers (net/http adds 4
	// KiB of slack); more is answered with 431.
	injectMaxHeaderBytes = 64 << 10
	// injectReplayBuffer is the largest request body kept for a retry
	// after a 401 from a token route's upstream.
	injectReplayBuffer = 1 << 20
	// injectIdleTimeout closes a keep-alive connection with no request
	// for this long, when the session's IdleTimeout is longer or off.
	injectIdleTimeout = 2 * time.Minute
)

// phantomPrefix starts every phantom credential, so that one is easy to
// recognise in a sandbox's environment or a log.
const phantomPrefix = "cp-phantom-"

// InjectSocketPath returns the absolute path of the session's injection
// front, inject.sock in [Session.Dir], or "" when the session has no
// routes ([SessionOptions].Routes).
func (ss *Session) InjectSocketPath() string {
	if ss.inject == nil {
		return ""
	}
	return ss.inject.path
}

// Phantom returns the session's phantom credential: "cp-phantom-" and 48
// random hex characters, made for this session only. The sandbox's SDKs
// send it where they would send a real credential, and the injection
// front swaps it for the real one; it is worth nothing elsewhere, and
// nothing once the session has closed. Every session has one, routes or
// not. Printed forms of the Session never show it.
func (ss *Session) Phantom() Secret { return ss.phantom }

// injectFront is a session's injection front: an HTTP/1.1 server on
// inject.sock that forwards the requests of each route to its upstream,
// with the session's phantom credential replaced by the real one.
type injectFront struct {
	srv       *Server
	ss        *Session
	path      string
	routes    map[string]*route
	phantom   [32]byte // SHA-256 of the session's phantom
	transport http.RoundTripper
	closeIdle func() // closes the idle upstream connections of a transport of the session's own
	http      *http.Server
	proxy     *httputil.ReverseProxy
	ln        net.Listener
	ctx       context.Context // of every request; ends when the front closes
	cancel    context.CancelFunc
	maxConns  int

	mu       sync.Mutex
	conns    int
	fresh    map[net.Conn]struct{} // connections that have sent no request yet
	stopping bool                  // shutting down: fresh connections are closed
	closed   bool                  // no handler may start
	handlers sync.WaitGroup        // running handlers
}

// newInjectFront listens on inject.sock in the session's directory, for
// routes; serve starts serving.
func (ss *Session) newInjectFront(routes map[string]*route) (*injectFront, error) {
	s := ss.srv
	path := filepath.Join(ss.dir, injectSocketName)
	if err := checkSocketPathLen(path); err != nil {
		return nil, err
	}
	ln, err := listenPrivate(path)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ss.ctx)
	f := &injectFront{
		srv:      s,
		ss:       ss,
		path:     path,
		routes:   routes,
		phantom:  sha256.Sum256([]byte(ss.phantom)),
		ctx:      ctx,
		cancel:   cancel,
		maxConns: ss.maxConns,
		fresh:    make(map[net.Conn]struct{}),
	}
	f.transport, f.closeIdle = sessionTransport(s.opts.InjectTransport)
	errLog := log.New(&logWriter{s.log}, "", 0)
	idle := injectIdleTimeout
	if ss.idleTimeout > 0 {
		idle = min(idle, ss.idleTimeout)
	}
	f.proxy = &httputil.ReverseProxy{
		Rewrite:        f.rewrite,
		Transport:      injectTransport{f},
		FlushInterval:  -1, // every write reaches the sandbox at once: server-sent events as they come
		ErrorLog:       errLog,
		ErrorHandler:   f.proxyError,
		ModifyResponse: f.forwarded,
		BufferPool:     copyBuffers,
	}
	f.http = &http.Server{
		Handler:           f,
		ReadHeaderTimeout: injectReadHeaderTimeout,
		MaxHeaderBytes:    injectMaxHeaderBytes,
		IdleTimeout:       idle,
		ErrorLog:          errLog,
		ConnState:         f.connState,
		BaseContext:       func(net.Listener) context.Context { return f.ctx },
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if ic, ok := c.(*injectConn); ok {
				return context.WithValue(ctx, peerKey{}, ic.peer)
			}
			return ctx
		},
	}
	f.ln = &injectListener{Listener: ln, f: f}
	return f, nil
}

// sessionTransport returns the transport a session's front reaches its
// upstreams with: a clone of rt when it is an *http.Transport, so that
// the session's upstream connections are its own and close with it; rt
// itself when it is another RoundTripper; and one of our own when rt is
// nil.
func sessionTransport(rt http.RoundTripper) (http.RoundTripper, func()) {
	var t *http.Transport
	switch rt := rt.(type) {
	case nil:
		t = &http.Transport{
			Proxy:                  nil, // never a proxy from the environment
			DialContext:            (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			TLSClientConfig:        &tls.Config{MinVersion: tls.VersionTLS12},
			TLSHandshakeTimeout:    10 * time.Second,
			ForceAttemptHTTP2:      true,
			MaxIdleConns:           16,
			IdleConnTimeout:        90 * time.Second,
			ExpectContinueTimeout:  time.Second,
			MaxResponseHeaderBytes: 1 << 20,
			// The sandbox's own Accept-Encoding goes upstream as it is,
			// and the answer comes back as it was sent.
			DisableCompression: true,
		}
	case *http.Transport:
		t = rt.Clone()
	default:
		return rt, func() {}
	}
	return t, t.CloseIdleConnections
}

// serve serves the front until it is closed.
func (f *injectFront) serve() {
	f.http.Serve(f.ln) // returns once the front shuts down or closes
}

// enter registers a handler, unless the front has closed.
func (f *injectFront) enter() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.handlers.Add(1)
	return true
}

// close closes the front's listener and connections at once, cancels
// its requests in flight, and waits for its handlers. It may be called
// more than once, and concurrently.
func (f *injectFront) close() {
	f.cancel()
	f.http.Close()
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	f.handlers.Wait()
	f.closeIdle()
}

// shutdown stops accepting, lets the requests in flight finish (until
// ctx ends) and then closes the front. Connections that have not sent a
// request yet are closed at once, as idle ones are: net/http would wait
// 5 s for them.
func (f *injectFront) shutdown(ctx context.Context) {
	f.mu.Lock()
	f.stopping = true
	fresh := slices.Collect(maps.Keys(f.fresh))
	f.mu.Unlock()
	for _, c := range fresh {
		c.Close() // not under f.mu, which its Close takes
	}
	f.http.Shutdown(ctx)
	f.close()
}

// connState keeps track of the connections that have sent no request.
func (f *injectFront) connState(c net.Conn, state http.ConnState) {
	f.mu.Lock()
	stopping := f.stopping
	if state == http.StateNew && !stopping {
		f.fresh[c] = struct{}{}
	} else {
		delete(f.fresh, c)
	}
	f.mu.Unlock()
	if state == http.StateNew && stopping {
		c.Close()
	}
}

// peerKey is the context key of the peer of a request to the front.
type peerKey struct{}

// injectListener admits the connections to the front that the session's
// socket would: those of allowed uids, within the session's connection
// cap (the front's own).
type injectListener struct {
	net.Listener
	f *injectFront
}

// Accept returns the next connection the front may serve; connections
// it refuses are closed, and logged as refusals.
func (l *injectListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if ic := l.f.admit(c); ic != nil {
			return ic, nil
		}
	}
}

func (f *injectFront) admit(c net.Conn) net.Conn {
	s := f.srv
	peer, err := s.identify(c)
	switch {
	case err != nil:
		s.refused(f.ss, Peer{}, "connection", "cannot identify the peer", slog.String("socket", injectSocketName), slog.String("err", err.Error()))
		c.Close()
		return nil
	case !s.uidAllowed(peer):
		s.refused(f.ss, peer, "connection", "peer uid not allowed", slog.String("socket", injectSocketName))
		c.Close()
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.conns >= f.maxConns {
		s.refused(f.ss, peer, "connection", "connection cap reached", slog.String("socket", injectSocketName), slog.Int("cap", f.maxConns))
		c.Close()
		return nil
	}
	f.conns++
	return &injectConn{Conn: c, peer: peer, f: f}
}

// injectConn is a connection to the front, counted until it closes.
type injectConn struct {
	net.Conn
	peer Peer
	f    *injectFront
	once sync.Once
}

func (c *injectConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.f.mu.Lock()
		c.f.conns--
		c.f.mu.Unlock()
	})
	return err
}

// CloseWrite lets net/http half-close the connection after a response it
// ends the connection with, as it does for the Unix socket underneath.
func (c *injectConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// logWriter turns what net/http and httputil log into warnings of the
// server's logger, with anything that looks like a secret redacted.
type logWriter struct{ log *slog.Logger }

func (w *logWriter) Write(p []byte) (int, error) {
	w.log.Warn("credproxy: injection front", "err", redactCut(strings.TrimSpace(string(p))))
	return len(p), nil
}

// routeNames lists the routes' names for the log, sorted.
func routeNames(routes map[string]*route) []string {
	return slices.Sorted(maps.Keys(routes))
}

// copyBuffers holds the 32 KiB buffers the fronts copy response bodies
// with (httputil's size): an open stream holds one, and a finished call
// hands it to the next rather than leave it to the collector.
var copyBuffers httputil.BufferPool = &copyBufferPool{}

type copyBufferPool struct{ pool sync.Pool }

func (p *copyBufferPool) Get() []byte {
	if b, ok := p.pool.Get().(*[]byte); ok {
		return *b
	}
	return make([]byte, 32<<10)
}

func (p *copyBufferPool) Put(b []byte) { p.pool.Put(&b) }
