//go:build linux

package main

import (
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
)

// serve under systemd socket activation, driven by the real
// systemd-socket-activate: it listens on the sockets given with -l, and at
// the first connection attempt execs serve in its own place, so serve's
// pid is the one LISTEN_PID names, with the sockets from descriptor 3 on.
// It removes no socket file afterwards: having exec'd, it is gone, as
// systemd's socket unit is not (systemd keeps its socket file, and
// listening on it, until the socket unit stops).

// logBuffer collects a process's output, safe for the goroutine os/exec
// copies it in, and lets a test wait for a line without sleeping.
type logBuffer struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	wrote chan struct{} // closed, and replaced, at each write
}

func newLogBuffer() *logBuffer { return &logBuffer{wrote: make(chan struct{})} }

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	close(b.wrote)
	b.wrote = make(chan struct{})
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// await waits until the output holds n copies of s, and fails the test
// after 10 s.
func (b *logBuffer) await(t *testing.T, s string, n int) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		b.mu.Lock()
		got, wrote := strings.Count(b.buf.String(), s), b.wrote
		b.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-wrote:
		case <-deadline:
			t.Fatalf("waited 10 s for %d of %q in:\n%s", n, s, b)
		}
	}
}

// activated is a serve started by systemd-socket-activate.
type activated struct {
	cmd            *exec.Cmd
	stdout, stderr *logBuffer
}

// activate starts systemd-socket-activate listening on sockets, to exec
// credproxy with args at the first connection; it returns once every
// socket is listening. The process is killed at cleanup.
func activate(t *testing.T, sockets []string, args ...string) *activated {
	t.Helper()
	needTool(t, "systemd-socket-activate", "systemd")
	var argv []string
	for _, s := range sockets {
		argv = append(argv, "-l", s)
	}
	a := &activated{cmd: exec.Command("systemd-socket-activate", append(append(argv, binary), args...)...), stdout: newLogBuffer(), stderr: newLogBuffer()}
	a.cmd.Env = pathEnv(t)
	a.cmd.Stdout, a.cmd.Stderr = a.stdout, a.stderr
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.cmd.Process.Kill(); a.cmd.Wait() })
	a.stderr.await(t, "Listening on ", len(sockets))
	return a
}

// waitExit waits for cmd to exit, 10 s at most, and returns its code.
func waitExit(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
		return cmd.ProcessState.ExitCode()
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("%v still ran after 10 s", cmd.Args)
		return -1
	}
}

// An activated serve serves its grant on the socket systemd passed, to a
// client with no capability token (Serve's connections need none): the
// granted token without its refresh token, and a refusal, not a
// not-found, for the API key the store holds but the grant does not name.
// stdout stays empty (no token to hand out), stderr says what it serves.
// SIGTERM ends it with status 0, and the socket file is left for systemd,
// which owns it: a listener from an inherited descriptor does not unlink
// its path on Close, as one from net.Listen would.
func TestActivatedServeServesItsGrantOnTheSocketFromSystemd(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "credproxy.sock")
	a := activate(t, []string{socket}, "serve", "-store", "memory", "-import", writeCreds(t), "-allow-provider", "anthropic")

	client := credproxy.NewClient(socket, credproxy.ClientOptions{}) // its first call makes serve start
	tok, err := client.GetToken(t.Context(), "anthropic", "")
	if err != nil || string(tok.AccessToken()) != fakeAccess || tok.RefreshToken() != "" {
		t.Fatalf("GetToken(anthropic) = %v; want the access token, without its refresh token", err)
	}
	if _, err := client.GetAPIKey(t.Context(), "openai"); !errors.Is(err, credproxy.ErrDenied) {
		t.Errorf("GetAPIKey(openai), not granted: %v, want ErrDenied", err)
	}
	if _, err := client.GetToken(t.Context(), "gemini", ""); !errors.Is(err, credproxy.ErrDenied) {
		t.Errorf("GetToken(gemini), not granted: %v, want ErrDenied", err)
	}
	client.Close()

	a.cmd.Process.Signal(syscall.SIGTERM)
	if code := waitExit(t, a.cmd); code != 0 {
		t.Errorf("serve exited %d after SIGTERM, want 0; stderr:\n%s", code, a.stderr)
	}
	if fi, err := os.Lstat(socket); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Errorf("the socket systemd owns is gone after serve: %v", err)
	}
	if a.stdout.String() != "" {
		t.Errorf("stdout %q, want nothing", a.stdout)
	}
	stderr := a.stderr.String()
	if !strings.Contains(stderr, `msg="credproxy: serving the socket from systemd, without a capability token" socket=`+socket+
		` grant="read-only; providers: anthropic; buckets: default; API keys: none"`) {
		t.Errorf("stderr does not say what serve serves:\n%s", stderr)
	}
	if strings.Contains(stderr, "warning") || strings.Contains(stderr, fakeAccess) {
		t.Errorf("stderr has a warning or the token:\n%s", stderr)
	}
}

// A socket other users may connect to (systemd's default SocketMode=0666;
// systemd-socket-activate makes its sockets 0644, so the test changes the
// mode before serve starts) is served, with a warning that names the mode
// and the setting that fixes it.
func TestActivatedServeWarnsWhenOtherUsersMayConnect(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "credproxy.sock")
	a := activate(t, []string{socket}, "serve", "-store", "memory")
	if err := os.Chmod(socket, 0o666); err != nil {
		t.Fatal(err)
	}
	if _, err := credproxy.NewClient(socket, credproxy.ClientOptions{}).ListProviders(t.Context()); err != nil {
		t.Fatalf("ListProviders: %v", err)
	}
	a.cmd.Process.Signal(syscall.SIGTERM)
	waitExit(t, a.cmd)
	if !strings.Contains(a.stderr.String(), "credproxy: warning: the socket "+socket+" has mode 0666") ||
		!strings.Contains(a.stderr.String(), "SocketMode=0600") {
		t.Errorf("no warning of the open socket:\n%s", a.stderr)
	}
}

// serve takes one socket: a socket unit with two Listen lines makes it
// exit 1, naming the count and the setting to fix, before it serves.
func TestActivatedServeRefusesTwoSockets(t *testing.T) {
	dir := t.TempDir()
	first, second := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	a := activate(t, []string{first, second}, "serve", "-store", "memory")
	if c, err := net.Dial("unix", first); err == nil {
		c.Close()
	}
	if code := waitExit(t, a.cmd); code != 1 || !strings.Contains(a.stderr.String(), "credproxy: systemd passed 2 sockets and serve takes one") ||
		!strings.Contains(a.stderr.String(), "exactly one ListenStream=") {
		t.Errorf("serve given two sockets: exit %d, stderr:\n%s", code, a.stderr)
	}
}

// LISTEN_FDS meant for another process (LISTEN_PID is not serve's pid: a
// parent's variables that leaked) is not serve's to take: serve makes its
// own session as without them, and leaves the descriptor alone.
func TestServeIgnoresSocketActivationMeantForAnotherProcess(t *testing.T) {
	theirs := filepath.Join(t.TempDir(), "theirs.sock")
	f := descriptors(t)(net.ListenUnix("unix", unixAddr("unix", theirs)))
	cmd := exec.Command(binary, "serve", "-store", "memory")
	cmd.Env = append(hostEnv(t), "LISTEN_PID="+strconv.Itoa(os.Getpid()), "LISTEN_FDS=1") // the test's pid, serve's parent
	cmd.ExtraFiles = []*os.File{f}
	lines := startFirstLine(t, cmd)
	socket, ok := strings.CutPrefix(lines.Text(), credproxy.SocketEnv+"=")
	if !ok || socket == theirs {
		t.Fatalf("serve with its parent's LISTEN_PID printed %q, want its own session's socket", lines.Text())
	}
	if !lines.Scan() || !strings.HasPrefix(lines.Text(), "LLXPRT_CAPABILITY_TOKEN=") {
		t.Fatalf("no capability token: %q", lines.Text())
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if code := waitExit(t, cmd); code != 0 {
		t.Errorf("serve exited %d after SIGTERM", code)
	}
	if _, err := os.Lstat(theirs); err != nil {
		t.Errorf("the other process's socket: %v", err)
	}
}

// serve refuses, with exit status 1 and words that name what systemd
// passed and the setting to use, a descriptor 3 that is not a listening
// Unix stream socket with a path (an abstract one, which any process in
// the network namespace reaches, was accepted until an attacking review);
// and -session-dir, which has no use then, with a
// usage error. LISTEN_PID is set by a shell that then execs serve, so it
// is serve's pid.
func TestActivatedServeRefusesWhatIsNotAListeningUnixSocket(t *testing.T) {
	dir := t.TempDir()
	regular := filepath.Join(dir, "file")
	os.WriteFile(regular, nil, 0o600)
	file, err := os.Open(regular)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	fd := descriptors(t)
	fd(net.ListenUnix("unix", unixAddr("unix", filepath.Join(dir, "conn.sock")))) // for the connection below
	for _, tc := range []struct {
		name string
		fd   *os.File
		args []string
		code int
		want string
	}{
		{"regular file", file, nil, 1, "descriptor 3 from systemd (LISTEN_FDS) is not a socket; serve needs ListenStream= with a path"},
		{"datagram", fd(net.ListenUnixgram("unixgram", unixAddr("unixgram", filepath.Join(dir, "dgram.sock")))), nil, 1, "is not a stream socket (ListenDatagram="},
		{"TCP", fd(net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})), nil, 1, "is not a Unix socket (a port or an IP address in ListenStream=?)"},
		{"abstract", fd(net.ListenUnix("unix", unixAddr("unix", "@credproxy-test-"+strconv.Itoa(os.Getpid())))), nil, 1, "is an abstract or unnamed Unix socket"},
		{"connection", fd(net.DialUnix("unix", nil, unixAddr("unix", filepath.Join(dir, "conn.sock")))), nil, 1, "is not listening (Accept=yes"},
		{"-session-dir", fd(net.ListenUnix("unix", unixAddr("unix", filepath.Join(dir, "ok.sock")))), []string{"-session-dir", filepath.Join(dir, "s")}, 2, "-session-dir has no use when systemd passes the socket"},
	} {
		cmd := exec.Command("sh", append([]string{"-c", `export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@"`, "sh", binary, "serve", "-store", "memory"}, tc.args...)...)
		cmd.Env = hostEnv(t)
		cmd.ExtraFiles = []*os.File{tc.fd}
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if code := waitExit(t, cmd); code != tc.code || !strings.Contains(stderr.String(), tc.want) || stdout.Len() > 0 {
			t.Errorf("%s on descriptor 3: exit %d, stdout %q, stderr %q; want exit %d and %q", tc.name, code, stdout.String(), stderr.String(), tc.code, tc.want)
		}
		onePrefix(t, stderr.String())
	}
}

// socketFile is what descriptors takes: a listener or a connection.
type socketFile interface {
	File() (*os.File, error)
	Close() error
}

// descriptors returns a function that takes what a net.Listen... or
// net.Dial... call returns and gives a duplicate of its descriptor, to pass
// on as descriptor 3, closing the original (without removing a Unix
// listener's socket file, which the duplicate still listens on). The
// duplicates are closed at cleanup.
func descriptors(t *testing.T) func(socketFile, error) *os.File {
	return func(c socketFile, err error) *os.File {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		if ul, ok := c.(*net.UnixListener); ok {
			ul.SetUnlinkOnClose(false)
		}
		defer c.Close()
		f, err := c.File()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
}

// unixAddr is the address of a Unix socket of network at path.
func unixAddr(network, path string) *net.UnixAddr { return &net.UnixAddr{Name: path, Net: network} }

// The README's unit pair, as far as it runs without a user manager: the
// service's ExecStart line, taken from README.md, runs under
// systemd-socket-activate with a credentials directory holding the file
// store's password (what LoadCredential= makes), and nothing else gives
// the password. Its shell execs serve, which keeps the pid LISTEN_PID
// names, so serve takes the socket; a sandbox in bubblewrap with the
// socket's directory mounted read-only, as the README mounts
// %t/credproxy, reads the token without its refresh token.
func TestActivatedServeRunsAsTheREADMEServiceDoes(t *testing.T) {
	needTool(t, "bwrap", "bubblewrap")
	script := readmeExecStart(t)
	env := hostEnv(t)
	credproxyCmd(t, env, tokenJSON, "token", "set", "anthropic").want(t, 0, "")
	creds := t.TempDir()
	if err := os.WriteFile(filepath.Join(creds, "keyring-password"), []byte(fakePassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "credproxy")
	os.Mkdir(dir, 0o700)
	socket := filepath.Join(dir, "credproxy.sock")
	needTool(t, "systemd-socket-activate", "systemd")
	cmd := exec.Command("systemd-socket-activate", "-l", socket, "-E", "XDG_CONFIG_HOME", "-E", "CREDENTIALS_DIRECTORY="+creds,
		"/bin/sh", "-c", script)
	cmd.Env = withoutEnv(env, credproxy.KeyringPasswordEnv)
	stderr := newLogBuffer()
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	stderr.await(t, "Listening on ", 1)

	r := runBinary(t, "bwrap", pathEnv(t), "", nil, bwrapArgs(dir, "--clearenv", "--setenv", credproxy.SocketEnv, socket,
		"--", "/credproxy", "token", "get", "anthropic")...)
	if r.code != 0 || r.stdout != sanitised+"\n" {
		t.Errorf("token get in bubblewrap: %+v\nserve's stderr:\n%s", r, stderr)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if code := waitExit(t, cmd); code != 0 {
		t.Errorf("serve exited %d after SIGTERM; stderr:\n%s", code, stderr)
	}
}

// readmeExecStart returns the shell script of the README's credproxy.service
// ExecStart line, as systemd would run it here: $$ is $, and the binary is
// the one under test.
func readmeExecStart(t *testing.T) string {
	t.Helper()
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(readme)) {
		if script, ok := strings.CutPrefix(strings.TrimSpace(line), "ExecStart=/bin/sh -c '"); ok && strings.HasSuffix(script, "'") {
			script = strings.ReplaceAll(strings.TrimSuffix(script, "'"), "$$", "$")
			return strings.ReplaceAll(script, "%h/go/bin/credproxy", binary)
		}
	}
	t.Fatal("README.md has no ExecStart=/bin/sh -c '...' line")
	return ""
}
