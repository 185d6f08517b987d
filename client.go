package credproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
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
	// for IdleTimeout. Arming it records idleGen in armedGen; registering a
	// call bumps idleGen, which disarms it without a timer operation.
	idle     *time.Timer
	idleAt   time.Time
	idleGen  uint64
	armedGen uint64
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

type closedError struct{}

func (closedError) Error() string { return "credproxy: client is closed" }
func (closedError) Unwrap() error { return net.ErrClosed }

var errClientClosed error = closedError{}

// RemoteError is a failure the server reported. Its Is method matches the
// sentinel error of its code (CodeNotFound matches [ErrNotFound], and so
// on), and errors.As recovers it to tell a remote error from a transport
// one. A RemoteError is a plain value: safe to read from any goroutine,
// and its zero value (no code) matches [ErrInternal].
type RemoteError struct {
	Op      Op
	Code    Code
	Message string // the server's fixed text; act on Code, not on this

	// RetryAfter is set for CodeRateLimited.
	RetryAfter time.Duration

	// Denied is, for a refusal, the kind of thing refused, as the
	// response's "denied" member names it: "provider", "bucket",
	// "api_key", "read_only" or "new_token_limit", for which Is matches
	// [ErrProviderDenied], [ErrBucketDenied], [ErrKeyDenied], [ErrReadOnly]
	// and [ErrNewTokenLimit] (as well as [ErrDenied]). It is empty when
	// the server named no kind.
	Denied string
}

// Error returns "credproxy: <op>: <message> (<code>)".
func (e *RemoteError) Error() string {
	return "credproxy: " + string(e.Op) + ": " + e.Message + " (" + string(e.Code) + ")"
}

// Is reports whether target is the sentinel error for e.Code. Codes that
// other implementations of the protocol send match the nearest sentinel:
// FORBIDDEN, PERMISSION_DENIED and ACCESS_DENIED match [ErrDenied];
// INVALID_PARAM and UNKNOWN_OP [ErrInvalidRequest]; HOST_AUTH_REQUIRED
// [ErrReauthRequired]; PROVIDER_NOT_CONFIGURED [ErrProviderNotFound];
// SESSION_NOT_FOUND, SESSION_EXPIRED and SESSION_ALREADY_USED (a login
// session the host no longer has) [ErrNotFound]; CANCELLED
// context.Canceled. Every other code, REFRESH_FAILED and codes nobody
// defines included, matches [ErrInternal]: the server could not complete
// the request. A refusal that names its kind (see Denied) also matches
// that kind's sentinel.
func (e *RemoteError) Is(target error) bool {
	s := e.Code.sentinel()
	if d, ok := target.(*denial); ok {
		return s == ErrDenied && e.Denied != "" && e.Denied == d.kind
	}
	return s == target
}

// connect returns the current connection, dialling and handshaking if
// there is none.
func (c *Client) connect(ctx context.Context) (*clientConn, error) {
	select {
	case c.connecting <- struct{}{}:
		defer func() { <-c.connecting }()
	case <-ctx.Done():
		return nil, errorf("connect to the credential proxy at %s: %w", c.path, ctx.Err())
	}
	c.mu.Lock()
	cc, err := c.currentLocked()
	c.mu.Unlock()
	if cc != nil || err != nil {
		return cc, err
	}
	if ctx.Err() != nil { // sent nothing yet: not even the handshake
		return nil, errorf("connect to the credential proxy at %s: %w", c.path, ctx.Err())
	}

	nc, err := c.dial(ctx)
	if err != nil {
		return nil, errorf("connect to the credential proxy at %s: %w", c.path, err)
	}
	if err := c.checkServer(nc); err != nil {
		nc.Close()
		return nil, err
	}
	if err := handshake(ctx, nc, c.opts.CapabilityToken); err != nil {
		nc.Close()
		return nil, err
	}
	cc = &clientConn{nc: nc, writing: make(chan struct{}, 1), pending: make(map[string]chan<- callResult)}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		nc.Close()
		return nil, errClientClosed
	}
	c.cc = cc
	c.lost = false
	c.armIdleLocked(cc)
	c.wg.Go(func() { c.readLoop(cc) })
	return cc, nil
}

func (c *Client) currentLocked() (*clientConn, error) {
	switch {
	case c.closed:
		return nil, errClientClosed
	case c.cc != nil:
		return c.cc, nil
	case c.lost:
		return nil, ErrConnectionLost
	}
	return nil, nil
}

// checkServer refuses a server that runs as a uid other than this
// process's, root's and those of ServerUIDs, where the kernel can tell.
func (c *Client) checkServer(nc net.Conn) error {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return nil
	}
	server, err := peerCreds(uc)
	if errors.Is(err, errors.ErrUnsupported) {
		return nil
	}
	if err != nil {
		return errorf("identify the credential proxy at %s: %w", c.path, err)
	}
	uid, _ := server.UID()
	if uid != os.Geteuid() && uid != 0 && !slices.Contains(c.opts.ServerUIDs, uid) {
		return errorf("the credential proxy at %s runs as uid %d, neither this process's uid %d nor root; refusing to talk to it (set ClientOptions.ServerUIDs if that uid is expected): %w",
			c.path, uid, os.Geteuid(), ErrDenied)
	}
	return nil
}

// handshake sends the version 1 handshake, with token if there is one, and
// checks the reply (PROTOCOL.md, "Handshake").
func handshake(ctx context.Context, nc net.Conn, token Secret) error {
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
		defer nc.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(aLongTimeAgo) })
	defer stop()
	hs := []byte(`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1`)
	if token != "" {
		hs = append(append(hs, `,"capabilityToken":`...), quote(string(token))...)
	}
	if err := writeFrame(nc, append(hs, "}}"...)); err != nil {
		return errorf("handshake: %w", contextOr(ctx, err))
	}
	frame, err := readFrame(nc, nil)
	if err != nil {
		return errorf("handshake: %w", contextOr(ctx, err))
	}
	var reply struct {
		OK   bool `json:"ok"`
		Code Code `json:"code"`
		Data struct {
			Version int `json:"version"`
		} `json:"data"`
	}
	if err := json.Unmarshal(frame, &reply); err != nil {
		return errorf("handshake: malformed reply: %w", ErrInternal)
	}
	if !reply.OK || reply.Data.Version != ProtocolVersion {
		if reply.Code == "" || reply.Code == CodeUnknownVersion {
			return errorf("handshake: server does not speak protocol version %d: %w", ProtocolVersion, ErrUnknownVersion)
		}
		msg := "handshake refused"
		if reply.Code == CodeUnauthorized {
			msg = "invalid or missing capability token"
		}
		return &RemoteError{Op: opHandshake, Code: reply.Code, Message: msg}
	}
	return nil
}

// contextOr returns ctx's error if ctx has ended, since a deadline or
// cancellation is the real cause of an I/O error then, and err otherwise.
// An I/O deadline met at or after ctx's deadline is ctx's, which the
// connection's deadline copies: context.DeadlineExceeded, even if ctx's
// own timer has not fired yet.
func contextOr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if dl, ok := ctx.Deadline(); ok && errors.Is(err, os.ErrDeadlineExceeded) && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return err
}

// armIdleLocked starts the idle timer of cc, which has no call pending.
func (c *Client) armIdleLocked(cc *clientConn) {
	if c.opts.IdleTimeout < 0 {
		return
	}
	cc.idleGen++
	cc.armedGen = cc.idleGen
	cc.idleAt = time.Now()
	if cc.idle != nil {
		cc.idle.Reset(c.opts.IdleTimeout)
		return
	}
	cc.idle = time.AfterFunc(c.opts.IdleTimeout, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		// A firing that raced with a later arming finds the connection
		// idle for less than IdleTimeout; the reset timer fires again.
		if c.cc == cc && len(cc.pending) == 0 && cc.armedGen == cc.idleGen &&
			time.Since(cc.idleAt) >= c.opts.IdleTimeout {
			c.cc = nil
			c.closeConnLocked(cc)
		}
	})
}

// readLoop delivers responses to their calls until the connection ends.
func (c *Client) readLoop(cc *clientConn) {
	// Any failure ends the connection: a read error, a frame that does not
	// parse, or a response with id "unknown" (the server could not read one
	// of our frames, so some call would never be answered).
	var buf []byte
	for {
		frame, err := readFrame(cc.nc, buf)
		if err != nil {
			break
		}
		resp, err := decodeResponse(frame)
		if err != nil {
			break
		}
		id, ok := responseID(resp.ID)
		if !ok {
			break
		}
		c.mu.Lock()
		ch := cc.pending[id]
		delete(cc.pending, id)
		if ch != nil && len(cc.pending) == 0 {
			c.armIdleLocked(cc)
		}
		c.mu.Unlock()
		if ch != nil {
			ch <- callResult{resp: resp}
		}
		if cap(frame) <= 4096 {
			buf = frame[:0]
		}
	}

	c.mu.Lock()
	if c.cc == cc {
		c.cc = nil
	}
	// A connection the server closed with nothing pending (its idle
	// timeout) is not lost: no call failed, and the next one reconnects.
	closing := cc.closing || len(cc.pending) == 0
	if !closing && !c.opts.Reconnect {
		c.lost = true
	}
	pending := cc.pending
	cc.pending = nil
	if cc.idle != nil {
		cc.idle.Stop()
	}
	c.mu.Unlock()
	cc.nc.Close()
	for _, ch := range pending {
		ch <- callResult{err: ErrConnectionLost}
	}
}

func responseID(raw jsontext.Value) (string, bool) {
	if raw.Kind() != '"' {
		return "", false
	}
	id, err := jsontext.AppendUnquote(nil, raw)
	if err != nil || string(id) == unknownID {
		return "", false
	}
	return string(id), true
}

// call sends one request and waits for its response. It returns the data
// object of a success, or the error.
//
// A call whose context ends fails with the same error whatever it was
// doing (waiting for a slot, connecting, writing, waiting for the
// response): "credproxy: <op>: " and the context's error, which it wraps.
// A call whose context has ended is never sent: select picks at random
// among ready cases, so a call can get through every wait with its
// context ended, and the write checks once more.
func (c *Client) call(ctx context.Context, op Op, payload []byte) (jsontext.Value, error) {
	if ctx.Err() != nil {
		return nil, ctxError(op, ctx.Err())
	}
	ctx, cancel := context.WithTimeout(ctx, c.opts.RequestTimeout)
	defer cancel()
	for {
		data, err := c.send(ctx, op, payload)
		if err == nil {
			return data, nil
		}
		if err, retry := c.failed(ctx, op, err); !retry {
			return nil, err
		}
	}
}

// failed returns the error of a call to op that failed with err, or
// reports that the call is to be sent again. (A function of its own: the
// errors.As target would cost the success path an allocation.)
func (c *Client) failed(ctx context.Context, op Op, err error) (_ error, retry bool) {
	var re *RemoteError
	switch {
	case errors.As(err, &re): // the server's answer
		_, fits := c.holdLeft(ctx)
		return err, re.Code == CodeRateLimited && c.retries(op) && fits // send waits for the hold
	case ctx.Err() != nil: // the real cause of any other error then
		return ctxError(op, ctx.Err()), false
	case errors.Is(err, context.DeadlineExceeded): // as I/O met it, a moment before the context did
		return ctxError(op, context.DeadlineExceeded), false
	}
	return err, false
}

// retries reports whether the client sends op again after RATE_LIMITED:
// whether it is a read, unless NoRateLimitRetry is set.
func (c *Client) retries(op Op) bool {
	switch op {
	case OpGetToken, OpGetAPIKey, OpHasAPIKey, OpGetBucketStats, OpListProviders, OpListBuckets, OpListAPIKeys:
		return !c.opts.NoRateLimitRetry
	}
	return false
}

// holdFor holds the client's calls back for d, at least a second (the
// protocol's least retryAfter), from now.
func (c *Client) holdFor(d time.Duration) {
	until := int64(time.Since(c.epoch) + max(d, time.Second))
	for {
		h := c.hold.Load()
		if h >= until || c.hold.CompareAndSwap(h, until) {
			return
		}
	}
}

// holdLeft returns how long the hold has yet to run, and whether it ends
// before ctx's deadline.
func (c *Client) holdLeft(ctx context.Context) (left time.Duration, fits bool) {
	h := c.hold.Load()
	if h == 0 {
		return 0, true
	}
	now := time.Now()
	left = max(0, time.Duration(h)-now.Sub(c.epoch))
	dl, ok := ctx.Deadline()
	return left, !ok || now.Add(left).Before(dl)
}

// sleep waits for d or the end of ctx, and then returns ctx's error.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// seconds converts a response's retryAfter, capped at a day so that no
// value overflows a Duration.
func seconds(s float64) time.Duration {
	if !(s > 0) {
		return 0
	}
	return time.Duration(min(s, 86400) * float64(time.Second))
}

// ctxError is the error of a call to op whose context ended with cause.
func ctxError(op Op, cause error) error {
	return errorf("%s: %w", op, cause)
}

// send sends one request on a free slot, once the hold has run if it
// ends before ctx's deadline, and waits for its response.
func (c *Client) send(ctx context.Context, op Op, payload []byte) (jsontext.Value, error) {
	for {
		select {
		case c.slots <- struct{}{}:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		// The hold is read with a slot taken: a read refused with
		// RATE_LIMITED sets it before it frees its slot, so a call that
		// gets the slot sees it.
		left, fits := c.holdLeft(ctx)
		if left == 0 || !fits {
			break
		}
		<-c.slots // no slot is kept while waiting
		if err := sleep(ctx, left); err != nil {
			return nil, err
		}
	}
	defer func() { <-c.slots }()

	ch := make(chan callResult, 1)
	cc, id, err := c.register(ctx, ch)
	if err != nil {
		return nil, err
	}
	frame := startFrame(make([]byte, 0, 64+len(id)+len(op)+len(payload)))
	frame = append(frame, `{"v":1,"id":"`...)
	frame = append(frame, id...)
	frame = append(frame, `","op":"`...)
	frame = append(frame, op...)
	frame = append(frame, `","payload":`...)
	frame = append(frame, payload...)
	frame = append(frame, '}')
	if err := c.write(ctx, cc, frame); err != nil {
		c.unregister(cc, id)
		return nil, err
	}

	select {
	case r := <-ch:
		if r.err != nil {
			return nil, r.err
		}
		if !r.resp.OK {
			re := &RemoteError{Op: op, Code: r.resp.Code, Message: r.resp.Error, RetryAfter: seconds(r.resp.RetryAfter),
				Denied: r.resp.deniedKind()}
			if re.Code == CodeRateLimited && c.retries(op) {
				c.holdFor(re.RetryAfter)
			}
			return nil, re
		}
		if r.resp.Data.Kind() != '{' {
			return nil, errorf("%s: response has no data object: %w", op, ErrInternal)
		}
		return r.resp.Data, nil
	case <-ctx.Done():
		c.unregister(cc, id)
		return nil, ctx.Err()
	}
}

// unregister forgets the pending call id of cc, which will not wait for
// its response.
func (c *Client) unregister(cc *clientConn, id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cc.pending != nil {
		delete(cc.pending, id)
		if len(cc.pending) == 0 && c.cc == cc {
			c.armIdleLocked(cc)
		}
	}
}

// register connects if needed and records a pending call on the current
// connection, in one step, so an idle close cannot come between them.
func (c *Client) register(ctx context.Context, ch chan<- callResult) (*clientConn, string, error) {
	for {
		c.mu.Lock()
		cc, err := c.currentLocked()
		if err != nil {
			c.mu.Unlock()
			return nil, "", err
		}
		if cc != nil {
			c.nextID++
			id := strconv.FormatUint(c.nextID, 10)
			cc.pending[id] = ch
			cc.idleGen++ // disarms the idle timer
			c.mu.Unlock()
			return cc, id, nil
		}
		c.mu.Unlock()
		if _, err := c.connect(ctx); err != nil {
			return nil, "", err
		}
	}
}

// write sends a request frame whole. A write that fails or is cut off by
// its deadline leaves the stream in an unknown state, so the connection is
// closed: its pending calls fail with ErrConnectionLost.
func (c *Client) write(ctx context.Context, cc *clientConn, frame []byte) error {
	frame, err := sealFrame(frame)
	if err != nil {
		return err
	}
	select {
	case cc.writing <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-cc.writing }()
	if err := ctx.Err(); err != nil { // select may have chosen the turn over the ended context
		return err
	}
	dl, _ := ctx.Deadline()
	cc.nc.SetWriteDeadline(dl)
	if _, err := cc.nc.Write(frame); err != nil {
		cc.nc.Close()
		if err = contextOr(ctx, err); errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		return ErrConnectionLost
	}
	return nil
}

// Request payloads. Names are quoted as JSON strings; the server validates
// them.

func tokenPayload(provider, bucket string) []byte {
	p := append([]byte(`{"provider":`), quote(provider)...)
	if bucket != "" {
		p = append(append(p, `,"bucket":`...), quote(bucket)...)
	}
	return append(p, '}')
}

func quote(s string) []byte {
	q, _ := jsontext.AppendQuote(nil, s)
	return q
}

// GetToken returns the token of provider and bucket ("" for the default
// bucket), without its refresh token. An absent token is an error matching
// [ErrNotFound].
func (c *Client) GetToken(ctx context.Context, provider, bucket string) (Token, error) {
	return c.token(ctx, OpGetToken, provider, bucket)
}

// token runs op, get_token or refresh_token, and returns its token.
func (c *Client) token(ctx context.Context, op Op, provider, bucket string) (Token, error) {
	data, err := c.call(ctx, op, tokenPayload(provider, bucket))
	if err != nil {
		return Token{}, err
	}
	tok, err := parseTokenAsIs(data)
	if err != nil {
		return Token{}, errorf("%s: malformed token from server: %w", op, ErrInternal)
	}
	return tok.WithoutRefreshToken(), nil
}

// RefreshToken asks the host to refresh the token of provider and bucket
// ("" for the default bucket) and returns the new token, without its
// refresh token, which stays on the host. If the stored token is still
// valid for over a minute (someone refreshed it meanwhile), the host
// returns it without asking the provider. Failures match [ErrNotFound],
// [ErrProviderNotFound] (the host cannot refresh this provider),
// [ErrRefreshNotAvailable] and [ErrReauthRequired] (the user must log in
// again on the host), and [ErrRateLimited] (refreshed moments ago; see
// [RemoteError].RetryAfter).
func (c *Client) RefreshToken(ctx context.Context, provider, bucket string) (Token, error) {
	return c.token(ctx, OpRefreshToken, provider, bucket)
}

// SaveToken asks the host to merge token into the stored token of provider
// and bucket. Its refresh token, if any, is not sent: the host keeps its
// own.
func (c *Client) SaveToken(ctx context.Context, provider, bucket string, token Token) error {
	p := tokenPayload(provider, bucket)
	p = append(p[:len(p)-1], `,"token":`...)
	p = token.appendSanitised(p)
	_, err := c.call(ctx, OpSaveToken, append(p, '}'))
	return err
}

// RemoveToken asks the host to delete the token of provider and bucket. It
// succeeds if the token was already absent.
func (c *Client) RemoveToken(ctx context.Context, provider, bucket string) error {
	_, err := c.call(ctx, OpRemoveToken, tokenPayload(provider, bucket))
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	return err
}

// ListProviders returns the providers with tokens that this client may
// use, sorted.
func (c *Client) ListProviders(ctx context.Context) ([]string, error) {
	return c.listNames(ctx, OpListProviders, []byte("{}"), "providers")
}

// ListBuckets returns the buckets of provider that this client may use,
// sorted.
func (c *Client) ListBuckets(ctx context.Context, provider string) ([]string, error) {
	return c.listNames(ctx, OpListBuckets, tokenPayload(provider, ""), "buckets")
}

// ListAPIKeys returns the names of the API keys this client may use,
// sorted.
func (c *Client) ListAPIKeys(ctx context.Context) ([]string, error) {
	return c.listNames(ctx, OpListAPIKeys, []byte("{}"), "keys")
}

func (c *Client) listNames(ctx context.Context, op Op, payload []byte, member string) ([]string, error) {
	data, err := c.call(ctx, op, payload)
	if err != nil {
		return nil, err
	}
	var lists map[string][]string
	if err := json.Unmarshal(data, &lists); err != nil {
		return nil, errorf("%s: malformed list from server: %w", op, ErrInternal)
	}
	names := lists[member]
	if names == nil {
		names = []string{}
	}
	return names, nil
}

// BucketStats is the usage record of a bucket. Version 1 servers report no
// usage: the counts are zero.
type BucketStats struct {
	Bucket       string  `json:"bucket"`
	RequestCount int64   `json:"requestCount"`
	Percentage   float64 `json:"percentage"`
}

// GetBucketStats returns the usage record of provider's bucket. An absent
// token is an error matching [ErrNotFound].
func (c *Client) GetBucketStats(ctx context.Context, provider, bucket string) (BucketStats, error) {
	data, err := c.call(ctx, OpGetBucketStats, tokenPayload(provider, bucket))
	if err != nil {
		return BucketStats{}, err
	}
	var st BucketStats
	if err := json.Unmarshal(data, &st); err != nil {
		return BucketStats{}, errorf("get_bucket_stats: malformed stats from server: %w", ErrInternal)
	}
	return st, nil
}

// GetAPIKey returns the API key called name. An absent key is an error
// matching [ErrNotFound].
func (c *Client) GetAPIKey(ctx context.Context, name string) (Secret, error) {
	data, err := c.call(ctx, OpGetAPIKey, keyPayload(name))
	if err != nil {
		return "", err
	}
	var v struct {
		Key string `json:"key"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return "", errorf("get_api_key: malformed key from server: %w", ErrInternal)
	}
	return Secret(v.Key), nil
}

// HasAPIKey reports whether an API key called name exists.
func (c *Client) HasAPIKey(ctx context.Context, name string) (bool, error) {
	data, err := c.call(ctx, OpHasAPIKey, keyPayload(name))
	if err != nil {
		return false, err
	}
	var v struct {
		Exists bool `json:"exists"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return false, errorf("has_api_key: malformed answer from server: %w", ErrInternal)
	}
	return v.Exists, nil
}

func keyPayload(name string) []byte {
	return append(append([]byte(`{"name":`), quote(name)...), '}')
}

// SaveAPIKey fails with [ErrHostOnly]: API keys are managed on the host.
func (c *Client) SaveAPIKey(context.Context, string, Secret) error { return ErrHostOnly }

// RemoveAPIKey fails with [ErrHostOnly]: API keys are managed on the host.
func (c *Client) RemoveAPIKey(context.Context, string) error { return ErrHostOnly }
