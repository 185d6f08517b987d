// Package credproxytest checks that a [credproxy.Store] keeps the Store
// contract, and that a [credproxy.Server] and [credproxy.Client] serve
// from it as they do from [credproxy.MemoryStore]. Call [TestStore] and
// [TestServer] from a test of the store's own package, with a function
// that opens a store; they run subtests and report failures on t, as
// testing/slogtest and testing/fstest do.
//
// A test of a store called ExampleStore would read:
//
//	func TestExampleStore(t *testing.T) {
//		newStore := func(t *testing.T) credproxy.Store {
//			// A store for t: empty the first time, the same data
//			// (another handle, as another host would open) when asked
//			// again for the same t.
//			return openExampleStore(t, storeNameFor(t))
//		}
//		t.Run("store", func(t *testing.T) { credproxytest.TestStore(t, newStore) })
//		t.Run("server", func(t *testing.T) { credproxytest.TestServer(t, newStore) })
//	}
//
// The suites use only the package's exported API: servers listen on real
// Unix sockets in temporary directories, and clients reach them as a
// sandbox would. Every credential they write is obviously fake ("fake-" or
// "sk-fake-"), and every refresh token contains "fake-refresh".
package credproxytest

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
)

// Obviously fake credentials. Each is long and unique, so that a scan for
// it cannot match by accident.
const (
	fakeAccess  = "fake-access-token-AAAA1111"
	fakeRefresh = "fake-refresh-token-RRRR9999-must-never-leave-the-host"
	fakeAPIKey  = "sk-fake-api-key-KKKK5555"
)

// anthropicToken is a stored token with a refresh token and
// provider-specific members whose exact form must survive: a big integer
// that float64 would round, a float with a trailing zero, a null, a nested
// object and a non-ASCII string.
const anthropicToken = `{"access_token":"` + fakeAccess + `","refresh_token":"` + fakeRefresh + `",` +
	`"expiry":9999999999,"token_type":"Bearer","scope":null,"account_id":"acct-42",` +
	`"big":12345678901234567890,"ratio":1.50,"nested":{"a":[1,2.0,"x"]},"name":"Zoë"}`

// anthropicTokenSanitised is anthropicToken as get_token must serve it:
// every member but the refresh token, byte for byte.
const anthropicTokenSanitised = `{"access_token":"` + fakeAccess + `",` +
	`"expiry":9999999999,"token_type":"Bearer","scope":null,"account_id":"acct-42",` +
	`"big":12345678901234567890,"ratio":1.50,"nested":{"a":[1,2.0,"x"]},"name":"Zoë"}`

// mustToken parses a token or fails the test.
func mustToken(t testing.TB, js string) credproxy.Token {
	t.Helper()
	tok, err := credproxy.ParseToken([]byte(js))
	if err != nil {
		t.Fatalf("ParseToken(%s): %v", js, err)
	}
	return tok
}

// fill saves tokens (keyed "provider/bucket") and API keys in st.
func fill(t *testing.T, st credproxy.Store, tokens map[string]string, keys map[string]string) {
	t.Helper()
	ctx := context.Background()
	for pb, js := range tokens {
		provider, bucket, _ := strings.Cut(pb, "/")
		if err := st.SaveToken(ctx, provider, bucket, mustToken(t, js)); err != nil {
			t.Fatalf("SaveToken(%s, %s): %v", provider, bucket, err)
		}
	}
	for name, key := range keys {
		if err := st.SaveAPIKey(ctx, name, credproxy.Secret(key)); err != nil {
			t.Fatalf("SaveAPIKey(%s): %v", name, err)
		}
	}
}

// filled returns a new store from newStore holding the credentials most
// server subtests serve.
func filled(t *testing.T, newStore func(t *testing.T) credproxy.Store) credproxy.Store {
	t.Helper()
	st := newStore(t)
	fill(t, st, map[string]string{
		"anthropic/default": anthropicToken,
		"anthropic/work":    `{"access_token":"fake-work-access","refresh_token":"fake-refresh-work"}`,
		"openai/default":    `{"access_token":"fake-openai-access"}`,
		"gemini/default":    `{"access_token":"fake-gemini-access"}`,
	}, map[string]string{"openai": fakeAPIKey, "anthropic": "sk-fake-other", "zeta": "sk-fake-zeta"})
	return st
}

// socketDir returns a new private directory with a short path: the
// subtest names that t.TempDir puts in its path can push a socket path
// past macOS's 103 usable bytes.
func socketDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "cpt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// serve starts a server with opts on a new socket and returns the server
// and the socket's path. At cleanup it shuts the server down and checks
// that Serve returned ErrServerClosed, as net/http's Serve does.
func serve(t *testing.T, opts credproxy.Options) (*credproxy.Server, string) {
	t.Helper()
	srv, err := credproxy.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := credproxy.Listen(socketDir(t))
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, credproxy.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return srv, ln.Addr().String()
}

// client returns a client of the socket at path, closed at cleanup.
func client(t *testing.T, path string, opts credproxy.ClientOptions) *credproxy.Client {
	t.Helper()
	c := credproxy.NewClient(path, opts)
	t.Cleanup(func() { c.Close() })
	return c
}
