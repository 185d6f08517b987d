package e2e

import (
	"errors"
	"testing"

	"github.com/credproxy/credproxy/e2e/oidcprovider"
	"golang.org/x/oauth2"
)

// wantInvalidGrant fails the test unless err is the provider's refusal of
// a refresh token.
func wantInvalidGrant(t *testing.T, err error) {
	t.Helper()
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) || re.ErrorCode != "invalid_grant" {
		t.Errorf("refreshing: %v, want invalid_grant", err)
	}
}

// loggedIn returns a provider and a host logged in to it as "demo", and
// the token stored.
func loggedIn(t *testing.T) (*oidcprovider.Provider, *host, storedToken) {
	t.Helper()
	p := startProvider(t, oidcprovider.Options{})
	h := newHost(t, publicEntry(p))
	loginDemo(t, h)
	return p, h, h.token("demo")
}

// logout revokes the token at the provider (RFC 7009), which then refuses
// the old refresh token (invalid_grant), and removes it from the store.
func TestLogoutRevokesSoTheProviderRefusesTheOldRefreshToken(t *testing.T) {
	p, h, old := loggedIn(t)
	h.run("logout", "demo").want(t, 0, "demo revoked the refresh token and the access token", "removed demo/default")
	if n := p.RevocationCalls(); n != 2 {
		t.Errorf("%d revocation requests, want 2 (refresh token, access token)", n)
	}
	_, err := refresh(t.Context(), p, old.RefreshToken)
	wantInvalidGrant(t, err)
	h.run("token", "get", "demo").want(t, 1, "no token for provider demo")
}

// When the provider's revocation endpoint cannot be reached, logout keeps
// the token, exits 1, and says what to do: try again, or -no-revoke.
func TestLogoutKeepsTheTokenWhenRevocationFails(t *testing.T) {
	p, h, before := loggedIn(t)
	demo := publicEntry(p)
	demo.RevocationURL = "http://" + closedPort(t) + "/revoke"
	h.setProviders(map[string]entry{"demo": demo})
	h.run("logout", "demo").want(t, 1, "revoking the refresh token", "the token is still in the store: try again",
		"'credproxy logout -no-revoke demo' removes it here only")
	if after := h.token("demo"); after != before {
		t.Errorf("the token changed: %+v, was %+v", after, before)
	}
	if _, err := refresh(t.Context(), p, before.RefreshToken); err != nil {
		t.Errorf("the kept refresh token no longer refreshes: %v", err)
	}
}

// logout -no-revoke removes the token from the store without a word to
// the provider, where the refresh token stays valid.
func TestLogoutNoRevokeRemovesTheTokenHereOnly(t *testing.T) {
	p, h, old := loggedIn(t)
	h.run("logout", "-no-revoke", "demo").want(t, 0, "not revoked (-no-revoke)", "removed demo/default")
	h.noTokens()
	if n := p.RevocationCalls(); n != 0 {
		t.Errorf("%d revocation requests with -no-revoke", n)
	}
	if _, err := refresh(t.Context(), p, old.RefreshToken); err != nil {
		t.Errorf("the refresh token no longer refreshes after -no-revoke: %v", err)
	}
}

// logout of a token that is not there says so, and where to look, with
// exit status 1: with no store at all (none is created), and with a store
// that holds another token.
func TestLogoutWithoutATokenSaysSo(t *testing.T) {
	p := startProvider(t, oidcprovider.Options{})
	h := newHost(t, publicEntry(p))
	h.run("logout", "demo").want(t, 1, "no token for demo/default", "no credential store")
	loginDemo(t, h)
	h.run("logout", "demo", "work").want(t, 1, "no token for provider demo bucket work", "'credproxy token ls'")
	if n := p.RevocationCalls(); n != 0 {
		t.Errorf("%d revocation requests for no token", n)
	}
}
