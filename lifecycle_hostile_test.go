package credproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"golang.org/x/oauth2"
)

// The token lifecycle against a hostile sandbox and a careless provider.
// Each of these failed before its fix: a reviewer attacking the change
// from inside a sandbox wrote them.

// slowSaveStore is a MemoryStore whose writes take a while, as a keyring
// write does (a file rename with fsync, a D-Bus call).
type slowSaveStore struct {
	*MemoryStore
	delay time.Duration
}

func (s slowSaveStore) SaveToken(ctx context.Context, p, b string, t Token) error {
	time.Sleep(s.delay)
	return s.MemoryStore.SaveToken(ctx, p, b, t)
}

// sessionPipeClient returns a client of a new session of srv under
// policy, connected through pipes, so that it runs in a synctest bubble.
func sessionPipeClient(t *testing.T, srv *Server, policy Policy) *Client {
	ss := srv.newSession(policy, randomHex(4))
	ss.token = Secret(randomHex(32))
	ss.digest = capabilityDigest(string(ss.token))
	ss.limiter = newConnLimiter(1000, 1000)
	ss.maxConns = 16
	c := NewClient("pipe", ClientOptions{CapabilityToken: ss.token, dial: func(context.Context) (net.Conn, error) {
		client, server := net.Pipe()
		srv.serveConn(server, selfPeer(), ss)
		t.Cleanup(func() { client.Close() })
		return client, nil
	}})
	t.Cleanup(func() { c.Close() })
	return c
}

// F4: a sandbox with a write grant cannot reset the failure backoff by
// saving a token while refresh_token is between its unlocked read and the
// flight's locked one: a token a peer saved is not a refresh done
// elsewhere. Against a provider that fails every time, 30 minutes of that
// game make the backoff's 6 or so calls, not 30.
func TestPeerSaveDoesNotResetTheRefreshBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ms := NewMemoryStore()
		ms.SaveToken(context.Background(), "anthropic", "", expiringToken(t, time.Hour))
		e := newTokenEndpoint(time.Hour)
		fails := make([]int, 1000)
		for i := range fails {
			fails[i] = 400
		}
		e.failNext(fails...)
		_, connect := pipeServer(t, Options{Store: slowSaveStore{ms, 20 * time.Millisecond}, RateLimit: -1, DisableRenewal: true,
			Refreshers: map[string]Refresher{"anthropic": refresherFor("http://provider.invalid/token", &http.Client{Transport: handlerTransport{e}})}})
		dial := func(context.Context) (net.Conn, error) { return connect(), nil }
		c1 := NewClient("pipe", ClientOptions{dial: dial})
		c2 := NewClient("pipe", ClientOptions{dial: dial})
		defer c1.Close()
		defer c2.Close()
		ctx := context.Background()
		for i, start := 0, time.Now(); time.Since(start) < 30*time.Minute; i++ {
			c1.RefreshToken(ctx, "anthropic", "")
			time.Sleep(31 * time.Second)
			tok := mustToken(t, fmt.Sprintf(`{"access_token":"fake-access-sandbox-%d","expiry":%d}`, i, time.Now().Add(time.Hour).Unix()))
			go c2.SaveToken(ctx, "anthropic", "", tok)
			time.Sleep(5 * time.Millisecond) // the save is under way
			c1.RefreshToken(ctx, "anthropic", "")
			time.Sleep(31 * time.Second)
		}
		if n := e.callCount(); n > 8 {
			t.Errorf("provider called %d times in 30 minutes although it failed every time; the backoff allows about 6", n)
		}
	})
}

// F1: a sandbox with a write grant cannot hold the cooldown open for
// everyone by saving tokens: another sandbox whose token stopped working
// still gets a token from the provider.
func TestPeerSaveDoesNotHoldTheRefreshCooldownOpen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newTokenEndpoint(time.Hour)
		ms := NewMemoryStore()
		ms.SaveToken(context.Background(), "anthropic", "", expiringToken(t, time.Hour))
		srv, err := NewServer(Options{Store: ms, RateLimit: -1,
			Refreshers: map[string]Refresher{"anthropic": refresherFor("http://provider.invalid/token", &http.Client{Transport: handlerTransport{e}})}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { srv.Close() })
		a := sessionPipeClient(t, srv, &Grant{Providers: []string{"anthropic"}, Write: true})
		b := sessionPipeClient(t, srv, &Grant{Providers: []string{"anthropic"}})
		ctx := context.Background()
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			for i := 0; ; i++ {
				a.GetToken(ctx, "anthropic", "")
				a.SaveToken(ctx, "anthropic", "", mustToken(t, fmt.Sprintf(`{"access_token":"fake-access-sandbox-A-%d"}`, i)))
				a.RefreshToken(ctx, "anthropic", "")
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Second):
				}
			}
		}()
		time.Sleep(time.Second)
		fromProvider := 0
		for range 20 {
			tok, err := b.RefreshToken(ctx, "anthropic", "")
			if err == nil && !strings.Contains(string(tok.AccessToken()), "sandbox") {
				fromProvider++
			}
			time.Sleep(time.Minute)
		}
		if fromProvider == 0 || e.callCount() == 0 {
			t.Errorf("20 refresh_token requests from B over 20 minutes: %d provider calls, %d tokens from the provider", e.callCount(), fromProvider)
		}
	})
}

// A sandbox with a write grant pads the stored token up to the save_token
// cap; the provider's next answer (with a 3 KB id_token, as OIDC providers
// send) must not push it past what a frame carries: the refresh keeps the
// provider's members and the stored ones that fit, smallest first, so the
// token stays servable.
func TestRefreshKeepsAPaddedTokenServable(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ms := NewMemoryStore()
		ctx := context.Background()
		ms.SaveToken(ctx, "anthropic", "", expiringToken(t, time.Hour))
		idToken := "fake-idtoken." + strings.Repeat("A", 3000)
		refresher := RefresherFunc(func(ctx context.Context, old Token) (Token, error) {
			return NewToken(TokenFields{AccessToken: "fake-access-1", RefreshToken: "fake-refresh-rotated-1",
				TokenType: "Bearer", Expiry: time.Now().Add(time.Hour), Extra: map[string]any{"id_token": idToken}})
		})
		logger, logs := debugLogger()
		_, connect := pipeServer(t, Options{Store: ms, Logger: logger, RateLimit: -1, DisableRenewal: true,
			Refreshers: map[string]Refresher{"anthropic": refresher}})
		c := NewClient("pipe", ClientOptions{dial: func(context.Context) (net.Conn, error) { return connect(), nil }})
		defer c.Close()

		stored, _ := ms.GetToken(ctx, "anthropic", "")
		room := maxSavedToken - len(stored.Reveal()) - len(`,"pad":""`)
		pad := mustToken(t, `{"access_token":"fake-access-0","pad":"`+strings.Repeat("p", room)+`"}`)
		if err := c.SaveToken(ctx, "anthropic", "", pad); err != nil {
			t.Fatalf("save the padded token: %v", err)
		}
		if _, err := c.RefreshToken(ctx, "anthropic", ""); err != nil {
			t.Fatalf("refresh_token: %v", err)
		}
		tok, err := c.GetToken(ctx, "anthropic", "")
		if err != nil {
			t.Fatalf("get_token after the refresh of a padded token: %v", err)
		}
		after, _ := ms.GetToken(ctx, "anthropic", "")
		if len(after.Reveal()) > maxSavedToken || string(tok.AccessToken()) != "fake-access-1" || after.RefreshToken() != "fake-refresh-rotated-1" {
			t.Errorf("stored token after the refresh: %d bytes (cap %d), access %q", len(after.Reveal()), maxSavedToken, string(tok.AccessToken()))
		}
		if _, ok := tok.Field("id_token"); !ok {
			t.Error("the provider's id_token was left out")
		}
		if _, ok := tok.Field("account_id"); !ok {
			t.Error("the stored account_id, small, was left out")
		}
		if !strings.Contains(logs.String(), `"members":["pad"]`) {
			t.Errorf("the host log does not name the member left out:\n%s", logs.String())
		}
	})
}

// F5: the client secret is among the secrets kept out of the host log and
// of RefreshEvent.Err, in the form (client_secret_post, any escaping) and
// in the Basic header a provider might echo, even when the secret's
// separators break it into runs too short to look secret.
func TestClientSecretNeverReachesTheLog(t *testing.T) {
	for _, style := range []oauth2.AuthStyle{oauth2.AuthStyleInParams, oauth2.AuthStyleInHeader} {
		synctest.Test(t, func(t *testing.T) {
			const secret = "fake8Q~aB3.cD4_eF5~gH6.iJ7-kL8.mN9~oP0"
			echo := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				body, _ := io.ReadAll(r.Body)
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(400)
				fmt.Fprintf(w, `{"error":"invalid_grant","error_description":"bad request: %s; auth %s"}`, body, r.Header.Get("Authorization"))
			})
			ms := NewMemoryStore()
			ms.SaveToken(context.Background(), "anthropic", "", expiringToken(t, -time.Second))
			logger, logs := debugLogger()
			var mu sync.Mutex
			var events []RefreshEvent
			_, connect := pipeServer(t, Options{Store: ms, Logger: logger, RateLimit: -1, DisableRenewal: true,
				OnRefresh: func(ev RefreshEvent) { mu.Lock(); events = append(events, ev); mu.Unlock() },
				Refreshers: map[string]Refresher{"anthropic": &OAuth2Refresher{TokenURL: "http://provider.invalid/token",
					ClientID: testClientID, ClientSecret: secret, AuthStyle: style,
					HTTPClient: &http.Client{Transport: handlerTransport{echo}}}}})
			c := NewClient("pipe", ClientOptions{dial: func(context.Context) (net.Conn, error) { return connect(), nil }})
			defer c.Close()
			c.RefreshToken(context.Background(), "anthropic", "")
			synctest.Wait()
			mu.Lock()
			defer mu.Unlock()
			texts := []string{logs.String()}
			for _, ev := range events {
				texts = append(texts, ev.Err.Error())
			}
			if !strings.Contains(logs.String(), "invalid_grant") || len(events) != 1 {
				t.Fatalf("style %v: the provider's error is not in the log, or %d events:\n%s", style, len(events), logs.String())
			}
			for _, text := range texts {
				for _, form := range []string{secret, url.QueryEscape(secret), secret[6:20], "ZmFrZThR"} {
					if strings.Contains(text, form) {
						t.Errorf("style %v: %q appears in:\n%s", style, form, text)
					}
				}
			}
		})
	}
}

// An OnRefresh hook may shut the server down, as a host that stops when
// its user must log in again does: the hook runs once the refresh no
// longer counts as running, so Shutdown does not wait for it.
func TestOnRefreshMayShutDownTheServer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newTokenEndpoint(time.Hour)
		e.current = "fake-refresh-issued-elsewhere"
		ms := NewMemoryStore()
		ms.SaveToken(context.Background(), "anthropic", "", expiringToken(t, -time.Second))
		var srv *Server
		done := make(chan error, 1)
		srv, connect := pipeServer(t, Options{Store: ms, RateLimit: -1, DisableRenewal: true,
			OnRefresh: func(ev RefreshEvent) {
				if ev.Outcome == RefreshReauthRequired {
					done <- srv.Shutdown(context.Background())
				}
			},
			Refreshers: map[string]Refresher{"anthropic": refresherFor("http://provider.invalid/token", &http.Client{Transport: handlerTransport{e}})}})
		c := NewClient("pipe", ClientOptions{dial: func(context.Context) (net.Conn, error) { return connect(), nil }})
		if _, err := c.RefreshToken(context.Background(), "anthropic", ""); !errors.Is(err, ErrReauthRequired) {
			t.Fatalf("refresh_token: %v", err)
		}
		c.Close()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Shutdown from OnRefresh: %v", err)
			}
		case <-time.After(time.Minute):
			t.Fatal("Shutdown called from OnRefresh did not return within a minute")
		}
	})
}

// F5: a provider's error text is logged cut to 4 KiB, so that redacting
// a 1 MiB error page costs what 4 KiB does; a secret that the cut leaves
// half-spelled is redacted too, not logged as a prefix.
func TestRedactCutLeavesNoPrefixOfASecret(t *testing.T) {
	secret := "fake-refresh/AB+cd=ef gh&ij"
	encoded := url.QueryEscape(secret)
	for _, at := range []int{maxLoggedText - 10, maxLoggedText - 2, maxLoggedText - len(encoded) + 1} {
		text := strings.Repeat(".", at) + encoded + strings.Repeat(" lorem", 1<<20/6)
		got := redactCut(text, secret)
		if len(got) > maxLoggedText+64 {
			t.Errorf("cut at %d: %d bytes logged, want about %d", at, len(got), maxLoggedText)
		}
		if strings.Contains(got, "fake-re") || strings.Contains(got, encoded[:len(encoded)-1]) {
			t.Errorf("secret at %d, cut: a prefix of it is logged: ...%s", at, got[max(0, len(got)-80):])
		}
		if !strings.Contains(got, "[cut at") {
			t.Errorf("the log does not say the text was cut: ...%s", got[max(0, len(got)-80):])
		}
	}
}
