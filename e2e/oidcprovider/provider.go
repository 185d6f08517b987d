// Package oidcprovider runs a real OpenID provider on a loopback address,
// for the end-to-end tests of credproxy's CLI and for trying credproxy
// login without an account anywhere. It is the op package of
// github.com/zitadel/oidc/v3 with that project's example storage, login
// pages and device pages, with two clients registered: a public native
// client (the way CLIs are registered, PKCE and loopback redirects on any
// port) and a confidential client with a secret.
//
// Call [Start], read the endpoints and client ids from the [Provider],
// and play the user's part in the browser with [Login] and
// [ApproveDevice]. The provider counts the calls made to its token and
// revocation endpoints, so that a test can assert, say, exactly one refresh.
//
// # Logging
//
// The example server logs every request through slog's default logger;
// a test that wants quiet sets slog.SetDefault itself.
//
// # Security
//
// This is a test provider: its users, passwords and token encryption key
// are fixed and public, and it speaks plain HTTP. Never expose it beyond
// the loopback interface.
package oidcprovider

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"time"

	"github.com/zitadel/oidc/v3/example/server/exampleop"
	"github.com/zitadel/oidc/v3/example/server/storage"
)

// The example storage's user, whose name carries the host of the issuer
// it was made for: "localhost" here, whatever address the provider has.
const (
	DemoUser     = "test-user@localhost"
	DemoPassword = "verysecure"
)

// Grant types, as the token endpoint's grant_type names them, for
// [Provider.TokenCalls].
const (
	GrantAuthorizationCode = "authorization_code"
	GrantRefreshToken      = "refresh_token"
	GrantDeviceCode        = "urn:ietf:params:oauth:grant-type:device_code"
)

// CallbackPath is the path of the public client's registered redirect
// URI, http://127.0.0.1/callback: as RFC 8252, section 7.3 asks, the
// provider accepts it on any loopback address and any port.
const CallbackPath = "/callback"

// Options configures a provider. The zero value is a provider on a free
// port of 127.0.0.1 with the example's token lifetimes.
type Options struct {
	// Addr is the address to listen on, such as "127.0.0.1:9998". ""
	// means a free port on 127.0.0.1.
	Addr string

	// AccessTokenLifetime, when positive, is the lifetime the token
	// endpoint's responses give their access tokens (expires_in), for
	// tests of refreshing. The provider's own record of each token keeps
	// the example's five minutes, so a token past this lifetime is still
	// accepted where the provider checks it (userinfo, revocation). Zero
	// means five minutes.
	AccessTokenLifetime time.Duration

	// ConfidentialRedirectURIs are the redirect URIs registered for the
	// confidential client. It is a web client, so they must match
	// exactly, port included: give the loopback URL the test will name
	// in its redirect_url. Nil registers none, which leaves it the
	// device flow and refreshing.
	ConfidentialRedirectURIs []string
}

// Provider is a running OpenID provider. Its fields describe it and must
// not be changed; its methods are safe for concurrent use. Close stops it.
type Provider struct {
	// Issuer is the provider's issuer URL, with a trailing slash, such as
	// http://127.0.0.1:41234/.
	Issuer string

	// The endpoints, as the provider's discovery document gives them.
	AuthURL, TokenURL, DeviceAuthURL, RevocationURL, UserinfoURL string

	// PublicClientID is a native client with no secret (token endpoint
	// auth method "none"), which must use PKCE. It may use the
	// authorization code flow with a redirect to CallbackPath on any
	// loopback address and port, the device flow, and refresh tokens.
	PublicClientID string

	// ConfidentialClientID and ConfidentialClientSecret are a web client
	// that authenticates with HTTP Basic. It may use the authorization
	// code flow with the redirect URIs of
	// [Options.ConfidentialRedirectURIs], the device flow (authenticated
	// when polling) and refresh tokens. The secret is new for each
	// provider.
	ConfidentialClientID, ConfidentialClientSecret string

	// Scopes are the scopes to ask for: with offline_access, the provider
	// issues refresh tokens.
	Scopes []string

	srv      *http.Server
	served   chan struct{}
	observer *observer
}

// Start starts a provider, serving until Close.
func Start(opts Options) (*Provider, error) {
	addr := opts.Addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("oidcprovider: %w", err)
	}
	secret := "cs-" + rand.Text() // a new client secret, 130 random bits
	p := &Provider{
		Issuer:                   "http://" + ln.Addr().String() + "/",
		PublicClientID:           "credproxy-cli",
		ConfidentialClientID:     "credproxy-web",
		ConfidentialClientSecret: secret,
		Scopes:                   []string{"openid", "offline_access"},
		served:                   make(chan struct{}),
	}
	public := storage.NativeClient(p.PublicClientID, "http://127.0.0.1"+CallbackPath)
	confidential := storage.WebClient(p.ConfidentialClientID, secret, opts.ConfidentialRedirectURIs...)
	if opts.ConfidentialRedirectURIs == nil {
		// WebClient registers an example URI when given none.
		confidential = storage.WebClient(p.ConfidentialClientID, secret, "https://invalid.example/none")
	}
	users := storage.NewUserStore("http://localhost:0") // the users are @localhost
	st := &store{
		Storage: storage.NewStorageWithClients(users,
			map[string]*storage.Client{p.PublicClientID: public, p.ConfidentialClientID: confidential}),
		users:      users,
		lifetime:   opts.AccessTokenLifetime,
		withDevice: map[string]bool{p.PublicClientID: true, p.ConfidentialClientID: true},
	}
	router := exampleop.SetupServer(p.Issuer, st, nil, false)
	if err := p.discover(router); err != nil {
		ln.Close()
		return nil, err
	}
	p.observer = newObserver(p, router)
	p.srv = &http.Server{Handler: p.observer, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		defer close(p.served)
		p.srv.Serve(ln)
	}()
	return p, nil
}

// discover fills in the endpoints from the provider's discovery document,
// asked of the handler in process: the provider names its own endpoints.
func (p *Provider) discover(h http.Handler) error {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, p.Issuer+".well-known/openid-configuration", nil))
	var doc struct {
		AuthURL       string `json:"authorization_endpoint"`
		TokenURL      string `json:"token_endpoint"`
		DeviceAuthURL string `json:"device_authorization_endpoint"`
		RevocationURL string `json:"revocation_endpoint"`
		UserinfoURL   string `json:"userinfo_endpoint"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &doc); err != nil || rec.Code != http.StatusOK {
		return fmt.Errorf("oidcprovider: discovery answered %d: %q", rec.Code, rec.Body.String())
	}
	p.AuthURL, p.TokenURL, p.DeviceAuthURL = doc.AuthURL, doc.TokenURL, doc.DeviceAuthURL
	p.RevocationURL, p.UserinfoURL = doc.RevocationURL, doc.UserinfoURL
	for _, u := range []string{p.AuthURL, p.TokenURL, p.DeviceAuthURL, p.RevocationURL, p.UserinfoURL} {
		if _, err := url.Parse(u); err != nil || u == "" {
			return fmt.Errorf("oidcprovider: discovery gave the endpoint %q", u)
		}
	}
	return nil
}

// Close stops the provider: it stops accepting, gives requests in flight
// a second to finish, closes every connection, and returns once the
// server has stopped. It can be called more than once.
func (p *Provider) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := p.srv.Shutdown(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		err = p.srv.Close()
	}
	<-p.served
	return err
}

// TokenCalls returns how many requests with the grant type (such as
// GrantRefreshToken) the token endpoint has received, answered or not.
func (p *Provider) TokenCalls(grantType string) int { return p.observer.tokenCalls(grantType) }

// RevocationCalls returns how many requests the revocation endpoint has
// received, answered or not.
func (p *Provider) RevocationCalls() int { return p.observer.revocationCalls() }

// AuthorizeRequests returns the query of each request the authorization
// endpoint has received, in order: what the browser carried there from
// the client.
func (p *Provider) AuthorizeRequests() []url.Values { return p.observer.authorizeRequests() }
