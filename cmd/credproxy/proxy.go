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
	"slices"
	"strconv"
	"strings"
	"syscall"
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
	fs.StringVar(&p.store, "store", "keyring", "credential `store`: keyring (the host's, see CREDPROXY_KEYRING_BACKEND) or memory")
	fs.StringVar(&p.importFile, "import", "", "with -store memory, load tokens and keys from this JSON `file`: {\"tokens\":{PROVIDER:{BUCKET:TOKEN}},\"keys\":{NAME:KEY}}")
	fs.StringVar(&p.sessionDir, "session-dir", "", "the session's own `directory`, which will hold its socket and nothing else: mount it into the sandbox, read-only; it must not exist, or be empty with mode 0700 (default: a new directory in the per-user directory in the temp dir)")
	fs.StringVar(&p.providers, "providers", "", "the providers `file`, whose tokens the host refreshes (default: $"+providersEnv+", else providers.json in the config directory; see 'credproxy providers -help')")
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
	sess, err = srv.NewSession(credproxy.SessionOptions{Policy: &p.grant, Dir: p.sessionDir})
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
	store, err := p.openStore(ctx)
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

func (p *proxyFlags) openStore(ctx context.Context) (credproxy.StoreCloser, error) {
	switch p.store {
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
	return nil, usageError("-store must be keyring or memory, not %q", p.store)
}

const runSynopsis = `Usage: credproxy run [flags] -- CMD [ARGS...]

Starts a credential proxy session for one sandbox and runs CMD with
LLXPRT_CREDENTIAL_SOCKET set to the session's socket, and the session's
capability token on file descriptor 3 (LLXPRT_CAPABILITY_FD=3). The socket is
alone in the session's directory: mount that directory into the sandbox,
read-only. The sandbox may read what the -allow flags name and nothing else,
and may change nothing unless -allow-write is given; the grant is logged on
stderr when the session starts, and every refused request is logged there too.
The tokens of the providers in the providers file ('credproxy providers -help')
are refreshed on the host, before they expire and when the sandbox asks, so a
long-running sandbox keeps working past its first token's lifetime.

CMD gets descriptors 0, 1 and 2 and the token's 3, and none of the others run
inherited. run forwards SIGTERM, SIGHUP, SIGINT and SIGQUIT to CMD, except a
Ctrl-C or Ctrl-\ from the terminal, which CMD gets from it directly; when CMD
exits, run closes the session (its socket, directory and token stop working),
shuts the proxy down (5 s at most) and exits with CMD's status. If the proxy cannot start, CMD is
not started and run exits 125. On Linux CMD is killed if run dies, and a run
that is PID 1 (a container's entrypoint) reaps the orphaned processes
reparented to it, so that they do not linger as zombies.
CREDPROXY_KEYRING_PASSWORD is removed from CMD's environment, and run makes
itself non-dumpable so that CMD cannot read it from /proc either.`

const runExample = `  # A bubblewrap sandbox that sees the session's socket and nothing of the host's store:
  credproxy run -session-dir /tmp/cp-sandbox -allow-provider anthropic -- \
    bwrap --unshare-all --die-with-parent --cap-drop ALL --ro-bind /usr /usr --symlink usr/lib /lib \
      --symlink usr/lib64 /lib64 --symlink usr/bin /bin --proc /proc --dev /dev \
      --ro-bind /tmp/cp-sandbox /tmp/cp-sandbox --ro-bind "$(command -v credproxy)" /credproxy \
      -- /credproxy token get anthropic
  # Podman: pass descriptor 3 and the two variables on, mount the directory read-only:
  credproxy run -session-dir /tmp/cp-sandbox -allow-provider anthropic -- \
    podman run --rm --network none --preserve-fds 1 --env LLXPRT_CREDENTIAL_SOCKET --env LLXPRT_CAPABILITY_FD \
      -v /tmp/cp-sandbox:/tmp/cp-sandbox:ro IMAGE /credproxy token get anthropic`

func runCommand(ctx context.Context, args []string, std stdio) int {
	fs := newFlags("run", runSynopsis, runExample, std)
	var p proxyFlags
	p.register(fs)
	if err := parseProxyFlags(fs, args); err != nil {
		return reportRun(err, std)
	}
	if fs.NArg() == 0 {
		return reportRun(usageError("run needs a command: credproxy run [flags] -- CMD [ARGS...]"), std)
	}
	if err := protectProcess(); err != nil {
		fmt.Fprintln(std.err, "credproxy: cannot start the proxy, so the command was not started:", err)
		return exitNoProxy
	}
	if err := p.checkReaping(); err != nil {
		return reportRun(err, std)
	}
	inheritNothing()
	sess, stop, err := p.start(ctx, std)
	if err != nil {
		fmt.Fprintln(std.err, "credproxy: cannot start the proxy, so the command was not started:", message(err))
		return exitNoProxy
	}
	handoff, err := sess.HandoffFile()
	if err != nil {
		stop()
		fmt.Fprintln(std.err, "credproxy: cannot start the proxy, so the command was not started:", message(err))
		return exitNoProxy
	}

	cmd := exec.Command(fs.Arg(0), fs.Args()[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = std.in, std.out, std.err
	cmd.ExtraFiles = []*os.File{handoff} // descriptor 3
	cmd.SysProcAttr = commandAttr()
	cmd.Env = append(withoutEnv(os.Environ(), credproxy.KeyringPasswordEnv, credproxy.SocketEnv, credproxy.CapabilityFDEnv),
		sess.Environ()...)
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(signals)
	err = cmd.Start()
	handoff.Close()
	if err != nil {
		stop()
		return reportStart(err, std)
	}
	status := relaySignals(cmd, signals, std)
	if err := stop(); err != nil {
		fmt.Fprintln(std.err, "credproxy: shutting the proxy down:", err)
	}
	return status
}

// relaySignals passes the signals that arrive on signals on to cmd,
// started, until it ends, and returns the status to exit with for it (see
// waitCommand). run and forward both wrap a command this way.
func relaySignals(cmd *exec.Cmd, signals <-chan os.Signal, std stdio) int {
	waited := make(chan int, 1)
	go func() { waited <- waitCommand(cmd, std) }()
	for {
		select {
		case sig := <-signals:
			if !terminalSentToo(sig, cmd.Process.Pid) { // one Ctrl-C must reach CMD once
				cmd.Process.Signal(sig)
			}
		case status := <-waited:
			return status
		}
	}
}

// exitStatus is the status run exits with for CMD's end, as cmd.Wait
// reported it (err): see waitStatusCode.
func exitStatus(cmd *exec.Cmd, err error, std stdio) int {
	if cmd.ProcessState == nil {
		fmt.Fprintln(std.err, "credproxy:", err)
		return exitError
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok {
		return waitStatusCode(ws)
	}
	return cmd.ProcessState.ExitCode()
}

// waitStatusCode is the status run exits with for CMD's wait status: its
// exit code, or 128 plus the signal that killed it, as shells report it.
func waitStatusCode(ws syscall.WaitStatus) int {
	if ws.Signaled() {
		return exitSignalBase + int(ws.Signal())
	}
	return ws.ExitStatus()
}

// withoutEnv returns env without the variables called names.
func withoutEnv(env []string, names ...string) []string {
	kept := env[:0:0]
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		if !slices.Contains(names, name) {
			kept = append(kept, kv)
		}
	}
	return kept
}

const serveSynopsis = `Usage: credproxy serve [flags]

Serves one credential proxy session until SIGINT, SIGTERM or SIGHUP, then
closes it, shuts down gracefully and removes the socket. Stdout gets two lines:
LLXPRT_CREDENTIAL_SOCKET=<path> and LLXPRT_CAPABILITY_TOKEN=<token>. Hand the
token to the sandboxed program on its file descriptor 3, as the 64 characters
and a newline (with LLXPRT_CAPABILITY_FD=3), never in its environment or
arguments, and mount the socket's directory, read-only. Unlike run, serve
cannot keep its own environment (the store password, say) from the sandbox:
start the sandbox with a clean one. Logs go to stderr. As with run, the
tokens of the providers in the providers file are refreshed on the host. serve makes itself
non-dumpable, as run does.

Started by systemd socket activation (LISTEN_PID and LISTEN_FDS; the README
has a user unit pair), serve serves the one listening Unix socket systemd
passes instead, prints nothing on stdout, and on SIGINT, SIGTERM or SIGHUP
shuts down and leaves the socket to systemd; -session-dir does not apply.
There is no session and no capability token then: every process that can
connect to the socket gets the grant. The boundary is the socket's
permissions (SocketMode=0600, in a directory only its user can reach:
DirectoryMode=0700) and the peer-uid check, so mount the socket's directory
only into sandboxes of that user, and start a serve of its own, with a
socket of its own, for each grant. serve warns if the socket's mode lets
other users connect.`

const serveExample = `  coproc CP { exec credproxy serve -allow-provider anthropic; }   # exec: $CP_PID is serve
  read -r sock <&"${CP[0]}"; read -r tok <&"${CP[0]}"
  sock=${sock#*=}
  bwrap --unshare-all --die-with-parent --cap-drop ALL --clearenv ... \
    --ro-bind "$(dirname "$sock")" "$(dirname "$sock")" \
    --setenv LLXPRT_CREDENTIAL_SOCKET "$sock" --setenv LLXPRT_CAPABILITY_FD 3 \
    -- agent 3<<<"${tok#*=}"     # bash 5.1 and later: a pipe, not a file
  kill "$CP_PID"; wait "$CP_PID"  # closes the session`

func serveCommand(ctx context.Context, args []string, std stdio) error {
	fs := newFlags("serve", serveSynopsis, serveExample, std)
	var p proxyFlags
	p.register(fs)
	if err := parseProxyFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError("serve takes no arguments; did you mean 'credproxy run -- %s'?", strings.Join(fs.Args(), " "))
	}
	if err := protectProcess(); err != nil {
		return err
	}
	// SIGHUP too: a terminal closing or a shell logging out must not
	// leave the socket and session directory behind.
	ctx, cancel := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer cancel()
	ln, path, err := systemdListener()
	if err != nil {
		return err
	}
	if ln != nil {
		return p.serveActivated(ctx, ln, path, std)
	}
	sess, stop, err := p.start(ctx, std)
	if err != nil {
		return err
	}
	fmt.Fprintf(std.out, "%s=%s\n%s=%s\n", credproxy.SocketEnv, sess.SocketPath(), capabilityTokenLine, string(sess.CapabilityToken()))
	<-ctx.Done()
	return stop()
}

// capabilityTokenLine names the token in serve's output, as the reference
// implementation's launcher names it. Clients do not read it from their
// environment: it goes to them on descriptor 3.
const capabilityTokenLine = "LLXPRT_CAPABILITY_TOKEN"
