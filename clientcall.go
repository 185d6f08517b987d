package credproxy

import (
	"context"
	"errors"
	"net"
	"strconv"
	"time"

	"github.com/go-json-experiment/json/jsontext"
)

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
			if cc.idle != nil {
				cc.idle.Stop()
			}
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
