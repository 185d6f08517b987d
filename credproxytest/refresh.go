package credproxytest

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
)

// provider is an OAuth2 provider's token endpoint as a
// [credproxy.Refresher]: it rotates refresh tokens, each working once, and
// a reused one revokes the grant, as providers that detect reuse do. So a
// second refresh of one token, anywhere, logs every host out: exactly the
// failure the server's one-refresh-per-token rule prevents.
type provider struct {
	mu      sync.Mutex
	calls   int
	current string // the one refresh token that works; "" once revoked
}

func newProvider() *provider { return &provider{current: fakeRefresh} }

func (p *provider) refresh(_ context.Context, tok credproxy.Token) (credproxy.Token, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.calls++
	if p.current == "" || string(tok.RefreshToken()) != p.current {
		p.current = ""
		return credproxy.Token{}, fmt.Errorf("test provider: refresh token reused, grant revoked: %w", credproxy.ErrReauthRequired)
	}
	p.current = fmt.Sprintf("fake-refresh-rotated-%d", p.calls)
	return credproxy.ParseToken(fmt.Appendf(nil, `{"access_token":"fake-access-%d","refresh_token":%q,"expiry":%d}`,
		p.calls, p.current, time.Now().Add(time.Hour).Unix()))
}

// state returns how many times the provider was called and the refresh
// token that works now.
func (p *provider) state() (calls int, current string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.calls, p.current
}

// refreshOptions are the options of a server on st whose provider
// "anthropic" refreshes at p. Renewal is off, so that only the requests
// of a subtest call p.
func refreshOptions(st credproxy.Store, p *provider, logger *slog.Logger) credproxy.Options {
	return credproxy.Options{Store: st, RateLimit: -1, DisableRenewal: true, Logger: logger,
		Refreshers: map[string]credproxy.Refresher{"anthropic": credproxy.RefresherFunc(p.refresh)}}
}

// expiringToken is a token with the provider's first refresh token that
// expires in d (negative: expired).
func expiringToken(t *testing.T, d time.Duration) string {
	return fmt.Sprintf(`{"access_token":"fake-access-0","refresh_token":%q,"expiry":%d,"account_id":"acct-7"}`,
		fakeRefresh, time.Now().Add(d).Unix())
}

// checkRefreshed checks that st holds the provider's current refresh
// token, so that the next refresh, on any host, can use it.
func checkRefreshed(t *testing.T, st credproxy.Store, p *provider) {
	t.Helper()
	tok, err := st.GetToken(t.Context(), "anthropic", "")
	_, current := p.state()
	if err != nil || current == "" || string(tok.RefreshToken()) != current {
		t.Errorf("stored token: %v; its refresh token is not the provider's current one (revoked: %v)", err, current == "")
	}
}

// noRefreshTokenIn fails the test if text holds any refresh token the
// suite uses.
func noRefreshTokenIn(t *testing.T, where, text string) {
	t.Helper()
	if strings.Contains(text, "fake-refresh") {
		t.Errorf("a refresh token appears in %s:\n%s", where, text)
	}
}

// logBuffer collects log output from many goroutines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func debugLogger() (*slog.Logger, *logBuffer) {
	b := new(logBuffer)
	return slog.New(slog.NewJSONHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug})), b
}

func testRefresh(t *testing.T, newStore func(t *testing.T) credproxy.Store) {
	t.Run("get_token of an expired token refreshes it once", func(t *testing.T) {
		p := newProvider()
		st := newStore(t)
		fill(t, st, map[string]string{"anthropic/default": expiringToken(t, -time.Minute)}, nil)
		_, path := serve(t, refreshOptions(st, p, nil))
		c := client(t, path, credproxy.ClientOptions{})
		for range 2 {
			tok, err := c.GetToken(t.Context(), "anthropic", "")
			if acct, _ := tok.Field("account_id"); err != nil || tok.AccessToken() != "fake-access-1" || string(acct) != `"acct-7"` {
				t.Fatalf("get_token served %s, %v; want fake-access-1 merged into the stored token", tok.Reveal(), err)
			}
		}
		r := dialRaw(t, path)
		r.send(`{"v":1,"id":"g","op":"get_token","payload":{"provider":"anthropic"}}`)
		noRefreshTokenIn(t, "a get_token response on the wire", r.recv())
		if calls, _ := p.state(); calls != 1 {
			t.Errorf("three get_tokens of an expired token made %d refresher calls, want 1", calls)
		}
		checkRefreshed(t, st, p)
	})

	t.Run("concurrent refresh_tokens make one refresher call", func(t *testing.T) {
		p := newProvider()
		st := newStore(t)
		fill(t, st, map[string]string{"anthropic/default": expiringToken(t, -time.Minute)}, nil)
		logger, logs := debugLogger()
		_, path := serve(t, refreshOptions(st, p, logger))
		var wg sync.WaitGroup
		got := make(chan string, 50)
		for range 5 {
			c := client(t, path, credproxy.ClientOptions{})
			for range 10 {
				wg.Go(func() {
					tok, err := c.RefreshToken(context.Background(), "anthropic", "")
					if err != nil {
						t.Errorf("RefreshToken: %v", err)
						return
					}
					got <- string(tok.Reveal())
				})
			}
		}
		wg.Wait()
		close(got)
		for js := range got {
			if !strings.Contains(js, `"access_token":"fake-access-1"`) || !strings.Contains(js, `"account_id":"acct-7"`) {
				t.Errorf("refresh_token served %s; want fake-access-1 merged into the stored token", js)
			}
		}
		r := dialRaw(t, path)
		r.send(`{"v":1,"id":"r","op":"refresh_token","payload":{"provider":"anthropic"}}`)
		frame := r.recv()
		if !strings.Contains(frame, `"ok":true`) {
			t.Errorf("raw refresh_token: %s", frame)
		}
		noRefreshTokenIn(t, "a refresh_token response on the wire", frame)
		if calls, _ := p.state(); calls != 1 {
			t.Errorf("51 refresh_tokens made %d refresher calls, want 1", calls)
		}
		checkRefreshed(t, st, p)
		noRefreshTokenIn(t, "the server's debug log", logs.String())
	})

	// Sandboxes on two hosts hold the stored token (valid for ten more
	// minutes) and find it rejected. The host that does not call the
	// provider finds the token changed under the store's lock, or knows
	// that its sandboxes hold an older token than the store's.
	t.Run("two servers on one store refresh once between them", func(t *testing.T) {
		p := newProvider()
		first := newStore(t)
		if _, ok := first.(credproxy.TokenLocker); !ok {
			t.Skipf("%T is not a credproxy.TokenLocker: two servers on it cannot keep each other from refreshing one token at once", first)
		}
		fill(t, first, map[string]string{"anthropic/default": expiringToken(t, 10*time.Minute)}, nil)
		var clients []*credproxy.Client
		var paths []string
		for _, st := range []credproxy.Store{first, newStore(t)} {
			_, path := serve(t, refreshOptions(st, p, nil))
			paths = append(paths, path)
			for range 2 {
				c := client(t, path, credproxy.ClientOptions{})
				if tok, err := c.GetToken(t.Context(), "anthropic", ""); err != nil || tok.AccessToken() != "fake-access-0" {
					t.Fatalf("get_token: %q, %v", string(tok.AccessToken()), err)
				}
				clients = append(clients, c)
			}
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		served := map[string]int{} // access token or error → count
		for i := range 50 {
			wg.Go(func() {
				tok, err := clients[i%len(clients)].RefreshToken(context.Background(), "anthropic", "")
				got := string(tok.AccessToken())
				if err != nil {
					got = err.Error()
				}
				mu.Lock()
				served[got]++
				mu.Unlock()
			})
		}
		wg.Wait()
		if calls, _ := p.state(); calls != 1 || len(served) != 1 || served["fake-access-1"] != 50 {
			t.Errorf("two servers: %d refresher calls, served %v; want 1 call and fake-access-1 × 50", calls, served)
		}
		for _, path := range paths {
			r := dialRaw(t, path)
			r.send(`{"v":1,"id":"g","op":"get_token","payload":{"provider":"anthropic"}}`)
			noRefreshTokenIn(t, "a get_token response on the wire", r.recv())
		}
		checkRefreshed(t, first, p)
	})
}
