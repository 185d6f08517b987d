package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/credproxy/credproxy"
)

// proxyFlags are the flags run and serve share.
type proxyFlags struct {
	grant      credproxy.Grant
	allowUIDs  []int
	store      string
	importFile string
	sessionDir string
	providers  string
	verbose    bool
	inject     []string
	injectAddr string
	etcd       etcdConfig // the -etcd-* flags, over the providers file's
	secretEnv  []string   // variables that hold the store's secrets, kept from CMD

	injected *injection // what -inject asks for, once newServer has read the providers file
}

func (p *proxyFlags) register(fs *flag.FlagSet) {
	fs.Func("allow-provider", "let the sandbox use this `provider`'s tokens (repeatable; '*' for every provider; none given: no tokens)", appendTo(&p.grant.Providers))
	fs.Func("allow-bucket", "of every provider allowed, this `bucket` (repeatable; '*' for every bucket; none given: the default bucket only, so name default too to keep it)", appendTo(&p.grant.Buckets))
	fs.Func("allow-key", "let the sandbox read this API key `name` (repeatable; '*' for every key; none given: no keys)", appendTo(&p.grant.Keys))
	fs.BoolVar(&p.grant.Write, "allow-write", false, "let the sandbox save and remove the tokens it may use, and create up to 16 new ones (default: read-only)")
	fs.Func("allow-uid", "also accept peers running as this host `uid` (repeatable; e.g. a container's user)", func(v string) error {
		uid, err := strconv.Atoi(v)
		if err != nil || uid < 0 {
			return errors.New("not a uid")
		}
		p.allowUIDs = append(p.allowUIDs, uid)
		return nil
	})
	fs.StringVar(&p.store, "store", defaultStore(), "credential `store`: keyring (the host's, see CREDPROXY_KEYRING_BACKEND), etcd (a fleet's, see 'credproxy providers -help'), or memory; $"+storeEnv+" sets the default")
	registerEtcdFlags(fs, &p.etcd)
	fs.StringVar(&p.importFile, "import", "", "with -store memory, load tokens and keys from this JSON `file`: {\"tokens\":{PROVIDER:{BUCKET:TOKEN}},\"keys\":{NAME:KEY}}")
	fs.StringVar(&p.sessionDir, "session-dir", "", "the session's own `directory`, which will hold its socket and nothing else: mount it into the sandbox, read-only; it must not exist, or be empty with mode 0700 (default: a new directory in the per-user directory in the temp dir)")
	fs.StringVar(&p.providers, "providers", "", "the providers `file`, whose tokens the host refreshes (default: $"+providersEnv+", else providers.json in the config directory; see 'credproxy providers -help')")
	fs.Func("inject", "route the sandbox's SDK for this `provider` through the session's injecting front, which puts the real API key or token in (repeatable; see 'credproxy providers -help'); does not let the sandbox read the credential", appendTo(&p.inject))
	fs.StringVar(&p.injectAddr, "inject-addr", defaultInjectAddr, "with -inject, the loopback `address` 'credproxy forward' listens on in the sandbox, as the base URLs given to CMD name it")
	fs.BoolVar(&p.verbose, "v", false, "log every request (the audit log) on stderr, besides the refusals logged always")
}

// parseProxyFlags parses args, and explains the flags that are gone
// rather than calling them unknown.
func parseProxyFlags(fs *flag.FlagSet, args []string) error {
	for _, a := range args {
		if a == "--" {
			break
		}
		name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if strings.HasPrefix(a, "-") && (name == "socket-dir" || name == "print-socket-dir") {
			return usageError("-%s is gone: a directory of sockets must not be mounted into a sandbox, since the sandbox would reach every proxy in it. Each run now has a session directory of its own: choose it with -session-dir DIR, or find it as the directory of $%s, and mount it read-only", name, credproxy.SocketEnv)
		}
	}
	return parseFlags(fs, args)
}

func appendTo(list *[]string) func(string) error {
	return func(v string) error { *list = append(*list, v); return nil }
}

// start opens the store and starts a server with one session, under the
// grant the flags give, and logs the grant on stderr. The returned stop
// closes the session (revoking its token) and shuts the server down
// gracefully (5 s).
func (p *proxyFlags) start(ctx context.Context, std stdio) (sess *credproxy.Session, stop func() error, err error) {
	srv, store, err := p.newServer(ctx, std, nil)
	if err != nil {
		return nil, nil, err
	}
	opts := credproxy.SessionOptions{Policy: &p.grant, Dir: p.sessionDir}
	if p.injected != nil {
		opts = injectSessionOptions(&p.grant, p.injected.routes, p.sessionDir)
	}
	sess, err = srv.NewSession(opts)
	if err != nil {
		srv.Close()
		store.Close()
		return nil, nil, err
	}
	stop = func() error {
		err := sess.Close()
		if serr := shutdown(srv, store); err == nil {
			err = serr
		}
		return err
	}
	return sess, stop, nil
}

// newServer opens the store and makes a server on it that logs on
// stderr, with policy for the connections [credproxy.Server.Serve]
// accepts (nil for a server of sessions only, which never calls Serve).
// Both run's and serve's sessions and a socket-activated serve come
// through here, so that the server is made one way. The caller closes the
// store once the server is shut down: [shutdown] does both.
func (p *proxyFlags) newServer(ctx context.Context, std stdio, policy credproxy.Policy) (*credproxy.Server, credproxy.StoreCloser, error) {
	provs, err := openProviders(p.providers)
	if err != nil {
		return nil, nil, err
	}
	if err := provs.exceptClientSecrets(&p.grant); err != nil {
		return nil, nil, err
	}
	var injectTransport http.RoundTripper
	if len(p.inject) > 0 {
		if err := checkLoopbackAddr(p.injectAddr); err != nil {
			return nil, nil, fmt.Errorf("-inject-addr: %w", err)
		}
		if p.injected, err = provs.injection(p.inject); err != nil {
			return nil, nil, err
		}
		if injectTransport, err = p.injected.transport(); err != nil {
			return nil, nil, err
		}
	}
	store, err := p.openStore(ctx, provs, std)
	if err != nil {
		return nil, nil, err
	}
	refreshers, err := provs.refreshers(ctx, store)
	if err != nil {
		store.Close()
		return nil, nil, err
	}
	srv, err := credproxy.NewServer(credproxy.Options{
		Store:       store,
		Policy:      policy,
		AllowedUIDs: p.allowUIDs,
		Logger:      p.logger(std),
		Refreshers:  refreshers,
		OnRefresh:   reauthHint(std),

		InjectTransport: injectTransport,
	})
	if err != nil {
		store.Close()
		return nil, nil, err
	}
	if len(p.grant.Buckets) > 0 && len(p.grant.Providers) == 0 {
		fmt.Fprintln(std.err, "credproxy: warning: -allow-bucket without -allow-provider grants no token")
	}
	return srv, store, nil
}

// logger is the log on stderr: refusals and session events always, every
// request with -v.
func (p *proxyFlags) logger(std stdio) *slog.Logger {
	level := slog.LevelInfo
	if p.verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(std.err, &slog.HandlerOptions{Level: level}))
}

// shutdown shuts srv down gracefully (5 s at most), then closes its store.
func shutdown(srv *credproxy.Server, store credproxy.StoreCloser) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := srv.Shutdown(ctx)
	store.Close()
	return err
}

func (p *proxyFlags) openStore(ctx context.Context, provs providers, std stdio) (credproxy.StoreCloser, error) {
	switch p.store {
	case "etcd":
		if p.importFile != "" {
			return nil, usageError("-import works with -store memory; to put credentials into the fleet's store use 'credproxy token set' and 'credproxy key set' with %s=etcd", storeEnv)
		}
		cfg := provs.etcd.overriddenBy(p.etcd)
		p.secretEnv = cfg.secretEnv()
		return openEtcdStore(ctx, cfg, p.logger(std), std)
	case "memory":
		st := credproxy.NewMemoryStore()
		if p.importFile != "" {
			data, err := os.ReadFile(p.importFile)
			if err != nil {
				return nil, err
			}
			if err := credproxy.ImportCredentials(ctx, st, data); err != nil {
				return nil, fmt.Errorf("%s: %w", p.importFile, err)
			}
		}
		return st, nil
	case "keyring":
		if p.importFile != "" {
			return nil, usageError("-import works with -store memory; to put credentials into the keyring use 'credproxy token set' and 'credproxy key set'")
		}
		return credproxy.OpenKeyringStore(credproxy.KeyringOptions{})
	}
	return nil, usageError("-store must be keyring, etcd or memory, not %q", p.store)
}
