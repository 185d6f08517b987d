//go:build unix

package main

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
)

// The sandbox boundary as a user meets it through the CLI: each test is
// one way out of a sandbox that was open on the main branch before
// sessions, tried the way an attacker inside would try it.

// startRun starts credproxy run in the background with args, waits for
// CMD's first line of output and returns it; the run is stopped at cleanup.
func startRun(t *testing.T, env []string, args ...string) string {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = env
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("credproxy %v printed nothing: %v", args, err)
	}
	return strings.TrimSpace(line)
}

// pathEnv is a host environment with PATH, for commands run by name.
func pathEnv(t *testing.T) []string {
	return append(hostEnv(t), "PATH="+os.Getenv("PATH"))
}

// S1: two proxies of one user, each with its sandbox. The other proxy
// grants the openai key; this sandbox's grant does not. Mounting what the
// project says to mount (the directory of its socket) shows the sandbox
// its own socket only, read-only, so it can neither reach the other
// proxy nor unlink or replace a socket, nor, without capabilities, make a
// read-only mount writable.
func TestSandboxReachesOnlyItsOwnSession(t *testing.T) {
	needTool(t, "bwrap", "bubblewrap")
	env := pathEnv(t)
	creds := writeCreds(t)
	otherSocket := startRun(t, env, "run", "-store", "memory", "-import", creds, "-allow-provider", "anthropic", "-allow-key", "openai", "--",
		"sh", "-c", `echo "$LLXPRT_CREDENTIAL_SOCKET"; exec sleep 60`)
	script := `for s in $(find / \( -path /proc -o -path /usr -o -path /sys \) -prune -o -name "*.sock" -print 2>/dev/null); do
			echo "socket $s"
			LLXPRT_CREDENTIAL_SOCKET=$s /credproxy key get -raw openai
			d=$(dirname "$s")
			mount -o remount,rw,bind "$d" "$d" 2>/dev/null && echo "remounted $d"
			rm -f "$s" 2>/dev/null && echo "removed $s"
		done
		mount -o remount,rw,bind /usr /usr 2>/dev/null && echo "remounted /usr"`
	r := credproxyCmd(t, env, "", "run", "-store", "memory", "-import", creds, "-allow-provider", "anthropic", "--",
		"sh", "-c", `dir=$(dirname "$LLXPRT_CREDENTIAL_SOCKET"); exec bwrap `+strings.Join(bwrapArgs(`"$dir"`), " ")+` -- /bin/sh -c '`+script+`'`)
	sockets := strings.Count(r.stdout, "socket ")
	if sockets != 1 || strings.Contains(r.stdout, fakeKey) || strings.Contains(r.stdout, filepath.Base(otherSocket)) ||
		strings.Contains(r.stdout, "removed") || strings.Contains(r.stdout, "remounted") {
		t.Errorf("the sandbox saw %d sockets and got:\n%s%s", sockets, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stderr, "API key not allowed") {
		t.Errorf("its own proxy did not refuse the key:\n%s", r.stderr)
	}
	if _, err := os.Stat(otherSocket); err != nil {
		t.Errorf("the other proxy's socket: %v", err)
	}
}

// S1 in Podman: the container gets the session's directory only,
// read-only, and through it its own proxy; the other proxy's socket is
// not in it.
func TestContainerReachesOnlyItsOwnSession(t *testing.T) {
	needTool(t, "podman", "podman runc")
	needRoot(t, "rootful Podman needs root")
	image := importImage(t)
	env := pathEnv(t)
	creds := writeCreds(t)
	otherSocket := startRun(t, env, "run", "-store", "memory", "-import", creds, "-allow-key", "openai", "--",
		"sh", "-c", `echo "$LLXPRT_CREDENTIAL_SOCKET"; exec sleep 60`)
	sessionDir := filepath.Join(t.TempDir(), "session")
	r := credproxyCmd(t, env, "", append([]string{"run", "-store", "memory", "-import", creds, "-session-dir", sessionDir,
		"-allow-provider", "anthropic", "--"}, append(podmanRun(sessionDir), image, "/credproxy", "key", "get", "openai")...)...)
	if r.code == 0 || strings.Contains(r.stdout, fakeKey) || !strings.Contains(r.stderr, "API key not allowed") {
		t.Errorf("the container got the key its grant does not name: %+v", r)
	}
	entries, _ := os.ReadDir(filepath.Dir(otherSocket))
	if filepath.Dir(otherSocket) == sessionDir || len(entries) != 1 {
		t.Errorf("the other proxy's directory %s holds %d entries", filepath.Dir(otherSocket), len(entries))
	}
}

// S6: by default a sandbox cannot change the host's tokens: token set and
// token rm inside it are refused, and the host's token, refresh token
// included, is as it was. -allow-write lets it save (merging: the host
// keeps its refresh token).
func TestSandboxCannotChangeTheHostsTokenByDefault(t *testing.T) {
	env := pathEnv(t)
	credproxyCmd(t, env, tokenJSON, "token", "set", "anthropic").want(t, 0, "")
	planted := `{"access_token":"PLANTED","expiry":99999999999}`
	r := credproxyCmd(t, env, "", "run", "-allow-provider", "anthropic", "--", "sh", "-c",
		`echo '`+planted+`' | `+binary+` token set anthropic; `+binary+` token rm anthropic`)
	if strings.Count(r.stderr, "sandbox connections cannot modify tokens") != 4 { // two logged, two reported
		t.Errorf("token set and rm in the sandbox:\n%s", r.stderr)
	}
	credproxyCmd(t, env, "", "token", "get", "-with-refresh-token", "anthropic").want(t, 0, tokenJSON+"\n")

	credproxyCmd(t, env, "", "run", "-allow-provider", "anthropic", "-allow-write", "--", "sh", "-c",
		`echo '`+planted+`' | `+binary+` token set anthropic`).want(t, 0, "")
	got := credproxyCmd(t, env, "", "token", "get", "-with-refresh-token", "anthropic")
	if !strings.Contains(got.stdout, "PLANTED") || !strings.Contains(got.stdout, fakeRefresh) {
		t.Errorf("after a granted save: %s", got.stdout)
	}
}

// S6: naming a provider grants its default bucket and nothing else: no API
// key, and lists show only what may be read. The grant is logged in one
// line when the session starts.
func TestNamingAProviderGrantsNothingElse(t *testing.T) {
	env := pathEnv(t)
	creds := writeCreds(t)
	r := credproxyCmd(t, env, "", "run", "-store", "memory", "-import", creds, "-allow-provider", "anthropic", "--", "sh", "-c",
		binary+` key ls; `+binary+` token ls; `+binary+` key get -raw openai; echo "key get: $?"`)
	if r.stdout != "anthropic/default\nkey get: 1\n" {
		t.Errorf("stdout %q, want the one token and no key", r.stdout)
	}
	if !strings.Contains(r.stderr, `grant="read-only; providers: anthropic; buckets: default; API keys: none"`) {
		t.Errorf("the grant is not logged in one line:\n%s", r.stderr)
	}
}

// S10: run holds the store's password in its environment. A command it
// starts, running as the same (non-root) uid, can read neither run's
// /proc/$PPID/environ nor its memory map (the ptrace access check a
// debugger meets): run is not dumpable. The password is not in the
// command's own environment either.
func TestRunHidesTheStorePasswordFromItsCommand(t *testing.T) {
	needRoot(t, "needs root to run credproxy as another, non-root, uid")
	dir, err := os.MkdirTemp("", "cp")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chown(dir, 65534, 65534)
	cmd := exec.Command(binary, "run", "-store", "memory", "--", "sh", "-c",
		`tr '\0' '\n' < /proc/$PPID/environ | grep PASSWORD || echo "environ unreadable"
		cat /proc/$PPID/maps >/dev/null 2>&1 && echo "maps readable" || echo "maps unreadable"
		echo "own: [$CREDPROXY_KEYRING_PASSWORD]"`)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), credproxy.KeyringPasswordEnv + "=" + fakePassword, "TMPDIR=" + dir, "HOME=" + dir}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("credproxy run as uid 65534: %v", err)
	}
	if string(out) != "environ unreadable\nmaps unreadable\nown: []\n" {
		t.Errorf("the command saw:\n%s", out)
	}
}

// S3: a process that finds the socket but not the token (a tokenless
// client, or one whose descriptor 3 was closed) is refused.
func TestTokenlessConnectionIsRefused(t *testing.T) {
	env := pathEnv(t)
	creds := writeCreds(t)
	r := credproxyCmd(t, env, "", "run", "-store", "memory", "-import", creds, "-allow-provider", "anthropic", "--", "sh", "-c",
		`unset LLXPRT_CAPABILITY_FD; exec 3<&-; `+binary+` token get anthropic`)
	if r.code != 1 || r.stdout != "" || !strings.Contains(r.stderr, "invalid or missing capability token") {
		t.Errorf("a tokenless client: %+v", r)
	}
}

// S4 end to end: in bubblewrap and in Podman, the example inner process
// gets the token from descriptor 3 and is served; after the handoff the
// variable is unset, descriptor 3 is closed, and a child of it inherits
// neither.
func TestHandoffOnDescriptor3(t *testing.T) {
	creds := writeCreds(t)
	want := credproxy.CapabilityFDEnv + ` after the handoff: ""` + "\ndescriptor 3 open: false\n" +
		credproxy.CapabilityFDEnv + " in a child: unset\ntoken: " + fakeAccess + "\n"
	t.Run("bubblewrap", func(t *testing.T) {
		needTool(t, "bwrap", "bubblewrap")
		sessionDir := filepath.Join(t.TempDir(), "session")
		credproxyCmd(t, pathEnv(t), "", append([]string{"run", "-store", "memory", "-import", creds, "-session-dir", sessionDir,
			"-allow-provider", "anthropic", "--", "bwrap"}, bwrapArgs(sessionDir, "--", "/inner", "anthropic")...)...).want(t, 0, want)
	})
	t.Run("podman", func(t *testing.T) {
		needTool(t, "podman", "podman runc")
		needRoot(t, "rootful Podman needs root")
		image := importImage(t)
		sessionDir := filepath.Join(t.TempDir(), "session")
		// The image has no shell; inner's child reports nothing then.
		r := credproxyCmd(t, pathEnv(t), "", append([]string{"run", "-store", "memory", "-import", creds, "-session-dir", sessionDir,
			"-allow-provider", "anthropic", "--"}, append(podmanRun(sessionDir), image, "/inner", "anthropic")...)...)
		r.want(t, 0, strings.Replace(want, credproxy.CapabilityFDEnv+" in a child: unset\n", "", 1))
	})
}

// S5: when the command exits, run closes its session. A process the
// command left behind, which had been served on an open connection, is
// refused from then on: its connection is closed and the socket is gone.
func TestRunRevokesTheSessionWhenTheCommandExits(t *testing.T) {
	env := pathEnv(t)
	creds := writeCreds(t)
	out := filepath.Join(t.TempDir(), "out")
	credproxyCmd(t, env, "", "run", "-store", "memory", "-import", creds, "-allow-provider", "anthropic", "--", "sh", "-c",
		inner+` -repeat 2 -interval 1s anthropic > `+out+` 2>&1 & sleep 0.5`).want(t, 0, "")
	// inner reads once at once and again a second later: wait for it.
	for range 100 {
		if data, _ := os.ReadFile(out); strings.Count(string(data), "\n") >= 5 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	data, _ := os.ReadFile(out)
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	if len(lines) != 5 || lines[3] != "token: "+fakeAccess || !strings.HasPrefix(lines[4], "error: ") {
		t.Errorf("the left-behind process saw:\n%s", data)
	}
}

// S8 on the host: token set moves a refresh token stored under another
// name to refresh_token, and says so; two of them, or a nested one, are
// refused, naming the members. The sandbox never gets any of them.
func TestTokenSetConvertsOrRefusesRefreshTokenVariants(t *testing.T) {
	env := pathEnv(t)
	r := credproxyCmd(t, env, `{"access_token":"`+fakeAccess+`","refreshToken":"`+fakeRefresh+`"}`, "token", "set", "anthropic")
	r.want(t, 0, "")
	if !strings.Contains(r.stderr, `renamed refreshToken to refresh_token`) {
		t.Errorf("no word of the conversion: %q", r.stderr)
	}
	credproxyCmd(t, env, "", "token", "get", "-with-refresh-token", "anthropic").
		want(t, 0, `{"access_token":"`+fakeAccess+`","refresh_token":"`+fakeRefresh+`"}`+"\n")
	for in, want := range map[string]string{
		`{"access_token":"a","refresh_token":"SECRET-1","Refresh-Token":"SECRET-2"}`: `members "refresh_token" and "Refresh-Token" both hold a refresh token`,
		`{"access_token":"a","oauth":{"refresh_token":"SECRET-3"}}`:                  `member "oauth" holds a refresh token at /oauth/refresh_token`,
	} {
		r := credproxyCmd(t, env, in, "token", "set", "p")
		if r.code != 1 || !strings.Contains(r.stderr, want) || strings.Contains(r.stderr, "SECRET") {
			t.Errorf("token set %s: %+v, want it to say %q", in, r, want)
		}
	}
}

// A launcher's open files do not leak into the sandbox: CMD gets
// descriptors 0 to 2 and the token's 3, and none of those run inherited
// (here an open file on 3, which run replaces, and one on 4).
func TestRunPassesOnlyTheTokenDescriptor(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "store-item")
	os.WriteFile(secret, []byte("host file"), 0o600)
	var extra []*os.File
	for range 2 {
		f, err := os.Open(secret)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		extra = append(extra, f)
	}
	r := runBinary(t, binary, pathEnv(t), "", extra, "run", "-store", "memory", "--", "sh", "-c",
		`for fd in 3 4; do if test -e /proc/$$/fd/$fd; then echo "$fd: $(head -c 9 <&$fd | tr -c '[:alnum:] ' .)"; else echo "$fd: closed"; fi; done`)
	if r.code != 0 || strings.Contains(r.stdout, "host file") || !strings.Contains(r.stdout, "4: closed") || !strings.HasPrefix(r.stdout, "3: ") {
		t.Errorf("descriptors in CMD: %+v", r)
	}
}

// Issue 15, item 5: CMD dies with run. A run that is SIGKILLed cannot
// close its session; a CMD that ran on would believe it had a proxy, and
// a sandbox would outlive its launcher's supervision. The kernel sends
// CMD SIGKILL when run dies (PR_SET_PDEATHSIG, as bwrap --die-with-parent).
func TestCommandDiesWithRun(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("parent-death signals and /proc are Linux's")
	}
	cmd, lines := startCredproxy(t, "run", "-store", "memory", "--", "sh", "-c", `echo $$; exec sleep 1000`)
	pid, err := strconv.Atoi(lines.Text())
	if err != nil {
		t.Fatalf("CMD's pid: %q", lines.Text())
	}
	cmd.Process.Kill()
	cmd.Wait()
	if !gone(pid, 10*time.Second) {
		syscall.Kill(pid, syscall.SIGKILL)
		t.Fatalf("CMD (pid %d) still runs after run was killed", pid)
	}
}

// gone polls /proc until pid has ended (or is a zombie no one reaped
// yet), or the wait is over.
func gone(pid int, wait time.Duration) bool {
	for deadline := time.Now().Add(wait); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			return true
		}
		if _, rest, ok := strings.Cut(string(stat), ") "); ok && strings.HasPrefix(rest, "Z") {
			return true
		}
	}
	return false
}

// Issue 15, item 5: serve treats SIGHUP (a closed terminal, a shell
// logging out) like SIGTERM: it closes the session, removes its socket and
// exits 0, rather than dying and leaving the socket behind.
func TestServeStopsOnSIGHUP(t *testing.T) {
	cmd, lines := startCredproxy(t, "serve", "-store", "memory")
	socket, ok := strings.CutPrefix(lines.Text(), credproxy.SocketEnv+"=")
	if !ok {
		t.Fatalf("first line %q", lines.Text())
	}
	lines.Scan() // the token: serve has started when it is printed
	cmd.Process.Signal(syscall.SIGHUP)
	if err := cmd.Wait(); err != nil {
		t.Errorf("serve after SIGHUP: %v", err)
	}
	if _, err := os.Lstat(socket); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	if _, err := os.Lstat(filepath.Dir(socket)); !os.IsNotExist(err) {
		t.Errorf("session directory left behind: %v", err)
	}
}
