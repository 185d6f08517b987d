package credproxy

import (
	"context"
	"errors"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// sourceHarness is a server over a real Unix socket whose provider
// "anthropic" refreshes at a real OAuth2 token endpoint, with the host's
// own refreshing off (no renewal, no refresh before get_token), so that
// every refresh is one a TokenSource asked for; and a client of it.
type sourceHarness struct {
	store    Store
	endpoint *tokenEndpoint
	logs     *logBuffer
	client   *Client
}

func newSourceHarness(t *testing.T, st Store) *sourceHarness {
	t.Helper()
	h := &sourceHarness{store: st, endpoint: newTokenEndpoint(time.Hour)}
	hs := httptest.NewServer(h.endpoint)
	t.Cleanup(hs.Close)
	opts := Options{Store: st, RateLimit: -1, RefreshMargin: -1, DisableRenewal: true,
		Refreshers: map[string]Refresher{"anthropic": refresherFor(hs.URL, hs.Client())}}
	opts.Logger, h.logs = debugLogger()
	_, path := startServer(t, opts)
	h.client = newTestClient(t, path, ClientOptions{})
	return h
}

// save stores the token js for provider.
func (h *sourceHarness) save(t *testing.T, provider, js string) {
	t.Helper()
	if err := h.store.SaveToken(context.Background(), provider, "", mustToken(t, js)); err != nil {
		t.Fatal(err)
	}
}

// requests returns how many requests for op the server has served.
func (h *sourceHarness) requests(op Op) int {
	n := 0
	for line := range strings.Lines(h.logs.String()) {
		if strings.Contains(line, `"msg":"credproxy: request"`) && strings.Contains(line, `"op":"`+string(op)+`"`) {
			n++
		}
	}
	return n
}

// wantAccess checks that src serves the access token want, and that the
// server has served gets get_token and refreshes refresh_token requests.
func (h *sourceHarness) wantAccess(t *testing.T, step string, src *TokenSource, want string, gets, refreshes int) {
	t.Helper()
	tok, err := src.Token()
	if err != nil {
		t.Fatalf("%s: Token: %v", step, err)
	}
	if tok.AccessToken != want || tok.RefreshToken != "" {
		t.Errorf("%s: access token %q (refresh token %q), want %q and none", step, tok.AccessToken, tok.RefreshToken, want)
	}
	if g, r := h.requests(OpGetToken), h.requests(OpRefreshToken); g != gets || r != refreshes {
		t.Errorf("%s: %d get_token and %d refresh_token requests, want %d and %d", step, g, r, gets, refreshes)
	}
}

// Issue 13, finding 7: a TokenSource serves the token it has while it is
// valid for more than the margin, and one without an expiry until it is
// invalidated, without asking the server again; the oauth2.Token carries
// the expiry and the provider-specific members.
func TestTokenSourceCachesWhileValid(t *testing.T) {
	h := newSourceHarness(t, NewMemoryStore())
	h.store.SaveToken(context.Background(), "anthropic", "", expiringToken(t, time.Hour))
	h.save(t, "openai", `{"access_token":"fake-open-1"}`)
	src := h.client.TokenSource(t.Context(), "anthropic", "", TokenSourceOptions{})
	for i := range 3 {
		h.wantAccess(t, "anthropic", src, "fake-access-0", 1, 0)
		tok, _ := src.Token()
		if exp, _ := expiringToken(t, time.Hour).Expiry(); tok.Expiry.Sub(exp).Abs() > 2*time.Second || tok.Extra("account_id") != "acct-7" {
			t.Errorf("call %d: expiry %v (want about %v), account_id %v", i, tok.Expiry, exp, tok.Extra("account_id"))
		}
	}
	never := h.client.TokenSource(t.Context(), "openai", "", TokenSourceOptions{})
	for range 3 {
		h.wantAccess(t, "no expiry", never, "fake-open-1", 2, 0)
	}
	if n := h.endpoint.callCount(); n != 0 {
		t.Errorf("%d token endpoint calls, want 0", n)
	}
}

// Issue 13, finding 7: a token that the server serves within the margin
// of its expiry is refreshed through the proxy, once; with the margin off
// it is served as it is. A near-expiry token the host cannot refresh is
// served while it is valid, and the source does not ask again at every
// call; once expired, the refresh error is returned as it came.
func TestTokenSourceRefreshesNearExpiry(t *testing.T) {
	h := newSourceHarness(t, NewMemoryStore())
	h.store.SaveToken(context.Background(), "anthropic", "", expiringToken(t, 30*time.Second))
	src := h.client.TokenSource(t.Context(), "anthropic", "", TokenSourceOptions{})
	h.wantAccess(t, "first", src, "fake-access-1", 1, 1)
	h.wantAccess(t, "again", src, "fake-access-1", 1, 1)
	if n := h.endpoint.callCount(); n != 1 {
		t.Errorf("%d token endpoint calls, want 1", n)
	}

	h = newSourceHarness(t, NewMemoryStore())
	h.store.SaveToken(context.Background(), "anthropic", "", expiringToken(t, 30*time.Second))
	src = h.client.TokenSource(t.Context(), "anthropic", "", TokenSourceOptions{Margin: -1})
	h.wantAccess(t, "margin off", src, "fake-access-0", 1, 0)

	h = newSourceHarness(t, NewMemoryStore())
	h.save(t, "anthropic", `{"access_token":"fake-norefresh","expiry":`+unixIn(30*time.Second)+`}`)
	h.save(t, "openai", `{"access_token":"fake-expired","expiry":`+unixIn(-time.Second)+`}`)
	src = h.client.TokenSource(t.Context(), "anthropic", "", TokenSourceOptions{})
	h.wantAccess(t, "no refresh token", src, "fake-norefresh", 1, 1)
	h.wantAccess(t, "no refresh token, again", src, "fake-norefresh", 1, 1)
	expired := h.client.TokenSource(t.Context(), "openai", "", TokenSourceOptions{})
	if _, err := expired.Token(); !errors.Is(err, ErrProviderNotFound) {
		t.Errorf("expired token the host cannot refresh: %v, want ErrProviderNotFound", err)
	}
}

// unixIn returns the Unix time d from now, in seconds, as JSON.
func unixIn(d time.Duration) string { return strconv.FormatInt(time.Now().Add(d).Unix(), 10) }

// Issue 13, finding 7: after the caller reports that the token was
// rejected (an HTTP 401), the next Token asks the host to refresh and
// serves the new access token, even though the old one had not expired.
// If the host cannot refresh, the source serves a token the host has
// since been given, and until then the refresh error.
func TestTokenSourceRefreshesAfterUnauthorized(t *testing.T) {
	h := newSourceHarness(t, NewMemoryStore())
	// Valid for another hour: the 401 is what says it stopped working.
	h.store.SaveToken(context.Background(), "anthropic", "", expiringToken(t, time.Hour))
	h.save(t, "openai", `{"access_token":"fake-open-1"}`)
	src := h.client.TokenSource(t.Context(), "anthropic", "", TokenSourceOptions{})
	h.wantAccess(t, "before", src, "fake-access-0", 1, 0)
	src.Invalidate()
	h.wantAccess(t, "after a 401", src, "fake-access-1", 1, 1)
	h.wantAccess(t, "then", src, "fake-access-1", 1, 1)

	open := h.client.TokenSource(t.Context(), "openai", "", TokenSourceOptions{})
	h.wantAccess(t, "openai", open, "fake-open-1", 2, 1)
	open.Invalidate()
	for i := range 2 {
		if _, err := open.Token(); !errors.Is(err, ErrProviderNotFound) {
			t.Errorf("call %d after a 401, no refresher and no new token: %v, want ErrProviderNotFound", i, err)
		}
	}
	h.save(t, "openai", `{"access_token":"fake-open-2"}`)
	h.wantAccess(t, "openai, a new token on the host", open, "fake-open-2", 5, 4)
}

// Issue 13, finding 7: calls from many goroutines at once make one
// request, and share its answer.
func TestTokenSourceConcurrentCallsMakeOneRequest(t *testing.T) {
	st := NewMemoryStore()
	gated := newGatedStore(st)
	h := newSourceHarness(t, gated)
	h.save(t, "anthropic", `{"access_token":"fake-access-0","expiry":`+unixIn(time.Hour)+`}`)
	src := h.client.TokenSource(t.Context(), "anthropic", "", TokenSourceOptions{})

	const n = 20
	var wg sync.WaitGroup
	got := make(chan string, n)
	for range n {
		wg.Go(func() {
			tok, err := src.Token()
			if err != nil {
				t.Errorf("Token: %v", err)
				return
			}
			got <- tok.AccessToken
		})
	}
	<-gated.entered // one request reached the store...
	for deadline := time.Now().Add(10 * time.Second); src.waiting() < n-1; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d calls wait for the request in flight, want %d", src.waiting(), n-1)
		}
	}
	close(gated.gate) // ...and every other call waits for its answer
	wg.Wait()
	close(got)
	for at := range got {
		if at != "fake-access-0" {
			t.Errorf("a call got %q", at)
		}
	}
	if g := h.requests(OpGetToken); g != 1 {
		t.Errorf("%d concurrent calls made %d get_token requests, want 1", n, g)
	}

	// A failure is shared too, and not kept: the next call asks again.
	gone := h.client.TokenSource(t.Context(), "gemini", "", TokenSourceOptions{})
	for i := range 2 {
		if _, err := gone.Token(); !errors.Is(err, ErrNotFound) {
			t.Errorf("call %d for a missing token: %v, want ErrNotFound", i, err)
		}
	}
	if g := h.requests(OpGetToken); g != 3 {
		t.Errorf("%d get_token requests, want 3", g)
	}
}

// A TokenSource's requests end with its context.
func TestTokenSourceContext(t *testing.T) {
	h := newSourceHarness(t, NewMemoryStore())
	h.save(t, "anthropic", `{"access_token":"fake-access-0"}`)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := h.client.TokenSource(ctx, "anthropic", "", TokenSourceOptions{}).Token(); !errors.Is(err, context.Canceled) {
		t.Errorf("Token with a cancelled context: %v, want context.Canceled", err)
	}
}
