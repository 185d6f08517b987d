package credproxy

import (
	"math"
	"time"

	"golang.org/x/time/rate"
)

// Default rate limit per connection (PROTOCOL.md, "Requests"): a token bucket refilled at 60
// requests per second and holding 60, so the 61st request of a burst is
// refused.
const (
	defaultRateLimit = 60
	defaultRateBurst = 60
)

// connLimiter limits the requests of one connection, or of one session's
// connections together. A nil *connLimiter allows everything. It is safe
// for concurrent use.
type connLimiter struct {
	lim *rate.Limiter
}

// newConnLimiter returns a limiter for perSecond requests a second with the
// given burst, or nil when perSecond is negative or infinite (no limit).
func newConnLimiter(perSecond float64, burst int) *connLimiter {
	if perSecond < 0 || math.IsInf(perSecond, 1) {
		return nil
	}
	return &connLimiter{lim: rate.NewLimiter(rate.Limit(perSecond), burst)}
}

// allow takes one request from the bucket at now. When the bucket is empty
// it reports false and the whole seconds, at least 1, until a request would
// be allowed.
func (l *connLimiter) allow(now time.Time) (ok bool, retryAfter int) {
	if l == nil || l.lim.AllowN(now, 1) {
		return true, 0
	}
	wait := 1.0
	if limit := float64(l.lim.Limit()); limit > 0 {
		wait = (1 - l.lim.TokensAt(now)) / limit
	}
	return false, max(1, int(math.Ceil(wait)))
}

// allow takes one request at now from the connection's budget and then
// from its session's, and reports false and the whole seconds to wait
// when either is spent.
func (c *conn) allow(now time.Time) (ok bool, retryAfter int) {
	if ok, retryAfter = c.limiter.allow(now); ok {
		ok, retryAfter = c.sess.limiter.allow(now)
	}
	return ok, retryAfter
}
