package credproxy

import (
	"context"
	"crypto/subtle"
	"errors"
	"sync"
	"time"

	"golang.org/x/oauth2"
)

// DefaultTokenSourceMargin is the margin a [TokenSource] renews tokens
// within when [TokenSourceOptions.Margin] is zero.
const DefaultTokenSourceMargin = 60 * time.Second

// tokenSourceRecheck is how often, at most, a TokenSource asks the server
// again about a token it holds that is valid but within the margin: one
// the host could not refresh.
const tokenSourceRecheck = 10 * time.Second

// TokenSourceOptions configures a [TokenSource]. The zero value gives the
// defaults.
type TokenSourceOptions struct {
	// Margin is how long before a token expires the source renews it: it
	// stops serving the token it holds, asks the server, and asks the host
	// to refresh the server's token too if that one also expires within
	// Margin. Zero means DefaultTokenSourceMargin, 60 s; a negative value
	// serves a token until it expires.
	Margin time.Duration
}

// TokenSource is an oauth2.TokenSource that serves the access token of one
// provider and bucket from a credproxy server, through a [Client]; make
// one with [Client.TokenSource]. Go code in a sandbox hands it to
// golang.org/x/oauth2 (oauth2.NewClient, or an oauth2.Transport) and never
// handles a token itself.
//
// The source keeps the last token it got and serves it while it is valid
// for longer than the margin ([TokenSourceOptions.Margin]). Then it asks
// the server for the token (get_token), and if that one expires within the
// margin too, asks the host to refresh it (refresh_token); if the host
// cannot, the source serves the token it has while that is still valid,
// and asks again at most every 10 seconds. A token without an expiry is
// kept until [TokenSource.Invalidate]. Errors are the [Client]'s, as they
// came: errors.Is(err, ErrNotFound) and the like work.
//
// A TokenSource is safe for concurrent use. Calls that find no token to
// serve share one request: while one call asks the server, the others wait
// for its answer, error included. Its zero value is not usable.
//
// oauth2.NewClient wraps the source in oauth2.ReuseTokenSource, which
// keeps a token of its own until 10 seconds before it expires (a token
// without an expiry, forever) and so never sees Invalidate. To act on a
// 401, give the source to an oauth2.Transport directly, as the example of
// [TokenSource.Invalidate] does: the source keeps its token itself.
type TokenSource struct {
	ctx              context.Context
	client           *Client
	provider, bucket string
	margin           time.Duration // negative: none

	mu       sync.Mutex
	token    Token     // the token served, or the zero Token
	until    time.Time // when to stop serving token, unless forever
	forever  bool      // token has no expiry: serve it until invalidated
	invalid  bool      // Invalidate was called: the next fetch refreshes
	rejected Secret    // the access token the caller reported rejected
	flight   *tokenFetch
	waiters  int // calls waiting for flight
}

// tokenFetch is a request for a token in progress; done closes when tok
// and err are set.
type tokenFetch struct {
	done chan struct{}
	tok  Token
	err  error
}

// TokenSource returns a source of the token of provider and bucket (""
// for the default bucket), as an oauth2.TokenSource; see [TokenSource].
// ctx bounds every request the source makes, on top of the client's
// RequestTimeout: once it ends, Token fails with its error. The client
// must stay open while the source is used.
func (c *Client) TokenSource(ctx context.Context, provider, bucket string, opts TokenSourceOptions) *TokenSource {
	setDefault(&opts.Margin, DefaultTokenSourceMargin)
	return &TokenSource{ctx: ctx, client: c, provider: provider, bucket: bucket, margin: opts.Margin}
}

var _ oauth2.TokenSource = (*TokenSource)(nil)

// Token returns the access token as an *oauth2.Token (see
// [Token.OAuth2]): Expiry is the token's expiry, RefreshToken is empty,
// and the token's other members are in Extra.
func (s *TokenSource) Token() (*oauth2.Token, error) {
	tok, err := s.get()
	if err != nil {
		return nil, err
	}
	return tok.OAuth2(), nil
}

// Invalidate reports that the token last served was rejected (an HTTP
// 401, say): the source drops it, and the next call to Token asks the host
// to refresh the token, whatever its expiry. If the host cannot refresh
// it ([ErrRefreshNotAvailable], [ErrProviderNotFound]), Token serves the
// server's current token if it differs from the rejected one, and
// otherwise fails with the refresh error until the host has another.
func (s *TokenSource) Invalidate() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.token.IsZero() {
		s.rejected = s.token.AccessToken()
	}
	s.token, s.invalid = Token{}, true
}

// get returns the token to serve: the one held, the answer to the
// request in flight, or the answer to a new request.
func (s *TokenSource) get() (Token, error) {
	s.mu.Lock()
	if !s.token.IsZero() && (s.forever || time.Now().Before(s.until)) {
		defer s.mu.Unlock()
		return s.token, nil
	}
	if f := s.flight; f != nil {
		s.waiters++
		s.mu.Unlock()
		defer func() {
			s.mu.Lock()
			s.waiters--
			s.mu.Unlock()
		}()
		select {
		case <-f.done:
			return f.tok, f.err
		case <-s.ctx.Done():
			return Token{}, s.ctx.Err()
		}
	}
	f := &tokenFetch{done: make(chan struct{})}
	s.flight = f
	invalid, rejected := s.invalid, s.rejected
	s.invalid = false // an Invalidate during the fetch sets it again
	s.mu.Unlock()

	tok, err := s.fetch(invalid, rejected)

	s.mu.Lock()
	s.flight = nil
	switch {
	case err == nil:
		s.token = tok
		s.until, s.forever = s.holdUntil(tok, time.Now())
	case invalid:
		s.invalid = true // until a token comes, the rejected one may not
	}
	s.mu.Unlock()
	f.tok, f.err = tok, err
	close(f.done)
	return tok, err
}

// fetch asks the server for the token: refresh_token first if the caller
// invalidated the token it had (rejected), get_token first otherwise.
func (s *TokenSource) fetch(invalid bool, rejected Secret) (Token, error) {
	if invalid {
		tok, err := s.client.RefreshToken(s.ctx, s.provider, s.bucket)
		if !errors.Is(err, ErrRefreshNotAvailable) && !errors.Is(err, ErrProviderNotFound) {
			return tok, err
		}
		got, gerr := s.client.GetToken(s.ctx, s.provider, s.bucket)
		switch {
		case gerr != nil:
			return Token{}, gerr
		case rejected != "" && subtle.ConstantTimeCompare([]byte(got.AccessToken()), []byte(rejected)) == 1:
			return Token{}, err
		}
		return got, nil
	}
	tok, err := s.client.GetToken(s.ctx, s.provider, s.bucket)
	if err != nil || !s.expiresWithinMargin(tok, time.Now()) {
		return tok, err
	}
	fresh, err := s.client.RefreshToken(s.ctx, s.provider, s.bucket)
	if err == nil {
		return fresh, nil
	}
	if exp, _ := tok.Expiry(); time.Now().Before(exp) {
		return tok, nil // still valid: better than nothing
	}
	return Token{}, err
}

// expiresWithinMargin reports whether tok expires within the margin of now.
func (s *TokenSource) expiresWithinMargin(tok Token, now time.Time) bool {
	exp, ok := tok.Expiry()
	return ok && s.margin >= 0 && !now.Add(s.margin).Before(exp)
}

// holdUntil returns when to stop serving tok, got at now: the margin
// before its expiry, but no sooner than tokenSourceRecheck from now unless
// it expires sooner; or forever if it has no expiry.
func (s *TokenSource) holdUntil(tok Token, now time.Time) (until time.Time, forever bool) {
	exp, ok := tok.Expiry()
	if !ok {
		return time.Time{}, true
	}
	until = exp
	if s.margin > 0 {
		until = exp.Add(-s.margin)
	}
	if recheck := now.Add(tokenSourceRecheck); until.Before(recheck) {
		until = recheck
		if exp.Before(until) {
			until = exp
		}
	}
	return until, false
}

// waiting returns how many calls wait for the request in flight.
func (s *TokenSource) waiting() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.waiters
}
