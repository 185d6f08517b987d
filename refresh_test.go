package credproxy

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
)

// tokenEndpoint is a real OAuth2 token endpoint for the tests: it serves
// the refresh grant (RFC 6749, section 6) for one client, with HTTP Basic
// client authentication, and rotates refresh tokens: each works once, and
// using an old one gets invalid_grant, as providers that revoke a reused
// refresh token do. Like careless providers, its errors quote the refresh
// token they were sent. All its tokens contain "fake-", and its refresh
// tokens "fake-refresh".
type tokenEndpoint struct {
	mu       sync.Mutex
	current  string        // the one refresh token that works
	lifetime time.Duration // expires_in of the tokens it issues
	issued   int
	calls    []time.Time
	used     []string        // refresh tokens presented, in order
	failWith []int           // statuses for the next calls, one each
	echoBody bool            // invalid_grant quotes the form body as received, not the refresh token
	gate     chan struct{}   // if set, each call waits for it to close
	entered  chan struct{}   // receives a value as each call starts
	grant    map[string]bool // refresh tokens that have been exchanged

	// Misbehaviours of real providers, off by default.
	noExpiresIn bool   // successes carry no expires_in
	expiresIn   string // if set, the expires_in JSON value of successes
	hang        bool   // calls never answer; they end when the request's context does
	html        bool   // calls answer 200 with an HTML page (a login wall, say)
	retryAfter  string // Retry-After header of the statuses in failWith
}

func newTokenEndpoint(lifetime time.Duration) *tokenEndpoint {
	return &tokenEndpoint{current: fakeRefresh, lifetime: lifetime, entered: make(chan struct{}, 100), grant: map[string]bool{}}
}

const (
	testClientID     = "credproxy-test-client"
	testClientSecret = "fake-client-secret-CCCC3333"
)

func (e *tokenEndpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	e.mu.Lock()
	e.calls = append(e.calls, time.Now())
	gate := e.gate
	e.mu.Unlock()
	e.entered <- struct{}{}
	if gate != nil {
		<-gate
	}
	e.mu.Lock()
	hang, html := e.hang, e.html
	e.mu.Unlock()
	if hang {
		<-r.Context().Done()
		return
	}
	if html {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprint(w, "<!doctype html><title>Sign in</title><p>Please sign in.")
		return
	}
	reply := func(status int, body string) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		fmt.Fprint(w, body)
	}
	body, err := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(body))
	if err == nil {
		err = r.ParseForm()
	}
	if err != nil || r.PostForm.Get("grant_type") != "refresh_token" {
		reply(400, `{"error":"unsupported_grant_type"}`)
		return
	}
	if r.Header.Get("Authorization") != "Basic "+base64.StdEncoding.EncodeToString([]byte(testClientID+":"+testClientSecret)) {
		reply(401, `{"error":"invalid_client"}`)
		return
	}
	rt := r.PostForm.Get("refresh_token")
	e.mu.Lock()
	defer e.mu.Unlock()
	e.used = append(e.used, rt)
	if len(e.failWith) > 0 {
		status := e.failWith[0]
		e.failWith = e.failWith[1:]
		if e.retryAfter != "" {
			w.Header().Set("Retry-After", e.retryAfter)
		}
		reply(status, `{"error":"server_error","error_description":"could not refresh `+rt+`"}`)
		return
	}
	if rt != e.current {
		quoted := rt
		if e.echoBody {
			quoted = string(body)
		}
		reply(400, `{"error":"invalid_grant","error_description":"refresh token `+quoted+` is not valid"}`)
		return
	}
	e.grant[rt] = true
	e.issued++
	e.current = fmt.Sprintf("fake-refresh-rotated-%d-XXXX%d", e.issued, e.issued)
	expiresIn := `,"expires_in":` + strconv.Itoa(int(e.lifetime/time.Second))
	switch {
	case e.noExpiresIn:
		expiresIn = ""
	case e.expiresIn != "":
		expiresIn = `,"expires_in":` + e.expiresIn
	}
	reply(200, fmt.Sprintf(`{"access_token":"fake-access-%d","token_type":"Bearer"%s,"refresh_token":"%s","scope":"chat"}`,
		e.issued, expiresIn, e.current))
}

func (e *tokenEndpoint) callCount() int { return len(e.callTimes()) }

// callTimes returns when the calls so far came in.
func (e *tokenEndpoint) callTimes() []time.Time {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]time.Time(nil), e.calls...)
}

// failNext forgets past calls and makes the next calls fail with statuses.
func (e *tokenEndpoint) failNext(statuses ...int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.calls, e.failWith = nil, statuses
}

// state returns the refresh tokens presented so far and the one that works.
func (e *tokenEndpoint) state() (used []string, current string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.used...), e.current
}

// handlerTransport sends requests to an http.Handler in memory: the
// endpoint's real code without a network, for synctest bubbles, which
// cannot hold real sockets.
type handlerTransport struct{ h http.Handler }

func (t handlerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	rec := httptest.NewRecorder()
	t.h.ServeHTTP(rec, r)
	if err := r.Context().Err(); err != nil {
		return nil, err // as a real transport does when the request is cancelled
	}
	return rec.Result(), nil
}

// refresherFor returns an OAuth2 refresher for e at url, through client.
func refresherFor(url string, client *http.Client) *OAuth2Refresher {
	return &OAuth2Refresher{TokenURL: url, ClientID: testClientID, ClientSecret: testClientSecret, HTTPClient: client}
}

// expiringToken is a stored token with the endpoint's first refresh token
// that expires in d (negative: expired).
func expiringToken(t testing.TB, d time.Duration) Token {
	return mustToken(t, fmt.Sprintf(`{"access_token":"fake-access-0","refresh_token":"%s","expiry":%d,"account_id":"acct-7"}`,
		fakeRefresh, time.Now().Add(d).Unix()))
}

// refreshHarness is a server on a MemoryStore whose provider "anthropic"
// refreshes at a token endpoint, in a synctest bubble, with a client
// connected through a pipe.
type refreshHarness struct {
	srv      *Server
	store    *MemoryStore
	endpoint *tokenEndpoint
	client   *Client
	logs     *logBuffer
}

func newRefreshHarness(t *testing.T, lifetime time.Duration, stored Token, opts Options) *refreshHarness {
	t.Helper()
	h := &refreshHarness{store: NewMemoryStore(), endpoint: newTokenEndpoint(lifetime)}
	if !stored.IsZero() {
		h.store.SaveToken(context.Background(), "anthropic", "", stored)
	}
	opts.Store = h.store
	opts.Logger, h.logs = debugLogger()
	opts.RateLimit = -1
	opts.Refreshers = map[string]Refresher{
		"anthropic": refresherFor("http://provider.invalid/token", &http.Client{Transport: handlerTransport{h.endpoint}}),
	}
	srv, connect := pipeServer(t, opts)
	h.srv = srv
	h.client = NewClient("pipe", ClientOptions{dial: func(context.Context) (net.Conn, error) { return connect(), nil }})
	t.Cleanup(func() { h.client.Close() })
	return h
}

// storedRefreshToken returns the refresh token in the store.
func (h *refreshHarness) storedRefreshToken(t *testing.T) string {
	t.Helper()
	tok, err := h.store.GetToken(context.Background(), "anthropic", "")
	if err != nil {
		t.Fatal(err)
	}
	return string(tok.RefreshToken())
}

// noRefreshTokenIn fails the test if text holds any refresh token the
// tests use.
func noRefreshTokenIn(t *testing.T, where, text string) {
	t.Helper()
	if strings.Contains(text, "fake-refresh") {
		t.Errorf("a refresh token appears in %s:\n%s", where, text)
	}
}

// --- refresh_token (R12–R15) ---

// R12, one refresh for many concurrent requests on one server and on two
// servers sharing a store, is credproxytest.TestServer's, on every store
// (suites_test.go).

// R12, R13: refresh tokens rotate: each refresh presents the latest one,
// which the endpoint accepts exactly once, and the store ends with the
// newest.
func TestRefreshUsesEachRotatedRefreshTokenOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, 90*time.Second, expiringToken(t, -time.Second), Options{DisableRenewal: true})
		ctx := context.Background()
		for i := 1; i <= 5; i++ {
			tok, err := h.client.RefreshToken(ctx, "anthropic", "")
			if err != nil || string(tok.AccessToken()) != "fake-access-"+strconv.Itoa(i) {
				t.Fatalf("refresh %d: %q, %v", i, string(tok.AccessToken()), err)
			}
			// Past the cooldown, and within a minute of expiry.
			time.Sleep(31 * time.Second)
		}
		used, current := h.endpoint.state()
		if len(used) != 5 {
			t.Fatalf("endpoint saw %d refreshes, want 5", len(used))
		}
		seen := map[string]bool{}
		for _, rt := range used {
			if seen[rt] {
				t.Errorf("refresh token %q was presented twice", rt)
			}
			seen[rt] = true
		}
		if got := h.storedRefreshToken(t); got != current {
			t.Errorf("stored refresh token %q, want the newest %q", got, current)
		}
		noRefreshTokenIn(t, "the debug log", h.logs.String())
	})
}

// R13: invalid_grant is REAUTH_REQUIRED after one endpoint call (no retry,
// no second call in the other auth style); the dead refresh token is
// cleared, so the next refresh is REFRESH_NOT_AVAILABLE; the provider's
// text, which quotes the refresh token, reaches neither the client nor the
// log.
func TestRefreshInvalidGrantRequiresReauth(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, -time.Second), Options{DisableRenewal: true})
		h.endpoint.current = "fake-refresh-issued-elsewhere" // before any call
		ctx := context.Background()
		_, err := h.client.RefreshToken(ctx, "anthropic", "")
		if !errors.Is(err, ErrReauthRequired) {
			t.Fatalf("RefreshToken with a rejected refresh token = %v", err)
		}
		noRefreshTokenIn(t, "the client's error", err.Error())
		if n := h.endpoint.callCount(); n != 1 {
			t.Errorf("endpoint calls = %d, want 1", n)
		}
		stored, _ := h.store.GetToken(ctx, "anthropic", "")
		if stored.RefreshToken() != "" || string(stored.AccessToken()) != "fake-access-0" {
			t.Errorf("after REAUTH_REQUIRED the store holds %s; want the access token without the refresh token", stored.Reveal())
		}
		if _, err := h.client.RefreshToken(ctx, "anthropic", ""); !errors.Is(err, ErrRefreshNotAvailable) {
			t.Errorf("second RefreshToken = %v, want ErrRefreshNotAvailable", err)
		}
		if n := h.endpoint.callCount(); n != 1 {
			t.Errorf("endpoint calls = %d after the second request, want 1", n)
		}
		noRefreshTokenIn(t, "the debug log", h.logs.String())
		if !strings.Contains(h.logs.String(), "invalid_grant") {
			t.Errorf("the host log does not say why the refresh failed:\n%s", h.logs.String())
		}
	})
}

// F5: a provider that echoes the form body in its error sends the refresh
// token back URL-encoded, and golang.org/x/oauth2 puts that text in its
// error; the WARN log, at the default level, says why the refresh failed
// but holds the refresh token in no form.
func TestRefreshLogRedactsRefreshTokenEchoedURLEncoded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const rt = `fake-refresh/AB+cd=ef gh&ij"kl`
		q, _ := jsontext.AppendQuote(nil, rt)
		stored := mustToken(t, `{"access_token":"fake-access-0","refresh_token":`+string(q)+`}`)
		h := newRefreshHarness(t, time.Hour, stored, Options{DisableRenewal: true})
		h.endpoint.echoBody = true // and its current refresh token is another
		if _, err := h.client.RefreshToken(context.Background(), "anthropic", ""); !errors.Is(err, ErrReauthRequired) {
			t.Fatalf("RefreshToken with a rejected refresh token = %v", err)
		}
		var warn strings.Builder
		for line := range strings.Lines(h.logs.String()) {
			if strings.Contains(line, `"level":"WARN"`) {
				warn.WriteString(line)
			}
		}
		logged := warn.String()
		if !strings.Contains(logged, "invalid_grant") || !strings.Contains(logged, "grant_type=refresh_token") {
			t.Fatalf("no WARN line quotes the provider's echo of the form body:\n%s", h.logs.String())
		}
		// As it is, as the JSON log would escape it, and as the provider echoed it.
		for _, form := range []string{rt, string(q[1 : len(q)-1]), url.QueryEscape(rt)} {
			if strings.Contains(logged, form) {
				t.Errorf("the WARN log holds the refresh token as %q:\n%s", form, logged)
			}
		}
		noRefreshTokenIn(t, "the debug log", h.logs.String())
	})
}

// R13: HTTP 401 is REAUTH_REQUIRED too, after exactly one call: the auth
// style is explicit, so golang.org/x/oauth2 does not retry in the other.
func TestRefreshUnauthorizedRequiresReauthAfterOneCall(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, -time.Second), Options{DisableRenewal: true})
		h.endpoint.failNext(401)
		if _, err := h.client.RefreshToken(context.Background(), "anthropic", ""); !errors.Is(err, ErrReauthRequired) {
			t.Fatalf("RefreshToken on HTTP 401 = %v", err)
		}
		if n := h.endpoint.callCount(); n != 1 {
			t.Errorf("endpoint calls = %d, want 1", n)
		}
	})
}

// R13: 5xx and 429 are retried twice, after 1 s and then 3 s; other 4xx
// are not retried; either way the client gets a fixed message.
func TestRefreshRetriesTransientFailures(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, -time.Second), Options{DisableRenewal: true})
		e := h.endpoint
		ctx := context.Background()

		e.failNext(500, 429)
		start := time.Now()
		if tok, err := h.client.RefreshToken(ctx, "anthropic", ""); err != nil || string(tok.AccessToken()) != "fake-access-1" {
			t.Fatalf("after two transient failures: %v", err)
		}
		if got := offsets(start, e.callTimes()); got != "0s 1s 4s" {
			t.Errorf("calls at %s, want 0s 1s 4s", got)
		}

		time.Sleep(time.Hour) // the new token expires; the cooldown is long over
		e.failNext(503, 500, 502)
		start = time.Now()
		_, err := h.client.RefreshToken(ctx, "anthropic", "")
		var re *RemoteError
		if !errors.As(err, &re) || re.Code != CodeInternalError || re.Message != "refresh failed" {
			t.Fatalf("after three transient failures: %v", err)
		}
		if got := offsets(start, e.callTimes()); got != "0s 1s 4s" {
			t.Errorf("calls at %s, want 0s 1s 4s", got)
		}

		time.Sleep(time.Hour)
		e.failNext(400)
		if _, err := h.client.RefreshToken(ctx, "anthropic", ""); !errors.Is(err, ErrInternal) || e.callCount() != 1 {
			t.Errorf("HTTP 400: %v after %d calls, want INTERNAL_ERROR after 1", err, e.callCount())
		}
		noRefreshTokenIn(t, "the debug log", h.logs.String())
	})
}

// offsets formats the times of calls relative to start.
func offsets(start time.Time, calls []time.Time) string {
	var parts []string
	for _, c := range calls {
		parts = append(parts, c.Sub(start).String())
	}
	return strings.Join(parts, " ")
}

// R14: within 30 s of a refresh, a refresh request gets the still-valid
// token without a provider call, and RATE_LIMITED with the seconds left
// once it has expired; after the cooldown the provider is called again.
func TestRefreshCooldown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, 20*time.Second, expiringToken(t, -time.Second), Options{DisableRenewal: true})
		ctx := context.Background()
		if _, err := h.client.RefreshToken(ctx, "anthropic", ""); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Second)
		if tok, err := h.client.RefreshToken(ctx, "anthropic", ""); err != nil || string(tok.AccessToken()) != "fake-access-1" {
			t.Errorf("within the cooldown, valid token: %q, %v", string(tok.AccessToken()), err)
		}
		time.Sleep(20 * time.Second) // 25 s after the refresh: expired, 5 s of cooldown left
		_, err := h.client.RefreshToken(ctx, "anthropic", "")
		var re *RemoteError
		if !errors.As(err, &re) || !errors.Is(err, ErrRateLimited) || re.RetryAfter != 5*time.Second {
			t.Errorf("within the cooldown, expired token: %v (retryAfter %v), want RATE_LIMITED after 5s", err, re.RetryAfter)
		}
		if n := h.endpoint.callCount(); n != 1 {
			t.Errorf("endpoint calls within the cooldown = %d, want 1", n)
		}
		time.Sleep(5 * time.Second)
		if tok, err := h.client.RefreshToken(ctx, "anthropic", ""); err != nil || string(tok.AccessToken()) != "fake-access-2" {
			t.Errorf("after the cooldown: %q, %v", string(tok.AccessToken()), err)
		}
	})
}

// R6.5 order of refresh checks: no refresher → PROVIDER_NOT_FOUND; no
// token → NOT_FOUND; no refresh token → REFRESH_NOT_AVAILABLE. None calls
// the provider.
func TestRefreshChecksBeforeCallingTheProvider(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, Token{}, Options{DisableRenewal: true})
		ctx := context.Background()
		h.store.SaveToken(ctx, "openai", "", expiringToken(t, -time.Second))
		if _, err := h.client.RefreshToken(ctx, "openai", ""); !errors.Is(err, ErrProviderNotFound) {
			t.Errorf("provider without a refresher: %v", err)
		}
		if _, err := h.client.RefreshToken(ctx, "anthropic", ""); !errors.Is(err, ErrNotFound) {
			t.Errorf("no token: %v", err)
		}
		h.store.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"fake-access-0"}`))
		if _, err := h.client.RefreshToken(ctx, "anthropic", ""); !errors.Is(err, ErrRefreshNotAvailable) {
			t.Errorf("no refresh token: %v", err)
		}
		if n := h.endpoint.callCount(); n != 0 {
			t.Errorf("endpoint calls = %d, want 0", n)
		}
	})
}

// R15: a logout (remove_token) that arrives while a refresh is at the
// provider waits for it and then wins: the refreshed token is saved first
// and removed after, never resurrected.
func TestLogoutDuringRefreshWaitsAndWins(t *testing.T) {
	e := newTokenEndpoint(time.Hour)
	e.gate = make(chan struct{})
	hs := httptest.NewServer(e)
	defer hs.Close()
	release := sync.OnceFunc(func() { close(e.gate) })
	defer release() // before hs.Close, which waits for the held call
	st := &orderedStore{Store: storeWith(t, nil, nil)}
	st.Store.SaveToken(context.Background(), "anthropic", "", expiringToken(t, -time.Minute))
	srv, path := startServer(t, Options{Store: st, RateLimit: -1, DisableRenewal: true,
		Refreshers: map[string]Refresher{"anthropic": refresherFor(hs.URL, hs.Client())}})
	c := newTestClient(t, path, ClientOptions{})
	ctx := context.Background()

	refreshed := make(chan error, 1)
	go func() { _, err := c.RefreshToken(ctx, "anthropic", ""); refreshed <- err }()
	<-e.entered // the refresh holds the lock and is at the provider
	removed := make(chan error, 1)
	go func() { removed <- c.RemoveToken(ctx, "anthropic", "") }()
	waitUntil(t, func() bool { return srv.locks.waiters("anthropic:default") == 2 }) // the logout waits
	release()
	if err := <-refreshed; err != nil {
		t.Fatalf("refresh: %v", err)
	}
	if err := <-removed; err != nil {
		t.Fatalf("remove: %v", err)
	}
	if got := st.log(); got != "save remove" {
		t.Errorf("store writes: %q, want the refresh's save, then the logout's remove", got)
	}
	if _, err := c.GetToken(ctx, "anthropic", ""); !errors.Is(err, ErrNotFound) {
		t.Errorf("after the logout: %v, want ErrNotFound", err)
	}
}

// orderedStore records the order of token writes.
type orderedStore struct {
	Store
	mu     sync.Mutex
	writes []string
}

func (o *orderedStore) SaveToken(ctx context.Context, provider, bucket string, token Token) error {
	o.record("save")
	return o.Store.SaveToken(ctx, provider, bucket, token)
}

func (o *orderedStore) RemoveToken(ctx context.Context, provider, bucket string) error {
	o.record("remove")
	return o.Store.RemoveToken(ctx, provider, bucket)
}

func (o *orderedStore) record(w string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.writes = append(o.writes, w)
}

func (o *orderedStore) log() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return strings.Join(o.writes, " ")
}

// --- get_token margin and proactive renewal (R16) ---

// get_token refreshes a token that expires within the margin (60 s by
// default) before serving it; with the margin off it serves the stored one.
func TestGetTokenRefreshesTokenAboutToExpire(t *testing.T) {
	for _, tc := range []struct {
		margin time.Duration
		want   string
		calls  int
	}{{0, "fake-access-1", 1}, {-1, "fake-access-0", 0}} {
		synctest.Test(t, func(t *testing.T) {
			h := newRefreshHarness(t, time.Hour, expiringToken(t, 30*time.Second), Options{RefreshMargin: tc.margin, DisableRenewal: true})
			tok, err := h.client.GetToken(context.Background(), "anthropic", "")
			if err != nil || string(tok.AccessToken()) != tc.want || h.endpoint.callCount() != tc.calls {
				t.Errorf("margin %v: get_token served %q (%v) after %d endpoint calls; want %s after %d",
					tc.margin, string(tok.AccessToken()), err, h.endpoint.callCount(), tc.want, tc.calls)
			}
		})
	}
}

// R16, the point of it all: a sandbox that reads its token once a minute
// for four hours, with one-hour access tokens, never gets an expired
// token or a refresh token; the host renews each token shortly before it
// expires, once.
func TestRenewalKeepsALongSessionFresh(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, time.Hour), Options{})
		ctx := context.Background()
		start := time.Now()
		served := map[string]bool{}
		for minute := 0; minute < 4*60; minute++ {
			tok, err := h.client.GetToken(ctx, "anthropic", "")
			if err != nil {
				t.Fatalf("minute %d: %v", minute, err)
			}
			exp, ok := tok.Expiry()
			if !ok || !exp.After(time.Now().Add(4*time.Minute)) {
				t.Fatalf("minute %d: served a token expiring at %v, now %v", minute, exp, time.Now())
			}
			if tok.RefreshToken() != "" {
				t.Fatalf("minute %d: served a refresh token", minute)
			}
			served[string(tok.AccessToken())] = true
			time.Sleep(time.Minute)
		}
		calls := h.endpoint.callCount()
		if calls < 4 || calls > 5 || len(served) != calls+1 {
			t.Errorf("4 hours of one-hour tokens: %d endpoint calls, %d access tokens served; want 4 or 5 calls, each token served",
				calls, len(served))
		}
		for i, at := range h.endpoint.callTimes() {
			t.Logf("renewal %d at %v", i+1, at.Sub(start))
		}
		noRefreshTokenIn(t, "the debug log", h.logs.String())
	})
}

// R16: the renewal runs at expiry - max(300 s, 10% of the lifetime) -
// jitter (0–30 s): for a token with an hour left, between 6:30 and 6:00
// before it expires.
func TestRenewalRunsShortlyBeforeExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, time.Hour), Options{})
		start := time.Now()
		if _, err := h.client.GetToken(context.Background(), "anthropic", ""); err != nil {
			t.Fatal(err)
		}
		time.Sleep(59 * time.Minute)
		calls := h.endpoint.callTimes()
		if len(calls) != 1 {
			t.Fatalf("endpoint calls in the first 59 minutes = %d, want 1", len(calls))
		}
		if at := calls[0].Sub(start); at < 53*time.Minute+30*time.Second || at > 54*time.Minute {
			t.Errorf("renewal at %v, want between 53m30s and 54m", at)
		}
	})
}

// R16: a failing renewal backs off 30 s, 60 s, 120 s ... up to 1800 s
// between attempts (each attempt is a refresh with its own two retries),
// and stops after 10 failures in a row.
func TestRenewalBacksOffAndStops(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, time.Hour), Options{})
		failures := make([]int, 1000)
		for i := range failures {
			failures[i] = 503
		}
		h.endpoint.failNext(failures...)
		if _, err := h.client.GetToken(context.Background(), "anthropic", ""); err != nil {
			t.Fatal(err)
		}
		time.Sleep(24 * time.Hour)
		calls := h.endpoint.callTimes()
		if len(calls) != 30 {
			t.Fatalf("endpoint calls = %d, want 10 renewals × 3 attempts", len(calls))
		}
		var gaps []string
		for i := 3; i < len(calls); i += 3 {
			gaps = append(gaps, calls[i].Sub(calls[i-3]).String())
		}
		if got, want := strings.Join(gaps, " "), "30s 1m0s 2m0s 4m0s 8m0s 16m0s 30m0s 30m0s 30m0s"; got != want {
			t.Errorf("gaps between renewals %s, want %s", got, want)
		}
	})
}

// R16: Shutdown cancels pending renewals: none runs after it.
func TestShutdownCancelsRenewals(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, time.Hour), Options{})
		if _, err := h.client.GetToken(context.Background(), "anthropic", ""); err != nil {
			t.Fatal(err)
		}
		h.client.Close()
		if err := h.srv.Shutdown(context.Background()); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Hour)
		if n := h.endpoint.callCount(); n != 0 {
			t.Errorf("endpoint calls after Shutdown = %d, want 0", n)
		}
	})
}

// The OAuth2 adapter's token carries what the endpoint returned, and the
// stored token keeps its provider-specific members through the merge.
func TestOAuth2RefresherConvertsTheResponse(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, -time.Second), Options{DisableRenewal: true})
		tok, err := h.client.RefreshToken(context.Background(), "anthropic", "")
		if err != nil {
			t.Fatal(err)
		}
		var got map[string]any
		if err := json.Unmarshal(tok.Reveal(), &got); err != nil {
			t.Fatal(err)
		}
		want := map[string]any{"access_token": "fake-access-1", "token_type": "Bearer", "scope": "chat", "account_id": "acct-7",
			"expiry": float64(time.Now().Add(time.Hour).Unix())}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("refreshed token %v, want %v", got, want)
		}
	})
}

// waiters returns how many hold or wait for the lock of key.
func (k *keyedMutex) waiters(key string) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	if l := k.locks[key]; l != nil {
		return l.waiters
	}
	return 0
}

// R16: a renewal that fires after another process has renewed the token
// (a later expiry in the store) calls no provider and follows the new
// expiry; one that fires after a logout stops.
func TestRenewalFollowsTheStoredToken(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, time.Hour), Options{})
		ctx := context.Background()
		start := time.Now()
		if _, err := h.client.GetToken(ctx, "anthropic", ""); err != nil {
			t.Fatal(err)
		}
		time.Sleep(30 * time.Minute)
		// Another host renews the token: it now expires 2 h after start.
		renewed := mustToken(t, fmt.Sprintf(`{"access_token":"fake-access-elsewhere","refresh_token":"%s","expiry":%d}`,
			fakeRefresh, start.Add(2*time.Hour).Unix()))
		h.store.SaveToken(ctx, "anthropic", "", renewed)
		time.Sleep(60 * time.Minute) // past the first planned renewal, short of the new one
		if n := h.endpoint.callCount(); n != 0 {
			t.Fatalf("endpoint calls = %d at %s, want 0: the token was renewed elsewhere", n, offsets(start, h.endpoint.callTimes()))
		}
		time.Sleep(30 * time.Minute) // past the new expiry's renewal, about 7 min before it
		calls := h.endpoint.callTimes()
		if len(calls) != 1 || calls[0].Sub(start) < 112*time.Minute || calls[0].Sub(start) > 115*time.Minute {
			t.Fatalf("renewal calls at %s, want one between 1h52m and 1h55m", offsets(start, calls))
		}

		h.store.RemoveToken(ctx, "anthropic", "")
		time.Sleep(3 * time.Hour)
		if n := h.endpoint.callCount(); n != 1 {
			t.Errorf("endpoint calls after the logout = %d, want still 1", n)
		}
	})
}

// F2 with tokens that live less than the 30 s cooldown: get_token for a
// token that expired within the cooldown after a refresh refreshes it
// again, rather than answering RATE_LIMITED until the cooldown ends (the
// sandbox would wait out the rest of it with no working token). Only
// refresh_token, which a sandbox sends at will, is held by the cooldown.
func TestGetTokenRefreshesATokenThatExpiredWithinTheCooldown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, 4*time.Second, expiringToken(t, -time.Second), Options{DisableRenewal: true})
		ctx := context.Background()
		first, err := h.client.GetToken(ctx, "anthropic", "")
		if err != nil || string(first.AccessToken()) != "fake-access-1" {
			t.Fatalf("get_token of an expired token: %q, %v; want the refreshed fake-access-1", string(first.AccessToken()), err)
		}
		time.Sleep(5 * time.Second) // fake-access-1 has expired; 25 s of cooldown left
		start := time.Now()
		second, err := h.client.GetToken(ctx, "anthropic", "")
		if err != nil || string(second.AccessToken()) != "fake-access-2" || time.Since(start) > time.Second {
			t.Errorf("get_token within the cooldown, token expired: %q, %v after %v; want fake-access-2 at once",
				string(second.AccessToken()), err, time.Since(start))
		}
		if n := h.endpoint.callCount(); n != 2 {
			t.Errorf("provider calls = %d, want 2", n)
		}
	})
}

// Proactive renewal of a token that lives less than the cooldown renews
// it before it expires (halfway), rather than waiting for the cooldown to
// end with the token expired meanwhile: a sandbox that reads its token
// again and again never finds it expired. And it stays one provider call
// per half lifetime, no more.
func TestRenewalOfAShortLivedTokenIsNotHeldByTheCooldown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, 4*time.Second, expiringToken(t, -time.Second), Options{})
		ctx := context.Background()
		for i := 0; i < 40; i++ {
			tok, err := h.client.GetToken(ctx, "anthropic", "")
			if err != nil {
				t.Fatalf("get_token at %d s: %v", i/2, err)
			}
			if exp, _ := tok.Expiry(); !exp.After(time.Now()) {
				t.Fatalf("get_token at %d s served a token that expired at %v", i/2, exp)
			}
			time.Sleep(500 * time.Millisecond)
		}
		// 20 s of 4 s tokens renewed halfway: about 10 calls.
		if n := h.endpoint.callCount(); n < 6 || n > 12 {
			t.Errorf("provider calls in 20 s = %d, want one per 2 s or so", n)
		}
		h.srv.Close()
	})
}

// A sandbox with write access must not be able to make the host call the
// provider more than once per cooldown by saving an already-expired access
// token (save_token keeps the stored refresh token) and then asking for it:
// the host's own get_token refresh of an expired token bypasses the
// cooldown, and the token it "sees" expired is the peer's, not a token the
// provider chose the lifetime of.
func TestSaveTokenOfAnExpiredTokenDoesNotBypassTheCooldown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, -time.Second), Options{DisableRenewal: true})
		ctx := context.Background()
		start := time.Now()
		for i := 0; i < 50; i++ {
			expired := mustToken(t, fmt.Sprintf(`{"access_token":"peer-%d","expiry":%d}`, i, time.Now().Add(-time.Hour).Unix()))
			if err := h.client.SaveToken(ctx, "anthropic", "", expired); err != nil {
				t.Fatal(err)
			}
			h.client.GetToken(ctx, "anthropic", "")
			time.Sleep(100 * time.Millisecond)
		}
		// At most one provider call per cooldown (plus the first).
		elapsed := time.Since(start)
		if n, most := h.endpoint.callCount(), 1+int(elapsed/refreshCooldown); n > most {
			t.Errorf("provider calls in %v driven by a sandbox = %d, want at most %d (cooldown %v)", elapsed, n, most, refreshCooldown)
		}
	})
}
