package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/credproxy/credproxy"
)

// proxyFlags are the flags run and serve share.
type proxyFlags struct {
	allow          credproxy.AllowList
	allowUIDs      []int
	store          string
	importFile     string
	socketDir      string
	printSocketDir bool
	verbose        bool
}

func (p *proxyFlags) register(fs *flag.FlagSet) {
	fs.Func("allow-provider", "allow this `provider` (repeatable; none given: all)", appendTo(&p.allow.Providers))
	fs.Func("allow-bucket", "allow this `bucket` (repeatable; none given: all)", appendTo(&p.allow.Buckets))
	fs.Func("allow-key", "allow this API key `name` (repeatable; none given: all)", appendTo(&p.allow.Keys))
	fs.Func("allow-uid", "also accept peers running as this host `uid` (repeatable; e.g. a container's user)", func(v string) error {
		uid, err := strconv.Atoi(v)
		if err != nil || uid < 0 {
			return errors.New("not a uid")
		}
		p.allowUIDs = append(p.allowUIDs, uid)
		return nil
	})
	fs.StringVar(&p.store, "store", "keyring", "credential `store`: keyring (the host's, see CREDPROXY_KEYRING_BACKEND) or memory")
	fs.StringVar(&p.importFile, "import", "", "with -store memory, load tokens and keys from this JSON `file`: {\"tokens\":{PROVIDER:{BUCKET:TOKEN}},\"keys\":{NAME:KEY}}")
	fs.StringVar(&p.socketDir, "socket-dir", "", "`directory` for the socket, created 0700 if needed (default: the per-user directory in the temp dir)")
	fs.BoolVar(&p.printSocketDir, "print-socket-dir", false, "print the socket directory, the one to bind-mount into a sandbox, and exit")
	fs.BoolVar(&p.verbose, "v", false, "log every request (the audit log) on stderr")
}

func appendTo(list *[]string) func(string) error {
	return func(v string) error { *list = append(*list, v); return nil }
}

// socketDirectory is the directory the socket goes in.
func (p *proxyFlags) socketDirectory() (string, error) {
	if p.socketDir != "" {
		return p.socketDir, nil
	}
	return credproxy.DefaultSocketDir()
}

// start opens the store, listens and serves. The returned stop shuts the
// server down gracefully (5 s) and removes the socket.
func (p *proxyFlags) start(ctx context.Context, std stdio) (path string, stop func() error, err error) {
	store, err := p.openStore(ctx)
	if err != nil {
		return "", nil, err
	}
	level := slog.LevelInfo
	if p.verbose {
		level = slog.LevelDebug
	}
	srv, err := credproxy.NewServer(credproxy.Options{
		Store:       store,
		Policy:      &p.allow,
		AllowedUIDs: p.allowUIDs,
		Logger:      slog.New(slog.NewTextHandler(std.err, &slog.HandlerOptions{Level: level})),
	})
	if err != nil {
		store.Close()
		return "", nil, err
	}
	ln, err := credproxy.Listen(p.socketDir)
	if err != nil {
		store.Close()
		return "", nil, err
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	stop = func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := srv.Shutdown(ctx)
		if serr := <-served; !errors.Is(serr, credproxy.ErrServerClosed) && err == nil {
			err = serr
		}
		store.Close()
		return err
	}
	return ln.Addr().String(), stop, nil
}

func (p *proxyFlags) openStore(ctx context.Context) (credproxy.StoreCloser, error) {
	switch p.store {
	case "memory":
		st := memoryStore{credproxy.NewMemoryStore()}
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
	return nil, usageError("-store must be keyring or memory, not %q", p.store)
}

// memoryStore is a MemoryStore that can be closed like the others.
type memoryStore struct{ *credproxy.MemoryStore }

func (memoryStore) Close() error { return nil }

const runSynopsis = `Usage: credproxy run [flags] -- CMD [ARGS...]

Starts a credential proxy, runs CMD with LLXPRT_CREDENTIAL_SOCKET set to its
socket, forwards SIGINT, SIGTERM and SIGHUP to CMD, and when CMD exits shuts
the proxy down (5 s at most), removes the socket and exits with CMD's status.
If the proxy cannot start, CMD is not started and run exits 125.
CREDPROXY_KEYRING_PASSWORD is removed from CMD's environment.`

const runExample = `  # A bubblewrap sandbox that sees the socket and nothing of the host's store:
  credproxy run -socket-dir /tmp/cp-sandbox -allow-provider anthropic -- \
    bwrap --unshare-all --die-with-parent --ro-bind /usr /usr --symlink usr/lib /lib \
      --symlink usr/lib64 /lib64 --symlink usr/bin /bin --proc /proc --dev /dev \
      --bind /tmp/cp-sandbox /tmp/cp-sandbox --ro-bind "$(command -v credproxy)" /credproxy \
      -- /credproxy token get anthropic`

func runCommand(ctx context.Context, args []string, std stdio) int {
	fs := newFlags("run", runSynopsis, runExample, std)
	var p proxyFlags
	p.register(fs)
	if err := fs.Parse(args); err != nil {
		return report(err, std)
	}
	if p.printSocketDir {
		return printSocketDir(&p, std)
	}
	if fs.NArg() == 0 {
		return report(usageError("run needs a command: credproxy run [flags] -- CMD [ARGS...]"), std)
	}
	path, stop, err := p.start(ctx, std)
	if err != nil {
		fmt.Fprintln(std.err, "credproxy: cannot start the proxy, so the command was not started:", strings.TrimPrefix(err.Error(), "credproxy: "))
		return exitNoProxy
	}

	cmd := exec.Command(fs.Arg(0), fs.Args()[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = std.in, std.out, std.err
	cmd.Env = append(withoutEnv(os.Environ(), credproxy.KeyringPasswordEnv), credproxy.SocketEnv+"="+path)
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(signals)
	if err := cmd.Start(); err != nil {
		stop()
		fmt.Fprintln(std.err, "credproxy:", err)
		return exitNoProxy
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	var werr error
	for done := false; !done; {
		select {
		case sig := <-signals:
			cmd.Process.Signal(sig)
		case werr = <-waited:
			done = true
		}
	}
	if err := stop(); err != nil {
		fmt.Fprintln(std.err, "credproxy: shutting the proxy down:", err)
	}
	return exitStatus(cmd, werr, std)
}

// exitStatus is the status run exits with for CMD's end: its exit code,
// or 128 plus the signal that killed it, as shells report it.
func exitStatus(cmd *exec.Cmd, err error, std stdio) int {
	if cmd.ProcessState == nil {
		fmt.Fprintln(std.err, "credproxy:", err)
		return exitError
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return exitSignalBase + int(ws.Signal())
	}
	return cmd.ProcessState.ExitCode()
}

// withoutEnv returns env without the variable called name.
func withoutEnv(env []string, name string) []string {
	kept := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, name+"=") {
			kept = append(kept, kv)
		}
	}
	return kept
}

func printSocketDir(p *proxyFlags, std stdio) int {
	dir, err := p.socketDirectory()
	if err != nil {
		return report(err, std)
	}
	fmt.Fprintln(std.out, dir)
	return 0
}

const serveSynopsis = `Usage: credproxy serve [flags]

Serves a credential proxy until SIGINT or SIGTERM, then shuts down gracefully
and removes the socket. The first line on stdout is
LLXPRT_CREDENTIAL_SOCKET=<path>; logs go to stderr.`

const serveExample = `  credproxy serve -allow-provider anthropic &
  # pass the printed LLXPRT_CREDENTIAL_SOCKET=... to the sandbox, and bind-mount its directory`

func serveCommand(ctx context.Context, args []string, std stdio) error {
	fs := newFlags("serve", serveSynopsis, serveExample, std)
	var p proxyFlags
	p.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError("serve takes no arguments; did you mean 'credproxy run -- %s'?", strings.Join(fs.Args(), " "))
	}
	if p.printSocketDir {
		if code := printSocketDir(&p, std); code != 0 {
			return errors.New("cannot find the socket directory")
		}
		return nil
	}
	ctx, cancel := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	path, stop, err := p.start(ctx, std)
	if err != nil {
		return err
	}
	fmt.Fprintf(std.out, "%s=%s\n", credproxy.SocketEnv, path)
	<-ctx.Done()
	return stop()
}
