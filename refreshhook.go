package credproxy

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// RefreshOutcome is how a host-side refresh ended (see [RefreshEvent]).
type RefreshOutcome int

const (
	// RefreshSucceeded: the provider issued a new token, and it was saved.
	RefreshSucceeded RefreshOutcome = iota + 1

	// RefreshFailed: the provider could not be reached, failed, or
	// answered with something that is not a valid token. The server asks
	// it again for this token no sooner than [RefreshEvent.RetryAfter].
	RefreshFailed

	// RefreshReauthRequired: the provider rejected the refresh token
	// (OAuth2 invalid_grant, HTTP 401). The server removed it from the
	// stored token; the user must log in again on the host.
	RefreshReauthRequired
)

// String returns "succeeded", "failed" or "reauth-required".
func (o RefreshOutcome) String() string {
	switch o {
	case RefreshSucceeded:
		return "succeeded"
	case RefreshFailed:
		return "failed"
	case RefreshReauthRequired:
		return "reauth-required"
	}
	return "unknown"
}

// RefreshEvent reports the outcome of a host-side refresh to
// [Options.OnRefresh], so that a host can, say, prompt its user to log in
// again instead of leaving a sandbox to fail. It carries no secret.
type RefreshEvent struct {
	Provider string
	Bucket   string // never empty: [DefaultBucket] when the request named none
	Outcome  RefreshOutcome

	// RetryAfter, with RefreshFailed, is how long from now the server waits
	// before it asks the provider again for this token. The backoff counts
	// from the refresh's first attempt (30 s, doubling), so after retries
	// it is less than the round figure.
	RetryAfter time.Duration

	// Err, unless the refresh succeeded, says why it did not, with the
	// token's secrets redacted from its text. errors.Is matches what the
	// cause matched ([ErrReauthRequired], [ErrTransient],
	// context.DeadlineExceeded ...); the cause itself, which may quote
	// the provider's raw response, is not reachable from it.
	Err error
}

// report tells the host's OnRefresh hook how a flight that asked the
// provider ended: no event for a flight that found the token refreshed
// elsewhere, gone, or not refreshable.
func (co *coordinator) report(provider, bucket string, called bool, err error, retryAfter time.Duration) {
	hook := co.srv.opts.OnRefresh
	if hook == nil {
		return
	}
	if err != nil && !isRedacted(err) {
		err = redactError(err) // a store's or lock's error: no token to name, but redact's heuristics still apply
	}
	ev := RefreshEvent{Provider: provider, Bucket: bucket, Err: err}
	switch {
	case err == nil && called:
		ev.Outcome = RefreshSucceeded
	case errors.Is(err, ErrReauthRequired):
		ev.Outcome = RefreshReauthRequired
	case err != nil && retryAfter > 0:
		ev.Outcome, ev.RetryAfter = RefreshFailed, retryAfter
	default:
		return
	}
	hook(ev)
}

// redactedError is a refresher's error with the secrets it might quote
// taken out of its text. It matches what the cause matches, but does not
// unwrap to it: the cause may hold the provider's raw response.
type redactedError struct {
	msg   string
	cause error
}

func (e *redactedError) Error() string             { return e.msg }
func (e *redactedError) Is(target error) bool      { return errors.Is(e.cause, target) }
func (e *redactedError) RetryAfter() time.Duration { return retryAfterOf(e.cause) }

// isRedacted reports whether err came from a refresher (and was logged,
// redacted, where it happened).
func isRedacted(err error) bool {
	var r *redactedError
	return errors.As(err, &r)
}

// redactError returns err with the secrets of tokens redacted from its
// text, which is cut to maxLoggedText bytes.
func redactError(err error, tokens ...Token) error {
	return redactLine(err, secretsOf(tokens)...)
}

// redactLine returns err with secrets, and what looks like one, redacted
// from its text, which is cut to maxLoggedText bytes and put on one line:
// golang.org/x/oauth2 puts the response body on a line of its own, and a
// host prints the error in a line of its log.
func redactLine(err error, secrets ...string) error {
	return &redactedError{msg: oneLine(redactCut(err.Error(), secrets...)), cause: err}
}

// oneLine is s, which may quote a provider's response, fit for one line
// of a terminal or log: a newline becomes a space, and every other control
// character (C0, DEL, C1) its \x or \u escape, so that the response
// cannot move the cursor, retitle the window or forge a line of ours.
func oneLine(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '\n':
			b.WriteByte(' ')
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, "\\x%02x", r)
		case r >= 0x80 && r < 0xa0:
			fmt.Fprintf(&b, "\\u%04x", r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}
