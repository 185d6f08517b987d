package credproxy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Refresh timing (PROTOCOL.md, "Refresh").
const (
	// get_token refreshes a token that expires within this margin
	// ([Options.RefreshMargin]).
	defaultRefreshMargin = 60 * time.Second
	// After a successful refresh of a key, no other runs for this long:
	// refresh_token gets the token it produced.
	refreshCooldown = 30 * time.Second
	// Each provider call gets this long.
	refreshAttemptTimeout = 30 * time.Second
	// A refresh as a whole (lock, calls, retries, save) gets this long;
	// it runs on after the request that started it gives up, so that a
	// rotated refresh token is never dropped half way.
	refreshFlightTimeout = 2 * time.Minute
	// get_token waits this long for a refresh of a token about to expire,
	// then serves the stored one: well under the store deadline, so a
	// hanging provider never costs the sandbox its valid token.
	preServeRefreshWait = 5 * time.Second
	// After n failed refreshes of a key in a row, the next waits
	// min(failureBackoffMax, failureBackoffBase * 2^(n-1)), or the
	// provider's Retry-After (at most maxRetryAfter) if longer.
	failureBackoffBase = 30 * time.Second
	failureBackoffMax  = 30 * time.Minute
	maxRetryAfter      = 24 * time.Hour
	// A refreshed token that claims to live longer than this is refused:
	// a unit error (milliseconds for seconds) rather than a real lifetime.
	maxTokenLifetime = 10 * 365 * 24 * time.Hour
)

// refreshRetryDelays are the waits before the second and third attempt
// after transient failures.
var refreshRetryDelays = [...]time.Duration{1 * time.Second, 3 * time.Second}

// retryLater is the error of a refresh asked for within the cooldown of
// the last one, while the stored token has expired, or within the backoff
// after a failure.
type retryLater struct {
	after  time.Duration
	failed bool // backing off after a failure, not cooling down after a success
}

func (e *retryLater) Error() string {
	if e.failed {
		return fmt.Sprintf("credproxy: the last refresh failed; retry in %v", e.after)
	}
	return fmt.Sprintf("credproxy: refreshed less than %v ago; retry in %v", refreshCooldown, e.after)
}
func (e *retryLater) Unwrap() error { return ErrRateLimited }

// errRefreshOverdue is get_token's answer when the refresh it would join
// already kept another get_token waiting for preServeRefreshWait.
var errRefreshOverdue = fmt.Errorf("credproxy: refresh in progress for longer than %v: %w", preServeRefreshWait, context.DeadlineExceeded)

// errBadExpiry fails a refresh whose token is already expired or claims an
// absurd lifetime.
var errBadExpiry = errors.New("credproxy: the refreshed token's expiry is already past or more than ten years away (expires_in must be a positive number of seconds)")

// coordinator runs the refreshes of one server: one flight at a time per
// provider:bucket, shared by everyone who asks meanwhile, the memory of
// each key's last success and failures, and the proactive renewal timers.
type coordinator struct {
	srv        *Server
	refreshers map[string]Refresher

	mu       sync.Mutex
	flights  map[string]*flight
	lastDone map[string]time.Time // key → end of its last successful provider refresh
	// lastLife holds, per key, the start and expiry of the token that
	// refresh produced (or that was found refreshed elsewhere); a zero
	// expiry: none or unknown.
	lastLife map[string]life
	failed   map[string]failures // key → its failures since the last success
	// peerSaved holds, per key, a digest of the access token a peer last
	// saved with save_token. Such a token is not a refresh done elsewhere:
	// taking it for one would let a sandbox with a write grant hold the
	// cooldown open, or reset the failure backoff, at will.
	peerSaved map[string]uint64
	renewals  map[string]*renewal
	closed    bool
	wg        sync.WaitGroup // flights and firing renewals
}

// flight is one refresh in progress; done closes when tok and err are set.
type flight struct {
	done chan struct{}
	tok  Token
	err  error
	// overdue is set once a get_token gave up waiting for the flight;
	// later ones serve the stored token without waiting again.
	overdue atomic.Bool
}

// failures is the memory of a key's failed refreshes.
type failures struct {
	n     int       // in a row
	until time.Time // no provider call before this
}

// want is what an asker needs from a refresh.
type want struct {
	// seen is the stored token the asker saw. If the token under the lock
	// differs, someone refreshed (or saved) it meanwhile, and it is
	// returned without a provider call when it is valid for longer than
	// need. The zero Token: read it first.
	seen Token
	need time.Duration
	// beforeServe marks get_token's bounded wait (preServeRefreshWait).
	beforeServe bool
	// session, for refresh_token, is the asker's session: if it was last
	// given a token other than the stored one, the stored one is what it
	// needs, and no provider call.
	session *Session
	// renewal marks proactive renewal, which refreshes a token before it
	// expires.
	renewal bool
}

func newCoordinator(srv *Server, refreshers map[string]Refresher) *coordinator {
	m := make(map[string]Refresher, len(refreshers))
	for p, r := range refreshers {
		if r != nil {
			m[p] = r
		}
	}
	return &coordinator{
		srv:        srv,
		refreshers: m,
		flights:    make(map[string]*flight),
		lastDone:   make(map[string]time.Time),
		lastLife:   make(map[string]life),
		failed:     make(map[string]failures),
		peerSaved:  make(map[string]uint64),
		renewals:   make(map[string]*renewal),
	}
}

// refresh returns a refreshed token for provider and bucket: it joins the
// flight in progress for them or starts one. Within the cooldown after a
// success it returns the stored token, and within the backoff after a
// failure a *retryLater. The checks run in the spec's order: no
// refresher, no token, no refresh token, then cooldown and backoff.
func (co *coordinator) refresh(ctx context.Context, provider, bucket string, w want) (Token, error) {
	r := co.refreshers[provider]
	if r == nil {
		return Token{}, ErrProviderNotFound
	}
	st := co.srv.opts.Store
	if w.seen.IsZero() {
		var err error
		if w.seen, err = st.GetToken(ctx, provider, bucket); err != nil {
			return Token{}, err
		}
	}
	if w.seen.RefreshToken() == "" {
		return Token{}, ErrRefreshNotAvailable
	}
	key := tokenKey(provider, bucket)
	if w.session != nil && w.session.servedOther(provider, bucket, w.seen) {
		// Read again: the token seen may predate the one the session was
		// given, which the asker then cannot hold yet.
		stored, err := st.GetToken(ctx, provider, bucket)
		if err != nil {
			return Token{}, err
		}
		if validFor(stored, time.Now()) > 0 && co.refreshedElsewhere(key, stored) {
			co.observedRefresh(key, stored)
			return stored, nil
		}
		w.seen = stored
	}
	co.mu.Lock()
	f := co.flights[key]
	if now := time.Now(); f == nil && now.Sub(co.lastDone[key]) < refreshCooldown {
		since := now.Sub(co.lastDone[key])
		co.mu.Unlock()
		// The token seen may predate the refresh that started the
		// cooldown.
		stored, err := st.GetToken(ctx, provider, bucket)
		if err != nil {
			return Token{}, err
		}
		if validFor(stored, time.Now()) > 0 && !w.renewal {
			return stored, nil
		}
		hold := refreshCooldown - since
		if w.session == nil {
			// The host's own refreshes, get_token's for an expired token
			// and renewal, go on within the cooldown once the token the
			// last refresh produced is halfway through its life: it
			// lives less than the cooldown, and waiting it out would
			// leave the sandbox with none. The provider chose that
			// lifetime; a token a peer saved, with whatever expiry,
			// does not count, so a sandbox cannot drive refreshes
			// faster than two per provider token.
			co.mu.Lock()
			halfway, ok := co.lastLife[key].halfway()
			co.mu.Unlock()
			if ok {
				hold = min(hold, time.Until(halfway))
			}
		}
		if hold > 0 {
			return Token{}, &retryLater{after: hold}
		}
		co.mu.Lock()
		f = co.flights[key]
	}
	if f == nil {
		now := time.Now()
		if until := co.failed[key].until; now.Before(until) {
			co.mu.Unlock()
			return Token{}, &retryLater{after: until.Sub(now), failed: true}
		}
		if co.closed {
			co.mu.Unlock()
			return Token{}, ErrServerClosed
		}
		f = &flight{done: make(chan struct{})}
		co.flights[key] = f
		co.wg.Add(1)
		go co.fly(f, r, provider, bucket, w)
	} else if w.beforeServe && f.overdue.Load() {
		co.mu.Unlock()
		return Token{}, errRefreshOverdue
	}
	co.mu.Unlock()
	select {
	case <-f.done:
		return f.tok, f.err
	case <-ctx.Done():
		if w.beforeServe {
			f.overdue.Store(true)
		}
		return Token{}, ctx.Err()
	}
}

// savedByPeer records that a peer saved tok as the token of key.
func (co *coordinator) savedByPeer(key string, tok Token) {
	d := accessDigest(tok)
	co.mu.Lock()
	defer co.mu.Unlock()
	co.peerSaved[key] = d
}

// refreshedElsewhere reports whether stored, found in place of the token
// an asker saw, is a refresh by someone else (another process, or the
// host's user), rather than what a peer saved over the socket.
func (co *coordinator) refreshedElsewhere(key string, stored Token) bool {
	d := accessDigest(stored)
	co.mu.Lock()
	defer co.mu.Unlock()
	saved, ok := co.peerSaved[key]
	return !ok || saved != d
}

// observedRefresh notes that the token of key was refreshed elsewhere
// lately (another process, or the host's user): the cooldown starts, as
// after a refresh of our own, so that sandboxes catching up with the new
// token do not each ask the provider for another.
func (co *coordinator) observedRefresh(key string, tok Token) {
	co.mu.Lock()
	defer co.mu.Unlock()
	if now := time.Now(); now.After(co.lastDone[key]) {
		co.lastDone[key] = now
		co.lastLife[key] = lifeOf(tok, now)
	}
}

// life is a refreshed token's lifetime: from when it was seen to its
// expiry.
type life struct{ from, exp time.Time }

func lifeOf(tok Token, from time.Time) life {
	exp, _ := tok.Expiry()
	return life{from, exp}
}

// halfway returns the middle of the lifetime, if the token had an expiry.
func (l life) halfway() (time.Time, bool) {
	if l.exp.IsZero() || !l.exp.After(l.from) {
		return time.Time{}, false
	}
	return l.from.Add(l.exp.Sub(l.from) / 2), true
}

// beforeServe refreshes stored, which get_token is about to serve and
// which expires within the margin, waiting at most preServeRefreshWait.
func (co *coordinator) beforeServe(ctx context.Context, provider, bucket string, stored Token) (Token, error) {
	ctx, cancel := context.WithTimeout(ctx, preServeRefreshWait)
	defer cancel()
	return co.refresh(ctx, provider, bucket, want{seen: stored, need: co.srv.opts.RefreshMargin, beforeServe: true})
}

// fly runs one flight to its end, whoever is still waiting for it, and
// remembers how it went.
func (co *coordinator) fly(f *flight, r Refresher, provider, bucket string, w want) {
	ctx, cancel := context.WithTimeout(co.srv.baseCtx, refreshFlightTimeout)
	defer cancel()
	start := time.Now()
	tok, called, err := co.run(ctx, r, provider, bucket, w)

	key := tokenKey(provider, bucket)
	now := time.Now()
	var retryAfter time.Duration
	co.mu.Lock()
	delete(co.flights, key)
	switch {
	case err == nil && called:
		co.lastDone[key] = now
		co.lastLife[key] = lifeOf(tok, now)
		delete(co.failed, key)
	case err == nil:
		// Found refreshed by someone else: a refresh just happened, but
		// the provider's answer to us is still unknown.
		co.lastDone[key] = now
		co.lastLife[key] = lifeOf(tok, now)
	case err != nil && co.backsOff(err):
		fl := co.failed[key]
		fl.n++
		fl.until = start.Add(min(failureBackoffMax, failureBackoffBase<<min(fl.n-1, 16)))
		if ra := retryAfterOf(err); ra > 0 {
			fl.until = later(fl.until, now.Add(min(ra, maxRetryAfter)))
		}
		co.failed[key] = fl
		retryAfter = fl.until.Sub(now)
	}
	co.mu.Unlock()
	f.tok, f.err = tok, err
	close(f.done)
	if err == nil {
		co.watch(provider, bucket, tok, true)
	}
	co.wg.Done()
	// The host's hook runs once the flight no longer counts as running,
	// so that it may call Shutdown or Close.
	co.report(provider, bucket, called, err, retryAfter)
}

// backsOff reports whether a flight's failure counts against its key:
// failures of the provider, its answer or the store, but not a token that
// is gone or cannot be refreshed, nor a server that is closing.
func (co *coordinator) backsOff(err error) bool {
	return !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrRefreshNotAvailable) &&
		!errors.Is(err, ErrReauthRequired) && co.srv.baseCtx.Err() == nil
}

// due reports whether get_token should refresh tok before serving it: it
// can be refreshed, and it expires within the margin.
func (co *coordinator) due(provider string, tok Token) bool {
	margin := co.srv.opts.RefreshMargin
	if margin < 0 || co.refreshers[provider] == nil || tok.RefreshToken() == "" {
		return false
	}
	exp, ok := tok.Expiry()
	return ok && time.Until(exp) <= margin
}

// close stops every renewal and waits for running flights and renewals,
// which end promptly once the server's context is cancelled.
func (co *coordinator) close() {
	co.mu.Lock()
	co.closed = true
	for key, r := range co.renewals {
		r.timer.Stop()
		delete(co.renewals, key)
	}
	co.mu.Unlock()
	co.wg.Wait()
}
