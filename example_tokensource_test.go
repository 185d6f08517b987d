package credproxy_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"time"

	"github.com/credproxy/credproxy"
	"golang.org/x/oauth2"
)

// exampleHost serves the token js of "anthropic" on a new socket, with a
// refresher that issues the access token "at-2" (a real host would use an
// OAuth2Refresher), and returns a client of it and a function that stops
// it all.
func exampleHost(js string) (*credproxy.Client, func()) {
	ctx := context.Background()
	store := credproxy.NewMemoryStore()
	tok, err := credproxy.ParseToken([]byte(js))
	if err != nil {
		log.Fatal(err)
	}
	store.SaveToken(ctx, "anthropic", "", tok)
	refresher := credproxy.RefresherFunc(func(context.Context, credproxy.Token) (credproxy.Token, error) {
		return credproxy.NewToken(credproxy.TokenFields{AccessToken: "at-2", RefreshToken: "rt-2", Expiry: time.Now().Add(time.Hour)})
	})
	srv, _ := credproxy.NewServer(credproxy.Options{Store: store, Refreshers: map[string]credproxy.Refresher{"anthropic": refresher}})
	dir, _ := os.MkdirTemp("", "cp")
	ln, err := credproxy.Listen(dir)
	if err != nil {
		log.Fatal(err)
	}
	go srv.Serve(ln)
	client := credproxy.NewClient(ln.Addr().String(), credproxy.ClientOptions{})
	return client, func() {
		client.Close()
		srv.Shutdown(ctx)
		os.RemoveAll(dir)
	}
}

// exampleAPI is a provider's API that answers requests bearing the access
// token "at-2" and rejects the others with 401.
func exampleAPI() *httptest.Server {
	return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer at-2" {
			http.Error(w, "invalid token", http.StatusUnauthorized)
			return
		}
		fmt.Fprint(w, "hello")
	}))
}

// Go code in a sandbox gives a TokenSource to golang.org/x/oauth2, which
// puts the access token on each request. The stored token expires in 30
// seconds, within the margin, so what the sandbox gets is a token the host
// refreshed; the refresh token never leaves the host.
func ExampleClient_TokenSource() {
	ctx := context.Background()
	// In the sandbox, credproxy.NewClientFromEnv gives the client.
	client, stop := exampleHost(`{"access_token":"at-1","refresh_token":"rt-1","expires_in":30}`)
	defer stop()
	api := exampleAPI()
	defer api.Close()

	src := client.TokenSource(ctx, "anthropic", "", credproxy.TokenSourceOptions{})
	resp, err := oauth2.NewClient(ctx, src).Get(api.URL)
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(resp.Status, string(body))
	tok, _ := src.Token()
	fmt.Printf("access token %s, refresh token %q\n", tok.AccessToken, tok.RefreshToken)
	// Output:
	// 200 OK hello
	// access token at-2, refresh token ""
}

// When the provider rejects a token that has not expired (revoked, or
// rotated elsewhere; this one has no expiry), Invalidate makes the next
// Token ask the host for a refreshed one. The source goes to an oauth2.Transport directly:
// oauth2.NewClient would keep a copy of the token that Invalidate cannot
// reach.
func ExampleTokenSource_Invalidate() {
	ctx := context.Background()
	client, stop := exampleHost(`{"access_token":"at-1","refresh_token":"rt-1"}`)
	defer stop()
	api := exampleAPI()
	defer api.Close()

	src := client.TokenSource(ctx, "anthropic", "", credproxy.TokenSourceOptions{})
	httpClient := &http.Client{Transport: &oauth2.Transport{Source: src}}
	for attempt := 1; attempt <= 2; attempt++ {
		resp, err := httpClient.Get(api.URL)
		if err != nil {
			log.Fatal(err)
		}
		resp.Body.Close()
		fmt.Println("attempt", attempt, resp.Status)
		if resp.StatusCode != http.StatusUnauthorized {
			break
		}
		src.Invalidate()
	}
	// Output:
	// attempt 1 401 Unauthorized
	// attempt 2 200 OK
}
