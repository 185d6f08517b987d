// Command keyringserver puts credentials into the host's keyring store and
// serves them over the credproxy protocol: the smallest real host.
//
//	export CREDPROXY_KEYRING_PASSWORD=...          # the file store's password
//	keyringserver put-token anthropic < token.json  # token JSON on stdin
//	keyringserver put-key openai < key.txt          # API key on stdin
//	keyringserver serve -allow-provider anthropic
//
// Secrets are read from standard input, never from the command line, where
// other users could see them in ps. The store is the one
// credproxy.OpenKeyringStore opens: the encrypted file store in
// ~/.config/credproxy unless -backend, -dir or CREDPROXY_KEYRING_BACKEND
// say otherwise. serve prints LLXPRT_CREDENTIAL_SOCKET=<path> on stdout and
// runs until SIGINT or SIGTERM.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/credproxy/credproxy"
)

const usage = `usage:
  keyringserver [-backend B] [-dir D] put-token PROVIDER [BUCKET] < token.json
  keyringserver [-backend B] [-dir D] put-key NAME < key.txt
  keyringserver [-backend B] [-dir D] serve [-allow-provider P]... [-allow-bucket B]... [-allow-key K]... [-v]`

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "keyringserver:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	global := flag.NewFlagSet("keyringserver", flag.ContinueOnError)
	var opts credproxy.KeyringOptions
	global.StringVar(&opts.Backend, "backend", "", "keyring `backend`: file, auto, secret-service, keychain, wincred, pass, keyctl (default: $CREDPROXY_KEYRING_BACKEND or file)")
	global.StringVar(&opts.Dir, "dir", "", "store `directory` (default: credproxy in the user's config directory)")
	global.Usage = func() { fmt.Fprintln(global.Output(), usage); global.PrintDefaults() }
	if err := global.Parse(args); err != nil {
		return err
	}
	if global.NArg() == 0 {
		global.Usage()
		return errors.New("no command")
	}
	cmd, args := global.Arg(0), global.Args()[1:]
	if cmd != "put-token" && cmd != "put-key" && cmd != "serve" {
		return fmt.Errorf("unknown command %q\n%s", cmd, usage)
	}
	store, err := credproxy.OpenKeyringStore(opts)
	if err != nil {
		return err
	}
	defer store.Close()
	ctx := context.Background()

	switch cmd {
	case "put-token":
		if len(args) < 1 || len(args) > 2 {
			return errors.New("put-token takes PROVIDER [BUCKET], and the token JSON on stdin")
		}
		data, err := io.ReadAll(io.LimitReader(os.Stdin, credproxy.MaxFrameSize))
		if err != nil {
			return err
		}
		tok, err := credproxy.ParseToken(data)
		if err != nil {
			return err
		}
		bucket := ""
		if len(args) == 2 {
			bucket = args[1]
		}
		return store.SaveToken(ctx, args[0], bucket, tok)
	case "put-key":
		if len(args) != 1 {
			return errors.New("put-key takes NAME, and the key on stdin")
		}
		data, err := io.ReadAll(io.LimitReader(os.Stdin, credproxy.MaxFrameSize))
		if err != nil {
			return err
		}
		return store.SaveAPIKey(ctx, args[0], credproxy.Secret(strings.TrimRight(string(data), "\r\n")))
	}
	return serve(store, args)
}

// serve serves store until SIGINT or SIGTERM, then shuts down gracefully.
func serve(store credproxy.Store, args []string) error {
	flags := flag.NewFlagSet("serve", flag.ContinueOnError)
	var allow credproxy.AllowList
	flags.Func("allow-provider", "allow this `provider` (repeatable; none: all)", appendTo(&allow.Providers))
	flags.Func("allow-bucket", "allow this `bucket` (repeatable; none: all)", appendTo(&allow.Buckets))
	flags.Func("allow-key", "allow this API key `name` (repeatable; none: all)", appendTo(&allow.Keys))
	verbose := flags.Bool("v", false, "log every request (the audit log) on stderr")
	if err := flags.Parse(args); err != nil {
		return err
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	srv, err := credproxy.NewServer(credproxy.Options{
		Store:  store,
		Policy: &allow,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
	})
	if err != nil {
		return err
	}
	ln, err := credproxy.Listen("")
	if err != nil {
		return err
	}
	fmt.Printf("%s=%s\n", credproxy.SocketEnv, ln.Addr())

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(shutdown)
	}()
	if err := srv.Serve(ln); !errors.Is(err, credproxy.ErrServerClosed) {
		return err
	}
	return nil
}

func appendTo(list *[]string) func(string) error {
	return func(v string) error { *list = append(*list, v); return nil }
}
