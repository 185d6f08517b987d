package credproxy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Refresher renews the tokens of one provider on the host, so that the
// sandbox never needs a refresh token ([Options.Refreshers]).
// [OAuth2Refresher] is one for providers that speak the standard refresh
// grant.
//
// Refresh receives the stored token, refresh token included, and returns
// the provider's new token: it must have an access_token; it has a
// refresh_token if the provider rotated it (absent or "" keeps the stored
// one), an expiry in Unix seconds if the provider gave a lifetime, and any
// other members the provider returned. The server merges it into the
// stored token (every member of the new token replaces the stored one),
// saves the result and serves it without its refresh token.
//
// Refresh classifies its failures by what its error wraps:
//   - [ErrReauthRequired]: the refresh token is no longer valid (OAuth2
//     invalid_grant, HTTP 401). Not retried; the stored refresh token is
//     cleared and the sandbox is told to have the user log in again.
//   - [ErrTransient]: worth retrying (network errors, HTTP 5xx and 429).
//     Retried twice, after 1 s and 3 s.
//   - anything else: a permanent failure, not retried.
//
// The error's text is logged on the host, with the token's secrets
// redacted, and never sent to the sandbox. The server never runs two
// refreshes of one provider and bucket at once, within the process or,
// when the store implements [TokenLocker], across processes; ctx ends the
// call (each attempt has 30 s).
type Refresher interface {
	Refresh(ctx context.Context, token Token) (Token, error)
}

// RefresherFunc adapts a function to the [Refresher] interface.
type RefresherFunc func(ctx context.Context, token Token) (Token, error)

// Refresh calls f(ctx, token).
func (f RefresherFunc) Refresh(ctx context.Context, token Token) (Token, error) { return f(ctx, token) }

// ErrTransient marks a [Refresher] failure as worth retrying, as in
// fmt.Errorf("token endpoint: %w: %w", credproxy.ErrTransient, err). It
// never reaches a client.
var ErrTransient = errors.New("credproxy: transient refresh failure")

// Refresh timing (PROTOCOL.md, "Operations", refresh_token).
const (
	// A token valid for longer than this after the lock is taken was
	// refreshed by someone else, and is returned without a provider call.
	refreshFreshFor = 60 * time.Second
	// After a successful refresh of a key, no other runs for this long.
	refreshCooldown = 30 * time.Second
	// Each provider call gets this long.
	refreshAttemptTimeout = 30 * time.Second
	// A refresh as a whole (lock, calls, retries, save) gets this long;
	// it runs on after the request that started it gives up, so that a
	// rotated refresh token is never dropped half way.
	refreshFlightTimeout = 2 * time.Minute
)

// refreshRetryDelays are the waits before the second and third attempt
// after transient failures.
var refreshRetryDelays = [...]time.Duration{1 * time.Second, 3 * time.Second}

// coolingDown is the error of a refresh asked for within the cooldown of
// the last one, while the stored token has expired.
type coolingDown struct{ retryAfter time.Duration }

func (e *coolingDown) Error() string {
	return fmt.Sprintf("credproxy: refreshed less than %v ago; retry in %v", refreshCooldown, e.retryAfter)
}
func (e *coolingDown) Unwrap() error { return ErrRateLimited }

// coordinator runs the refreshes of one server: one flight at a time per
// provider:bucket, shared by everyone who asks meanwhile, and the
// proactive renewal timers.
type coordinator struct {
	srv        *Server
	refreshers map[string]Refresher

	mu       sync.Mutex
	flights  map[string]*flight
	lastDone map[string]time.Time // key → end of its last successful provider refresh
	renewals map[string]*renewal
	closed   bool
	wg       sync.WaitGroup // flights and firing renewals
}

// flight is one refresh in progress; done closes when tok and err are set.
type flight struct {
	done chan struct{}
	tok  Token
	err  error
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
		renewals:   make(map[string]*renewal),
	}
}

// refresh returns a fresh token for provider and bucket: it joins the
// flight in progress for them or starts one. need is how long the stored
// token must still be valid, once the lock is held, for the flight to
// return it instead of calling the provider. The checks run in the spec's
// order: no refresher, no token, no refresh token, then cooldown.
func (co *coordinator) refresh(ctx context.Context, provider, bucket string, need time.Duration) (Token, error) {
	r := co.refreshers[provider]
	if r == nil {
		return Token{}, ErrProviderNotFound
	}
	stored, err := co.srv.opts.Store.GetToken(ctx, provider, bucket)
	if err != nil {
		return Token{}, err
	}
	if stored.RefreshToken() == "" {
		return Token{}, ErrRefreshNotAvailable
	}
	key := provider + ":" + bucket
	co.mu.Lock()
	f := co.flights[key]
	if f == nil {
		if since := time.Since(co.lastDone[key]); since < refreshCooldown {
			co.mu.Unlock()
			// The token read above may predate the refresh that started
			// the cooldown.
			if stored, err = co.srv.opts.Store.GetToken(ctx, provider, bucket); err != nil {
				return Token{}, err
			}
			if exp, ok := stored.Expiry(); !ok || time.Now().Before(exp) {
				return stored, nil
			}
			return Token{}, &coolingDown{retryAfter: refreshCooldown - since}
		}
		if co.closed {
			co.mu.Unlock()
			return Token{}, ErrServerClosed
		}
		f = &flight{done: make(chan struct{})}
		co.flights[key] = f
		co.wg.Add(1)
		go co.fly(f, r, provider, bucket, need)
	}
	co.mu.Unlock()
	select {
	case <-f.done:
		return f.tok, f.err
	case <-ctx.Done():
		return Token{}, ctx.Err()
	}
}

// fly runs one flight to its end, whoever is still waiting for it.
func (co *coordinator) fly(f *flight, r Refresher, provider, bucket string, need time.Duration) {
	defer co.wg.Done()
	ctx, cancel := context.WithTimeout(co.srv.baseCtx, refreshFlightTimeout)
	defer cancel()
	tok, called, err := co.run(ctx, r, provider, bucket, need)

	key := provider + ":" + bucket
	co.mu.Lock()
	delete(co.flights, key)
	if err == nil && called {
		co.lastDone[key] = time.Now()
	}
	co.mu.Unlock()
	f.tok, f.err = tok, err
	close(f.done)
	if err == nil {
		co.watch(provider, bucket, tok, true)
	}
}

// run refreshes under the per-key lock: it reads the stored
// token again, returns it if it is still valid for longer than need, and
// otherwise calls the provider, merges and saves. It reports whether it
// called the provider successfully.
func (co *coordinator) run(ctx context.Context, r Refresher, provider, bucket string, need time.Duration) (Token, bool, error) {
	st := co.srv.opts.Store
	unlock, err := co.srv.lockToken(ctx, provider, bucket)
	if err != nil {
		return Token{}, false, err
	}
	defer unlock()
	stored, err := st.GetToken(ctx, provider, bucket)
	if err != nil {
		return Token{}, false, err // ErrNotFound: a logout came first
	}
	if stored.RefreshToken() == "" {
		return Token{}, false, ErrRefreshNotAvailable
	}
	if exp, ok := stored.Expiry(); ok && time.Until(exp) > need {
		return stored, false, nil
	}

	fresh, err := co.call(ctx, r, provider, bucket, stored)
	switch {
	case errors.Is(err, ErrReauthRequired):
		// The refresh token is dead; keep the access token, which may
		// still work until it expires, and never send the dead one again.
		if err := st.SaveToken(ctx, provider, bucket, stored.WithoutRefreshToken()); err != nil {
			co.logError("credproxy: cannot clear a rejected refresh token", provider, bucket, err, stored)
		}
		co.stopRenewal(provider + ":" + bucket)
		return Token{}, false, ErrReauthRequired
	case err != nil:
		return Token{}, false, err
	}
	merged := stored.Merge(fresh)
	if err := st.SaveToken(ctx, provider, bucket, merged); err != nil {
		// The provider may have rotated the refresh token: this is the one
		// failure that can cost the user their login, so say so.
		co.logError("credproxy: refreshed token could not be saved; if the provider rotated the refresh token, the user must log in again",
			provider, bucket, err, stored, fresh)
		return Token{}, false, err
	}
	co.srv.log.Info("credproxy: token refreshed", "provider", provider, "bucket", bucket)
	return merged, true, nil
}

// call asks the provider, retrying transient failures after the delays in
// refreshRetryDelays.
func (co *coordinator) call(ctx context.Context, r Refresher, provider, bucket string, stored Token) (Token, error) {
	for attempt := 0; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, refreshAttemptTimeout)
		fresh, err := r.Refresh(actx, stored)
		cancel()
		if err == nil && fresh.AccessToken() == "" {
			err = errors.New("the refresher returned a token without access_token")
		}
		if err == nil {
			return fresh, nil
		}
		co.logError("credproxy: refresh failed", provider, bucket, err, stored, fresh)
		if !errors.Is(err, ErrTransient) || attempt == len(refreshRetryDelays) || ctx.Err() != nil {
			return Token{}, err
		}
		t := time.NewTimer(refreshRetryDelays[attempt])
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return Token{}, ctx.Err()
		}
	}
}

// logError logs err with every secret of the tokens redacted.
func (co *coordinator) logError(msg, provider, bucket string, err error, tokens ...Token) {
	var secrets []string
	for _, t := range tokens {
		secrets = append(secrets, string(t.AccessToken()), string(t.RefreshToken()))
	}
	co.srv.log.Warn(msg, "provider", provider, "bucket", bucket, "err", redact(err.Error(), secrets...))
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
