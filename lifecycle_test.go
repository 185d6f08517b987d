package credproxy

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// Token lifecycle against providers that misbehave the way real ones do
// (PROTOCOL.md section 12 of the spec: F1 to F4). Each test runs in a
// synctest bubble, so the times it measures are the server's own.

// F1: refresh_token asks the provider even when the stored token is valid
// for another hour: the sandbox asks because its token stopped working.
// A refresh token revoked at the provider meanwhile is noticed at once.
func TestRefreshTokenAsksTheProviderWhileTheStoredTokenIsValid(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, time.Hour), Options{DisableRenewal: true})
		ctx := context.Background()
		tok, err := h.client.RefreshToken(ctx, "anthropic", "")
		if err != nil || string(tok.AccessToken()) != "fake-access-1" || h.endpoint.callCount() != 1 {
			t.Fatalf("refresh_token of a token valid for an hour: %q, %v after %d provider calls; want fake-access-1 after 1",
				string(tok.AccessToken()), err, h.endpoint.callCount())
		}
		// Within the cooldown, the refresh just made answers.
		time.Sleep(10 * time.Second)
		if tok, err := h.client.RefreshToken(ctx, "anthropic", ""); err != nil || string(tok.AccessToken()) != "fake-access-1" || h.endpoint.callCount() != 1 {
			t.Fatalf("within the cooldown: %q, %v after %d calls; want fake-access-1 after 1", string(tok.AccessToken()), err, h.endpoint.callCount())
		}
		// The user revokes the grant at the provider.
		h.endpoint.mu.Lock()
		h.endpoint.current = "fake-refresh-issued-after-revocation"
		h.endpoint.mu.Unlock()
		time.Sleep(21 * time.Second)
		if _, err := h.client.RefreshToken(ctx, "anthropic", ""); !errors.Is(err, ErrReauthRequired) {
			t.Fatalf("refresh_token after revocation, token still valid for 59 min: %v, want ErrReauthRequired", err)
		}
		if n := h.endpoint.callCount(); n != 2 {
			t.Errorf("provider calls = %d, want 2", n)
		}
	})
}

// F3: a provider that omits expires_in yields a token without expiry: the
// stale stored expiry is not kept, the sandbox is not served a token that
// looks expired, and no renewal loop follows (one call in three minutes).
func TestRefreshWithoutExpiresInDropsTheStaleExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		stale := mustToken(t, `{"access_token":"fake-access-0","refresh_token":"`+fakeRefresh+`","expiry":1000}`)
		h := newRefreshHarness(t, time.Hour, stale, Options{})
		h.endpoint.noExpiresIn = true
		ctx := context.Background()
		tok, err := h.client.RefreshToken(ctx, "anthropic", "")
		if err != nil {
			t.Fatal(err)
		}
		if exp, ok := tok.Expiry(); ok {
			t.Errorf("served a token expiring at %v (Unix %d); want no expiry", exp, exp.Unix())
		}
		stored, _ := h.store.GetToken(ctx, "anthropic", "")
		if _, ok := stored.Expiry(); ok || string(stored.AccessToken()) != "fake-access-1" {
			t.Errorf("stored token %s keeps an expiry", stored.WithoutRefreshToken().Reveal())
		}
		if _, err := h.client.GetToken(ctx, "anthropic", ""); err != nil {
			t.Fatal(err)
		}
		time.Sleep(180 * time.Second)
		if n := h.endpoint.callCount(); n != 1 {
			t.Errorf("provider calls in 180 s with no client activity = %d, want 1", n)
		}
	})
}

// F3: a non-positive expires_in is a failed refresh, not a token served as
// already expired; a refresh token the response rotated is still kept, so
// the user stays logged in.
func TestRefreshWithNonPositiveExpiresInFails(t *testing.T) {
	for _, expiresIn := range []string{"-60", "0"} {
		synctest.Test(t, func(t *testing.T) {
			h := newRefreshHarness(t, time.Hour, expiringToken(t, -time.Minute), Options{})
			h.endpoint.expiresIn = expiresIn
			ctx := context.Background()
			_, err := h.client.RefreshToken(ctx, "anthropic", "")
			if !errors.Is(err, ErrInternal) {
				t.Fatalf("expires_in %s: refresh_token = %v, want ErrInternal", expiresIn, err)
			}
			_, current := h.endpoint.state()
			if got := h.storedRefreshToken(t); got != current {
				t.Errorf("expires_in %s: stored refresh token %q, want the rotated %q", expiresIn, got, current)
			}
			time.Sleep(180 * time.Second)
			if n := h.endpoint.callCount(); n != 1 {
				t.Errorf("expires_in %s: provider calls in 180 s = %d, want 1", expiresIn, n)
			}
		})
	}
}

// F2: a hanging token endpoint does not break get_token for a token that
// is still valid: the refresh before serving waits a few seconds, not the
// store deadline, the stored token is served, and the next get_token does
// not wait again for the same hanging refresh.
func TestGetTokenServesTheStoredTokenWhileTheEndpointHangs(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, 50*time.Second), Options{DisableRenewal: true})
		h.endpoint.hang = true
		ctx := context.Background()
		for i := range 3 {
			start := time.Now()
			tok, err := h.client.GetToken(ctx, "anthropic", "")
			took := time.Since(start)
			if err != nil || string(tok.AccessToken()) != "fake-access-0" {
				t.Fatalf("get_token %d: %q, %v; want the stored token", i, string(tok.AccessToken()), err)
			}
			if limit := map[bool]time.Duration{true: preServeRefreshWait, false: 0}[i == 0]; took > limit {
				t.Errorf("get_token %d took %v, want at most %v", i, took, limit)
			}
		}
	})
}

// F4: a provider's 429 with Retry-After: 3600 is honoured: a sandbox that
// polls get_token every 0.5 s for 20 s causes one provider call, and no
// get_token waits for it; refresh_token meanwhile is RATE_LIMITED with the
// time left.
func TestRefreshHonoursRetryAfter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, 50*time.Second), Options{})
		h.endpoint.retryAfter = "3600"
		h.endpoint.failNext(429, 429, 429, 429, 429, 429, 429, 429, 429, 429, 429, 429, 429, 429, 429, 429, 429, 429, 429, 429)
		ctx := context.Background()
		start := time.Now()
		var slowest time.Duration
		for range 40 {
			t0 := time.Now()
			tok, err := h.client.GetToken(ctx, "anthropic", "")
			if err != nil || string(tok.AccessToken()) != "fake-access-0" {
				t.Fatalf("get_token at %v: %q, %v", time.Since(start), string(tok.AccessToken()), err)
			}
			slowest = max(slowest, time.Since(t0))
			time.Sleep(500 * time.Millisecond)
		}
		if n := h.endpoint.callCount(); n != 1 || slowest > 0 {
			t.Errorf("20 s of polling against 429 Retry-After 3600: %d provider calls at %s, slowest get_token %v; want 1 call and no wait",
				n, offsets(start, h.endpoint.callTimes()), slowest)
		}
		_, err := h.client.RefreshToken(ctx, "anthropic", "")
		var re *RemoteError
		if !errors.As(err, &re) || re.Code != CodeRateLimited || re.RetryAfter < 3500*time.Second || re.RetryAfter > 3600*time.Second {
			t.Errorf("refresh_token during Retry-After: %v, want RATE_LIMITED with about 3580 s", err)
		}
		if n := h.endpoint.callCount(); n != 1 {
			t.Errorf("provider calls = %d after refresh_token, want 1", n)
		}
	})
}

// F4: a 200 response that is not a token response (an HTML sign-in page)
// is a permanent failure: one call, no retries; and a failed refresh backs
// off: refresh_token within 30 s of it is RATE_LIMITED without a call, and
// the provider is asked again after that.
func TestRefreshFailuresBackOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, -time.Minute), Options{DisableRenewal: true})
		h.endpoint.html = true
		ctx := context.Background()
		if _, err := h.client.RefreshToken(ctx, "anthropic", ""); !errors.Is(err, ErrInternal) {
			t.Fatalf("refresh_token against an HTML page: %v, want ErrInternal", err)
		}
		if n := h.endpoint.callCount(); n != 1 {
			t.Fatalf("provider calls for an HTML 200 = %d, want 1 (no retries)", n)
		}
		time.Sleep(10 * time.Second)
		_, err := h.client.RefreshToken(ctx, "anthropic", "")
		var re *RemoteError
		if !errors.As(err, &re) || re.Code != CodeRateLimited || re.RetryAfter != 20*time.Second {
			t.Fatalf("refresh_token 10 s after a failure: %v, want RATE_LIMITED with 20 s", err)
		}
		if n := h.endpoint.callCount(); n != 1 {
			t.Fatalf("provider calls during the backoff = %d, want 1", n)
		}
		h.endpoint.mu.Lock()
		h.endpoint.html = false
		h.endpoint.mu.Unlock()
		time.Sleep(20 * time.Second)
		if tok, err := h.client.RefreshToken(ctx, "anthropic", ""); err != nil || string(tok.AccessToken()) != "fake-access-1" {
			t.Fatalf("after the backoff: %q, %v", string(tok.AccessToken()), err)
		}
	})
}

// F1 across hosts: a sandbox whose token was replaced in the store by
// another host's refresh gets the stored token from refresh_token without
// a provider call (a new one would revoke the other sandbox's token at
// providers that do so, and the two would take turns forever); once it
// holds the stored token and reports it dead, the provider is asked.
func TestRefreshTokenGivesASandboxWithAnOutdatedTokenTheStoredOne(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRefreshHarness(t, time.Hour, expiringToken(t, time.Hour), Options{DisableRenewal: true})
		opts := Options{Store: h.store, RateLimit: -1, DisableRenewal: true,
			Refreshers: map[string]Refresher{"anthropic": refresherFor("http://provider.invalid/token", &http.Client{Transport: handlerTransport{h.endpoint}})}}
		_, connect := pipeServer(t, opts)
		other := NewClient("pipe", ClientOptions{dial: func(context.Context) (net.Conn, error) { return connect(), nil }})
		defer other.Close()
		ctx := context.Background()

		if tok, err := h.client.GetToken(ctx, "anthropic", ""); err != nil || string(tok.AccessToken()) != "fake-access-0" {
			t.Fatalf("get_token: %q, %v", string(tok.AccessToken()), err)
		}
		if tok, err := other.RefreshToken(ctx, "anthropic", ""); err != nil || string(tok.AccessToken()) != "fake-access-1" {
			t.Fatalf("refresh_token on the other host: %q, %v", string(tok.AccessToken()), err)
		}
		time.Sleep(time.Minute) // past any cooldown
		if tok, err := h.client.RefreshToken(ctx, "anthropic", ""); err != nil || string(tok.AccessToken()) != "fake-access-1" || h.endpoint.callCount() != 1 {
			t.Fatalf("refresh_token from the sandbox holding fake-access-0: %q, %v after %d provider calls; want fake-access-1 after 1",
				string(tok.AccessToken()), err, h.endpoint.callCount())
		}
		time.Sleep(time.Minute)
		if tok, err := h.client.RefreshToken(ctx, "anthropic", ""); err != nil || string(tok.AccessToken()) != "fake-access-2" || h.endpoint.callCount() != 2 {
			t.Fatalf("refresh_token from the sandbox holding fake-access-1: %q, %v after %d provider calls; want fake-access-2 after 2",
				string(tok.AccessToken()), err, h.endpoint.callCount())
		}
	})
}

// The host hook hears each refresh that asked the provider: success,
// failure with the wait before the next attempt, and the provider's
// rejection of the refresh token, which a host CLI turns into "log in
// again". No event carries a secret.
func TestOnRefreshReportsOutcomes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		var events []RefreshEvent
		hook := func(ev RefreshEvent) {
			mu.Lock()
			defer mu.Unlock()
			events = append(events, ev)
		}
		h := newRefreshHarness(t, time.Hour, expiringToken(t, -time.Minute), Options{DisableRenewal: true, OnRefresh: hook})
		ctx := context.Background()
		if _, err := h.client.RefreshToken(ctx, "anthropic", ""); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Minute)
		h.endpoint.failNext(503, 503, 503)
		h.client.RefreshToken(ctx, "anthropic", "")
		time.Sleep(time.Hour)
		h.endpoint.mu.Lock()
		h.endpoint.current = "fake-refresh-issued-after-revocation"
		h.endpoint.mu.Unlock()
		h.client.RefreshToken(ctx, "anthropic", "")
		synctest.Wait() // the hook runs after the waiters have their answer

		mu.Lock()
		defer mu.Unlock()
		var got []string
		for _, ev := range events {
			got = append(got, ev.Outcome.String())
			if ev.Provider != "anthropic" || ev.Bucket != DefaultBucket {
				t.Errorf("event for %q/%q", ev.Provider, ev.Bucket)
			}
			if ev.Err != nil {
				noRefreshTokenIn(t, "a RefreshEvent's error", ev.Err.Error())
			}
		}
		if strings.Join(got, " ") != "succeeded failed reauth-required" {
			t.Fatalf("events %v, want succeeded failed reauth-required", got)
		}
		if ev := events[1]; ev.RetryAfter <= 0 || ev.RetryAfter > failureBackoffBase || !errors.Is(ev.Err, ErrTransient) {
			t.Errorf("failed event: RetryAfter %v, Err %v; want a wait of up to 30 s and an error matching ErrTransient", ev.RetryAfter, ev.Err)
		}
		if ev := events[2]; !errors.Is(ev.Err, ErrReauthRequired) {
			t.Errorf("reauth event: Err %v, want one matching ErrReauthRequired", ev.Err)
		}
	})
}

// F4: Retry-After is read as delay seconds or an HTTP date; anything
// else, or a time already past, is no wait, and a day is the most.
func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)
	for v, want := range map[string]time.Duration{
		"":                              0,
		"3600":                          time.Hour,
		"0":                             0,
		"-5":                            0,
		"soon":                          0,
		"99999999":                      maxRetryAfter,
		"99999999999999999999":          maxRetryAfter,
		"Sun, 06 Dec 2026 12:02:00 GMT": 2 * time.Minute,
		"Sun, 06 Dec 2026 11:00:00 GMT": 0,
	} {
		if got := parseRetryAfter(v, now); got != want {
			t.Errorf("Retry-After %q = %v, want %v", v, got, want)
		}
	}
}
