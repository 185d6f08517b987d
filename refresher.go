package credproxy

import (
	"context"
	"errors"
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
//     Retried twice, after 1 s and 3 s, unless the provider asked for a
//     longer wait.
//   - anything else: a permanent failure, not retried.
//
// An error in the chain with a method RetryAfter() time.Duration (as the
// errors of [OAuth2Refresher] have for a 429 or 503 with Retry-After) says
// how long the provider asked not to be called; the server waits at least
// that long before it calls again for that provider and bucket. After any
// failure it waits anyway: 30 s, doubling with each failure in a row up
// to 30 minutes (PROTOCOL.md, "Refresh").
//
// The token returned replaces the stored token's expiry: with no expiry, the
// saved token has none, and an expiry that is already past or more than ten
// years away fails the refresh (its refresh token, if rotated, is still
// saved).
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

// retryAfterOf returns how long the provider asked not to be called, as
// the error says through a RetryAfter method, or 0.
func retryAfterOf(err error) time.Duration {
	var ra interface{ RetryAfter() time.Duration }
	if errors.As(err, &ra) {
		return max(0, ra.RetryAfter())
	}
	return 0
}
