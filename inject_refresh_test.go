package credproxy

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Refresh behind the injection front: tokens are read and refreshed on
// the host as get_token and refresh_token do, and a sandbox cannot make
// the host call the provider more than the cooldown allows.

// countingRefresher hands out fakeRealAccess2, valid for an hour, and
// counts its calls.
type countingRefresher struct{ calls atomic.Int32 }

func (r *countingRefresher) Refresh(context.Context, Token) (Token, error) {
	r.calls.Add(1)
	return ParseToken(fmt.Appendf(nil, `{"access_token":%q,"expiry":%d}`, fakeRealAccess2, time.Now().Add(time.Hour).Unix()))
}

// acceptOnly is an upstream handler that answers 200 to requests with
// the bearer token want and 401, with a body of its own, to others.
func acceptOnly(want string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+want {
			w.Header().Set("Www-Authenticate", `Bearer error="invalid_token"`)
			http.Error(w, `{"error":"upstream says: invalid token"}`, http.StatusUnauthorized)
			return
		}
		io.WriteString(w, `{"ok":true}`)
	}
}

// refreshFront is a server whose "anthropic" tokens refresh with a
// countingRefresher, and a session with a token route to up.
func refreshFront(t *testing.T, st Store, up *upstream) (*Session, *countingRefresher) {
	t.Helper()
	r := &countingRefresher{}
	srv, _ := injectServer(t, st, Options{Refreshers: map[string]Refresher{"anthropic": r}, DisableRenewal: true})
	return injectSession(t, srv, tokenRoute(up)), r
}

// An upstream's 401 to the stored token leads to one refresh on the host
// and one retry with the new token, body and all: the sandbox gets the
// 200. Later requests carry the new token from the start.
func TestInjectRetriesOnceAfterA401WithARefreshedToken(t *testing.T) {
	up := newUpstream(t, acceptOnly(fakeRealAccess2))
	sess, r := refreshFront(t, injectStore(t), up)
	c := frontClient(t, sess)
	status, body, _ := call(t, c, "POST", "/anthropic/v1/messages", "Authorization", bearer(sess.Phantom()), strings.NewReader(`{"n":1}`))
	if status != 200 || body != `{"ok":true}` || r.calls.Load() != 1 || up.requests.Load() != 2 {
		t.Fatalf("got %d %q after %d refreshes and %d upstream requests; want 200 after 1 and 2", status, body, r.calls.Load(), up.requests.Load())
	}
	up.mu.Lock()
	first, retry := up.seen[0], up.seen[1]
	bodies := fmt.Sprintf("%s %s", up.bodies[0], up.bodies[1])
	up.mu.Unlock()
	if first.Header.Get("Authorization") != "Bearer "+fakeRealAccess || retry.Header.Get("Authorization") != "Bearer "+fakeRealAccess2 ||
		bodies != `{"n":1} {"n":1}` {
		t.Errorf("upstream saw %q then %q, bodies %s", first.Header.Get("Authorization"), retry.Header.Get("Authorization"), bodies)
	}
	if status, _, _ := call(t, c, "GET", "/anthropic/v1/models", "Authorization", bearer(sess.Phantom()), nil); status != 200 || up.requests.Load() != 3 {
		t.Errorf("the next request: %d after %d upstream requests, want 200 after 3", status, up.requests.Load())
	}
}

// An upstream that refuses every token gets the sandbox its own 401 as it
// came, and the host calls the provider once, not once per request: the
// refreshes the sandbox's requests set off fall within the cooldown, or
// join the one in flight.
func TestInjectPassesA401ThroughWithinTheRefreshCooldown(t *testing.T) {
	up := newUpstream(t, acceptOnly("nothing-is-accepted"))
	sess, r := refreshFront(t, injectStore(t), up)
	c := frontClient(t, sess)
	for i := range 5 {
		status, body, header := call(t, c, "POST", "/anthropic/v1/messages", "Authorization", bearer(sess.Phantom()), strings.NewReader(`{}`))
		if status != 401 || body != "{\"error\":\"upstream says: invalid token\"}\n" || header.Get("Www-Authenticate") == "" {
			t.Errorf("request %d: %d %q, want the upstream's 401", i, status, body)
		}
	}
	var wg sync.WaitGroup
	for range 10 {
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(t.Context(), "GET", "http://sandbox/anthropic/v1/models", nil)
			req.Header.Set("Authorization", bearer(sess.Phantom()))
			if resp, err := c.Do(req); err == nil {
				resp.Body.Close()
			}
		})
	}
	wg.Wait()
	if n := r.calls.Load(); n != 1 {
		t.Errorf("the provider was called %d times, want 1", n)
	}
	// 5 requests, the first retried once, and 10 more.
	if n := up.requests.Load(); n != 16 {
		t.Errorf("%d upstream requests, want 16", n)
	}
}

// A token that expires within the refresh margin is refreshed before it
// is injected, once for many requests at the same moment.
func TestInjectRefreshesATokenAboutToExpireOnceForConcurrentRequests(t *testing.T) {
	st := injectStore(t)
	soon := mustToken(t, fmt.Sprintf(`{"access_token":%q,"refresh_token":%q,"expiry":%d}`, fakeRealAccess, fakeRefresh, time.Now().Add(20*time.Second).Unix()))
	st.SaveToken(t.Context(), "anthropic", "", soon)
	up := newUpstream(t, acceptOnly(fakeRealAccess2))
	sess, r := refreshFront(t, st, up)
	c := frontClient(t, sess)
	var wg sync.WaitGroup
	var ok atomic.Int32
	for range 10 {
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(t.Context(), "GET", "http://sandbox/anthropic/v1/models", nil)
			req.Header.Set("Authorization", bearer(sess.Phantom()))
			if resp, err := c.Do(req); err == nil {
				if resp.StatusCode == 200 {
					ok.Add(1)
				}
				resp.Body.Close()
			}
		})
	}
	wg.Wait()
	if ok.Load() != 10 || r.calls.Load() != 1 || up.requests.Load() != 10 {
		t.Errorf("%d of 10 requests served, %d provider calls, %d upstream requests; want 10, 1, 10", ok.Load(), r.calls.Load(), up.requests.Load())
	}
}

// A body larger than the 1 MiB kept for a retry is not retried: the 401
// goes back as it came. The token is refreshed all the same, so the next
// request is served.
func TestInjectDoesNotRetryABodyTooLargeToKeep(t *testing.T) {
	up := newUpstream(t, acceptOnly(fakeRealAccess2))
	sess, r := refreshFront(t, injectStore(t), up)
	c := frontClient(t, sess)
	big := strings.Repeat("x", injectReplayBuffer+1)
	status, _, _ := call(t, c, "POST", "/anthropic/v1/messages", "Authorization", bearer(sess.Phantom()), strings.NewReader(big))
	_, got := up.last(t)
	if status != 401 || up.requests.Load() != 1 || len(got) != len(big) || r.calls.Load() != 1 {
		t.Fatalf("got %d after %d upstream requests (%d bytes) and %d refreshes; want 401 after 1 (%d bytes) and 1",
			status, up.requests.Load(), len(got), r.calls.Load(), len(big))
	}
	if status, _, _ := call(t, c, "POST", "/anthropic/v1/messages", "Authorization", bearer(sess.Phantom()), strings.NewReader(big)); status != 200 {
		t.Errorf("the next request: %d, want 200", status)
	}
}
