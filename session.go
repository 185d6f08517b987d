package credproxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// CapabilityFDEnv is the environment variable that tells a sandboxed
// process which file descriptor holds its session's capability token. Its
// value is always "3"; see [Session.HandoffFile] and [NewClientFromEnv].
const CapabilityFDEnv = "LLXPRT_CAPABILITY_FD"

// capabilityFD is the only descriptor a capability token is handed over
// on, as the reference implementation does.
const capabilityFD = 3

// Defaults for the zero values of [SessionOptions] (and, for idle
// connections and new tokens, of [Options]).
const (
	DefaultSessionMaxConnections = 32
	DefaultSessionRateLimit      = 120
	DefaultServerIdleTimeout     = 10 * time.Minute
	DefaultMaxNewTokens          = 16
	DefaultSessionWriteRate      = 1
	DefaultSessionWriteBurst     = 10
)

// SessionOptions configures a [Session]. Policy is required; every other
// zero value is safe and gives the default the field names.
type SessionOptions struct {
	// Policy decides what the session's sandbox may do. Required, so that
	// nothing is ever granted by omission; a [*Grant] is the usual choice,
	// and is read-only unless told otherwise.
	Policy Policy

	// Dir is the session's own directory: it holds the session's socket
	// (and, with Routes, the injection front's) and nothing else, and is
	// what a launcher mounts into the sandbox
	// (read-only is enough to connect). It must not exist, or be an empty
	// directory owned by this process's uid with mode 0700; every
	// directory above it must be owned by root or this uid and not be
	// writable by others (sticky directories such as /tmp excepted). A
	// directory the session created is removed when it closes. Empty
	// means a new directory in [DefaultSocketDir].
	Dir string

	// MaxConnections caps the session's concurrent connections. Zero
	// means 32. When the cap is reached, the session's oldest connection
	// still in its handshake is dropped, or else the new one is refused;
	// the server's own cap ([Options.MaxConnections]) applies as well.
	MaxConnections int

	// RateLimit is the number of requests per second the session's
	// connections may send together, and RateBurst how many at once, on
	// top of the per-connection limit of [Options.RateLimit]. Zero means
	// 120 and 120. A negative RateLimit switches the session's limit off.
	RateLimit float64
	RateBurst int

	// WriteRate is the number of token writes (save_token and
	// remove_token) per second the session may make, and WriteBurst how
	// many at once, within its request budget. A store that keeps every
	// revision until compacted (etcd) grows with each write, so a sandbox
	// given writes must not write as fast as it can send. Zero means 1
	// and 10. A negative WriteRate switches the limit off. Reads are not
	// counted. ([Server.Serve]'s connections, trusted by uid, have no
	// such budget.)
	WriteRate  float64
	WriteBurst int

	// IdleTimeout closes a connection that has completed its handshake and
	// then sent nothing for this long; clients reconnect when they next
	// need to. Zero means 10 minutes; negative keeps idle connections open.
	IdleTimeout time.Duration

	// MaxNewTokens caps how many tokens the sandbox may create (save_token
	// for a provider and bucket that has none) over the session's life,
	// when its Policy allows writes at all. Zero means 16; negative means
	// no cap.
	MaxNewTokens int

	// Routes, when not empty, give the session an injection front as
	// well: an HTTP/1.1 server on a second socket, "inject.sock" in Dir
	// ([Session.InjectSocketPath]), that forwards /<Name>/... to each
	// route's upstream with the session's phantom credential
	// ([Session.Phantom]) replaced by the real one, so that the sandbox
	// never holds a real credential. Each request must carry the phantom
	// where its route's Header says (401 if not), name a route (404) and
	// keep to the route's Methods and PathPrefixes (403); the session's
	// Policy is asked, as for get_token or get_api_key, before each
	// credential is read, and a [*Grant] must allow every route when the
	// session starts. Tokens are read and refreshed as get_token does;
	// after a 401 from the upstream, a token route's request is retried
	// once with a token refreshed on the host, as refresh_token does for
	// the session, if its body was at most 1 MiB. The front has its own
	// connection cap, MaxConnections, and closes keep-alive connections
	// idle for IdleTimeout or 2 minutes, whichever is shorter. The
	// routes' upstreams are reached through [Options.InjectTransport].
	// PROTOCOL.md, "Injection front", has the contract. The session's own
	// socket still serves the Policy to a client with the capability
	// token: for a sandbox that holds no real credential, do not hand it
	// the token ([Session.HandoffFile]), only the phantom, or give the
	// session a Policy that allows the routes' credentials to the front
	// only: the front's requests carry the route's name in
	// [Request].Route, and those on the session's socket carry none.
	Routes []Route
}

// Session is one sandbox's way in to a [Server]: its own socket, in a
// directory of its own, reached only with its capability token, and
// served under its own Policy, connection cap, rate budget and idle
// timeout. A launcher starts one per sandbox with [Server.NewSession],
// mounts [Session.Dir] into the sandbox, passes [Session.Environ] and
// [Session.HandoffFile] to the sandboxed command, and closes the session
// when the command exits: that revokes everything it granted.
//
// A Session is safe for concurrent use. Its printed forms never show its
// capability token.
type Session struct {
	srv      *Server
	id       string
	policy   Policy
	token    Secret   // "" for the server's own session, which Serve uses
	digest   [32]byte // of token
	dir      string   // "" for the server's own session
	socket   string
	madeDir  bool
	ctx      context.Context // ends when the session closes
	cancel   context.CancelFunc
	limiter  *connLimiter // the session's rate budget; nil: none
	writes   *connLimiter // its token writes' budget; nil: none
	refusals *refusalLog
	phantom  Secret       // see Phantom
	inject   *injectFront // nil: no routes

	maxConns    int
	idleTimeout time.Duration
	maxNew      int64 // < 0: no cap
	created     atomic.Int64

	// Guarded by srv.mu.
	listener net.Listener
	conns    int
	closed   bool

	live      sync.WaitGroup // its connections' goroutines
	accepting sync.WaitGroup // its accept loop

	// served holds, per token, a digest of the access token the session
	// was last given, so that refresh_token can tell a sandbox that holds
	// an outdated token (give it the stored one) from one whose current
	// token stopped working (ask the provider).
	servedMu sync.Mutex
	served   map[tokenID]uint64
}

// NewSession starts serving a new session, for one sandbox: it creates the
// session's directory, listens on a socket in it and makes the session's
// capability token. The errors say what to fix, so a launcher can report
// them and not start the sandbox. A session ends with [Session.Close], or
// with the server's Shutdown or Close.
func (s *Server) NewSession(opts SessionOptions) (*Session, error) {
	if opts.Policy == nil {
		return nil, errors.New("credproxy: SessionOptions.Policy is nil; say what the sandbox may do, for example with a *credproxy.Grant")
	}
	if g, ok := opts.Policy.(*Grant); ok {
		if err := g.check(); err != nil {
			return nil, err
		}
	}
	if opts.MaxConnections < 0 || opts.RateBurst < 0 || opts.WriteBurst < 0 {
		return nil, errors.New("credproxy: SessionOptions has a negative limit; use zero for the default")
	}
	setDefault(&opts.MaxConnections, DefaultSessionMaxConnections)
	setDefault(&opts.IdleTimeout, DefaultServerIdleTimeout)
	setDefault(&opts.MaxNewTokens, DefaultMaxNewTokens)
	if opts.RateLimit == 0 {
		opts.RateLimit = DefaultSessionRateLimit
	}
	if opts.RateBurst == 0 {
		opts.RateBurst = max(1, int(min(opts.RateLimit+0.999999, 1<<30)))
	}
	if opts.WriteRate == 0 {
		opts.WriteRate = DefaultSessionWriteRate
	}
	setDefault(&opts.WriteBurst, DefaultSessionWriteBurst)
	var routes map[string]*route
	if len(opts.Routes) > 0 {
		var err error
		if routes, err = compileRoutes(opts.Routes, opts.Policy, s.opts.InjectTransport != nil); err != nil {
			return nil, err
		}
	}

	sess := s.newSession(opts.Policy, randomHex(4))
	sess.token = Secret(randomHex(32))
	sess.digest = capabilityDigest(string(sess.token))
	sess.phantom = Secret(phantomPrefix + randomHex(24))
	sess.maxConns = opts.MaxConnections
	sess.idleTimeout = opts.IdleTimeout
	sess.maxNew = int64(opts.MaxNewTokens)
	sess.limiter = newConnLimiter(opts.RateLimit, opts.RateBurst)
	sess.writes = newConnLimiter(opts.WriteRate, opts.WriteBurst)

	if err := sess.makeDir(opts.Dir); err != nil {
		sess.cancel()
		return nil, err
	}
	ln, err := sess.listen()
	if err != nil {
		sess.removeDir()
		sess.cancel()
		return nil, err
	}
	if routes != nil {
		if sess.inject, err = sess.newInjectFront(routes); err != nil {
			ln.Close()
			sess.removeDir()
			sess.cancel()
			return nil, err
		}
	}
	if !s.trackSession(sess, ln) {
		ln.Close()
		if sess.inject != nil {
			sess.inject.close()
		}
		sess.removeDir()
		sess.cancel()
		return nil, ErrServerClosed
	}
	sess.accepting.Add(1)
	s.wg.Go(func() {
		defer sess.accepting.Done()
		s.serve(ln, sess)
	})
	attrs := []any{"session", sess.id, "socket", sess.socket, "grant", policyString(sess.policy)}
	if f := sess.inject; f != nil {
		sess.accepting.Add(1)
		s.wg.Go(func() {
			defer sess.accepting.Done()
			f.serve()
		})
		attrs = append(attrs, "inject", f.path, "routes", routeNames(routes))
	}
	s.log.Info("credproxy: session started", attrs...)
	return sess, nil
}

// newSession returns a session with policy and id, and a context that
// ends with the server's.
func (s *Server) newSession(policy Policy, id string) *Session {
	ctx, cancel := context.WithCancel(s.baseCtx)
	return &Session{srv: s, id: id, policy: policy, ctx: ctx, cancel: cancel, maxNew: -1, refusals: newRefusalLog()}
}

// trackSession registers a session and its listener, unless the server is
// shutting down.
func (s *Server) trackSession(ss *Session, ln net.Listener) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inShutdown.Load() {
		return false
	}
	ss.listener = ln
	s.sessions[ss] = struct{}{}
	return true
}

// ID returns the session's id, which names it in the host's log (and in
// its default directory's name).
func (ss *Session) ID() string { return ss.id }

// Dir returns the session's directory, an absolute path: the one to mount
// into the sandbox, read-only.
func (ss *Session) Dir() string { return ss.dir }

// SocketPath returns the absolute path of the session's socket, the value
// of [SocketEnv] in the sandbox.
func (ss *Session) SocketPath() string { return ss.socket }

// CapabilityToken returns the session's capability token: 64 lowercase hex
// characters, which a client must present in its handshake. Hand it to the
// sandbox with [Session.HandoffFile] rather than in its environment or
// arguments, where other processes can read it.
func (ss *Session) CapabilityToken() Secret { return ss.token }

// Environ returns the environment variables a sandboxed command needs, as
// "KEY=value" strings: [SocketEnv] set to the socket's path and
// [CapabilityFDEnv] set to 3. Add them to the command's environment, and
// pass [Session.HandoffFile] as its file descriptor 3.
func (ss *Session) Environ() []string {
	return []string{SocketEnv + "=" + ss.socket, CapabilityFDEnv + "=" + strconv.Itoa(capabilityFD)}
}

// HandoffFile returns a file that holds the capability token and a
// newline, and nothing else, to pass to the sandboxed command as its file
// descriptor 3 (in Go, as ExtraFiles[0] of an exec.Cmd). Close it once the
// command has started. On Linux it is a sealed memory file, which every
// process of the sandbox that inherits it can read; elsewhere it is a
// pipe, which the first reader drains. The token never touches a disk.
func (ss *Session) HandoffFile() (*os.File, error) {
	return handoffFile(string(ss.token) + "\n")
}

// String describes the session without its token.
func (ss *Session) String() string {
	return "credproxy.Session(" + ss.id + " at " + ss.socket + ")"
}

// GoString is String, so that %#v does not print the token.
func (ss *Session) GoString() string { return ss.String() }

// Format prints String for every verb, so no verb reaches the token.
func (ss *Session) Format(f fmt.State, _ rune) { io.WriteString(f, ss.String()) }

// Close ends the session: it closes its listeners and every one of its
// connections (requests in flight are cancelled and get no answer, those
// through the injection front included), removes its sockets and the
// directory it created, and invalidates its capability token and its
// phantom. It returns once the session's goroutines have exited. Close may
// be called more than once; the server and its other sessions go on.
func (ss *Session) Close() error {
	s := ss.srv
	s.mu.Lock()
	first := !ss.closed
	ss.closed = true
	var err error
	if first {
		err = s.closeSessionLocked(ss)
	}
	s.mu.Unlock()
	ss.cancel()
	if ss.inject != nil {
		ss.inject.close()
	}
	ss.accepting.Wait()
	ss.live.Wait()
	if first {
		ss.removeDir()
		s.logUnlogged(ss)
		s.log.Info("credproxy: session closed", "session", ss.id)
	}
	return err
}

// closeSessionLocked closes the session's listener and connections.
func (s *Server) closeSessionLocked(ss *Session) error {
	delete(s.sessions, ss)
	var err error
	if ss.listener != nil {
		for l := range s.listeners {
			if *l == ss.listener {
				keepReplacement(*l, s.listeners[l])
				delete(s.listeners, l)
			}
		}
		if cerr := ss.listener.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) {
			err = cerr
		}
	}
	for c := range s.conns {
		if c.sess == ss {
			c.rwc.Close()
		}
	}
	return err
}

// isClosed reports whether the session has been closed.
func (ss *Session) isClosed() bool {
	ss.srv.mu.Lock()
	defer ss.srv.mu.Unlock()
	return ss.closed
}

// reserveNewToken counts a token the sandbox is about to create, and
// reports whether the session may create it.
func (ss *Session) reserveNewToken() bool {
	if ss.maxNew < 0 {
		return true
	}
	if ss.created.Add(1) > ss.maxNew {
		ss.created.Add(-1)
		return false
	}
	return true
}

// randomHex returns n bytes from crypto/rand in lowercase hex.
func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b) // never fails (crypto/rand documents that it crashes the program instead)
	return hex.EncodeToString(b)
}

// policyString describes a policy for the log: a Grant in its own words.
func policyString(p Policy) string {
	if st, ok := p.(fmt.Stringer); ok {
		return st.String()
	}
	return fmt.Sprintf("%T", p)
}
