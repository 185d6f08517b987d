package fleet

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// rotatingProvider is a fake OAuth 2.0 token endpoint that behaves like a
// provider with refresh token rotation and reuse detection (Auth0's and
// Okta's "refresh token rotation", OAuth 2.0 Security BCP section 4.14.2):
// it takes the refresh_token grant only; each refresh token works once,
// and answers with a new access token and a new refresh token of the same
// family; a refresh token presented again after it was used revokes the
// whole family, so every later refresh of that login fails with
// invalid_grant: the user is logged out, on every host.
//
// It is a fake because no real provider with reuse detection can run
// here, and the e2e module's real OpenID provider (zitadel's example
// storage, in e2e/oidcprovider) rotates refresh tokens but does not
// detect reuse: its renewRefreshToken deletes the used token and keeps
// the new one valid, so a reused token is merely "invalid refresh token"
// and the other host stays logged in (zitadel/oidc v3.52.0,
// example/server/storage/storage.go). The failure the fleet's lock
// prevents is only visible with reuse detection.
//
// A refresh token counts as used when its request is answered, not when
// it arrives: a request that [rotatingProvider.hold] holds and that fails
// (the client went away, or the test released it with an error status)
// rotates nothing, as a provider that never processed it would.
//
// Access tokens are "FAKE-AT-..." and refresh tokens "FAKE-RT-...", with
// random hex: obviously fake, and easy to look for in a dump.
type rotatingProvider struct {
	URL       string // the token endpoint
	expiresIn int    // seconds, in every answer

	mu       sync.Mutex
	families []*family
	byRT     map[string]*family // every refresh token ever issued
	byAT     map[string]*family // every access token ever issued
	used     map[string]bool    // refresh tokens used
	calls    int                // token endpoint requests, whatever their fate
	rotated  int                // successful refreshes
	reused   int                // requests that presented a used refresh token
	aborted  int                // held requests whose client went away
	failed   int                // held requests released with an error status
	gates    []*gate            // armed, waiting for the next requests
	handling time.Duration      // time spent answering, gates excluded
}

// family is one login: the refresh tokens issued from one another.
type family struct {
	id      int
	current string // the refresh token that works now
	access  string // the newest access token
	revoked bool
}

// gate holds one token request until the test releases it.
type gate struct {
	arrived chan struct{} // closed when a request is held
	aborted chan struct{} // closed if the held request's client went away
	release chan int      // 0: answer as usual; else this HTTP status, no rotation
	rt      string        // the refresh token the held request carries
}

// newRotatingProvider starts the endpoint; it stops when t ends.
func newRotatingProvider(t *testing.T, expiresIn int) *rotatingProvider {
	t.Helper()
	p := &rotatingProvider{expiresIn: expiresIn, byRT: map[string]*family{}, byAT: map[string]*family{}, used: map[string]bool{}}
	srv := httptest.NewServer(http.HandlerFunc(p.serveToken))
	t.Cleanup(srv.Close)
	p.URL = srv.URL + "/oauth/token"
	return p
}

func fakeSecret(kind string) string {
	b := make([]byte, 12)
	rand.Read(b)
	return "FAKE-" + kind + "-" + hex.EncodeToString(b)
}

// login starts a family, as a user's login would, and returns its first
// access and refresh tokens.
func (p *rotatingProvider) login() (access, refresh string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f := &family{id: len(p.families), current: fakeSecret("RT"), access: fakeSecret("AT")}
	p.families = append(p.families, f)
	p.byRT[f.current], p.byAT[f.access] = f, f
	return f.access, f.current
}

// hold arms a gate for the next token request.
func (p *rotatingProvider) hold() *gate {
	g := &gate{arrived: make(chan struct{}), aborted: make(chan struct{}), release: make(chan int, 1)}
	p.mu.Lock()
	p.gates = append(p.gates, g)
	p.mu.Unlock()
	return g
}

func (p *rotatingProvider) serveToken(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.ParseForm() != nil {
		oauthError(w, http.StatusBadRequest, "invalid_request", "POST a form")
		return
	}
	p.mu.Lock()
	p.calls++
	var g *gate
	if len(p.gates) > 0 {
		g, p.gates = p.gates[0], p.gates[1:]
	}
	p.mu.Unlock()
	if r.Form.Get("grant_type") != "refresh_token" {
		oauthError(w, http.StatusBadRequest, "unsupported_grant_type", "refresh_token only")
		return
	}
	rt := r.Form.Get("refresh_token")
	if g != nil {
		g.rt = rt
		close(g.arrived)
		select {
		case status := <-g.release:
			if status != 0 {
				p.mu.Lock()
				p.failed++
				p.mu.Unlock()
				oauthError(w, status, "temporarily_unavailable", "released by the test with an error")
				return
			}
		case <-r.Context().Done():
			p.mu.Lock()
			p.aborted++
			p.mu.Unlock()
			close(g.aborted)
			return
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	handled := time.Now()
	defer func() { p.handling += time.Since(handled) }()
	f := p.byRT[rt]
	switch {
	case f == nil:
		oauthError(w, http.StatusBadRequest, "invalid_grant", "unknown refresh token")
		return
	case f.revoked:
		oauthError(w, http.StatusBadRequest, "invalid_grant", "logged out: this login was revoked after a refresh token was reused")
		return
	case p.used[rt]:
		p.reused++
		f.revoked = true
		oauthError(w, http.StatusBadRequest, "invalid_grant", "refresh token reused: every token of this login is revoked (logged out)")
		return
	}
	p.used[rt] = true
	p.rotated++
	f.current, f.access = fakeSecret("RT"), fakeSecret("AT")
	p.byRT[f.current], p.byAT[f.access] = f, f
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(map[string]any{"access_token": f.access, "token_type": "Bearer",
		"expires_in": p.expiresIn, "refresh_token": f.current})
}

func oauthError(w http.ResponseWriter, status int, code, desc string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"error": code, "error_description": desc})
}

// stats is a snapshot of the provider's counters.
type stats struct{ calls, rotated, reused, aborted, failed int }

func (p *rotatingProvider) stats() stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return stats{p.calls, p.rotated, p.reused, p.aborted, p.failed}
}

// revoked reports whether the family of the login that issued refresh
// token rt (any of its tokens) was revoked.
func (p *rotatingProvider) revoked(rt string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	handled := time.Now()
	defer func() { p.handling += time.Since(handled) }()
	f := p.byRT[rt]
	return f == nil || f.revoked
}

// current returns the refresh token that works now for the login that
// issued rt, and its newest access token.
func (p *rotatingProvider) current(rt string) (refresh, access string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if f := p.byRT[rt]; f != nil {
		return f.current, f.access
	}
	return "", ""
}

// accessValid reports whether the provider would accept access token at:
// it issued it, and its login is not revoked. (Expiry is left out: the
// tests' tokens live an hour.)
func (p *rotatingProvider) accessValid(at string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	f := p.byAT[at]
	return f != nil && !f.revoked
}

// refreshAt presents refresh token rt to the token endpoint at url, as a
// host would, and returns the new tokens, or the endpoint's error code.
func refreshAt(t *testing.T, url, rt string) (access, refresh string, errCode string) {
	t.Helper()
	resp, err := http.PostForm(url, map[string][]string{"grant_type": {"refresh_token"}, "refresh_token": {rt}, "client_id": {fleetClientID}})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		AccessToken  string `json:"access_token"`
		RefreshToken string `json:"refresh_token"`
		Error        string `json:"error"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	return body.AccessToken, body.RefreshToken, body.Error
}

// handlerTime returns the time the endpoint spent answering so far,
// held requests' waits excluded: the provider's share of a refresh.
func (p *rotatingProvider) handlerTime() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.handling
}
