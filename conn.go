package credproxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

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
	req := Request{Peer: c.peer, Op: op, Provider: a.provider, Bucket: a.bucket, Key: a.name}
	res := s.exec(ctx, c.sess, &req, a, appendOKStart(startFrame((*buf)[:0]), id))
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
