package credproxy

import (
	"context"
	"errors"
	"net"
	"os"
	"slices"
	"time"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
)

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
	cc.idleAt = time.Now()
	if cc.idle != nil {
		cc.idle.Reset(c.opts.IdleTimeout)
		return
	}
	cc.idle = time.AfterFunc(c.opts.IdleTimeout, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		// A firing that raced with a call's Stop finds the call pending, or,
		// if the connection was armed again since, too little idle time:
		// the reset timer fires again.
		if c.cc == cc && len(cc.pending) == 0 && time.Since(cc.idleAt) >= c.opts.IdleTimeout {
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
