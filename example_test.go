package credproxy_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"time"

	"github.com/credproxy/credproxy"
)

// A host serves a token on a private socket; a sandboxed client reads it
// without its refresh token.
func ExampleNewServer() {
	ctx := context.Background()
	store := credproxy.NewMemoryStore()
	tok, _ := credproxy.ParseToken([]byte(`{"access_token":"at-example","refresh_token":"rt-example","expiry":4102444800}`))
	store.SaveToken(ctx, "anthropic", "", tok)

	srv, err := credproxy.NewServer(credproxy.Options{Store: store})
	if err != nil {
		log.Fatal(err)
	}
	dir, _ := os.MkdirTemp("", "cp")
	defer os.RemoveAll(dir)
	ln, err := credproxy.Listen(dir) // "" for the default per-user directory
	if err != nil {
		log.Fatal(err) // the socket is unsafe or in use: do not start the sandbox
	}
	go srv.Serve(ln)
	defer srv.Shutdown(ctx)

	// In the sandbox: credproxy.NewClientFromEnv reads LLXPRT_CREDENTIAL_SOCKET.
	client := credproxy.NewClient(ln.Addr().String(), credproxy.ClientOptions{})
	defer client.Close()
	got, err := client.GetToken(ctx, "anthropic", "")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s\n", got.Reveal())
	// Output: {"access_token":"at-example","expiry":4102444800}
}

// Shutdown stops accepting, finishes requests in flight and removes the
// socket file; Serve then returns ErrServerClosed.
func ExampleServer_Shutdown() {
	srv, _ := credproxy.NewServer(credproxy.Options{Store: credproxy.NewMemoryStore()})
	dir, _ := os.MkdirTemp("", "cp")
	defer os.RemoveAll(dir)
	ln, _ := credproxy.Listen(dir)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fmt.Println("shutdown:", srv.Shutdown(ctx))
	fmt.Println("serve:", <-served)
	_, err := os.Stat(ln.Addr().String())
	fmt.Println("socket removed:", os.IsNotExist(err))
	// Output:
	// shutdown: <nil>
	// serve: credproxy: server closed
	// socket removed: true
}

// An AllowList scopes a sandbox to some providers, buckets and API keys;
// errors keep their meaning across the socket, the kind of a refusal
// included.
func ExampleAllowList() {
	ctx := context.Background()
	store := credproxy.NewMemoryStore()
	tok, _ := credproxy.ParseToken([]byte(`{"access_token":"at"}`))
	store.SaveToken(ctx, "anthropic", "", tok)
	store.SaveToken(ctx, "openai", "", tok)

	srv, _ := credproxy.NewServer(credproxy.Options{
		Store:  store,
		Policy: &credproxy.AllowList{Providers: []string{"anthropic"}},
	})
	dir, _ := os.MkdirTemp("", "cp")
	defer os.RemoveAll(dir)
	ln, _ := credproxy.Listen(dir)
	go srv.Serve(ln)
	defer srv.Shutdown(ctx)

	client := credproxy.NewClient(ln.Addr().String(), credproxy.ClientOptions{})
	defer client.Close()
	providers, _ := client.ListProviders(ctx)
	fmt.Println("visible:", providers)
	_, err := client.GetToken(ctx, "openai", "")
	fmt.Println("denied:", errors.Is(err, credproxy.ErrDenied), "- the provider:", errors.Is(err, credproxy.ErrProviderDenied))
	var remote *credproxy.RemoteError
	if errors.As(err, &remote) {
		fmt.Println("code:", remote.Code, "-", remote.Message, "- kind:", remote.Denied)
	}
	_, err = client.GetToken(ctx, "anthropic", "other-bucket")
	fmt.Println("absent:", errors.Is(err, credproxy.ErrNotFound))
	// Output:
	// visible: [anthropic]
	// denied: true - the provider: true
	// code: UNAUTHORIZED - provider not allowed - kind: provider
	// absent: true
}

// Tokens and secrets print and log as a redaction marker; Reveal and a
// string conversion are the deliberate ways to the values.
func ExampleToken_String() {
	tok, _ := credproxy.ParseToken([]byte(`{"access_token":"at-secret","refresh_token":"rt-secret"}`))
	key := credproxy.Secret("sk-secret")
	fmt.Println(tok, key)
	fmt.Printf("%+v %#v\n", tok, key)
	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		},
	}))
	logger.Info("loaded", "token", tok, "key", key)
	fmt.Println(string(tok.AccessToken()), string(key))
	// Output:
	// [REDACTED] [REDACTED]
	// [REDACTED] credproxy.Secret([REDACTED])
	// level=INFO msg=loaded token=[REDACTED] key=[REDACTED]
	// at-secret sk-secret
}

// Merge is how the server applies save_token: member by member, keeping
// the stored refresh token unless a new one is given.
func ExampleToken_Merge() {
	stored, _ := credproxy.ParseToken([]byte(`{"access_token":"old","refresh_token":"rt","expiry":1}`))
	update, _ := credproxy.ParseToken([]byte(`{"access_token":"new","expiry":2,"scope":"read"}`))
	merged := stored.Merge(update)
	fmt.Printf("%s\n", merged.Reveal())
	fmt.Printf("%s\n", merged.WithoutRefreshToken().Reveal())
	// Output:
	// {"access_token":"new","refresh_token":"rt","expiry":2,"scope":"read"}
	// {"access_token":"new","expiry":2,"scope":"read"}
}

// A MemoryStore is a complete Store, for tests, examples and hosts that
// load credentials at start.
func ExampleMemoryStore() {
	ctx := context.Background()
	store := credproxy.NewMemoryStore()
	store.SaveAPIKey(ctx, "openai", "sk-example")
	_, err := store.GetAPIKey(ctx, "gemini")
	fmt.Println(errors.Is(err, credproxy.ErrNotFound))
	names, _ := store.ListAPIKeys(ctx)
	fmt.Println(names)
	// Output:
	// true
	// [openai]
}

// The host refreshes tokens for the sandbox through a provider's OAuth2
// token endpoint; the sandbox asks with RefreshToken and never sees a
// refresh token, while the host stores the rotated one.
func ExampleOAuth2Refresher() {
	ctx := context.Background()
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"access_token":"at-2","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-2"}`)
	}))
	defer provider.Close()

	store := credproxy.NewMemoryStore()
	tok, _ := credproxy.ParseToken([]byte(`{"access_token":"at-1","refresh_token":"rt-1","expiry":1}`))
	store.SaveToken(ctx, "anthropic", "", tok)
	srv, _ := credproxy.NewServer(credproxy.Options{
		Store: store,
		Refreshers: map[string]credproxy.Refresher{
			"anthropic": &credproxy.OAuth2Refresher{TokenURL: provider.URL + "/token", ClientID: "example-cli"},
		},
	})
	dir, _ := os.MkdirTemp("", "cp")
	defer os.RemoveAll(dir)
	ln, _ := credproxy.Listen(dir)
	go srv.Serve(ln)
	defer srv.Shutdown(ctx)

	client := credproxy.NewClient(ln.Addr().String(), credproxy.ClientOptions{})
	defer client.Close()
	fresh, err := client.RefreshToken(ctx, "anthropic", "")
	if err != nil {
		log.Fatal(err)
	}
	stored, _ := store.GetToken(ctx, "anthropic", "")
	fmt.Println("sandbox:", fresh.AccessToken() == "at-2", fresh.RefreshToken() == "")
	fmt.Println("host keeps the rotated refresh token:", stored.RefreshToken() == "rt-2")
	// Output:
	// sandbox: true true
	// host keeps the rotated refresh token: true
}

// A launcher starts a session per sandbox: a socket alone in its own
// directory, a capability token, and a read-only Grant. The sandboxed
// process presents the token (NewClientFromEnv reads it from descriptor
// 3; here it is passed directly), and reads what the grant names; closing
// the session when the sandbox exits revokes it all.
func ExampleServer_NewSession() {
	ctx := context.Background()
	store := credproxy.NewMemoryStore()
	tok, _ := credproxy.ParseToken([]byte(`{"access_token":"at-example","refresh_token":"rt-example"}`))
	store.SaveToken(ctx, "anthropic", "", tok)
	store.SaveAPIKey(ctx, "openai", "sk-example")

	srv, err := credproxy.NewServer(credproxy.Options{Store: store})
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Shutdown(ctx)
	sess, err := srv.NewSession(credproxy.SessionOptions{
		Policy: &credproxy.Grant{Providers: []string{"anthropic"}}, // read-only, no API keys
	})
	if err != nil {
		log.Fatal(err) // the directory is unsafe: do not start the sandbox
	}
	// Mount sess.Dir() into the sandbox (read-only), and give the command
	// sess.Environ() and sess.HandoffFile() as its descriptor 3.

	client := credproxy.NewClient(sess.SocketPath(), credproxy.ClientOptions{CapabilityToken: sess.CapabilityToken()})
	defer client.Close()
	got, _ := client.GetToken(ctx, "anthropic", "")
	fmt.Printf("token: %s\n", got.Reveal())
	_, err = client.GetAPIKey(ctx, "openai")
	fmt.Println("key:", err)
	err = client.SaveToken(ctx, "anthropic", "", tok)
	fmt.Println("save:", err)

	stranger := credproxy.NewClient(sess.SocketPath(), credproxy.ClientOptions{})
	defer stranger.Close()
	_, err = stranger.GetToken(ctx, "anthropic", "")
	fmt.Println("without the token:", errors.Is(err, credproxy.ErrDenied))

	sess.Close() // the sandbox exited
	_, err = os.Stat(sess.Dir())
	fmt.Println("directory removed:", os.IsNotExist(err))
	// Output:
	// token: {"access_token":"at-example"}
	// key: credproxy: get_api_key: API key not allowed (UNAUTHORIZED)
	// save: credproxy: save_token: sandbox connections cannot modify tokens (UNAUTHORIZED)
	// without the token: true
	// directory removed: true
}

// A Grant names what a sandbox may use, and nothing it does not name is
// granted: "*" is the only way to say "all".
func ExampleGrant() {
	for _, g := range []*credproxy.Grant{
		{Providers: []string{"anthropic"}},
		{Providers: []string{"anthropic", "gemini"}, Buckets: []string{"work"}, Keys: []string{"openai"}},
		{Providers: []string{credproxy.GrantAll}, Buckets: []string{credproxy.GrantAll}, Write: true},
	} {
		fmt.Println(g)
	}
	// Output:
	// read-only; providers: anthropic; buckets: default; API keys: none
	// read-only; providers: anthropic, gemini; buckets: work; API keys: openai
	// read-write; providers: all; buckets: all; API keys: none
}
