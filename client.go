package credproxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Client defaults, used for the zero values of [ClientOptions].
const (
	DefaultRequestTimeout = 30 * time.Second
	DefaultIdleTimeout    = 5 * time.Minute
)

// ClientOptions configures a [Client]. The zero value gives the defaults.
type ClientOptions struct {
	// RequestTimeout bounds each call, on top of the caller's context,
	// waits for the server's rate limit included. Zero means 30s.
	RequestTimeout time.Duration

	// IdleTimeout is how long a connection with no call pending stays
	// open; the next call after it reconnects and handshakes again. Zero
	// means 5 minutes; a negative value keeps the connection open.
	IdleTimeout time.Duration

	// MaxInFlight caps the calls sent and not yet answered; further calls
	// wait for a slot (or their context), so that many goroutines sharing
	// a client never exceed the server's per-connection cap. Zero means 16,
	// the server's default.
	MaxInFlight int

	// Reconnect lets a call after a lost connection connect again. By
	// default it fails with [ErrConnectionLost]: a socket that reappears at
	// the same path could belong to someone else, so the safe reaction to
	// a vanished host is to restart the session. (A connection the server
	// closes while no call is pending, as it does with idle ones, is not
	// lost: the next call connects again either way.)
	Reconnect bool

	// CapabilityToken is the session's capability token, which the
	// handshake presents (PROTOCOL.md, "Sessions"). [NewClientFromEnv]
	// fills it in from the descriptor named by [CapabilityFDEnv]. Empty
	// presents none, which only a server without sessions accepts.
	CapabilityToken Secret

	// ServerUIDs lists uids, besides this process's effective uid and
	// root, that the server may run as. Before the handshake, which
	// carries the capability token, the client asks the kernel which uid
	// the server runs as (Linux and macOS) and refuses any other: a
	// process of another user that took the socket's path gets nothing.
	ServerUIDs []int

	// NoRateLimitRetry turns off waiting for the server's rate limit
	// (PROTOCOL.md, "Responses"). By default, a read (get_token,
	// get_api_key, has_api_key, get_bucket_stats and the lists) that the
	// server refuses with RATE_LIMITED waits the retryAfter the server
	// gave and is sent again, for as long as the wait ends before the
	// call's deadline (its context's, or RequestTimeout's); a wait that
	// would not fails the call at once with the server's error. Meanwhile
	// the client's other calls, writes included, wait for the same moment
	// before they are sent, unless their deadline comes first, so that a
	// busy client does not send what the server would refuse. Writes and
	// refresh_token are never sent twice. With NoRateLimitRetry set, every
	// call is sent at once, and RATE_LIMITED is returned as a
	// [*RemoteError] with RetryAfter set.
	NoRateLimitRetry bool

	// dial replaces the Unix socket dialer in tests.
	dial func(ctx context.Context) (net.Conn, error)
}

// Client talks to a credproxy server. It connects on first use and
// performs the handshake; after that, calls from any number of goroutines
// share the one connection, each request matched to its response by id.
// A Client is safe for concurrent use. It implements [Store], so code that
// reads credentials can take a Store and run unchanged on the host or in a
// sandbox; the writes the protocol does not carry fail with [ErrHostOnly].
//
// Errors the server reports are [*RemoteError] values, which match the
// package's sentinel errors: errors.Is(err, ErrNotFound) works as it does
// with a local Store. A read refused by the server's rate limit is sent
// again once the server allows, within the call's context (see
// [ClientOptions].NoRateLimitRetry); nothing else is sent twice. If the
// connection breaks, every pending call fails at once with
// [ErrConnectionLost]. A call whose context ends fails with an error
// wrapping the context's, whatever it was doing, and a call whose context
// has already ended is not sent.
//
// The zero Client is not usable: make one with [NewClient], [Dial] or
// [NewClientFromEnv].
type Client struct {
	path string
	opts ClientOptions
	dial func(ctx context.Context) (net.Conn, error)

	// connecting holds a token while a call dials and handshakes; a
	// channel, not a mutex, so that a call waiting its turn gives up when
	// its context ends.
	connecting chan struct{}
	slots      chan struct{} // one token per call in flight

	// hold is when, in nanoseconds since epoch, the server will take
	// requests again after it refused a read with RATE_LIMITED; calls wait
	// for it before they are sent. Zero: no read was refused.
	epoch time.Time
	hold  atomic.Int64

	mu     sync.Mutex
	cc     *clientConn // current connection, or nil
	lost   bool        // a connection broke and Reconnect is off
	closed bool
	nextID uint64
	wg     sync.WaitGroup // reader goroutines
}

var _ Store = (*Client)(nil)

// clientConn is one connection of a Client. Its fields other than nc and
// writing are guarded by Client.mu.
type clientConn struct {
	nc net.Conn
	// writing holds a token while a request is being written. A channel,
	// not a mutex, so that a call waiting its turn gives up when its
	// context ends.
	writing chan struct{}
	pending map[string]chan<- callResult
	closing bool // closed on purpose: idle or Client.Close

	// The idle timer closes the connection once it has had no call pending
	// for IdleTimeout: armed when the last pending call ends, stopped when
	// a call registers. idleAt is when it was armed, so that a firing that
	// raced with a Stop and a later arming finds too little idle time.
	idle   *time.Timer
	idleAt time.Time
}

type callResult struct {
	resp response
	err  error
}

// NewClient returns a client for the socket at path. It does not connect
// until the first call.
func NewClient(path string, opts ClientOptions) *Client {
	setDefault(&opts.RequestTimeout, DefaultRequestTimeout)
	setDefault(&opts.IdleTimeout, DefaultIdleTimeout)
	setDefault(&opts.MaxInFlight, DefaultMaxInFlight)
	c := &Client{path: path, opts: opts, dial: opts.dial, epoch: time.Now(),
		connecting: make(chan struct{}, 1), slots: make(chan struct{}, opts.MaxInFlight)}
	if c.dial == nil {
		c.dial = func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}
	}
	return c
}

// NewClientFromEnv returns a client for the socket named by the
// environment variable [SocketEnv], and an error if it is not set. Like
// [NewClient] it connects at the first call; [OpenStore] connects at once.
//
// If [CapabilityFDEnv] is set, and opts has no CapabilityToken, it reads
// the session's capability token from file descriptor 3 (the only one
// accepted), closes the descriptor and unsets the variable, so that
// programs this process starts inherit neither; the descriptor must hold
// exactly 64 lowercase hex characters and a newline. The token is kept for
// later clients of the process. A token that cannot be read is an error
// that says why.
func NewClientFromEnv(opts ClientOptions) (*Client, error) {
	path := os.Getenv(SocketEnv)
	if path == "" {
		return nil, errorf("%s is not set; run inside a sandbox started with a credential proxy", SocketEnv)
	}
	if opts.CapabilityToken == "" {
		token, err := capabilityFromEnv()
		if err != nil {
			return nil, err
		}
		opts.CapabilityToken = token
	}
	return NewClient(path, opts), nil
}

// Dial returns a client for the socket at path, connected and past the
// handshake, so that a missing or incompatible server is reported now.
func Dial(ctx context.Context, path string, opts ClientOptions) (*Client, error) {
	c := NewClient(path, opts)
	ctx, cancel := context.WithTimeout(ctx, c.opts.RequestTimeout)
	defer cancel()
	if _, err := c.connect(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// String describes the client by its socket path, never its capability
// token.
func (c *Client) String() string { return "credproxy.Client(" + c.path + ")" }

// GoString is String, so that %#v does not print the token.
func (c *Client) GoString() string { return c.String() }

// Format prints String for every verb, so no verb reaches the token.
func (c *Client) Format(f fmt.State, _ rune) { io.WriteString(f, c.String()) }

// Close closes the connection. Pending calls fail with an error matching
// net.ErrClosed, as do calls made afterwards. Close waits for the
// client's goroutines to exit, and may be called more than once.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	cc := c.cc
	c.cc = nil
	var pending map[string]chan<- callResult
	if cc != nil {
		pending = c.closeConnLocked(cc)
	}
	c.mu.Unlock()
	for _, ch := range pending {
		ch <- callResult{err: errClientClosed}
	}
	c.wg.Wait()
	return nil
}

// closeConnLocked closes cc on purpose and returns its pending calls.
func (c *Client) closeConnLocked(cc *clientConn) map[string]chan<- callResult {
	cc.closing = true
	if cc.idle != nil {
		cc.idle.Stop()
	}
	cc.nc.Close()
	pending := cc.pending
	cc.pending = nil
	return pending
}
