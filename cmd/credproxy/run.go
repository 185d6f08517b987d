package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/credproxy/credproxy"
)

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
CREDPROXY_KEYRING_PASSWORD, CREDPROXY_ETCD_PASSWORD and the fleet's data key
(CREDPROXY_ETCD_DATA_KEY, or the variable of an env:NAME data key source) are
removed from CMD's environment, and run makes itself non-dumpable so that CMD
cannot read them from /proc either.

With -inject NAME (repeatable), the sandbox never holds NAME's credential,
not even an access token: the session also serves an injecting HTTP front,
inject.sock in its directory, that forwards /NAME/... to NAME's API with the
real API key or token (refreshed on the host) in place of the session's
phantom credential. CMD's environment gets LLXPRT_INJECT_SOCKET,
LLXPRT_INJECT_ADDR (-inject-addr), LLXPRT_INJECT_PHANTOM and, per route, its
SDK's base URL (ANTHROPIC_BASE_URL=http://127.0.0.1:8787/anthropic) and key
variable (ANTHROPIC_API_KEY=the phantom); 'credproxy forward -- CMD' in the
sandbox serves that address. -inject grants the route's calls only, not the
credential over the socket. 'credproxy providers -help' has the routes.`

const runExample = `  # A bubblewrap sandbox that sees the session's socket and nothing of the host's store:
  credproxy run -session-dir /tmp/cp-sandbox -allow-provider anthropic -- \
    bwrap --unshare-all --die-with-parent --cap-drop ALL --ro-bind /usr /usr --symlink usr/lib /lib \
      --symlink usr/lib64 /lib64 --symlink usr/bin /bin --proc /proc --dev /dev \
      --ro-bind /tmp/cp-sandbox /tmp/cp-sandbox --ro-bind "$(command -v credproxy)" /credproxy \
      -- /credproxy token get anthropic
  # Podman: pass descriptor 3 and the two variables on, mount the directory read-only:
  credproxy run -session-dir /tmp/cp-sandbox -allow-provider anthropic -- \
    podman run --rm --network none --preserve-fds 1 --env LLXPRT_CREDENTIAL_SOCKET --env LLXPRT_CAPABILITY_FD \
      -v /tmp/cp-sandbox:/tmp/cp-sandbox:ro IMAGE /credproxy token get anthropic
  # Injection: the SDK in the sandbox gets a phantom key and a base URL that forward serves:
  credproxy run -session-dir /tmp/cp-sandbox -inject anthropic -- \
    bwrap --unshare-all --die-with-parent --cap-drop ALL --ro-bind /usr /usr --symlink usr/lib /lib \
      --symlink usr/lib64 /lib64 --symlink usr/bin /bin --proc /proc --dev /dev \
      --ro-bind /tmp/cp-sandbox /tmp/cp-sandbox --ro-bind "$(command -v credproxy)" /credproxy \
      -- /credproxy forward -- node app.mjs`

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
	cmd.Env = p.commandEnv(sess)
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

// commandEnv is CMD's environment: run's own, without the store's
// secrets (the keyring password; the etcd password and the fleet's data
// keys, from their default variables or those env:NAME sources name) and
// what the session sets, then the session's variables and, with -inject,
// the injection's, phantom credential included.
func (p *proxyFlags) commandEnv(sess *credproxy.Session) []string {
	drop := append(hostSecretEnv(), credproxy.SocketEnv, credproxy.CapabilityFDEnv)
	drop = append(drop, p.secretEnv...)
	var add []string
	if p.injected != nil {
		drop = append(drop, p.injected.names()...)
		add = p.injected.environ(sess.InjectSocketPath(), string(sess.Phantom()), p.injectAddr)
	}
	return append(append(withoutEnv(os.Environ(), drop...), sess.Environ()...), add...)
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
