package credproxy

import (
	"context"
	"errors"
	"math"
	"time"
)

// run refreshes under the per-key lock: it reads the stored token again,
// returns it if someone refreshed it since the asker saw it, and
// otherwise calls the provider, merges and saves. It reports whether it
// called the provider successfully.
func (co *coordinator) run(ctx context.Context, r Refresher, provider, bucket string, w want) (Token, bool, error) {
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
	if !stored.Equal(w.seen) && validFor(stored, time.Now()) > max(w.need, 0) && co.refreshedElsewhere(tokenKey(provider, bucket), stored) {
		return stored, false, nil
	}

	fresh, err := co.call(ctx, r, provider, bucket, stored)
	var replaced *replacedMeanwhile
	switch {
	case errors.As(err, &replaced) && validFor(replaced.stored, time.Now()) > 0:
		co.srv.log.Info("credproxy: token refreshed elsewhere while a retry waited; not retrying", "provider", provider, "bucket", bucket)
		return replaced.stored, false, nil
	case errors.Is(err, ErrReauthRequired):
		// The refresh token is dead; keep the access token, which may
		// still work until it expires, and never send the dead one again.
		_, cerr := co.srv.updateToken(ctx, provider, bucket, func(cur Token, found bool) (Token, error) {
			if !found || cur.RefreshToken() != stored.RefreshToken() {
				return Token{}, errChangedMeanwhile // not the token refused: keep it
			}
			return cur.WithoutRefreshToken(), nil
		})
		if cerr != nil && !errors.Is(cerr, errChangedMeanwhile) {
			co.logError("credproxy: cannot clear a rejected refresh token", provider, bucket, cerr, stored)
		}
		co.stopRenewal(tokenKey(provider, bucket))
		return Token{}, false, err
	case err != nil:
		return Token{}, false, err
	}
	if exp, ok := fresh.Expiry(); ok && (!exp.After(time.Now()) || time.Until(exp) > maxTokenLifetime) {
		co.srv.log.Warn("credproxy: refresh failed", "provider", provider, "bucket", bucket, "err", errBadExpiry.Error())
		co.keepRotated(ctx, provider, bucket, stored, fresh)
		return Token{}, false, errBadExpiry
	}
	// Merge with what is stored now rather than with what was read before
	// the call: the same under the lock, but a store that can update
	// atomically ([TokenUpdater]) then keeps a write made by a host that
	// took over a lock this one lost while waiting for the provider. If
	// that host stored another refresh token, it refreshed (or the user
	// logged in again) after this call began: its token is the newer, and
	// is kept, with this answer dropped.
	var dropped []string
	var newer Token
	merged, err := co.srv.updateToken(ctx, provider, bucket, func(cur Token, found bool) (Token, error) {
		if !found {
			return Token{}, ErrNotFound // removed meanwhile: the logout wins
		}
		if cur.RefreshToken() != stored.RefreshToken() {
			newer = cur
			return Token{}, errChangedMeanwhile
		}
		if _, ok := fresh.lookup(fieldExpiry); !ok {
			cur = cur.without(fieldExpiry) // never inherit a stale expiry
		}
		m, d, fits := fitMerged(cur, fresh, maxSavedToken)
		if !fits {
			return Token{}, errTokenTooLarge
		}
		dropped = d
		return m, nil
	})
	switch {
	case errors.Is(err, errChangedMeanwhile):
		co.srv.log.Warn("credproxy: refreshed token dropped: another process stored a newer one while the provider answered (this host's lock was lost)",
			"provider", provider, "bucket", bucket)
		return newer, false, nil
	case errors.Is(err, errTokenTooLarge):
		co.srv.log.Warn("credproxy: refresh failed", "provider", provider, "bucket", bucket, "err", errTokenTooLarge.Error())
		co.keepRotated(ctx, provider, bucket, stored, fresh)
		return Token{}, false, errTokenTooLarge
	case err != nil:
		// The provider may have rotated the refresh token: this is the one
		// failure that can cost the user their login, so say so.
		co.logError("credproxy: refreshed token could not be saved; if the provider rotated the refresh token, the user must log in again",
			provider, bucket, err, stored, fresh)
		return Token{}, false, err
	}
	if len(dropped) > 0 {
		co.srv.log.Warn("credproxy: refreshed token too large with all the stored members; left some out",
			"provider", provider, "bucket", bucket, "members", dropped)
	}
	co.srv.log.Info("credproxy: token refreshed", "provider", provider, "bucket", bucket)
	return merged, true, nil
}

// keepRotated saves the refresh token of a provider's answer that failed
// the refresh all the same: the provider may have rotated it, and losing
// it would log the user out.
func (co *coordinator) keepRotated(ctx context.Context, provider, bucket string, stored, fresh Token) {
	rt := fresh.RefreshToken()
	if rt == "" || rt == stored.RefreshToken() {
		return
	}
	_, err := co.srv.updateToken(ctx, provider, bucket, func(cur Token, found bool) (Token, error) {
		if !found {
			return Token{}, ErrNotFound
		}
		if cur.RefreshToken() != stored.RefreshToken() {
			return Token{}, errChangedMeanwhile // another process stored a newer one
		}
		return cur.Merge(fresh.only(fieldRefreshToken)), nil
	})
	if err != nil && !errors.Is(err, errChangedMeanwhile) {
		co.logError("credproxy: a rotated refresh token could not be saved; the user may have to log in again",
			provider, bucket, err, stored, fresh)
	}
}

// errChangedMeanwhile ends an update that finds the token is no longer
// the one it meant to change.
var errChangedMeanwhile = errors.New("credproxy: token changed meanwhile")

// validFor returns how long tok stays valid after now: a lot for a token
// without expiry, nothing or less for an expired one.
func validFor(tok Token, now time.Time) time.Duration {
	exp, ok := tok.Expiry()
	if !ok {
		return math.MaxInt64
	}
	return exp.Sub(now)
}

// call asks the provider, retrying transient failures after the delays in
// refreshRetryDelays, unless the provider asked to wait longer.
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
		err = redactError(err, stored, fresh)
		co.srv.log.Warn("credproxy: refresh failed", "provider", provider, "bucket", bucket, "err", err.Error())
		if !errors.Is(err, ErrTransient) || attempt == len(refreshRetryDelays) || ctx.Err() != nil ||
			retryAfterOf(err) > refreshRetryDelays[attempt] {
			return Token{}, err
		}
		t := time.NewTimer(refreshRetryDelays[attempt])
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return Token{}, ctx.Err()
		}
		// Retry only with the refresh token that is still stored: if
		// another host replaced it meanwhile (this one may have lost its
		// lock while the provider did not answer), sending the old one
		// again would look like reuse to a provider that rotates them.
		if cur, err := co.srv.opts.Store.GetToken(ctx, provider, bucket); err == nil && cur.RefreshToken() != stored.RefreshToken() {
			return Token{}, &replacedMeanwhile{cur}
		}
	}
}

// replacedMeanwhile ends a refresh whose stored token another host
// replaced while it waited to retry.
type replacedMeanwhile struct{ stored Token }

func (*replacedMeanwhile) Error() string {
	return "credproxy: the token was refreshed elsewhere while a retry waited"
}

// logError logs err with every secret of the tokens redacted.
func (co *coordinator) logError(msg, provider, bucket string, err error, tokens ...Token) {
	co.srv.log.Warn(msg, "provider", provider, "bucket", bucket, "err", redact(err.Error(), secretsOf(tokens)...))
}

func secretsOf(tokens []Token) []string {
	var secrets []string
	for _, t := range tokens {
		secrets = append(secrets, string(t.AccessToken()), string(t.RefreshToken()))
	}
	return secrets
}
