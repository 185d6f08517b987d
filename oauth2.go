package credproxy

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"golang.org/x/oauth2"
)

// OAuth2Refresher is a [Refresher] for providers that speak the standard
// OAuth 2.0 refresh grant (RFC 6749, section 6), through golang.org/x/oauth2.
// Its fields are read on every call; do not change them while a server
// uses it. The zero value is not usable: TokenURL is required.
type OAuth2Refresher struct {
	// TokenURL is the provider's token endpoint.
	TokenURL string

	// ClientID and ClientSecret identify the host's OAuth client. A public
	// client (an installed CLI, say) has no secret. The secret is a Secret,
	// so that printing the refresher (or Options holding it) hides it.
	ClientID     string
	ClientSecret Secret

	// AuthStyle says how the client authenticates. The zero value,
	// oauth2.AuthStyleAutoDetect, is not used as such: golang.org/x/oauth2
	// then repeats a failed request with the other style, which doubles
	// the provider calls exactly when a refresh token is being rejected.
	// Zero means oauth2.AuthStyleInHeader (HTTP Basic, which RFC 6749
	// requires servers to accept) when there is a ClientSecret, and
	// oauth2.AuthStyleInParams (client_id in the form) when there is none.
	AuthStyle oauth2.AuthStyle

	// HTTPClient makes the requests; nil means one like
	// http.DefaultClient that follows no redirect (a 3xx answer is a
	// failed refresh): a redirect would re-post the refresh token, and
	// the client secret, to whatever host it names. A client given here
	// should refuse redirects too. Each attempt is bounded by the context
	// the server passes, 30 s.
	HTTPClient *http.Client
}

var _ Refresher = (*OAuth2Refresher)(nil)

// noRedirectClient is http.DefaultClient that returns a redirect as the
// answer instead of following it.
var noRedirectClient = &http.Client{
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

// String describes the refresher by token endpoint and client id. It and
// Format keep fmt, with any verb, from printing the client secret.
func (o OAuth2Refresher) String() string {
	return fmt.Sprintf("credproxy.OAuth2Refresher(%s, client %s)", o.TokenURL, o.ClientID)
}

// Format writes String, whatever the verb.
func (o OAuth2Refresher) Format(f fmt.State, _ rune) { io.WriteString(f, o.String()) }

// Refresh exchanges token's refresh token for a new token. The result has
// access_token, token_type, expiry (when the provider gave expires_in),
// refresh_token (the new one if the provider rotated it), and scope and
// id_token when the provider returned them. Failures wrap [ErrReauthRequired]
// for invalid_grant or HTTP 401, and [ErrTransient] for network errors,
// HTTP 5xx and 429; the error text may quote the provider's response and
// is for the host's log only.
func (o *OAuth2Refresher) Refresh(ctx context.Context, token Token) (Token, error) {
	if o.TokenURL == "" {
		return Token{}, errors.New("credproxy: OAuth2Refresher.TokenURL is empty")
	}
	style := o.AuthStyle
	if style == oauth2.AuthStyleAutoDetect {
		style = oauth2.AuthStyleInParams
		if o.ClientSecret != "" {
			style = oauth2.AuthStyleInHeader
		}
	}
	cfg := oauth2.Config{
		ClientID:     o.ClientID,
		ClientSecret: string(o.ClientSecret),
		Endpoint:     oauth2.Endpoint{TokenURL: o.TokenURL, AuthStyle: style},
	}
	client := o.HTTPClient
	if client == nil {
		client = noRedirectClient
	}
	ctx = context.WithValue(ctx, oauth2.HTTPClient, client)
	// With no access token in it, the source refreshes at once, once.
	got, err := cfg.TokenSource(ctx, &oauth2.Token{RefreshToken: string(token.RefreshToken())}).Token()
	if err != nil {
		return Token{}, o.hideClientSecret(classifyOAuth2Error(ctx, err))
	}
	if got.Expiry.IsZero() && got.Extra("expires_in") != nil {
		// golang.org/x/oauth2 reads "expires_in":0 as no expiry at all;
		// a lifetime of zero is a token that is already expired, which
		// the server refuses as a failed refresh.
		got.Expiry = time.Now()
	}
	return tokenFromOAuth2(got)
}

// hideClientSecret takes the client secret out of err's text, where a
// provider that echoes the request quotes it: from the form
// (AuthStyleInParams), in any escaping, or from the Basic header, whose
// credentials golang.org/x/oauth2 URL-encodes before base64 (RFC 6749,
// section 2.3.1). err still matches what it matched.
func (o *OAuth2Refresher) hideClientSecret(err error) error {
	if o.ClientSecret == "" {
		return err
	}
	return &redactedError{cause: err, msg: redact(err.Error(), clientSecretForms(o.ClientID, o.ClientSecret)...)}
}

// clientSecretForms returns the forms in which a request quotes the
// client secret besides those redact finds itself: as it is, and in the
// Basic header, with and without the URL-encoding that golang.org/x/oauth2
// applies first. It returns none for no secret.
func clientSecretForms(clientID string, secret Secret) []string {
	if secret == "" {
		return nil
	}
	s := string(secret)
	b64 := base64.StdEncoding.EncodeToString
	return []string{s, b64([]byte(url.QueryEscape(clientID) + ":" + url.QueryEscape(s))), b64([]byte(clientID + ":" + s))}
}

// RedactOAuth2Error returns err, from a request that a host made to a
// provider as the client clientID with clientSecret (logging in, polling
// a device code, revoking: the calls an [OAuth2Refresher] does not make),
// fit for the host's terminal or log. Its text loses the client secret,
// in any escaping and in an HTTP Basic header; each of secrets (the
// tokens, codes and verifiers the request carried); and every run of
// characters that looks like a token. It is cut to 4 KiB and put on one
// line. The result matches what err matches (errors.Is), but does not
// unwrap to it: err may hold the provider's raw response. A nil err
// gives nil.
func RedactOAuth2Error(err error, clientID string, clientSecret Secret, secrets ...Secret) error {
	if err == nil {
		return nil
	}
	all := clientSecretForms(clientID, clientSecret)
	for _, s := range secrets {
		all = append(all, string(s))
	}
	return redactLine(err, all...)
}

// classifyOAuth2Error wraps err with the sentinel its kind calls for: a
// rejected refresh token, a failure worth retrying (the network, HTTP 5xx
// and 429, with the provider's Retry-After), or, for anything else, such
// as a 200 response that is not a token response, a permanent failure.
func classifyOAuth2Error(ctx context.Context, err error) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		status := 0
		if re.Response != nil {
			status = re.Response.StatusCode
		}
		switch {
		case re.ErrorCode == "invalid_grant" || status == http.StatusUnauthorized:
			return fmt.Errorf("%w: %w", ErrReauthRequired, err)
		case status >= 500 || status == http.StatusTooManyRequests:
			return &providerBusy{err: fmt.Errorf("%w: %w", ErrTransient, err), retryAfter: parseRetryAfter(re.Response.Header.Get("Retry-After"), time.Now())}
		}
		return err
	}
	var ue *url.Error
	var ne net.Error
	if ctx.Err() == nil && (errors.As(err, &ue) || errors.As(err, &ne)) {
		return fmt.Errorf("%w: %w", ErrTransient, err) // network
	}
	return err
}

// providerBusy is a transient failure with the provider's Retry-After.
type providerBusy struct {
	err        error
	retryAfter time.Duration
}

func (e *providerBusy) Error() string             { return e.err.Error() }
func (e *providerBusy) Unwrap() error             { return e.err }
func (e *providerBusy) RetryAfter() time.Duration { return e.retryAfter }

// parseRetryAfter reads a Retry-After header (RFC 9110, section 10.2.3):
// delay seconds or an HTTP date. Anything else, or a date in the past, is
// no wait.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	secs, err := strconv.ParseInt(v, 10, 64)
	switch {
	case err == nil && secs <= 0:
		return 0
	case err == nil:
		return time.Duration(min(secs, int64(maxRetryAfter/time.Second))) * time.Second
	case errors.Is(err, strconv.ErrRange) && secs > 0: // digits past int64: a long wait
		return maxRetryAfter
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return min(t.Sub(now), maxRetryAfter)
	}
	return 0
}

// tokenFromOAuth2 converts the token endpoint's answer to a Token.
func tokenFromOAuth2(t *oauth2.Token) (Token, error) {
	tok, err := TokenFromOAuth2(t)
	if err != nil {
		return Token{}, fmt.Errorf("credproxy: token endpoint response: %w", err)
	}
	return tok, nil
}
