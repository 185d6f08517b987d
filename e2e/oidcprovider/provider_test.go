package oidcprovider

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/oauth2"
)

func TestMain(m *testing.M) {
	slog.SetDefault(slog.New(slog.DiscardHandler)) // the example server logs every request
	os.Exit(m.Run())
}

// start starts a provider that the test closes.
func start(t *testing.T, opts Options) *Provider {
	t.Helper()
	p, err := Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// callback is a client's loopback redirect target: it hands the first
// code it gets to the test.
func callback(t *testing.T, path string) (redirect string, codes chan url.Values) {
	t.Helper()
	codes = make(chan url.Values, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != path {
			http.NotFound(w, r)
			return
		}
		select {
		case codes <- r.URL.Query():
		default:
		}
		io.WriteString(w, "you can close this window")
	}))
	t.Cleanup(srv.Close)
	return srv.URL + path, codes
}

// publicLogin runs the public client's code flow with PKCE, the user
// played by Login, and returns the client's configuration, the token and
// the PKCE verifier.
func publicLogin(t *testing.T, p *Provider) (oauth2.Config, *oauth2.Token, string) {
	t.Helper()
	redirect, codes := callback(t, CallbackPath)
	cfg := oauth2.Config{ClientID: p.PublicClientID, RedirectURL: redirect, Scopes: p.Scopes,
		Endpoint: oauth2.Endpoint{AuthURL: p.AuthURL, TokenURL: p.TokenURL, AuthStyle: oauth2.AuthStyleInParams}}
	verifier := oauth2.GenerateVerifier()
	if err := Login(t.Context(), cfg.AuthCodeURL("st4te", oauth2.S256ChallengeOption(verifier)), DemoUser, DemoPassword); err != nil {
		t.Fatal(err)
	}
	got := <-codes
	if got.Get("state") != "st4te" || got.Get("code") == "" {
		t.Fatalf("callback got %v", got)
	}
	tok, err := cfg.Exchange(t.Context(), got.Get("code"), oauth2.VerifierOption(verifier))
	if err != nil {
		t.Fatal(err)
	}
	return cfg, tok, verifier
}

// A public client's code flow with PKCE, played by Login, gives a token
// whose refresh token works once per rotation, and a short configured
// lifetime shows in expires_in; the provider counts the token calls by
// grant type and saw the S256 challenge, never the verifier.
func TestLoginGivesARefreshableTokenAndTheProviderCountsCalls(t *testing.T) {
	p := start(t, Options{AccessTokenLifetime: 30 * time.Second})
	ctx := t.Context()
	cfg, tok, verifier := publicLogin(t, p)
	if tok.RefreshToken == "" || tok.ExpiresIn > 30 || tok.ExpiresIn < 25 {
		t.Fatalf("token: refresh token %t, expires_in %d; want one, and 30 s", tok.RefreshToken != "", tok.ExpiresIn)
	}
	fresh, err := cfg.TokenSource(ctx, &oauth2.Token{RefreshToken: tok.RefreshToken}).Token()
	if err != nil {
		t.Fatal(err)
	}
	_, err = cfg.TokenSource(ctx, &oauth2.Token{RefreshToken: tok.RefreshToken}).Token()
	if re := (*oauth2.RetrieveError)(nil); !errors.As(err, &re) || re.ErrorCode != "invalid_grant" {
		t.Errorf("a rotated refresh token: %v, want invalid_grant", err)
	}
	if fresh.AccessToken == tok.AccessToken {
		t.Error("refreshing gave the same access token")
	}
	if n, m := p.TokenCalls(GrantAuthorizationCode), p.TokenCalls(GrantRefreshToken); n != 1 || m != 2 {
		t.Errorf("token calls: %d code, %d refresh; want 1 and 2", n, m)
	}
	reqs := p.AuthorizeRequests()
	if len(reqs) != 1 || reqs[0].Get("code_challenge_method") != "S256" || reqs[0].Get("code_challenge") != oauth2.S256ChallengeFromVerifier(verifier) || reqs[0].Has("code_verifier") {
		t.Errorf("authorize requests: %v", reqs)
	}
}

// A wrong password leaves the browser on the provider's login page, and
// Login says the provider refused it.
func TestLoginWithAWrongPasswordSaysTheProviderRefused(t *testing.T) {
	p := start(t, Options{})
	redirect, _ := callback(t, CallbackPath)
	cfg := oauth2.Config{ClientID: p.PublicClientID, RedirectURL: redirect, Scopes: p.Scopes,
		Endpoint: oauth2.Endpoint{AuthURL: p.AuthURL, TokenURL: p.TokenURL}}
	err := Login(t.Context(), cfg.AuthCodeURL("s", oauth2.S256ChallengeOption(oauth2.GenerateVerifier())), DemoUser, "wrong")
	if err == nil || !strings.Contains(err.Error(), "username or password wrong") {
		t.Fatalf("Login with a wrong password: %v", err)
	}
}

// The confidential client authenticates with its secret (HTTP Basic) and
// redirects to its registered loopback URI, port included.
func TestConfidentialClientLogsInWithItsSecret(t *testing.T) {
	redirect, codes := callback(t, "/cb")
	p := start(t, Options{ConfidentialRedirectURIs: []string{redirect}})
	cfg := oauth2.Config{ClientID: p.ConfidentialClientID, ClientSecret: p.ConfidentialClientSecret, RedirectURL: redirect,
		Scopes: p.Scopes, Endpoint: oauth2.Endpoint{AuthURL: p.AuthURL, TokenURL: p.TokenURL, AuthStyle: oauth2.AuthStyleInHeader}}
	if err := Login(t.Context(), cfg.AuthCodeURL("s"), DemoUser, DemoPassword); err != nil {
		t.Fatal(err)
	}
	tok, err := cfg.Exchange(t.Context(), (<-codes).Get("code"))
	if err != nil || tok.RefreshToken == "" {
		t.Fatalf("exchange: %v, refresh token %t", err, err == nil && tok.RefreshToken != "")
	}
	cfg.ClientSecret = "wrong"
	if _, err := cfg.TokenSource(t.Context(), &oauth2.Token{RefreshToken: tok.RefreshToken}).Token(); err == nil {
		t.Error("a wrong client secret refreshed")
	}
}

// The device flow, approved by ApproveDevice, gives the public client a
// token it can refresh. (It takes the provider's poll interval, 5 s.)
func TestApproveDeviceGivesARefreshableToken(t *testing.T) {
	if testing.Short() {
		t.Skip("the device flow's poll interval is 5 s")
	}
	p := start(t, Options{})
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cfg := oauth2.Config{ClientID: p.PublicClientID, Scopes: p.Scopes,
		Endpoint: oauth2.Endpoint{DeviceAuthURL: p.DeviceAuthURL, TokenURL: p.TokenURL, AuthStyle: oauth2.AuthStyleInParams}}
	da, err := cfg.DeviceAuth(ctx)
	if err != nil {
		t.Fatal(err)
	}
	approved := make(chan error, 1)
	go func() { approved <- ApproveDevice(ctx, da.VerificationURI, da.UserCode, DemoUser, DemoPassword) }()
	tok, err := cfg.DeviceAccessToken(ctx, da)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-approved; err != nil {
		t.Fatal(err)
	}
	if _, err := cfg.TokenSource(ctx, &oauth2.Token{RefreshToken: tok.RefreshToken}).Token(); err != nil {
		t.Fatalf("refreshing a device flow's token: %v", err)
	}
}

// A wrong user code is refused on the provider's page, and ApproveDevice
// says so.
func TestApproveDeviceWithAWrongCodeFails(t *testing.T) {
	p := start(t, Options{})
	err := ApproveDevice(t.Context(), strings.TrimSuffix(p.Issuer, "/")+"/device", "BBBB-BBBB", DemoUser, DemoPassword)
	if err == nil {
		t.Fatal("ApproveDevice with a code nobody asked for succeeded")
	}
}

// Close stops the provider: its port refuses connections, and a second
// Close does no harm.
func TestCloseStopsTheProvider(t *testing.T) {
	p := start(t, Options{})
	p.Close()
	if _, err := http.Get(p.Issuer); err == nil {
		t.Error("the provider answers after Close")
	}
	p.Close()
}

// Revoking a refresh token (RFC 7009), as the public client that holds
// it, makes the provider refuse it; the provider counts the call.
func TestRevokedRefreshTokenIsRefused(t *testing.T) {
	p := start(t, Options{})
	cfg, tok, _ := publicLogin(t, p)
	resp, err := http.PostForm(p.RevocationURL, url.Values{"token": {tok.RefreshToken},
		"token_type_hint": {"refresh_token"}, "client_id": {p.PublicClientID}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || p.RevocationCalls() != 1 {
		t.Fatalf("revocation: status %d, %d calls", resp.StatusCode, p.RevocationCalls())
	}
	_, err = cfg.TokenSource(t.Context(), &oauth2.Token{RefreshToken: tok.RefreshToken}).Token()
	if re := (*oauth2.RetrieveError)(nil); !errors.As(err, &re) || re.ErrorCode != "invalid_grant" {
		t.Errorf("a revoked refresh token: %v, want invalid_grant", err)
	}
}
