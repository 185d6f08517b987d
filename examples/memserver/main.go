// Command memserver serves credentials from memory over the credproxy
// protocol, for integration tests of clients in any language and as a
// benchmark target.
//
//	memserver -tokens creds.json -allow-provider anthropic -rate 0
//
// The tokens file holds {"tokens":{PROVIDER:{BUCKET:TOKEN}},"keys":{NAME:VALUE}}.
// With -token-url (and -client-id, -client-secret), every provider in it
// refreshes on the host through the standard OAuth2 refresh grant at that
// token endpoint: refresh_token works, get_token refreshes a token about to
// expire, and served tokens are renewed before they expire.
// With -keyring it serves the host's keyring store instead of memory (as
// credproxy serve does, with CREDPROXY_KEYRING_BACKEND and
// CREDPROXY_KEYRING_PASSWORD), and -tokens saves into it: a benchmark
// target for that store without serve's rate limits.
// When the server listens it prints one line, LLXPRT_CREDENTIAL_SOCKET=<path>,
// on stdout; logs go to stderr. With -session it serves a session instead:
// clients must present its capability token, which it prints on a second
// line, LLXPRT_CAPABILITY_TOKEN=<token>, and the -allow flags form its
// read-only Grant. SIGINT or SIGTERM shuts it down gracefully,
// removes the socket and exits 0.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/credproxy/credproxy"
)

// names is a repeatable string flag.
type names []string

func (n *names) String() string     { return strings.Join(*n, ",") }
func (n *names) Set(v string) error { *n = append(*n, v); return nil }

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "memserver:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		tokensFile = flag.String("tokens", "", "JSON `file` of tokens and API keys to serve")
		rate       = flag.Float64("rate", 60, "requests per second per connection; 0 disables the limit (benchmarks only)")
		socketDir  = flag.String("socket-dir", "", "`directory` for the socket (default: the per-user directory in the temp dir)")
		verbose    = flag.Bool("v", false, "log every request (the audit log) on stderr")
		maxConns   = flag.Int("max-connections", 0, "cap on concurrent `connections` (0: the default, 256)")
		maxNew     = flag.Int("max-new-tokens", -1, "cap on the `tokens` clients may create (negative: none, as suits a test server; 0: the library's default, 16)")
		session    = flag.Bool("session", false, "serve a session instead of a plain socket: a capability token is required, and the -allow flags form a read-only Grant (none given: nothing; '*': all); prints LLXPRT_CAPABILITY_TOKEN=<token> on a second line")
		tokenURL   = flag.String("token-url", "", "OAuth2 token endpoint `URL`: refresh every provider's tokens there")
		clientID   = flag.String("client-id", "", "OAuth2 client `id` for -token-url")
		secret     = flag.String("client-secret", "", "OAuth2 client `secret` for -token-url (visible in ps; for tests)")
		keyring    = flag.Bool("keyring", false, "serve the host's keyring store (see CREDPROXY_KEYRING_BACKEND and CREDPROXY_KEYRING_PASSWORD) instead of memory; -tokens saves into it")
		allow      credproxy.AllowList
	)
	flag.Var((*names)(&allow.Providers), "allow-provider", "allow this `provider` (repeatable; none: all, or with -session nothing)")
	flag.Var((*names)(&allow.Buckets), "allow-bucket", "allow this `bucket` (repeatable; none: all, or with -session the default bucket only)")
	flag.Var((*names)(&allow.Keys), "allow-key", "allow this API key `name` (repeatable; none: all, or with -session nothing)")
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q; see -help", flag.Args())
	}

	var store credproxy.Store = credproxy.NewMemoryStore()
	if *keyring {
		ks, err := credproxy.OpenKeyringStore(credproxy.KeyringOptions{})
		if err != nil {
			return err
		}
		defer ks.Close()
		store = ks
	}
	if *tokensFile != "" {
		data, err := os.ReadFile(*tokensFile)
		if err != nil {
			return err
		}
		if err := credproxy.ImportCredentials(context.Background(), store, data); err != nil {
			return fmt.Errorf("%s: %w", *tokensFile, err)
		}
	}
	var refreshers map[string]credproxy.Refresher
	if *tokenURL != "" {
		oauth := &credproxy.OAuth2Refresher{TokenURL: *tokenURL, ClientID: *clientID, ClientSecret: credproxy.Secret(*secret)}
		providers, _ := store.ListProviders(context.Background())
		refreshers = make(map[string]credproxy.Refresher, len(providers))
		for _, p := range providers {
			refreshers[p] = oauth
		}
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	opts := credproxy.Options{
		Store:          store,
		Policy:         &allow,
		Logger:         slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
		RateLimit:      *rate,
		Refreshers:     refreshers,
		MaxConnections: *maxConns,
		MaxNewTokens:   *maxNew,
	}
	if *rate == 0 {
		opts.RateLimit = -1
	}
	srv, err := credproxy.NewServer(opts)
	if err != nil {
		return err
	}
	served := make(chan error, 1)
	if *session {
		grant := &credproxy.Grant{Providers: allow.Providers, Buckets: allow.Buckets, Keys: allow.Keys}
		sessOpts := credproxy.SessionOptions{Policy: grant, MaxConnections: *maxConns, MaxNewTokens: *maxNew}
		if *rate == 0 {
			sessOpts.RateLimit = -1
		}
		if *socketDir != "" {
			sessOpts.Dir = filepath.Join(*socketDir, "session")
		}
		sess, err := srv.NewSession(sessOpts)
		if err != nil {
			return err
		}
		fmt.Printf("%s=%s\nLLXPRT_CAPABILITY_TOKEN=%s\n", credproxy.SocketEnv, sess.SocketPath(), string(sess.CapabilityToken()))
	} else {
		ln, err := credproxy.Listen(*socketDir)
		if err != nil {
			return err
		}
		fmt.Printf("%s=%s\n", credproxy.SocketEnv, ln.Addr())
		go func() { served <- srv.Serve(ln) }()
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return err
	}
	if *session {
		return nil
	}
	if err := <-served; !errors.Is(err, credproxy.ErrServerClosed) {
		return err
	}
	return nil
}
