package credproxy

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-json-experiment/json/jsontext"
)

// Defaults for the zero values of [Options].
const (
	DefaultMaxConnections   = 256
	DefaultMaxInFlight      = 16
	DefaultHandshakeTimeout = 5 * time.Second
	DefaultFrameTimeout     = 5 * time.Second
	DefaultStoreTimeout     = 15 * time.Second
	DefaultWriteTimeout     = 10 * time.Second
)

// Options configures a [Server]. Only Store is required; every other zero
// value is safe and gives the default the field names.
type Options struct {
	// Store holds the credentials the server serves. Required.
	Store Store

	// Policy decides which requests arriving through [Server.Serve] are
	// allowed. Nil allows all: Serve is for embedders whose clients are
	// trusted. A sandbox gets a [Session] instead ([Server.NewSession]),
	// with a Policy of its own.
	Policy Policy

	// Logger receives the audit log (one debug record per request) and
	// warnings (refused peers, store failures). Nil discards everything.
	// Secrets are never logged at any level.
	Logger *slog.Logger

	// AllowedUIDs lists uids, besides the server's effective uid, whose
	// processes may connect: for sandboxes whose user namespace maps the
	// inner user to another host uid. Empty allows only the server's uid.
	AllowedUIDs []int

	// RateLimit is the sustained number of requests per second allowed on
	// each connection, and RateBurst the number allowed at once. Zero means
	// 60 and 60 (PROTOCOL.md, "Requests"). A negative RateLimit switches
	// the limit off, for benchmarks only. A zero RateBurst with a non-zero RateLimit means the
	// rate rounded up.
	RateLimit float64
	RateBurst int

	// MaxConnections caps concurrent connections. Zero means 256. When the
	// cap is reached, the oldest connection that has not completed its
	// handshake is dropped to make room; if every connection has completed
	// it, the new one is refused.
	MaxConnections int

	// MaxInFlight caps the requests of one connection being served at
	// once; one more is refused with RESOURCE_EXHAUSTED. Zero means 16.
	MaxInFlight int

	// HandshakeTimeout bounds the time from accept to a completed
	// handshake. Zero means 5s.
	HandshakeTimeout time.Duration

	// FrameTimeout bounds the time from a frame's first byte to its last
	// (PROTOCOL.md, "Frames"). Zero means 5s.
	FrameTimeout time.Duration

	// StoreTimeout bounds the policy and store work of one request; past it
	// the request fails with INTERNAL_ERROR. Zero means 15s.
	StoreTimeout time.Duration

	// WriteTimeout bounds the write of one response; a peer that does not
	// read its responses is disconnected after it (after 0.9 to 1 times
	// it: the deadline is moved only once it falls a tenth behind). Zero
	// means 10s.
	WriteTimeout time.Duration

	// Refreshers renew tokens on the host, by provider name (see
	// [Refresher]): they serve refresh_token, the refresh before get_token
	// (RefreshMargin) and proactive renewal. A provider with none gets
	// PROVIDER_NOT_FOUND on refresh_token. NewServer copies the map.
	Refreshers map[string]Refresher

	// RefreshMargin: get_token refreshes a token that expires within this
	// margin before serving it, if it can be refreshed. It waits a few
	// seconds for the refresh at most; if the refresh fails or takes
	// longer, the stored token is served while it is still valid, and an
	// expired one is not served (the sandbox gets the refresh's error).
	// Zero means 60s; negative turns it off.
	RefreshMargin time.Duration

	// OnRefresh, if set, is told how each host-side refresh that asked the
	// provider ended (see [RefreshEvent]); for example, a host CLI can ask
	// its user to log in again on RefreshReauthRequired. It is called on
	// the refresh's own goroutine once the requests waiting for the
	// refresh have their answer; calls for one provider and bucket do not
	// overlap unless one blocks past the next refresh. It may call
	// Shutdown or Close, and may run after they have returned.
	OnRefresh func(RefreshEvent)

	// IdleTimeout closes a connection through [Server.Serve] that has
	// completed its handshake and then sent nothing for this long; the
	// client reconnects when it next needs to. Zero means 10 minutes;
	// negative keeps idle connections open. Sessions have their own.
	IdleTimeout time.Duration

	// MaxNewTokens caps how many tokens connections through
	// [Server.Serve] may create (save_token for a provider and bucket
	// that has none) over the server's life. Zero means 16; negative
	// means no cap. Sessions have their own.
	MaxNewTokens int

	// DisableRenewal turns off proactive renewal. By default, once
	// get_token has served a token that can be refreshed, the server
	// renews it shortly before it expires (at expiry - max(5 min, 10% of
	// its lifetime) - up to 30 s of jitter) and again after each renewal,
	// until Shutdown or Close. Nothing about it is persisted.
	DisableRenewal bool
}

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

// NewServer returns a server for opts. It fails only if opts.Store is nil
// or a field is out of range.
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

func setDefault[T int | time.Duration](v *T, def T) {
	if *v == 0 {
		*v = def
	}
}

// DefaultSocketDir returns the per-user socket directory, without creating
// it: {realpath(os.TempDir())}/llxprt-cred-{uid}. [Listen] puts sockets
// in it, and [Server.NewSession] puts each session's directory in it.
func DefaultSocketDir() (string, error) {
	tmp, err := filepath.EvalSymlinks(os.TempDir())
	if err != nil {
		return "", errorf("resolve the temp directory: %w", err)
	}
	return filepath.Join(tmp, "llxprt-cred-"+strconv.Itoa(os.Getuid())), nil
}

// Listen creates a socket named llxprt-cred-{pid}-{nonce}.sock in dir, or
// in [DefaultSocketDir] when dir is "", and listens on it; see [ListenPath]
// for the checks it makes. The nonce is 8 hex digits from crypto/rand, so
// the name cannot be guessed. Pass the listener to [Server.Serve] and its
// address (l.Addr().String()) to the client in [SocketEnv].
//
// A directory that holds several sockets must not be mounted into a
// sandbox: the sandbox would reach them all. Give each sandbox a
// [Session] ([Server.NewSession]), whose directory holds its socket only.
func Listen(dir string) (*net.UnixListener, error) {
	if dir == "" {
		var err error
		if dir, err = DefaultSocketDir(); err != nil {
			return nil, err
		}
	}
	var nonce [4]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return nil, errorf("socket nonce: %w", err)
	}
	name := fmt.Sprintf("llxprt-cred-%d-%s.sock", os.Getpid(), hex.EncodeToString(nonce[:]))
	return ListenPath(filepath.Join(dir, name))
}

// ListenPath listens on a Unix socket at path, carefully (PROTOCOL.md,
// "Socket" and "Sessions"):
//   - a relative path is made absolute, and symbolic links in the
//     directories above the socket are resolved;
//   - a path longer than the platform's sun_path allows is refused, never
//     truncated;
//   - the parent directory is created with mode 0700, and if it exists it
//     must be a real directory, owned by the effective uid and closed to
//     group and others, or ListenPath refuses to use it; every directory
//     above it must be owned by root or the effective uid and not be
//     writable by others unless it is sticky (as /tmp is), since whoever
//     can rename a directory on the path can put their own in its place;
//   - if something at path accepts connections, ListenPath fails with
//     "address already in use"; a stale file is removed;
//   - the socket is made 0600 before ListenPath returns. It is never more
//     open: the directory already keeps everyone else out.
//
// Closing the listener removes the socket file. The errors say what to fix,
// so a launcher can report them and stop before it starts a sandbox. A
// process of the same uid can still race the stale-file check; the private
// directory keeps everyone else from doing so.
func ListenPath(path string) (*net.UnixListener, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, errorf("socket path %s: %w", path, err)
	}
	if err := checkSocketPathLen(abs); err != nil {
		return nil, err
	}
	dir, err := ensurePrivateDir(filepath.Dir(abs), "socket directory")
	if err != nil {
		return nil, err
	}
	path = filepath.Join(dir, filepath.Base(abs)) // resolving links may have made it longer
	if err := checkSocketPathLen(path); err != nil {
		return nil, err
	}
	if _, err := os.Lstat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, errorf("listen on %s: address already in use by a running server", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, errorf("remove stale socket: %w", err)
		}
	}
	return listenPrivate(path)
}

// listenPrivate listens on a socket at path, in a private directory, and
// makes it 0600. It is never more open: the directory keeps everyone else
// out meanwhile.
func listenPrivate(path string) (*net.UnixListener, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, errorf("listen: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, errorf("chmod socket: %w", err)
	}
	return l, nil
}

// checkSocketPathLen refuses a socket path that does not fit sun_path,
// which the kernel would otherwise truncate.
func checkSocketPathLen(path string) error {
	if len(path) > maxSocketPathLen {
		return errorf("socket path %s is %d bytes, over the %d-byte limit of %s sockets; choose a shorter directory",
			path, len(path), maxSocketPathLen, runtime.GOOS)
	}
	return nil
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
	s.mu.Unlock()

	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
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
	s.mu.Unlock()
	// Cancel after closing, so that no answer to a cancelled request
	// reaches a peer: its connection is already gone.
	s.cancel()
	s.wg.Wait()
	s.refresh.close()
	s.endSessions()
	return err
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

// socketFile returns the file of a Unix listener's socket, or nil.
func socketFile(l net.Listener) os.FileInfo {
	ul, ok := l.(*net.UnixListener)
	if !ok || ul.Addr().String() == "" || ul.Addr().String()[0] == '@' {
		return nil
	}
	fi, err := os.Stat(ul.Addr().String())
	if err != nil {
		return nil
	}
	return fi
}

// keepReplacement stops closing l from removing its socket path when the
// file there is no longer the socket l listens on: someone deleted it and
// perhaps started another server at the same path, whose socket closing l
// would otherwise unlink.
func keepReplacement(l net.Listener, socket os.FileInfo) {
	ul, ok := l.(*net.UnixListener)
	if !ok || socket == nil {
		return
	}
	if now, err := os.Stat(ul.Addr().String()); err != nil || !os.SameFile(now, socket) {
		ul.SetUnlinkOnClose(false)
	}
}

// conn is one accepted connection. Its reader goroutine (serve) reads
// frames, applies the rate limit, decodes and validates, and runs each
// valid request itself; if one runs past inlineBudget, the watchdog starts
// another reader, so that at most MaxInFlight requests run at a time.
// Responses are written whole under wmu.
type conn struct {
	srv     *Server
	sess    *Session
	rwc     net.Conn
	peer    Peer
	seq     uint64
	br      *bufio.Reader
	frame   []byte
	limiter *connLimiter

	dec        requestDecoder // used by the reader goroutine only
	handshaken atomic.Bool
	// busySince is when the request the reader runs began, as time since
	// the server's epoch; 0 between requests, and handedOver once the
	// watchdog has passed the reading on.
	busySince atomic.Int64
	inFlight  atomic.Int32
	handlers  sync.WaitGroup

	// idleDeadline is when the connection, waiting for its next request,
	// is closed as idle (zero: never); used by the reader goroutine only.
	idleDeadline time.Time
	// Refusals by the rate limit are logged one a second at most; these
	// count the rest. Used by the reader goroutine only.
	rateLogged     time.Time
	rateSuppressed int

	wmu           sync.Mutex
	writeDead     bool      // a write failed; guarded by wmu
	writeDeadline time.Time // the connection's write deadline; guarded by wmu
}

func (c *conn) serve() {
	handshakeDeadline := time.Now().Add(c.srv.opts.HandshakeTimeout)
	c.setReadDeadline(handshakeDeadline)
	if !c.handshake(handshakeDeadline) {
		c.finish()
		return
	}
	if idle := c.sess.idleTimeout; idle > 0 {
		c.idleDeadline = time.Now().Add(idle)
	}
	c.setReadDeadline(c.idleDeadline)
	c.readRequests()
}

// finish ends the connection, once its reader is done with it.
func (c *conn) finish() {
	c.handlers.Wait()
	c.rwc.Close()
	if c.rateSuppressed > 0 {
		c.srv.refused(c.sess, c.peer, "request", "rate limit exceeded", slog.Int("more", c.rateSuppressed))
	}
	c.srv.untrack(c)
	c.sess.live.Done()
}

// inlineBudget is how long a request may run in its connection's reader
// goroutine before another goroutine takes over reading. Requests run
// inline because starting a goroutine per request costs more than a fast
// store call (BenchmarkGetToken: 0.65 of the floor's throughput with a
// goroutine per request, 0.84 inline); the handover keeps a slow store
// call or refresh from holding up the requests behind it on the same
// connection for more than about twice this.
const inlineBudget = 500 * time.Microsecond

// readRequests reads and serves requests until the connection ends, and
// then finishes it; or, if the watchdog hands the reading over while a
// request runs, leaves the rest to the goroutine that took over.
func (c *conn) readRequests() {
	for {
		frame, err := c.readFrame(c.idleDeadline)
		if err != nil {
			c.readFailed(err)
			c.finish()
			return
		}
		if c.srv.inShutdown.Load() {
			c.finish()
			return
		}
		if handedOver := c.handle(frame); handedOver {
			return
		}
	}
}

// handedOver is the busySince of a connection whose reading the watchdog
// has passed to another goroutine.
const handedOver = -1

// begin marks the start, at now, of a request run inline, and wakes the
// watchdog if it sleeps. It returns the mark for end.
func (c *conn) begin(now time.Time) int64 {
	since := int64(now.Sub(c.srv.epoch)) + 1 // never 0
	c.busySince.Store(since)
	if c.srv.watch.Load() != watchActive {
		c.srv.wakeWatchdog()
	}
	return since
}

// end marks the end of the request begun at since, and reports whether the
// watchdog passed the reading on meanwhile. Exactly one of end and the
// watchdog's handover changes busySince from since.
func (c *conn) end(since int64) (handedOver bool) {
	return !c.busySince.CompareAndSwap(since, 0)
}

// The watchdog's states. While requests come, begin keeps it active; each
// tick turns active to quiet, and a tick that finds it still quiet, with
// no request running, stops it.
const (
	watchStopped int32 = iota
	watchQuiet
	watchActive
)

func (s *Server) wakeWatchdog() {
	if s.watch.Swap(watchActive) == watchStopped {
		// Called from a reader, which the WaitGroup counts, so the Add in
		// Go cannot race with Wait reaching zero.
		s.wg.Go(s.watchdog)
	}
}

// watchdog hands the reading of a connection to a new goroutine when the
// request its reader runs is older than inlineBudget. One goroutine
// watches every connection, and only while requests come, so that a
// request costs an atomic store and a compare-and-swap, not a timer; it
// finds a slow request between one and two budgets after it began. It
// stops once a tick passes without a request, or at shutdown, when nothing
// more will be read. (A reader that begins a request during shutdown may
// start it again; it then stops at once.)
func (s *Server) watchdog() {
	tick := time.NewTicker(inlineBudget)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
		case <-s.stopping:
			return
		}
		busy := s.handOverSlowReaders()
		if !s.watch.CompareAndSwap(watchActive, watchQuiet) && !busy &&
			s.watch.CompareAndSwap(watchQuiet, watchStopped) {
			return
		}
	}
}

// handOverSlowReaders starts a new reader for each connection whose
// request has run for inlineBudget, and reports whether any request runs.
func (s *Server) handOverSlowReaders() (busy bool) {
	now := int64(time.Since(s.epoch)) + 1 // as begin counts
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		since := c.busySince.Load()
		if since <= 0 {
			continue
		}
		busy = true
		if now-since >= int64(inlineBudget) && c.busySince.CompareAndSwap(since, handedOver) {
			s.wg.Go(c.readRequests)
		}
	}
	return busy
}

// setReadDeadline sets the read deadline unless the server is shutting
// down, in which case reads must fail at once. The shutdown flag is checked
// after setting, so a deadline set concurrently with Shutdown cannot
// outlive it.
func (c *conn) setReadDeadline(t time.Time) {
	c.rwc.SetReadDeadline(t)
	if c.srv.inShutdown.Load() {
		c.rwc.SetReadDeadline(aLongTimeAgo)
	}
}

// readFrame waits for the next frame until idleDeadline (zero: forever),
// then gives the rest of it FrameTimeout from its first byte: a
// trickle of bytes does not extend that.
func (c *conn) readFrame(idleDeadline time.Time) ([]byte, error) {
	if _, err := c.br.Peek(1); err != nil {
		return nil, err
	}
	if !c.frameBuffered() {
		deadline := time.Now().Add(c.srv.opts.FrameTimeout)
		if !idleDeadline.IsZero() && idleDeadline.Before(deadline) {
			deadline = idleDeadline
		}
		c.setReadDeadline(deadline)
		defer c.setReadDeadline(idleDeadline)
	}
	frame, err := readFrame(c.br, c.frame)
	if err == nil && cap(frame) <= 4096 {
		c.frame = frame[:0] // keep small buffers; let a large one go
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = errFrameTimeout // its first byte had come
	}
	return frame, err
}

// errFrameTimeout is a frame begun and not finished within FrameTimeout,
// or before the connection's idle or handshake deadline.
var errFrameTimeout = fmt.Errorf("credproxy: frame not complete in time: %w", os.ErrDeadlineExceeded)

// extendIdle moves the idle deadline to IdleTimeout after now, a request's
// arrival. Setting a deadline updates a runtime timer, so it is moved only
// once it has fallen a tenth of IdleTimeout behind: the connection is
// closed after 0.9 to 1 times IdleTimeout without a request.
func (c *conn) extendIdle(now time.Time) {
	idle := c.sess.idleTimeout
	if idle <= 0 {
		return
	}
	if deadline := now.Add(idle); deadline.Sub(c.idleDeadline) > idle/10 {
		c.idleDeadline = deadline
		c.setReadDeadline(deadline)
	}
}

// frameBuffered reports whether the whole next frame is already buffered,
// so that reading it needs no deadline.
func (c *conn) frameBuffered() bool {
	if c.br.Buffered() < frameHeaderLen {
		return false
	}
	h, _ := c.br.Peek(frameHeaderLen)
	n := int(h[0])<<24 | int(h[1])<<16 | int(h[2])<<8 | int(h[3])
	return n <= MaxFrameSize && c.br.Buffered() >= frameHeaderLen+n
}

// readFailed answers a frame-level error that leaves the stream out of
// sync: an empty or oversize header gets one INVALID_REQUEST ("Frames"). The
// refusals, and a connection closed for holding a frame or its handshake
// back, are logged; a connection closed as idle or by its peer is not a
// refusal.
func (c *conn) readFailed(err error) {
	switch {
	case errors.Is(err, ErrFrameTooLarge):
		c.refuseFrame("frame too large")
	case errors.Is(err, errEmptyFrame):
		c.refuseFrame("empty frame")
	case c.srv.inShutdown.Load() || errors.Is(err, net.ErrClosed):
	case errors.Is(err, os.ErrDeadlineExceeded) && !c.handshaken.Load():
		c.srv.refused(c.sess, c.peer, "handshake", "no complete handshake in time")
	case errors.Is(err, errFrameTimeout):
		c.srv.refused(c.sess, c.peer, "frame", "frame not complete in time")
	case errors.Is(err, os.ErrDeadlineExceeded):
		c.srv.log.Debug("credproxy: closed an idle connection", "session", c.sess.id, "peer", c.peer)
	case err != io.EOF:
		c.srv.log.Debug("credproxy: connection read failed", "session", c.sess.id, "peer", c.peer, "err", err)
	}
}

// refuseFrame answers a frame that cannot be read as a request, and logs
// the refusal.
func (c *conn) refuseFrame(reason string) {
	c.srv.refused(c.sess, c.peer, "frame", reason)
	c.writeFailure(unknownID, invalid(reason), 0)
}

// handshake reads and answers the first frame ("Handshake"). It reports whether the
// connection may go on.
func (c *conn) handshake(deadline time.Time) bool {
	frame, err := c.readFrame(deadline)
	if err != nil {
		c.readFailed(err)
		return false
	}
	req, perr := c.dec.decode(frame)
	switch {
	case perr != nil:
		c.srv.refused(c.sess, c.peer, "handshake", perr.msg)
		c.writeFailure(unknownID, perr, 0)
		return false
	case req.op != opHandshake:
		c.srv.refused(c.sess, c.peer, "handshake", "handshake required")
		c.writeFailure(echoID(req.id), invalid("handshake required"), 0)
		return false
	}
	// The token is checked first: a peer without it learns nothing more,
	// not even which versions the server speaks.
	if c.sess.token != "" && (!c.sess.accepts(presentedToken(req)) || c.sess.isClosed()) {
		c.srv.refused(c.sess, c.peer, "handshake", "invalid or missing capability token")
		c.writeFrame(handshakeUnauthorized)
		return false
	}
	if _, ok := negotiate(req); !ok {
		c.srv.refused(c.sess, c.peer, "handshake", "no common protocol version")
		c.writeFrame(handshakeFail)
		return false
	}
	// Handshaken before the peer can know it: from then on the connection
	// cap never drops it to make room, as it drops connections still in
	// their handshake.
	c.handshaken.Store(true)
	return c.writeFrame(handshakeOK)
}

func echoID(id string) string {
	if id == "" {
		return unknownID
	}
	return id
}

// handle answers one request frame after the handshake, in the order the
// protocol sets: rate limit, id and op, payload schema, then policy and
// store. It reports whether, while a request ran, another goroutine took
// over reading the connection.
func (c *conn) handle(frame []byte) (handedOver bool) {
	req, perr := c.dec.decode(frame)
	now := time.Now()
	c.extendIdle(now)
	if ok, retryAfter := c.allow(now); !ok {
		c.logRateLimited(now, req.op)
		c.writeFailure(echoID(req.id), &protoError{code: CodeRateLimited, msg: "rate limit exceeded"}, retryAfter)
		return false
	}
	switch {
	case perr != nil:
		c.refuseRequest(unknownID, "", perr)
		return false
	case req.id == "":
		c.refuseRequest(unknownID, req.op, invalid("id must be a non-empty string or an integer"))
		return false
	case !req.opOK:
		c.refuseRequest(req.id, "", invalid("op must be a string"))
		return false
	case req.payloadErr:
		c.refuseRequest(req.id, req.op, invalid("payload must be an object"))
		return false
	}
	op := Op(req.op)
	a, perr := c.dec.decodeArgs(op, req.payload, req.members)
	if perr != nil {
		c.refuseRequest(req.id, req.op, perr)
		return false
	}
	if c.inFlight.Add(1) > int32(c.srv.opts.MaxInFlight) {
		c.inFlight.Add(-1)
		c.refuseRequest(req.id, req.op, &protoError{code: CodeResourceExhausted, msg: "too many requests in flight"})
		return false
	}
	c.handlers.Add(1)
	since := c.begin(now)
	c.srv.serveRequest(c, req.id, op, a, now)
	return c.end(since)
}

// writeFailure writes a failure response.
func (c *conn) writeFailure(id string, e *protoError, retryAfter int) {
	buf := getBuffer()
	defer putBuffer(buf)
	*buf = appendFailure(startFrame((*buf)[:0]), id, e, retryAfter)
	c.writeFramed(*buf, time.Now())
}

// writeFrame frames payload and writes it.
func (c *conn) writeFrame(payload []byte) bool {
	buf := getBuffer()
	defer putBuffer(buf)
	*buf = append(startFrame((*buf)[:0]), payload...)
	return c.writeFramed(*buf, time.Now())
}

// writeFramed seals and writes a frame begun with startFrame, whole, by
// about now + WriteTimeout. A failed write closes the connection: the peer
// has gone, or stopped reading, and a half-written frame cannot be undone.
func (c *conn) writeFramed(frame []byte, now time.Time) bool {
	frame, err := sealFrame(frame)
	if err != nil {
		return false
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.writeDead {
		return false
	}
	// Setting a deadline updates a runtime timer (0.2 us, a tenth of the
	// server's own work on a get_token); moving it only once it is a tenth
	// of WriteTimeout behind gives each write 0.9-1 WriteTimeout.
	if deadline := now.Add(c.srv.opts.WriteTimeout); deadline.Sub(c.writeDeadline) > c.srv.opts.WriteTimeout/10 {
		c.rwc.SetWriteDeadline(deadline)
		c.writeDeadline = deadline
	}
	if _, err := c.rwc.Write(frame); err != nil {
		c.writeDead = true
		c.rwc.Close()
		c.srv.log.Debug("credproxy: write failed; closing the connection", "peer", c.peer, "err", err)
		return false
	}
	return true
}

var bufferPool = sync.Pool{New: func() any { b := make([]byte, 0, 1024); return &b }}

func getBuffer() *[]byte { return bufferPool.Get().(*[]byte) }

func putBuffer(b *[]byte) {
	if cap(*b) <= 16<<10 {
		bufferPool.Put(b)
	}
}

// result is the outcome of one request: the response buffer with the data
// object appended on success, or a failure.
type result struct {
	data       []byte
	fail       *protoError
	retryAfter int   // seconds, for RATE_LIMITED
	cause      error // of a refusal, for the host's log
}

func failure(code Code, msg string) result { return result{fail: &protoError{code: code, msg: msg}} }

// serveRequest runs a validated request against the policy and the store,
// logs it, releases its in-flight slot and writes the response.
func (s *Server) serveRequest(c *conn, id string, op Op, a args, start time.Time) {
	defer c.handlers.Done()
	ctx := newRequestContext(c.sess.ctx, start.Add(s.opts.StoreTimeout))
	defer ctx.release()

	buf := getBuffer()
	defer putBuffer(buf)
	// The success response is built in place: exec appends the data object
	// after the envelope's opening, and a failure starts the frame over.
	ctx.req = Request{Peer: c.peer, Op: op, Provider: a.provider, Bucket: a.bucket, Key: a.name}
	res := s.exec(ctx, c.sess, &ctx.req, a, appendOKStart(startFrame((*buf)[:0]), id))
	now := time.Now()
	if res.fail == nil && ctx.errAt(now) != nil {
		// The store answered after its deadline (15 s), or the server is
		// closing: the answer may be stale or partial.
		res = failure(CodeInternalError, "credential store timed out")
	}
	if res.fail == nil && len(res.data)+1-frameHeaderLen > MaxFrameSize {
		s.log.Warn("credproxy: response too large for a frame", "op", op, "provider", a.provider, "bucket", a.bucket, "key", a.name)
		res = failure(CodeInternalError, "response too large")
	}
	var frame []byte
	if res.fail == nil {
		frame = append(res.data, '}')
	} else {
		frame = appendFailure(startFrame((*buf)[:0]), id, res.fail, res.retryAfter)
	}
	*buf = frame
	// The audit record is written before the response, so that it exists
	// by the time the peer can act on the answer: one record a request, at
	// debug level, or at info level for a refusal.
	if res.fail != nil && res.fail.code == CodeUnauthorized {
		s.refusedRequest(c, op, a, res.fail, res.cause)
	} else if s.log.Enabled(ctx, slog.LevelDebug) {
		code := "OK"
		if res.fail != nil {
			code = string(res.fail.code)
		}
		s.log.LogAttrs(ctx, slog.LevelDebug, "credproxy: request", c.sess.logAttr(),
			slog.String("op", string(op)), slog.String("provider", a.provider), slog.String("bucket", a.bucket),
			slog.String("key", a.name), slog.Any("peer", c.peer), slog.String("code", code),
			slog.Duration("duration", now.Sub(start)))
	}
	// The slot is free before the peer can see the answer, so a client
	// that keeps 16 requests outstanding never meets RESOURCE_EXHAUSTED.
	c.inFlight.Add(-1)
	c.writeFramed(frame, now)
}

// requestContext is a request's context: the server's context with the
// store deadline. context.WithTimeout costs four allocations per request;
// this costs one, because its Done channel, timer and link to the server's
// context are made only if a store asks for Done. Err is exact either
// way: it reads the clock and the server's context. It carries no values,
// so context.Cause of it is its Err.
type requestContext struct {
	base     context.Context
	deadline time.Time
	req      Request // the policy's view of the request, here to save it an allocation

	mu       sync.Mutex
	done     chan struct{} // made by the first Done
	err      error
	timer    *time.Timer
	stopBase func() bool
}

func newRequestContext(base context.Context, deadline time.Time) *requestContext {
	return &requestContext{base: base, deadline: deadline}
}

func (c *requestContext) Deadline() (time.Time, bool) { return c.deadline, true }

func (c *requestContext) Value(any) any { return nil }

func (c *requestContext) Err() error { return c.errAt(time.Now()) }

// errAt is Err at now.
func (c *requestContext) errAt(now time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.checkLocked(now)
}

// checkLocked sets err once the server's context ends or the deadline
// passes, closing done if it exists, and returns err.
func (c *requestContext) checkLocked(now time.Time) error {
	if c.err != nil {
		return c.err
	}
	if err := c.base.Err(); err != nil {
		c.err = err
	} else if !now.Before(c.deadline) {
		c.err = context.DeadlineExceeded
	}
	if c.err != nil && c.done != nil {
		close(c.done)
	}
	return c.err
}

func (c *requestContext) Done() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done != nil {
		return c.done
	}
	c.done = make(chan struct{})
	if c.err != nil {
		close(c.done)
		return c.done
	}
	if c.checkLocked(time.Now()) == nil {
		c.timer = time.AfterFunc(time.Until(c.deadline), func() { c.Err() })
		c.stopBase = context.AfterFunc(c.base, func() { c.Err() })
	}
	return c.done
}

// release ends the context when its request is done, as the cancel of
// context.WithTimeout does.
func (c *requestContext) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.timer != nil {
		c.timer.Stop()
		c.stopBase()
	}
	if c.err == nil {
		c.err = context.Canceled
		if c.done != nil {
			close(c.done)
		}
	}
}

// exec performs op for a connection of the session ss and appends its
// data object to dst.
func (s *Server) exec(ctx context.Context, ss *Session, req *Request, a args, dst []byte) result {
	op := req.Op
	policy := ss.policy
	if err := policy.Authorize(ctx, req); err != nil {
		return denied(err)
	}
	st := s.opts.Store
	switch op {
	case OpGetToken:
		tok, err := st.GetToken(ctx, a.provider, a.bucket)
		if err != nil {
			return s.storeFailure(ctx, op, a, err, "token not found")
		}
		if s.refresh.due(a.provider, tok) {
			fresh, err := s.refresh.beforeServe(ctx, a.provider, a.bucket, tok)
			switch {
			case err == nil:
				tok = fresh
			case validFor(tok, time.Now()) > 0:
				s.log.Debug("credproxy: serving the stored token; refresh before get_token failed",
					"provider", a.provider, "bucket", a.bucket, "err", err)
			default:
				return s.refreshFailure(ctx, op, a, err)
			}
		}
		s.refresh.watch(a.provider, a.bucket, tok, false)
		ss.noteServed(a.provider, a.bucket, tok)
		return result{data: tok.appendSanitised(dst)}

	case OpSaveToken:
		switch err := s.saveToken(ctx, ss, a.provider, a.bucket, a.token); {
		case errors.Is(err, ErrNewTokenLimit):
			return denied(err)
		case errors.Is(err, errTokenTooLarge):
			return failure(CodeInvalidRequest, "token too large once merged with the stored one")
		case err != nil:
			return s.storeFailure(ctx, op, a, err, "")
		}
		return result{data: append(dst, "{}"...)}

	case OpRemoveToken:
		if err := s.removeToken(ctx, a.provider, a.bucket); err != nil {
			// Best effort: a logout must not fail in the sandbox.
			s.logStoreError(op, a, err)
		}
		return result{data: append(dst, "{}"...)}

	case OpListProviders:
		names, err := st.ListProviders(ctx)
		if err != nil {
			s.logStoreError(op, a, err)
		}
		names = filterNames(ctx, policy, *req, names, func(r *Request, n string) { r.Provider = n })
		// A provider is listed only if the sandbox may use one of its
		// buckets: a name it could not read is not its business.
		names = slices.DeleteFunc(names, func(provider string) bool {
			buckets, err := st.ListBuckets(ctx, provider)
			r := *req
			r.Provider = provider
			return err != nil || len(filterNames(ctx, policy, r, buckets, func(r *Request, n string) { r.Bucket = n })) == 0
		})
		return s.namesResult(op, dst, "providers", names)

	case OpListBuckets:
		names, err := st.ListBuckets(ctx, a.provider)
		if err != nil {
			s.logStoreError(op, a, err)
		}
		names = filterNames(ctx, policy, *req, names, func(r *Request, n string) { r.Bucket = n })
		return s.namesResult(op, dst, "buckets", names)

	case OpGetBucketStats:
		if _, err := st.GetToken(ctx, a.provider, a.bucket); err != nil {
			return s.storeFailure(ctx, op, a, err, "token not found")
		}
		dst = append(dst, `{"bucket":`...)
		dst, _ = jsontext.AppendQuote(dst, a.bucket)
		return result{data: append(dst, `,"requestCount":0,"percentage":0}`...)}

	case OpGetAPIKey:
		key, err := st.GetAPIKey(ctx, a.name)
		if err != nil {
			return s.storeFailure(ctx, op, a, err, "API key not found")
		}
		dst = append(dst, `{"key":`...)
		dst, _ = jsontext.AppendQuote(dst, string(key))
		return result{data: append(dst, '}')}

	case OpListAPIKeys:
		names, err := st.ListAPIKeys(ctx)
		if err != nil {
			s.logStoreError(op, a, err)
		}
		names = filterNames(ctx, policy, *req, names, func(r *Request, n string) { r.Key = n })
		return s.namesResult(op, dst, "keys", names)

	case OpHasAPIKey:
		_, err := st.GetAPIKey(ctx, a.name)
		switch {
		case err == nil:
			return result{data: append(dst, `{"exists":true}`...)}
		case errors.Is(err, ErrNotFound):
			return result{data: append(dst, `{"exists":false}`...)}
		}
		return s.storeFailure(ctx, op, a, err, "")

	case OpRefreshToken:
		tok, err := s.refresh.refresh(ctx, a.provider, a.bucket, want{session: ss})
		if err != nil {
			return s.refreshFailure(ctx, op, a, err)
		}
		ss.noteServed(a.provider, a.bucket, tok)
		return result{data: tok.appendSanitised(dst)}
	}
	return failure(CodeInvalidRequest, "unknown operation")
}

// maxSavedToken bounds the JSON of a token a client saves, merged with the
// stored one: with room for any response envelope (an id of 256 bytes
// quoted at worst 6 bytes each), it can always be served, and saves that
// each add members cannot grow a stored token without limit.
const maxSavedToken = MaxFrameSize - 2048

// errTokenTooLarge refuses a save_token whose result would exceed
// maxSavedToken.
var errTokenTooLarge = errors.New("credproxy: token too large once merged")

// saveToken merges token into the stored one under the per-key lock:
// the incoming refresh token is dropped and the stored one kept. A token
// that does not exist yet counts against the session's MaxNewTokens, and
// the store's cross-process lock (a lock file, with KeyringStore) is
// taken only once that allows it, so that a sandbox cannot grow the store
// by naming new tokens.
func (s *Server) saveToken(ctx context.Context, ss *Session, provider, bucket string, token Token) error {
	incoming := token.WithoutRefreshToken()
	unlock, err := s.locks.lock(ctx, tokenKey(provider, bucket))
	if err != nil {
		return err
	}
	defer unlock()
	st := s.opts.Store
	stored, err := st.GetToken(ctx, provider, bucket)
	if errors.Is(err, ErrNotFound) && !ss.reserveNewToken() {
		return ErrNewTokenLimit
	}
	if locker, ok := st.(TokenLocker); ok {
		unlockStore, lerr := locker.LockToken(ctx, provider, bucket)
		if lerr != nil {
			return lerr
		}
		defer unlockStore()
		// Read again under the store's lock: another process may have saved.
		stored, err = st.GetToken(ctx, provider, bucket)
	}
	switch {
	case errors.Is(err, ErrNotFound):
	case err != nil:
		return err
	default:
		incoming = stored.Merge(incoming)
	}
	if len(incoming.Reveal()) > maxSavedToken {
		return errTokenTooLarge
	}
	if err := st.SaveToken(ctx, provider, bucket, incoming); err != nil {
		return err
	}
	s.refresh.savedByPeer(tokenKey(provider, bucket), incoming)
	return nil
}

// removeToken deletes a token under its per-key lock, so that a
// logout during a refresh or save waits for it and then wins. A token
// that does not exist is left alone without taking the store's
// cross-process lock, which would leave a lock file behind for the name.
func (s *Server) removeToken(ctx context.Context, provider, bucket string) error {
	unlock, err := s.locks.lock(ctx, tokenKey(provider, bucket))
	if err != nil {
		return err
	}
	defer unlock()
	st := s.opts.Store
	if _, err := st.GetToken(ctx, provider, bucket); errors.Is(err, ErrNotFound) {
		return nil
	}
	unlockStore, err := s.lockStore(ctx, provider, bucket)
	if err != nil {
		return err
	}
	defer unlockStore()
	if err := st.RemoveToken(ctx, provider, bucket); err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	return nil
}

// lockToken takes the per-key lock of provider and bucket: the server's
// own, and then the store's cross-process one if it offers one
// ([TokenLocker]). The returned function releases both.
func (s *Server) lockToken(ctx context.Context, provider, bucket string) (unlock func(), err error) {
	unlockOwn, err := s.locks.lock(ctx, tokenKey(provider, bucket))
	if err != nil {
		return nil, err
	}
	unlockStore, err := s.lockStore(ctx, provider, bucket)
	if err != nil {
		unlockOwn()
		return nil, err
	}
	return func() { unlockStore(); unlockOwn() }, nil
}

// lockStore takes the store's cross-process lock of provider and bucket,
// if the store offers one ([TokenLocker]).
func (s *Server) lockStore(ctx context.Context, provider, bucket string) (unlock func(), err error) {
	locker, ok := s.opts.Store.(TokenLocker)
	if !ok {
		return func() {}, nil
	}
	return locker.LockToken(ctx, provider, bucket)
}

func tokenKey(provider, bucket string) string { return provider + ":" + bucket }

// filterNames returns the sorted names policy allows, asking once per name
// with set filling the name into a copy of req.
func filterNames(ctx context.Context, policy Policy, req Request, names []string, set func(*Request, string)) []string {
	kept := make([]string, 0, len(names))
	for _, n := range names {
		if !validName(n) {
			continue
		}
		r := req
		set(&r, n)
		if policy.Authorize(ctx, &r) == nil {
			kept = append(kept, n)
		}
	}
	slices.Sort(kept)
	return slices.Compact(kept)
}

// namesResult appends a list's data object, with as many of the sorted
// names as fit in a frame: a list never fails for its size. A list cut
// short is logged on the host.
func (s *Server) namesResult(op Op, dst []byte, member string, names []string) result {
	// What the frame holds besides the names: the envelope so far, the
	// data object's member name, brackets and braces.
	room := MaxFrameSize - (len(dst) - frameHeaderLen) - len(member) - len(`{"":[]}}`)
	n := 0
	for i, name := range names {
		if room -= len(name) + len(`"",`); room < 0 {
			break
		}
		n = i + 1
	}
	if n < len(names) {
		s.log.Warn("credproxy: list cut short to fit a frame", "op", op, "names", len(names), "sent", n)
	}
	return result{data: appendNames(dst, member, names[:n])}
}

// refreshFailure maps a refresh error to its code and a fixed message; the
// provider's or store's own text has been logged by the coordinator or is
// logged here, never sent.
func (s *Server) refreshFailure(ctx context.Context, op Op, a args, err error) result {
	var later *retryLater
	switch {
	case errors.Is(err, ErrProviderNotFound):
		return failure(CodeProviderNotFound, "no refresher for this provider")
	case errors.Is(err, ErrNotFound):
		return failure(CodeNotFound, "token not found")
	case errors.Is(err, ErrRefreshNotAvailable):
		return failure(CodeRefreshNotAvailable, "no refresh token stored; log in again on the host")
	case errors.Is(err, ErrReauthRequired):
		return failure(CodeReauthRequired, "the provider rejected the refresh token; log in again on the host")
	case errors.As(err, &later):
		res := failure(CodeRateLimited, "token refreshed moments ago; retry later")
		if later.failed {
			res = failure(CodeRateLimited, "the last refresh failed; retry later")
		}
		res.retryAfter = max(1, int((later.after+time.Second-1)/time.Second))
		return res
	case errors.Is(err, context.DeadlineExceeded) && (ctx.Err() != nil || op == OpGetToken):
		return failure(CodeInternalError, "refresh timed out")
	case errors.Is(err, errBadExpiry) || errors.Is(err, errTokenTooLarge) || isRedacted(err):
		return failure(CodeInternalError, "refresh failed") // logged by the coordinator
	}
	s.logStoreError(op, a, err)
	return failure(CodeInternalError, "refresh failed")
}

// denied turns a policy error into UNAUTHORIZED with a message and a
// "denied" member naming the kind of thing refused, never the policy's own
// text, which is logged on the host.
func denied(err error) result {
	fail := &protoError{code: CodeUnauthorized, msg: "request not allowed"}
	var d *denial
	if errors.As(err, &d) {
		fail.msg, fail.denied = d.msg, d.kind
	}
	return result{fail: fail, cause: err}
}

// storeFailure maps a store error to a response: NOT_FOUND with notFound
// as the message when the error is ErrNotFound and notFound is set, and
// otherwise INTERNAL_ERROR, whose cause is logged on the host only.
func (s *Server) storeFailure(ctx context.Context, op Op, a args, err error, notFound string) result {
	if notFound != "" && errors.Is(err, ErrNotFound) {
		return failure(CodeNotFound, notFound)
	}
	s.logStoreError(op, a, err)
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return failure(CodeInternalError, "credential store timed out")
	}
	return failure(CodeInternalError, "credential store error")
}

func (s *Server) logStoreError(op Op, a args, err error) {
	var secrets []string
	if !a.token.IsZero() {
		secrets = []string{string(a.token.AccessToken()), string(a.token.RefreshToken())}
	}
	s.log.Warn("credproxy: store error", "op", op, "provider", a.provider, "bucket", a.bucket, "key", a.name,
		"err", redact(err.Error(), secrets...))
}
