package credproxy_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"

	"github.com/credproxy/credproxy"
)

// A host CLI asks its user to log in again when the provider rejects a
// refresh token, instead of leaving the sandbox to fail: Options.OnRefresh
// hears how each refresh that reached the provider ended.
func ExampleOptions_onRefresh() {
	ctx := context.Background()
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprint(w, `{"error":"invalid_grant","error_description":"refresh token revoked"}`)
	}))
	defer provider.Close()

	store := credproxy.NewMemoryStore()
	tok, _ := credproxy.ParseToken([]byte(`{"access_token":"at-1","refresh_token":"rt-1","expiry":4102444800}`))
	store.SaveToken(ctx, "anthropic", "", tok)
	told := make(chan credproxy.RefreshEvent, 1)
	srv, _ := credproxy.NewServer(credproxy.Options{
		Store: store,
		Refreshers: map[string]credproxy.Refresher{
			"anthropic": &credproxy.OAuth2Refresher{TokenURL: provider.URL + "/token", ClientID: "example-cli"},
		},
		OnRefresh: func(ev credproxy.RefreshEvent) {
			if ev.Outcome == credproxy.RefreshReauthRequired {
				told <- ev // a real host would tell its user on its UI
			}
		},
	})
	dir, _ := os.MkdirTemp("", "cp")
	defer os.RemoveAll(dir)
	ln, _ := credproxy.Listen(dir)
	go srv.Serve(ln)
	defer srv.Shutdown(ctx)

	// The sandbox's token stopped working; it asks for a new one.
	client := credproxy.NewClient(ln.Addr().String(), credproxy.ClientOptions{})
	defer client.Close()
	_, err := client.RefreshToken(ctx, "anthropic", "")
	fmt.Println("sandbox:", err)
	ev := <-told
	fmt.Printf("host: ask the user to log in to %s (bucket %s) again\n", ev.Provider, ev.Bucket)
	// Output:
	// sandbox: credproxy: refresh_token: the provider rejected the refresh token; log in again on the host (REAUTH_REQUIRED)
	// host: ask the user to log in to anthropic (bucket default) again
}
