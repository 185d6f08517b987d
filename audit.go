package credproxy

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// The audit log. Every request served leaves one record at debug level.
// Every refusal (a connection, handshake, frame or request turned away)
// leaves one record at info level, "credproxy: refused", with the session,
// the peer and the reason, so that a sandbox probing its proxy leaves a
// trace at the level hosts log by default. Records never hold a secret:
// names, codes and fixed reasons only, and no more than refusalOpLen
// bytes of an operation name the peer made up.
//
// A flood must not flood the host's log too: each session logs a burst of
// refusalBurst refusals, then refusalRate a second; the refusals not
// logged are counted, and the count ("unlogged") goes with the session's
// next record, or its last one when it ends.
const (
	refusalBurst = 20
	refusalRate  = 2
	refusalOpLen = 32
)

// refusalLog is a session's budget of refusal records.
type refusalLog struct {
	budget   *rate.Limiter
	unlogged atomic.Int64
}

func newRefusalLog() *refusalLog {
	return &refusalLog{budget: rate.NewLimiter(refusalRate, refusalBurst)}
}

// refused logs the refusal of something from peer in session ss, within
// the session's budget; stage is "connection", "handshake", "frame" or
// "request".
func (s *Server) refused(ss *Session, peer Peer, stage, reason string, attrs ...slog.Attr) {
	if !s.log.Enabled(context.Background(), slog.LevelInfo) {
		return
	}
	var unlogged int64
	if ss != nil {
		if !ss.refusals.budget.Allow() {
			ss.refusals.unlogged.Add(1)
			return
		}
		unlogged = ss.refusals.unlogged.Swap(0)
	}
	all := append([]slog.Attr{ss.logAttr(), slog.Any("peer", peer), slog.String("stage", stage), slog.String("reason", reason)}, attrs...)
	if unlogged > 0 {
		all = append(all, slog.Int64("unlogged", unlogged))
	}
	s.log.LogAttrs(context.Background(), slog.LevelInfo, "credproxy: refused", all...)
}

// logUnlogged logs the count of the session's refusals that went
// unlogged, when it ends.
func (s *Server) logUnlogged(ss *Session) {
	if n := ss.refusals.unlogged.Swap(0); n > 0 {
		s.log.LogAttrs(context.Background(), slog.LevelInfo, "credproxy: refused", ss.logAttr(),
			slog.String("reason", "refusals not logged, to keep a flood out of the log"), slog.Int64("unlogged", n))
	}
}

// logOp is an operation name as the log may hold it: cut to refusalOpLen
// bytes, so that a peer cannot fill the host's log with 64 KB names.
func logOp(op string) string {
	if len(op) <= refusalOpLen {
		return op // every known op is shorter
	}
	return strings.ToValidUTF8(op[:refusalOpLen], "") + "..."
}

// logAttr names the session in a log record; the server's own session
// (connections through Serve) is not named.
func (ss *Session) logAttr() slog.Attr {
	if ss == nil || ss.id == "" {
		return slog.Attr{}
	}
	return slog.String("session", ss.id)
}

// refuseRequest logs the refusal of a request before it reached the
// policy (its frame, schema or the in-flight cap), and answers it. Every
// refusal is logged before its answer is written, so that the record
// exists by the time the peer can act on the answer.
func (c *conn) refuseRequest(id, op string, e *protoError) {
	c.srv.refused(c.sess, c.peer, "request", e.msg, slog.String("op", logOp(op)), slog.String("code", string(e.code)))
	c.writeFailure(id, e, 0)
}

// refusedRequest logs a request the policy refused; cause is the policy's
// own error, which only the host sees.
func (s *Server) refusedRequest(c *conn, op Op, a args, fail *protoError, cause error) {
	attrs := []slog.Attr{slog.String("op", string(op)), slog.String("code", string(fail.code))}
	for _, name := range [...]struct{ key, value string }{{"provider", a.provider}, {"bucket", a.bucket}, {"key", a.name}} {
		if name.value != "" {
			attrs = append(attrs, slog.String(name.key, name.value))
		}
	}
	var d *denial
	if cause != nil && !errors.As(cause, &d) { // a denial's text is the reason already
		attrs = append(attrs, slog.String("policy", cause.Error()))
	}
	s.refused(c.sess, c.peer, "request", fail.msg, attrs...)
}

// rateLogInterval is how often, at most, a connection's refusals by the
// rate limit are logged: a flood must not flood the host's log too.
const rateLogInterval = time.Second

// logRateLimited logs a request refused by the rate limit at now, or
// counts it for the next record if one was written less than
// rateLogInterval ago. The count left at the end is logged by finish.
func (c *conn) logRateLimited(now time.Time, op string) {
	if now.Sub(c.rateLogged) < rateLogInterval {
		c.rateSuppressed++
		return
	}
	attrs := []slog.Attr{slog.String("op", logOp(op)), slog.String("code", string(CodeRateLimited))}
	if c.rateSuppressed > 0 {
		attrs = append(attrs, slog.Int("more", c.rateSuppressed))
	}
	c.srv.refused(c.sess, c.peer, "request", "rate limit exceeded", attrs...)
	c.rateLogged, c.rateSuppressed = now, 0
}
