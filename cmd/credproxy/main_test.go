package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
)

// The tests run the real binary, built once, static, so that it also runs
// inside sandboxes and a from-scratch container image; and inner, the
// example of a sandboxed process, built the same way.
var binary, inner string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "credproxy-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "credproxy")
	inner = filepath.Join(dir, "inner")
	// examples/inner is in the root module, cmd/credproxy in its own.
	for out, dir := range map[string]string{binary: ".", inner: "../../examples/inner"} {
		build := exec.Command("go", "-C", dir, "build", "-o", out, ".")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if msg, err := build.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "go build %s: %v\n%s", dir, err, msg)
			os.Exit(1)
		}
	}
	// Both must be usable by a process of another uid (some tests run
	// them as uid 65534).
	os.Chmod(dir, 0o755)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const (
	fakeAccess   = "fake-access-demo-AAAA"
	fakeRefresh  = "fake-refresh-demo-RRRR-stays-on-the-host"
	fakeKey      = "sk-fake-demo-KKKK"
	fakePassword = "fake-store-password"
	tokenJSON    = `{"access_token":"` + fakeAccess + `","refresh_token":"` + fakeRefresh + `","expiry":4102444800,"account_id":"acct-1"}`
	sanitised    = `{"access_token":"` + fakeAccess + `","expiry":4102444800,"account_id":"acct-1"}`
)

// hostEnv returns an environment with a fresh, private keyring store (file
// backend) and no proxy socket.
func hostEnv(t *testing.T) []string {
	t.Helper()
	config := t.TempDir()
	return append(os.Environ(), "XDG_CONFIG_HOME="+config, credproxy.KeyringPasswordEnv+"="+fakePassword,
		credproxy.KeyringBackendEnv+"=", credproxy.SocketEnv+"=")
}

// envValue returns the last value of name in env.
func envValue(env []string, name string) string {
	v := ""
	for _, kv := range env {
		if rest, ok := strings.CutPrefix(kv, name+"="); ok {
			v = rest
		}
	}
	return v
}

// result is how a run of the binary ended.
type result struct {
	stdout, stderr string
	code           int
}

// credproxyCmd runs the binary with env and stdin, and waits for it.
func credproxyCmd(t *testing.T, env []string, stdin string, args ...string) result {
	t.Helper()
	return runBinary(t, binary, env, stdin, nil, args...)
}

// credproxyCmdFD3 is credproxyCmd with fd3 on the binary's descriptor 3,
// through a pipe, as a launcher hands over a capability token.
func credproxyCmdFD3(t *testing.T, env []string, stdin, fd3 string, args ...string) result {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	w.WriteString(fd3)
	w.Close()
	defer r.Close()
	return runBinary(t, binary, env, stdin, []*os.File{r}, args...)
}

// runBinary runs bin with env, stdin and extra descriptors from 3 on, and
// waits for it.
func runBinary(t *testing.T, bin string, env []string, stdin string, extra []*os.File, args ...string) result {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.ExtraFiles = extra
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatalf("credproxy %v: %v", args, err)
	}
	return result{out.String(), errb.String(), cmd.ProcessState.ExitCode()}
}

// want fails the test unless r ended with code and stdout.
func (r result) want(t *testing.T, code int, stdout string) {
	t.Helper()
	if r.code != code || r.stdout != stdout {
		t.Fatalf("exit %d, stdout %q, stderr %q; want exit %d, stdout %q", r.code, r.stdout, r.stderr, code, stdout)
	}
}

// Host-side management: secrets come from stdin, get prints JSON and
// nothing else, the refresh token only on request, errors go to stderr
// with a non-zero exit.
func TestTokenAndKeyCommandsOnTheHost(t *testing.T) {
	env := hostEnv(t)
	credproxyCmd(t, env, tokenJSON, "token", "set", "anthropic").want(t, 0, "")
	credproxyCmd(t, env, tokenJSON, "token", "set", "anthropic", "work").want(t, 0, "")
	credproxyCmd(t, env, "", "token", "get", "anthropic").want(t, 0, sanitised+"\n")
	credproxyCmd(t, env, "", "token", "get", "-with-refresh-token", "anthropic", "work").want(t, 0, tokenJSON+"\n")
	credproxyCmd(t, env, "", "token", "ls").want(t, 0, "anthropic/default\nanthropic/work\n")
	credproxyCmd(t, env, "", "token", "rm", "anthropic", "work").want(t, 0, "")
	credproxyCmd(t, env, "", "token", "ls", "anthropic").want(t, 0, "anthropic/default\n")

	credproxyCmd(t, env, fakeKey+"\n", "key", "set", "openai").want(t, 0, "")
	credproxyCmd(t, env, "", "key", "get", "openai").want(t, 0, `"`+fakeKey+`"`+"\n")
	credproxyCmd(t, env, "", "key", "get", "-raw", "openai").want(t, 0, fakeKey+"\n")
	credproxyCmd(t, env, "", "key", "ls").want(t, 0, "openai\n")
	credproxyCmd(t, env, "", "key", "rm", "openai").want(t, 0, "")

	r := credproxyCmd(t, env, "", "key", "get", "openai")
	r.want(t, 1, "")
	if !strings.Contains(r.stderr, "no API key openai") {
		t.Errorf("stderr %q", r.stderr)
	}
	r = credproxyCmd(t, env, `{"refresh_token":"`+fakeRefresh+`"}`, "token", "set", "p")
	r.want(t, 1, "")
	if strings.Contains(r.stderr, fakeRefresh) || !strings.Contains(r.stderr, "access_token") {
		t.Errorf("a bad token on stdin: stderr %q", r.stderr)
	}
	credproxyCmd(t, env, "", "token", "frob").want(t, 2, "")
}

// Every command answers -help with its synopsis, flags and a worked
// example, on stdout (issue 15: help that was asked for), and exits 0.
func TestEveryCommandHasHelpWithAnExample(t *testing.T) {
	var commands []string // every command the usage names, so none is left out
	for _, line := range strings.Split(usage, "\n") {
		if rest, ok := strings.CutPrefix(line, "  credproxy "); ok {
			commands = append(commands, strings.Fields(rest)[0])
		}
	}
	if len(commands) < 6 {
		t.Fatalf("the usage names only %q", commands)
	}
	for _, cmd := range commands {
		r := credproxyCmd(t, os.Environ(), "", cmd, "-help")
		if r.code != 0 || !strings.Contains(r.stdout, "Usage:") || !strings.Contains(r.stdout, "Example:") {
			t.Errorf("credproxy %s -help: exit %d, stdout:\n%s", cmd, r.code, r.stdout)
		}
	}
	if r := credproxyCmd(t, os.Environ(), "", "version"); r.code != 0 || !strings.HasPrefix(r.stdout, "credproxy ") {
		t.Errorf("version: %+v", r)
	}
}

// run gives CMD the socket, leaves the store password out of its
// environment, and exits with CMD's status: its code, or 128 + the signal
// that killed it; and 125 for an error of its own (issue 15), such as no
// CMD.
func TestRunExitsWithTheCommandsStatus(t *testing.T) {
	env := append(hostEnv(t), "PATH="+os.Getenv("PATH"))
	r := credproxyCmd(t, env, "", "run", "-store", "memory", "--", "sh", "-c",
		`test -S "$LLXPRT_CREDENTIAL_SOCKET" && echo socket; echo "pw=$CREDPROXY_KEYRING_PASSWORD"; exit 3`)
	r.want(t, 3, "socket\npw=\n")
	credproxyCmd(t, env, "", "run", "-store", "memory", "--", "sh", "-c", "kill -KILL $$").want(t, 128+9, "")
	credproxyCmd(t, env, "", "run", "-store", "memory").want(t, 125, "")
}

// SIGTERM to run reaches the command; when it exits, run removes the
// socket and exits with the command's status.
func TestRunForwardsSIGTERMAndRemovesTheSocket(t *testing.T) {
	cmd, lines := startCredproxy(t, "run", "-store", "memory", "--", "sh", "-c",
		`trap 'echo got-term; exit 7' TERM; echo "$LLXPRT_CREDENTIAL_SOCKET"; while :; do sleep 1 & wait; done`)
	socket := lines.Text()
	if fi, err := os.Stat(socket); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket %s: %v", socket, err)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if !lines.Scan() || lines.Text() != "got-term" {
		t.Fatalf("the command did not get SIGTERM: %q", lines.Text())
	}
	cmd.Wait()
	if code := cmd.ProcessState.ExitCode(); code != 7 {
		t.Errorf("run exited %d, want the command's 7", code)
	}
	if _, err := os.Stat(socket); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
}

// A proxy that cannot start (its session directory belongs to someone
// else, or sits in a directory someone else owns) means the command never
// starts, and run says why and exits 125; so does an old flag (issue 15:
// run's usage errors exit 125).
func TestRunDoesNotStartTheCommandWithoutAProxy(t *testing.T) {
	needRoot(t, "needs root to give the directory to another user")
	theirs := filepath.Join(t.TempDir(), "sockets")
	os.Mkdir(theirs, 0o700)
	if err := os.Chown(theirs, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ dir, want string }{
		{theirs, "owned by uid 65534"},
		{filepath.Join(theirs, "session"), "inside " + theirs + ", which is owned by uid 65534"},
	} {
		marker := filepath.Join(t.TempDir(), "started")
		r := credproxyCmd(t, hostEnv(t), "", "run", "-store", "memory", "-session-dir", tc.dir, "--", "touch", marker)
		r.want(t, 125, "")
		if !strings.Contains(r.stderr, tc.want) || !strings.Contains(r.stderr, "command was not started") {
			t.Errorf("-session-dir %s: stderr %q", tc.dir, r.stderr)
		}
		if _, err := os.Stat(marker); !os.IsNotExist(err) {
			t.Error("the command ran")
		}
	}
	r := credproxyCmd(t, hostEnv(t), "", "run", "-store", "memory", "-socket-dir", theirs, "--", "true")
	if r.code != 125 || !strings.Contains(r.stderr, "-socket-dir is gone") || !strings.Contains(r.stderr, "-session-dir") {
		t.Errorf("the old -socket-dir flag: %+v", r)
	}
}

// serve prints the socket and the capability token as its first two
// lines and serves until SIGTERM, then removes the socket and exits 0. A
// client given the token on descriptor 3 is served; one without it is not.
func TestServePrintsTheSocketAndStopsOnSIGTERM(t *testing.T) {
	creds := writeCreds(t)
	cmd, lines := startCredproxy(t, "serve", "-store", "memory", "-import", creds, "-allow-provider", "anthropic")
	socket, ok := strings.CutPrefix(lines.Text(), credproxy.SocketEnv+"=")
	if !ok {
		t.Fatalf("first line %q", lines.Text())
	}
	if !lines.Scan() {
		t.Fatal("no second line")
	}
	token, ok := strings.CutPrefix(lines.Text(), "LLXPRT_CAPABILITY_TOKEN=")
	if !ok || len(token) != 64 {
		t.Fatalf("second line %q", lines.Text())
	}
	env := append(hostEnv(t), credproxy.SocketEnv+"="+socket)
	r := credproxyCmd(t, env, "", "token", "get", "anthropic")
	if r.code != 1 || !strings.Contains(r.stderr, "invalid or missing capability token") {
		t.Errorf("token get without the capability token: %+v", r)
	}
	withToken := append(env, credproxy.CapabilityFDEnv+"=3")
	credproxyCmdFD3(t, withToken, "", token+"\n", "token", "get", "anthropic").want(t, 0, sanitised+"\n")
	r = credproxyCmdFD3(t, withToken, fakeKey, token+"\n", "key", "set", "openai")
	if r.code != 1 || !strings.Contains(r.stderr, "manage keys on the host") {
		t.Errorf("key set through the proxy: %+v", r)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("serve after SIGTERM: %v", err)
	}
	if _, err := os.Stat(socket); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
}

// startCredproxy starts the binary in a host environment, waits for its
// first line of output and returns it with the scanner holding that line.
// The process is killed at cleanup.
func startCredproxy(t *testing.T, args ...string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = hostEnv(t)
	return cmd, startFirstLine(t, cmd)
}

// startFirstLine starts cmd, waits for its first line of output and
// returns the scanner holding that line. The process is killed at cleanup.
func startFirstLine(t *testing.T, cmd *exec.Cmd) *bufio.Scanner {
	t.Helper()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() {
		t.Fatalf("%v printed nothing", cmd.Args)
	}
	return lines
}

// writeCreds writes the demo credentials in the import format.
func writeCreds(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "creds.json")
	data := `{"tokens":{"anthropic":{"default":` + tokenJSON + `}},"keys":{"openai":"` + fakeKey + `"}}`
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// needRoot skips a test that must act as another uid (or run rootful
// Podman), saying why, or fails it when CREDPROXY_REQUIRE_ROOT is set, as
// CI sets it, so that CI cannot pass without running it.
func needRoot(t *testing.T, why string) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CREDPROXY_REQUIRE_ROOT") != "" {
		t.Fatalf("%s, and CREDPROXY_REQUIRE_ROOT is set", why)
	}
	t.Skip(why)
}

// needTool skips a test whose tool is missing, or fails it when
// CREDPROXY_REQUIRE_SANDBOXES is set, as CI sets it.
func needTool(t *testing.T, tool, pkg string) {
	t.Helper()
	if _, err := exec.LookPath(tool); err != nil {
		if os.Getenv("CREDPROXY_REQUIRE_SANDBOXES") != "" {
			t.Fatalf("%s not found (Debian: apt-get install %s) and CREDPROXY_REQUIRE_SANDBOXES is set", tool, pkg)
		}
		t.Skipf("%s not found; install %s to run this sandbox test", tool, pkg)
	}
}

// bwrapArgs is a bubblewrap sandbox with nothing of the host but /usr
// (read-only), the session directory (read-only: enough to connect) and
// the credproxy and inner binaries: its own user, network, pid, ipc and
// uts namespaces, a fresh /proc, /dev and /tmp, and no capabilities (bwrap
// started by root keeps them otherwise, and with them the sandbox could
// remount the read-only mounts writable). Descriptor 3, the capability
// token, passes through bwrap as any inherited descriptor does.
func bwrapArgs(sessionDir string, extra ...string) []string {
	args := []string{"--unshare-all", "--die-with-parent", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr",
		"--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
		"--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
		"--ro-bind", sessionDir, sessionDir, "--ro-bind", binary, "/credproxy", "--ro-bind", inner, "/inner"}
	return append(args, extra...)
}

// End to end in bubblewrap: the token comes from the host's keyring store
// through the session's socket, without its refresh token; the sandbox
// cannot see the store's files, has no network but loopback, and does not
// get the store password. Descriptor 3 reaches it through bwrap, so each
// credproxy command in it presents the capability token (S4). The proxy
// sees the sandbox as the host uid that started bwrap, whatever uid it has
// inside its user namespace.
func TestRunInBubblewrap(t *testing.T) {
	needTool(t, "bwrap", "bubblewrap")
	env := hostEnv(t)
	credproxyCmd(t, env, tokenJSON, "token", "set", "anthropic").want(t, 0, "")
	credproxyCmd(t, env, fakeKey, "key", "set", "openai").want(t, 0, "")
	storeDir := filepath.Join(envValue(env, "XDG_CONFIG_HOME"), "credproxy")
	if _, err := os.Stat(storeDir); err != nil {
		t.Fatalf("host store: %v", err)
	}
	sessionDir := filepath.Join(t.TempDir(), "session")

	script := `/credproxy token get anthropic; /credproxy key get -raw openai
		echo "uid inside: $(id -u 2>/dev/null || echo ?)"
		echo "interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
		test -e ` + storeDir + ` && echo STORE-VISIBLE
		echo "password: [$CREDPROXY_KEYRING_PASSWORD]"`
	start := time.Now()
	r := credproxyCmd(t, env, "", append([]string{"run", "-v", "-session-dir", sessionDir, "-allow-provider", "anthropic", "-allow-key", "openai", "--", "bwrap"},
		bwrapArgs(sessionDir, "--uid", "1000", "--", "/bin/sh", "-c", script)...)...)
	t.Logf("bubblewrap run: %v", time.Since(start))
	want := sanitised + "\n" + fakeKey + "\nuid inside: 1000\ninterfaces: lo \npassword: []\n"
	r.want(t, 0, want)
	if _, err := os.Stat(sessionDir); !os.IsNotExist(err) {
		t.Errorf("the session directory is left after the run: %v", err)
	}
	if !strings.Contains(r.stderr, fmt.Sprintf("uid=%d", os.Geteuid())) {
		t.Errorf("the audit log does not show the host uid %d for the sandbox:\n%s", os.Geteuid(), r.stderr)
	}
	if strings.Contains(r.stdout+r.stderr, fakeRefresh) {
		t.Error("the refresh token left the host")
	}
}

// End to end in rootful Podman: a container made with podman import from
// the static binaries alone, with the session directory mounted read-only
// and descriptor 3 passed on (--preserve-fds 1), gets the token. Its root
// is the host's root, so it passes the peer check as the same uid; a
// container user of another uid (65534, allowed to open the socket file)
// is refused until -allow-uid names it. The client in the container, a
// uid that is not the server's, accepts the server because it runs as
// root (S2).
func TestRunInPodman(t *testing.T) {
	needTool(t, "podman", "podman runc")
	needRoot(t, "rootful Podman needs root")
	image := importImage(t)
	env := hostEnv(t)
	creds := writeCreds(t)
	sessionDir := filepath.Join(t.TempDir(), "session")
	podman := func(extra ...string) []string {
		return append(append(podmanRun(sessionDir), extra...), image, "/credproxy", "token", "get", "anthropic")
	}
	run := []string{"run", "-store", "memory", "-import", creds, "-session-dir", sessionDir, "-allow-provider", "anthropic"}
	start := time.Now()
	r := credproxyCmd(t, env, "", append(append(run, "--"), podman()...)...)
	t.Logf("podman run: %v", time.Since(start))
	r.want(t, 0, sanitised+"\n")

	other := []string{"--user", "65534", "--cap-add", "DAC_OVERRIDE"}
	r = credproxyCmd(t, env, "", append(append(run, "--"), podman(other...)...)...)
	if r.code == 0 || r.stdout != "" || !strings.Contains(r.stderr, "peer uid not allowed") {
		t.Errorf("container user 65534 without -allow-uid: %+v", r)
	}
	r = credproxyCmd(t, env, "", append(append(run, "-allow-uid", "65534", "--"), podman(other...)...)...)
	r.want(t, 0, sanitised+"\n")
}

// podmanRun is the start of a rootful podman run of a container with no
// network, the session directory mounted read-only, descriptor 3 passed
// on and the two variables of the handoff set from the environment.
func podmanRun(sessionDir string) []string {
	return []string{"podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "run", "--rm", "--network", "none",
		"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--preserve-fds", "1",
		"-v", sessionDir + ":" + sessionDir + ":ro", "--env", credproxy.SocketEnv, "--env", credproxy.CapabilityFDEnv}
}

// importImage makes a container image holding only the static binaries,
// credproxy and inner.
func importImage(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	tarball := filepath.Join(dir, "image.tar")
	if out, err := exec.Command("tar", "-C", filepath.Dir(binary), "-cf", tarball, "credproxy", "inner").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, out)
	}
	const image = "localhost/credproxy-test:latest"
	if out, err := exec.Command("podman", "import", "-q", tarball, image).CombinedOutput(); err != nil {
		t.Fatalf("podman import: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("podman", "rmi", "-f", image).Run() })
	return image
}
