package credproxy

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"
)

// Proactive renewal timing (see [Options.DisableRenewal]).
const (
	// A token is renewed at expiry - max(renewLeadMin, 10% of the
	// remaining lifetime) - up to renewJitter; after n failures in a
	// row, again after min(renewBackoffMax, renewBackoffBase * 2^(n-1));
	// after renewMaxFailures, no more.
	renewLeadMin     = 300 * time.Second
	renewJitter      = 30 * time.Second
	renewBackoffBase = 30 * time.Second
	renewBackoffMax  = 1800 * time.Second
	renewMaxFailures = 10
)

// renewal is the proactive renewal of one key.
type renewal struct {
	timer    *time.Timer
	exp      time.Time // expiry of the token it renews
	due      time.Time // wall clock
	failures int
}

// watch schedules the proactive renewal of a token that get_token served
// or a refresh produced: once per key, or again (again=true) after a
// refresh. Tokens without a refresh token or an expiry are not renewed.
func (co *coordinator) watch(provider, bucket string, tok Token, again bool) {
	if co.srv.opts.DisableRenewal || co.refreshers[provider] == nil || tok.RefreshToken() == "" {
		return
	}
	exp, ok := tok.Expiry()
	if !ok || !exp.After(time.Now()) {
		// An expired token is refreshed when asked for, never on a timer
		// set from an expiry that is already past: that is how a stale
		// expiry turns into a refresh loop.
		return
	}
	key := provider + ":" + bucket
	co.mu.Lock()
	defer co.mu.Unlock()
	r := co.renewals[key]
	if co.closed || (r != nil && !again) {
		return
	}
	if r == nil {
		r = &renewal{}
		co.renewals[key] = r
	}
	r.exp, r.failures = exp, 0
	co.scheduleLocked(r, provider, bucket, renewAt(exp, time.Now()))
}

// renewAt is when a token expiring at exp, seen at now, is renewed: at
// expiry - max(5 min, 10% of the remaining lifetime) - jitter, but for a
// token that lives less than that, halfway to its expiry rather than at
// once (an expired one at once).
func renewAt(exp, now time.Time) time.Time {
	remaining := exp.Sub(now)
	lead := max(renewLeadMin, remaining/10)
	return later(exp.Add(-lead-rand.N(renewJitter)), now.Add(remaining/2))
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func (co *coordinator) scheduleLocked(r *renewal, provider, bucket string, at time.Time) {
	if r.timer != nil {
		r.timer.Stop()
	}
	r.due = at
	r.timer = time.AfterFunc(time.Until(at), func() { co.fire(r, provider, bucket) })
}

func (co *coordinator) stopRenewal(key string) {
	co.mu.Lock()
	defer co.mu.Unlock()
	if r := co.renewals[key]; r != nil {
		r.timer.Stop()
		delete(co.renewals, key)
	}
}

// fire runs a renewal whose timer went off. Timers run on the monotonic
// clock, which stops while the machine sleeps, so the wall clock and the
// stored token are checked again first: the token may have been renewed
// by another process, or the renewal may be late or early.
func (co *coordinator) fire(r *renewal, provider, bucket string) {
	key := provider + ":" + bucket
	co.mu.Lock()
	if co.closed || co.renewals[key] != r {
		co.mu.Unlock()
		return
	}
	co.wg.Add(1)
	due, planned := r.due, r.exp
	co.mu.Unlock()
	defer co.wg.Done()

	now := time.Now().Round(0) // wall clock
	if now.Before(due) {
		co.reschedule(r, provider, bucket, due)
		return
	}
	ctx, cancel := context.WithTimeout(co.srv.baseCtx, refreshFlightTimeout)
	defer cancel()
	stored, err := co.srv.opts.Store.GetToken(ctx, provider, bucket)
	exp, hasExpiry := stored.Expiry()
	switch {
	case errors.Is(err, ErrNotFound) || (err == nil && (stored.RefreshToken() == "" || !hasExpiry)):
		co.stopRenewal(key)
		return
	case err == nil && exp.After(planned):
		co.watch(provider, bucket, stored, true) // renewed elsewhere
		return
	}
	co.mu.Lock()
	coolUntil := co.lastDone[key].Add(refreshCooldown)
	co.mu.Unlock()
	if err == nil && now.Before(coolUntil) && exp.After(coolUntil) {
		co.reschedule(r, provider, bucket, coolUntil)
		return
	}
	var fresh Token
	if err == nil {
		// Refresh unless, under the lock, the token turns out to outlive
		// the one just read.
		fresh, err = co.refresh(ctx, provider, bucket, want{seen: stored, need: exp.Sub(now) + time.Second, renewal: true})
	}
	var wait *retryLater
	switch {
	case err == nil:
		co.watch(provider, bucket, fresh, true)
	case errors.As(err, &wait):
		co.reschedule(r, provider, bucket, now.Add(wait.after))
	case errors.Is(err, ErrReauthRequired) || errors.Is(err, ErrRefreshNotAvailable) ||
		errors.Is(err, ErrNotFound) || errors.Is(err, ErrServerClosed):
		co.stopRenewal(key)
	default:
		co.mu.Lock()
		defer co.mu.Unlock()
		if co.renewals[key] != r || co.closed {
			return
		}
		r.failures++
		if r.failures >= renewMaxFailures {
			co.srv.log.Warn("credproxy: proactive renewal stopped after repeated failures; the next get_token or refresh_token tries again",
				"provider", provider, "bucket", bucket, "failures", r.failures)
			delete(co.renewals, key)
			return
		}
		backoff := min(renewBackoffMax, renewBackoffBase<<(r.failures-1))
		// The key's own backoff is later when the provider sent Retry-After.
		co.scheduleLocked(r, provider, bucket, later(now.Add(backoff), co.failed[key].until))
	}
}

func (co *coordinator) reschedule(r *renewal, provider, bucket string, at time.Time) {
	co.mu.Lock()
	defer co.mu.Unlock()
	if co.renewals[provider+":"+bucket] == r && !co.closed {
		co.scheduleLocked(r, provider, bucket, at)
	}
}
