package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/credproxy/credproxy"
	"golang.org/x/oauth2"
)

// providerClient makes login's and logout's requests to providers: it
// follows no redirect, which would re-post a code, a token or the client
// secret to whatever host it names, past the providers file's https-only
// rule, and returns the 3xx answer instead, which fails the request.
var providerClient = &http.Client{
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

// withProviderClient is ctx with providerClient for golang.org/x/oauth2.
func withProviderClient(ctx context.Context) context.Context {
	return context.WithValue(ctx, oauth2.HTTPClient, providerClient)
}

// revokeTimeout bounds each revocation request.
const revokeTimeout = 30 * time.Second

// errUnsupportedTokenType is a provider's answer that it does not revoke
// tokens of the kind it was given (RFC 7009, section 2.2.1): many revoke
// only refresh tokens, and let access tokens expire.
var errUnsupportedTokenType = errors.New("unsupported_token_type")

// revoke asks the provider to revoke tok (RFC 7009): its refresh token
// first, which ends the grant and, at most providers, the access tokens
// issued with it, then its access token. It returns what was revoked, or
// the first failure; an unknown token counts as revoked (the provider
// answers 200), and an access token the provider does not revoke is left
// to expire.
func revoke(ctx context.Context, pv *provider, secret credproxy.Secret, tok credproxy.Token) (string, error) {
	secrets := []credproxy.Secret{tok.AccessToken(), tok.RefreshToken()}
	var done []string
	if rt := tok.RefreshToken(); rt != "" {
		if err := revokeOne(ctx, pv, secret, rt, "refresh_token", secrets); err != nil {
			return "", fmt.Errorf("revoking the refresh token: %w", err)
		}
		done = append(done, "the refresh token")
	}
	err := revokeOne(ctx, pv, secret, tok.AccessToken(), "access_token", secrets)
	switch {
	case errors.Is(err, errUnsupportedTokenType):
		done = append(done, "not the access token (it does not revoke them; it expires on its own)")
	case err != nil:
		return "", fmt.Errorf("revoking the access token: %w", err)
	default:
		done = append(done, "the access token")
	}
	return strings.Join(done, " and "), nil
}

// revokeOne sends one revocation request, authenticated as the token
// endpoint is: HTTP Basic with the URL-encoded client id and secret
// (RFC 6749, section 2.3.1), or client_id (and client_secret) in the
// form. Only 200 is success. Errors quote the provider's answer, with
// secrets and the client secret redacted.
func revokeOne(ctx context.Context, pv *provider, secret, token credproxy.Secret, hint string, secrets []credproxy.Secret) error {
	form := url.Values{"token": {string(token)}, "token_type_hint": {hint}}
	header := pv.authStyle(secret) == oauth2.AuthStyleInHeader
	if !header {
		form.Set("client_id", pv.ClientID)
		if secret != "" {
			form.Set("client_secret", string(secret))
		}
	}
	ctx, cancel := context.WithTimeout(ctx, revokeTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, pv.RevocationURL, strings.NewReader(form.Encode()))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	if header {
		req.SetBasicAuth(url.QueryEscape(pv.ClientID), url.QueryEscape(string(secret)))
	}
	resp, err := providerClient.Do(req)
	if err != nil {
		return credproxy.RedactOAuth2Error(err, pv.ClientID, secret, secrets...)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode == http.StatusOK {
		return nil
	}
	var answer struct {
		Error       string `json:"error"`
		Description string `json:"error_description"`
	}
	json.Unmarshal(body, &answer) // not JSON: the body is quoted as it is
	if answer.Error == "unsupported_token_type" {
		return errUnsupportedTokenType
	}
	failure := fmt.Errorf("the provider answered %s: %q", resp.Status, body)
	if answer.Error != "" {
		failure = fmt.Errorf("the provider answered %s: %q %q", resp.Status, answer.Error, answer.Description)
	}
	return credproxy.RedactOAuth2Error(failure, pv.ClientID, secret, secrets...)
}
