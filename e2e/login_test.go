package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/credproxy/credproxy/e2e/oidcprovider"
	"golang.org/x/oauth2"
)

// startProvider starts a provider that the test closes.
func startProvider(t *testing.T, opts oidcprovider.Options) *oidcprovider.Provider {
	t.Helper()
	p, err := oidcprovider.Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// startLogin starts credproxy login with args and returns it with the
// URL it printed for the browser (the browser, $BROWSER=true, does
// nothing: the test plays it) and that URL's redirect URI.
func startLogin(h *host, args ...string) (pr *proc, authURL string, redirect *url.URL) {
	h.t.Helper()
	pr = h.start(credproxyBin, nil, "", append([]string{"login"}, args...)...)
	authURL = pr.await(`(?m)^  (http://\S+)$`)[1]
	u, err := url.Parse(authURL)
	if err != nil {
		h.t.Fatal(err)
	}
	if redirect, err = url.Parse(u.Query().Get("redirect_uri")); err != nil {
		h.t.Fatal(err)
	}
	return pr, authURL, redirect
}

// loginDemo logs the host in to the provider "demo" with the browser flow,
// the user played by oidcprovider.Login.
func loginDemo(t *testing.T, h *host) {
	t.Helper()
	pr, authURL, _ := startLogin(h, "demo")
	if err := oidcprovider.Login(t.Context(), authURL, oidcprovider.DemoUser, oidcprovider.DemoPassword); err != nil {
		t.Fatal(err)
	}
	pr.wait().want(t, 0, "stored demo/default", "refreshable")
}

// storedToken is the token in the host's store, as token get prints it
// with its refresh token.
type storedToken struct {
	AccessToken  string `json:"access_token"`
	RefreshToken string `json:"refresh_token"`
	Expiry       int64  `json:"expiry"`
}

func (h *host) token(names ...string) storedToken {
	h.t.Helper()
	r := h.run(append([]string{"token", "get", "-with-refresh-token"}, names...)...)
	r.want(h.t, 0)
	var tok storedToken
	if err := json.Unmarshal([]byte(r.stdout), &tok); err != nil {
		h.t.Fatalf("token get: %v: %q", err, r.stdout)
	}
	return tok
}

// noTokens fails the test if the host's store holds a token.
func (h *host) noTokens() {
	h.t.Helper()
	if r := h.run("token", "ls"); r.code != 0 || r.stdout != "" {
		h.t.Errorf("token ls: exit %d, %q; want no tokens", r.code, r.stdout)
	}
}

// refresh refreshes refreshToken at p as its public client, directly.
func refresh(ctx context.Context, p *oidcprovider.Provider, refreshToken string) (*oauth2.Token, error) {
	cfg := oauth2.Config{ClientID: p.PublicClientID,
		Endpoint: oauth2.Endpoint{TokenURL: p.TokenURL, AuthStyle: oauth2.AuthStyleInParams}}
	return cfg.TokenSource(ctx, &oauth2.Token{RefreshToken: refreshToken}).Token()
}

// Login in a browser (authorization code with PKCE, a loopback redirect)
// stores a token whose access token the provider accepts and whose
// refresh token refreshes there; token get shows the access token (and
// not the refresh token). The authorization request carried an S256
// challenge and no verifier, to a loopback redirect URI, and a request
// to another path of the listener got 404 without ending the login.
func TestLoginStoresARefreshableTokenObtainedWithPKCE(t *testing.T) {
	p := startProvider(t, oidcprovider.Options{})
	h := newHost(t, publicEntry(p))
	pr, authURL, redirect := startLogin(h, "demo")
	if redirect.Scheme != "http" || redirect.Hostname() != "127.0.0.1" || redirect.Path != "/callback" {
		t.Errorf("redirect URI %s, want http://127.0.0.1:PORT/callback", redirect)
	}
	resp, err := http.Get("http://" + redirect.Host + "/favicon.ico")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("another path answered %d, want 404", resp.StatusCode)
	}
	if err := oidcprovider.Login(t.Context(), authURL, oidcprovider.DemoUser, oidcprovider.DemoPassword); err != nil {
		t.Fatal(err)
	}
	pr.wait().want(t, 0, "stored demo/default, valid until", "refreshable")

	tok := h.token("demo")
	r := h.run("token", "get", "demo")
	r.want(t, 0)
	if !strings.Contains(r.stdout, `"access_token":"`+tok.AccessToken+`"`) || strings.Contains(r.stdout, "refresh_token") {
		t.Errorf("token get: %s", r.stdout)
	}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, p.UserinfoURL, nil)
	req.Header.Set("Authorization", "Bearer "+tok.AccessToken)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"sub":"id1"`) {
		t.Errorf("userinfo with the stored access token: %d %s", resp.StatusCode, body)
	}
	if _, err := refresh(t.Context(), p, tok.RefreshToken); err != nil {
		t.Errorf("the stored refresh token does not refresh: %v", err)
	}
	if n := p.TokenCalls(oidcprovider.GrantRefreshToken); n != 1 {
		t.Errorf("%d refreshes at the provider, want 1", n)
	}

	reqs := p.AuthorizeRequests()
	if len(reqs) != 1 {
		t.Fatalf("%d authorize requests, want 1", len(reqs))
	}
	q := reqs[0]
	if q.Get("code_challenge_method") != "S256" || len(q.Get("code_challenge")) != 43 || q.Has("code_verifier") ||
		q.Get("client_id") != p.PublicClientID || q.Get("redirect_uri") != redirect.String() || len(q.Get("state")) < 22 {
		t.Errorf("the authorize request: %v", q)
	}
}

// Once the browser has the answer page, the listener is closed: a
// connection to its port is refused at once, while credproxy may still be
// exchanging the code.
func TestLoginClosesItsListenerOnceTheBrowserHasTheAnswer(t *testing.T) {
	p := startProvider(t, oidcprovider.Options{})
	h := newHost(t, publicEntry(p))
	pr, authURL, redirect := startLogin(h, "demo")
	if err := oidcprovider.Login(t.Context(), authURL, oidcprovider.DemoUser, oidcprovider.DemoPassword); err != nil {
		t.Fatal(err)
	}
	if !refused(redirect.Host) {
		t.Error("the redirect listener accepts a connection after its answer")
	}
	pr.wait().want(t, 0, "stored demo/default")
}

// An answer at the redirect URI with the wrong state (another login's, or
// a stranger's) ends the login with an error, stores nothing, and closes
// the listener; the browser is told, and shown no code.
func TestLoginWithAWrongStateFailsAndStoresNothing(t *testing.T) {
	p := startProvider(t, oidcprovider.Options{})
	h := newHost(t, publicEntry(p))
	pr, _, redirect := startLogin(h, "demo")
	resp, err := http.Get(redirect.String() + "?code=stolen-code-1234&state=not-the-state")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "wrong state") ||
		!strings.Contains(string(body), "close this window") || strings.Contains(string(body), "stolen-code") {
		t.Errorf("the page: %d %s", resp.StatusCode, body)
	}
	pr.wait().want(t, 1, "wrong state", "nothing was stored")
	if !refused(redirect.Host) {
		t.Error("the redirect listener accepts a connection after a wrong answer")
	}
	h.noTokens()
	if n := p.TokenCalls(oidcprovider.GrantAuthorizationCode); n != 0 {
		t.Errorf("%d code exchanges after a wrong state, want 0", n)
	}
}

// A login nobody finishes ends at -timeout with an error that says so,
// and stores nothing.
func TestLoginTimesOutWithAClearErrorAndStoresNothing(t *testing.T) {
	p := startProvider(t, oidcprovider.Options{})
	h := newHost(t, publicEntry(p))
	begin := time.Now()
	pr, _, redirect := startLogin(h, "-timeout", "2s", "demo")
	pr.wait().want(t, 1, "no answer reached "+redirect.String()+" within 2s (-timeout)", "nothing was stored")
	if d := time.Since(begin); d > 20*time.Second {
		t.Errorf("login took %s to time out after 2 s", d)
	}
	if !refused(redirect.Host) {
		t.Error("the redirect listener outlives the login")
	}
	h.noTokens()
}

// The provider's refusal (RFC 6749, section 4.1.2.1: error=access_denied,
// as when the user presses Deny) ends the login cleanly: exit 1, the
// provider's error quoted, nothing stored.
func TestLoginEndsCleanlyWhenTheProviderRefuses(t *testing.T) {
	p := startProvider(t, oidcprovider.Options{})
	h := newHost(t, publicEntry(p))
	pr, authURL, redirect := startLogin(h, "demo")
	u, _ := url.Parse(authURL)
	q := url.Values{"error": {"access_denied"}, "error_description": {"the user said no"}, "state": {u.Query().Get("state")}}
	resp, err := http.Get(redirect.String() + "?" + q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	pr.wait().want(t, 1, `the provider refused the login: "access_denied" ("the user said no")`, "nothing was stored")
	h.noTokens()
}

// A provider that gives no refresh token (no offline_access asked for)
// gets its token stored, with a warning that run cannot refresh it and
// the scope to add.
func TestLoginWithoutARefreshTokenWarnsAndSuggestsOfflineAccess(t *testing.T) {
	p := startProvider(t, oidcprovider.Options{})
	demo := publicEntry(p)
	demo.Scopes = []string{"openid"}
	h := newHost(t, demo)
	pr, authURL, _ := startLogin(h, "demo")
	if err := oidcprovider.Login(t.Context(), authURL, oidcprovider.DemoUser, oidcprovider.DemoPassword); err != nil {
		t.Fatal(err)
	}
	r := pr.wait()
	r.want(t, 0, "stored demo/default", "gave no refresh token, so run and serve cannot refresh", "offline_access")
	if strings.Contains(r.stderr, "refreshable") {
		t.Errorf("stderr calls the token refreshable:\n%s", r.stderr)
	}
	if tok := h.token("demo"); tok.RefreshToken != "" || tok.AccessToken == "" {
		t.Errorf("stored %+v", tok)
	}
}

// login -device stores a token that refreshes at the provider: the user
// enters the printed code at the printed URL (ApproveDevice).
func TestLoginDeviceStoresAWorkingToken(t *testing.T) {
	t.Parallel() // the device flow's poll interval is 5 s
	p := startProvider(t, oidcprovider.Options{})
	h := newHost(t, publicEntry(p))
	pr := h.start(credproxyBin, nil, "", "login", "-device", "demo")
	m := pr.await(`open\n\n  (http://\S+)\n\non any device and enter the code\n\n  (\S+)\n`)
	if err := oidcprovider.ApproveDevice(t.Context(), m[1], m[2], oidcprovider.DemoUser, oidcprovider.DemoPassword); err != nil {
		t.Fatal(err)
	}
	pr.wait().want(t, 0, "stored demo/default", "refreshable", "user_code="+m[2])
	if _, err := refresh(t.Context(), p, h.token("demo").RefreshToken); err != nil {
		t.Errorf("the device flow's refresh token does not refresh: %v", err)
	}
	if n := p.TokenCalls(oidcprovider.GrantDeviceCode); n < 1 {
		t.Errorf("%d device token polls", n)
	}
}

// login refuses to run in a sandbox (LLXPRT_CREDENTIAL_SOCKET set), before
// it opens a store or a listener.
func TestLoginRefusesToRunInASandbox(t *testing.T) {
	p := startProvider(t, oidcprovider.Options{})
	h := newHost(t, publicEntry(p))
	r := h.start(credproxyBin, []string{socketEnv + "=/nonexistent/sock"}, "", "login", "demo").wait()
	r.want(t, 1, "login runs on the host")
	if len(p.AuthorizeRequests()) != 0 || strings.Contains(r.stderr, "http://") {
		t.Errorf("login in a sandbox went on:\n%s", r.stderr)
	}
	h.noTokens()
}
