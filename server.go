package credproxy

import (
	"bufio"
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Server serves a [Store] over the credproxy protocol. Its lifecycle
// follows net/http's Server: [Server.Serve] on one or more listeners, then
// [Server.Shutdown] or [Server.Close]. A Server is safe for concurrent use
// and cannot be restarted once shut down. Create one with [NewServer]; the
// zero Server is not usable.
type Server struct {
	opts     Options
	log      *slog.Logger
	euid     int
	baseCtx  context.Context
	cancel   context.CancelFunc
	locks    keyedMutex
	warnOnce sync.Once
	refresh  *coordinator

	inShutdown atomic.Bool
	stopping   chan struct{} // closed when inShutdown is set
	stopOnce   sync.Once

	// The watchdog over requests that run in their connection's reader;
	// see watchdog.
	epoch time.Time // busySince values are monotonic time since epoch
	watch atomic.Int32

	// main is the session of the connections Serve accepts: Options'
	// policy and limits, no capability token.
	main *Session

	mu        sync.Mutex
	listeners map[*net.Listener]os.FileInfo // the socket file of a Unix listener, when it has one
	sessions  map[*Session]struct{}         // made by NewSession and not yet closed
	conns     map[*conn]struct{}
	connSeq   uint64
	wg        sync.WaitGroup // every connection goroutine
}

// NewServer returns a server for opts. It fails only if opts.Store is nil,
// a field is out of range, or opts.Policy is a [*Grant] that names what no
// request could carry.
func NewServer(opts Options) (*Server, error) {
	if opts.Store == nil {
		return nil, errors.New("credproxy: Options.Store is nil; use NewMemoryStore or another Store")
	}
	if opts.MaxConnections < 0 || opts.MaxInFlight < 0 || opts.RateBurst < 0 ||
		opts.HandshakeTimeout < 0 || opts.FrameTimeout < 0 || opts.StoreTimeout < 0 || opts.WriteTimeout < 0 {
		return nil, errors.New("credproxy: Options has a negative limit or timeout; use zero for the default")
	}
	if opts.Policy == nil {
		opts.Policy = AllowAll()
	}
	// A Grant with a typo would grant nothing without a word: refuse it
	// here as NewSession does, for a server whose Serve has a grant
	// (credproxy serve under systemd socket activation).
	if g, ok := opts.Policy.(*Grant); ok {
		if err := g.check(); err != nil {
			return nil, err
		}
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if opts.RateLimit == 0 {
		opts.RateLimit = defaultRateLimit
		if opts.RateBurst == 0 {
			opts.RateBurst = defaultRateBurst
		}
	}
	if opts.RateBurst == 0 {
		opts.RateBurst = max(1, int(min(opts.RateLimit+0.999999, 1<<30)))
	}
	opts.AllowedUIDs = slices.Clone(opts.AllowedUIDs)
	setDefault(&opts.MaxConnections, DefaultMaxConnections)
	setDefault(&opts.MaxInFlight, DefaultMaxInFlight)
	setDefault(&opts.HandshakeTimeout, DefaultHandshakeTimeout)
	setDefault(&opts.FrameTimeout, DefaultFrameTimeout)
	setDefault(&opts.StoreTimeout, DefaultStoreTimeout)
	setDefault(&opts.WriteTimeout, DefaultWriteTimeout)
	setDefault(&opts.RefreshMargin, defaultRefreshMargin)
	setDefault(&opts.IdleTimeout, DefaultServerIdleTimeout)
	setDefault(&opts.MaxNewTokens, DefaultMaxNewTokens)

	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		opts:      opts,
		log:       logger,
		euid:      os.Geteuid(),
		baseCtx:   ctx,
		cancel:    cancel,
		stopping:  make(chan struct{}),
		epoch:     time.Now(),
		listeners: make(map[*net.Listener]os.FileInfo),
		sessions:  make(map[*Session]struct{}),
		conns:     make(map[*conn]struct{}),
	}
	s.main = s.newSession(opts.Policy, "")
	s.main.maxConns = opts.MaxConnections
	s.main.idleTimeout = opts.IdleTimeout
	s.main.maxNew = int64(opts.MaxNewTokens)
	s.refresh = newCoordinator(s, opts.Refreshers)
	s.opts.Refreshers = nil // the coordinator holds the copy
	return s, nil
}

// Serve accepts connections on l and serves each in its own goroutine,
// like http.Server.Serve. It always returns a non-nil error and closes l;
// after [Server.Shutdown] or [Server.Close] the error is [ErrServerClosed].
//
// The peer of each connection is identified when it is accepted. On Linux
// and macOS a peer whose uid is neither the server's effective uid nor in
// [Options.AllowedUIDs], or whose credentials cannot be read (as with a
// listener that is not a Unix socket), is disconnected before anything is
// read (PROTOCOL.md, "Roles and transport"). Serve may be called on several
// listeners at once.
//
// Every connection Serve accepts is served under [Options.Policy] and
// needs no capability token. For a sandbox, use [Server.NewSession].
func (s *Server) Serve(l net.Listener) error { return s.serve(l, s.main) }

// serve accepts connections on l for the session ss.
func (s *Server) serve(l net.Listener, ss *Session) error {
	defer l.Close()
	if !s.trackListener(&l, true) {
		return ErrServerClosed
	}
	defer s.trackListener(&l, false)

	var backoff time.Duration
	for {
		rw, err := l.Accept()
		if err != nil {
			if s.inShutdown.Load() {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors and similar: wait and retry, as
			// net/http does, rather than spin or stop serving.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("credproxy: accept failed; retrying", "err", err, "backoff", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		s.accept(rw, ss)
	}
}

func (s *Server) trackListener(l *net.Listener, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		if s.inShutdown.Load() {
			return false
		}
		s.listeners[l] = socketFile(*l)
	} else {
		delete(s.listeners, l)
	}
	return true
}

// accept identifies the peer of rw and starts serving it for the session
// ss if it may connect.
func (s *Server) accept(rw net.Conn, ss *Session) {
	peer, err := s.identify(rw)
	if err != nil {
		s.refused(ss, Peer{}, "connection", "cannot identify the peer", slog.String("err", err.Error()))
		rw.Close()
		return
	}
	if !s.uidAllowed(peer) {
		s.refused(ss, peer, "connection", "peer uid not allowed")
		rw.Close()
		return
	}
	s.serveConn(rw, peer, ss)
}

func (s *Server) identify(rw net.Conn) (Peer, error) {
	uc, ok := rw.(*net.UnixConn)
	if !ok {
		return Peer{}, errorf("connection is %T, not a Unix socket", rw)
	}
	peer, err := peerCreds(uc)
	if errors.Is(err, errors.ErrUnsupported) {
		s.warnOnce.Do(func() {
			s.log.Warn("credproxy: peer credentials are not available on this platform; relying on the socket's file mode", "goos", runtime.GOOS)
		})
		return Peer{}, nil
	}
	return peer, err
}

func (s *Server) uidAllowed(p Peer) bool {
	uid, ok := p.UID()
	if !ok {
		// Only platforms without peer credentials yield unknown peers
		// without an error; the Policy still sees the unknown peer.
		return true
	}
	return uid == s.euid || slices.Contains(s.opts.AllowedUIDs, uid)
}

// serveConn tracks rw as a connection of the session ss and serves it in
// a new goroutine. It is the seam the in-package tests use to serve a
// net.Pipe with a chosen peer.
func (s *Server) serveConn(rw net.Conn, peer Peer, ss *Session) {
	c := &conn{
		srv:     s,
		sess:    ss,
		rwc:     rw,
		peer:    peer,
		br:      bufio.NewReader(rw),
		limiter: newConnLimiter(s.opts.RateLimit, s.opts.RateBurst),
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inShutdown.Load() || ss.closed {
		rw.Close()
		return
	}
	// The session's cap first, so that one sandbox filling its own cannot
	// push out another's connections; then the server's.
	if ss.conns >= ss.maxConns && !s.makeRoomLocked(ss, ss, peer, ss.maxConns) ||
		len(s.conns) >= s.opts.MaxConnections && !s.makeRoomLocked(nil, ss, peer, s.opts.MaxConnections) {
		rw.Close()
		return
	}
	s.connSeq++
	c.seq = s.connSeq
	s.conns[c] = struct{}{}
	ss.conns++
	ss.live.Add(1)
	s.wg.Go(c.serve)
}

// makeRoomLocked drops the oldest connection of the session scope (of any
// session if scope is nil) that has not completed its handshake, so that
// silent connections cannot lock a client out, and reports whether it
// found one. Either way the refusal is logged: of the new connection, of
// session ss and peer, or of the one dropped.
func (s *Server) makeRoomLocked(scope, ss *Session, peer Peer, limit int) bool {
	var victim *conn
	for c := range s.conns {
		if (scope == nil || c.sess == scope) && !c.handshaken.Load() && (victim == nil || c.seq < victim.seq) {
			victim = c
		}
	}
	if victim == nil {
		s.refused(ss, peer, "connection", "connection cap reached", slog.Int("cap", limit))
		return false
	}
	s.refused(victim.sess, victim.peer, "connection", "connection cap reached; dropped the oldest connection still in its handshake", slog.Int("cap", limit))
	s.untrackLocked(victim)
	victim.rwc.Close()
	return true
}

func (s *Server) untrack(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.untrackLocked(c)
}

func (s *Server) untrackLocked(c *conn) {
	if _, ok := s.conns[c]; ok {
		delete(s.conns, c)
		c.sess.conns--
	}
}

// aLongTimeAgo is a deadline in the past, to interrupt blocked reads.
var aLongTimeAgo = time.Unix(1, 0)

// Shutdown shuts the server down gracefully, like http.Server.Shutdown: it
// closes the listeners (removing the socket files of listeners made by
// [Listen]), stops reading new requests, lets the requests in flight finish
// and their responses be written, and closes every connection
// (PROTOCOL.md, "Connections"). If ctx ends first, Shutdown closes everything as [Server.Close] does and
// returns ctx.Err(). Shutdown may be called more than once, and before
// Serve; it returns once every connection goroutine has exited.
func (s *Server) Shutdown(ctx context.Context) error {
	s.stop()
	s.mu.Lock()
	err := s.closeListenersLocked()
	for c := range s.conns {
		c.rwc.SetReadDeadline(aLongTimeAgo)
	}
	fronts := s.frontsLocked()
	s.mu.Unlock()

	// The injection fronts shut down as http.Server does, each at its
	// pace; ctx ending closes them with the rest.
	var frontsDone sync.WaitGroup
	for _, f := range fronts {
		frontsDone.Go(func() { f.shutdown(ctx) })
	}
	done := make(chan struct{})
	go func() { frontsDone.Wait(); s.wg.Wait(); close(done) }()
	select {
	case <-done:
		s.cancel()
		// Refreshes end promptly once cancelled, unless a Refresher
		// ignores its context: then ctx bounds the wait.
		flown := make(chan struct{})
		go func() { s.refresh.close(); close(flown) }()
		select {
		case <-flown:
		case <-ctx.Done():
			err = ctx.Err()
		}
		s.endSessions()
		return err
	case <-ctx.Done():
		s.Close()
		<-done
		return ctx.Err()
	}
}

// endSessions removes what is left of the sessions once the server has
// stopped: their directories, and their tokens' validity.
func (s *Server) endSessions() {
	s.logUnlogged(s.main)
	s.mu.Lock()
	ended := make([]*Session, 0, len(s.sessions))
	for ss := range s.sessions {
		ss.closed = true
		delete(s.sessions, ss)
		ended = append(ended, ss)
	}
	s.mu.Unlock()
	for _, ss := range ended {
		ss.cancel()
		if ss.inject != nil {
			ss.inject.close() // closed already; this waits for it
		}
		ss.removeDir()
		s.logUnlogged(ss)
	}
}

// stop marks the server as shutting down.
func (s *Server) stop() {
	s.stopOnce.Do(func() {
		s.inShutdown.Store(true)
		close(s.stopping)
	})
}

// Close closes the listeners and every connection at once, cancelling the
// context of requests in flight, like http.Server.Close. It returns once
// every connection goroutine and host-side refresh has exited, which
// takes as long as the slowest store call or Refresher takes to honour
// its cancelled context. Close may be
// called more than once, and before Serve.
func (s *Server) Close() error {
	s.stop()
	s.mu.Lock()
	err := s.closeListenersLocked()
	for c := range s.conns {
		c.rwc.Close()
	}
	fronts := s.frontsLocked()
	s.mu.Unlock()
	// Cancel after closing, so that no answer to a cancelled request
	// reaches a peer: its connection is already gone.
	s.cancel()
	for _, f := range fronts {
		f.close()
	}
	s.wg.Wait()
	s.refresh.close()
	s.endSessions()
	return err
}

// frontsLocked returns the injection fronts of the open sessions.
func (s *Server) frontsLocked() []*injectFront {
	var fronts []*injectFront
	for ss := range s.sessions {
		if ss.inject != nil {
			fronts = append(fronts, ss.inject)
		}
	}
	return fronts
}

func (s *Server) closeListenersLocked() error {
	var err error
	for l, socket := range s.listeners {
		keepReplacement(*l, socket)
		if cerr := (*l).Close(); cerr != nil && err == nil && !errors.Is(cerr, net.ErrClosed) {
			err = cerr
		}
		delete(s.listeners, l)
	}
	return err
}
