package credproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/99designs/keyring"
)

// The file backend's password in tests: obviously fake.
const fakeStorePassword = "fake-store-password-PPPP7777"

// newTestStore returns the store the server and client tests run on: a
// MemoryStore, or, when CREDPROXY_TEST_STORE is "keyring" (set by
// TestKeyringServerSuite), a KeyringStore on the file backend in a
// temporary directory.
func newTestStore(t testing.TB) Store {
	t.Helper()
	if os.Getenv("CREDPROXY_TEST_STORE") != "keyring" {
		return NewMemoryStore()
	}
	return openFileStore(t, storeDir(t))
}

// openFileStore opens the file-backend store in dir with the fake password.
func openFileStore(t testing.TB, dir string) *KeyringStore {
	t.Helper()
	st, err := OpenKeyringStore(KeyringOptions{Backend: "file", Dir: dir, Password: fixedPassword(fakeStorePassword)})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// storeDir returns a new directory for a store, which must be private
// (t.TempDir's own directory has mode 0755).
func storeDir(t testing.TB) string {
	return filepath.Join(t.TempDir(), "store")
}

func fixedPassword(pw string) func() (string, error) {
	return func() (string, error) { return pw, nil }
}

// skipOrFail skips a test whose backend cannot run here, or fails it when
// CREDPROXY_REQUIRE_BACKENDS is set: CI sets it, so that a missing package
// there is a failure, not a silent skip.
func skipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CREDPROXY_REQUIRE_BACKENDS") != "" {
		t.Fatalf(format, args...)
	}
	t.Skipf(format, args...)
}

// TestKeyringServerSuite runs every test of this package that goes
// through a server again, with the server on a KeyringStore (file backend)
// instead of a MemoryStore, by re-running the test binary with
// CREDPROXY_TEST_STORE=keyring. Tests of the keyring store itself, the
// fuzz targets and the examples are left out of the re-run.
func TestKeyringServerSuite(t *testing.T) {
	t.Parallel() // a process or processes of its own; overlaps the others
	if os.Getenv("CREDPROXY_TEST_STORE") != "" {
		t.Skip("already the re-run")
	}
	if testing.Short() {
		t.Skip("-short")
	}
	cmd := exec.Command(os.Args[0], "-test.count=1", "-test.v", "-test.skip=^(TestKeyring|TestOpenStore|Fuzz|Example)")
	cmd.Env = append(os.Environ(), "CREDPROXY_TEST_STORE=keyring")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("server and client tests on KeyringStore failed: %v\n%s", err, out)
	}
	t.Logf("%d tests passed on KeyringStore", strings.Count(string(out), "\n--- PASS"))
}

// scaled returns n, or a fifth of it under the race detector or -short.
func scaled(n int) int {
	if raceEnabled || testing.Short() {
		return n / 5
	}
	return n
}

// Every contract point of Store holds for the keyring store on every
// backend that can run here: Secret Service (gnome-keyring), pass and the
// kernel keyring. The file backend runs the suite, and the server suite,
// in suites_test.go.
func TestKeyringStoreConformance(t *testing.T) {
	t.Parallel() // a process or processes of its own; overlaps the others
	t.Run("keyctl", func(t *testing.T) {
		if runtime.GOOS != "linux" {
			t.Skip("the kernel keyring is Linux's")
		}
		StoreSuite(t, func(t *testing.T) Store {
			st, err := OpenKeyringStore(KeyringOptions{Backend: "keyctl", Dir: storeDir(t)})
			if err != nil {
				t.Fatal(err)
			}
			emptyStore(t, st)
			t.Cleanup(func() { emptyStore(t, st) })
			return st
		})
	})
	t.Run("pass", func(t *testing.T) {
		passDir := setUpPass(t)
		n := 0
		StoreSuite(t, func(t *testing.T) Store {
			n++
			st, err := OpenKeyringStore(KeyringOptions{Backend: "pass", Dir: storeDir(t),
				Keyring: keyringConfig(passDir, "t"+strings.Repeat("x", n))})
			if err != nil {
				t.Fatal(err)
			}
			return st
		})
	})
	t.Run("secret-service", func(t *testing.T) {
		if os.Getenv("CREDPROXY_TEST_SECRET_SERVICE") == "" {
			runUnderSecretService(t)
			return
		}
		auto, err := OpenKeyringStore(KeyringOptions{Backend: "auto", Dir: storeDir(t)})
		if err != nil || auto.Backend() != "secret-service" {
			t.Fatalf("auto with a Secret Service: %v", err)
		}
		n := 0
		StoreSuite(t, func(t *testing.T) Store {
			n++
			// A service name per store keeps stores apart in the one
			// collection this session has.
			st, err := OpenKeyringStore(KeyringOptions{Backend: "secret-service", Dir: storeDir(t),
				Keyring: keyringConfig("", "t"+strings.Repeat("x", n))})
			if err != nil {
				t.Fatal(err)
			}
			return st
		})
	})
}

// emptyStore removes every token and API key of st.
func emptyStore(t *testing.T, st Store) {
	t.Helper()
	ctx := context.Background()
	providers, err := st.ListProviders(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range providers {
		buckets, _ := st.ListBuckets(ctx, p)
		for _, b := range buckets {
			st.RemoveToken(ctx, p, b)
		}
	}
	keys, _ := st.ListAPIKeys(ctx)
	for _, k := range keys {
		st.RemoveAPIKey(ctx, k)
	}
}

var passSetup struct {
	sync.Mutex
	gnupgHome string
	keyID     string
}

// setUpPass makes a throwaway GPG key (no passphrase) in a temporary
// GNUPGHOME, for the whole test binary, and returns a new password store
// initialised with it. GNUPGHOME is set in the environment because pass
// runs gpg, which reads it from there.
func setUpPass(t testing.TB) string {
	t.Helper()
	for _, tool := range []string{"pass", "gpg", "gpgconf"} {
		if _, err := exec.LookPath(tool); err != nil {
			skipOrFail(t, "pass backend needs %s (Debian: apt-get install pass gnupg)", tool)
		}
	}
	passSetup.Lock()
	defer passSetup.Unlock()
	if passSetup.keyID == "" {
		home, err := os.MkdirTemp("", "cpgpg")
		if err != nil {
			t.Fatal(err)
		}
		gpg := func(args ...string) []byte {
			cmd := exec.Command("gpg", append([]string{"--batch", "--homedir", home}, args...)...)
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("gpg %v: %v\n%s", args, err, out)
			}
			return out
		}
		gpg("--passphrase", "", "--quick-gen-key", "credproxy test <test@credproxy.invalid>", "default", "default", "never")
		for _, line := range strings.Split(string(gpg("--list-secret-keys", "--with-colons")), "\n") {
			if f := strings.Split(line, ":"); f[0] == "fpr" && len(f) > 9 {
				passSetup.keyID = f[9]
				break
			}
		}
		passSetup.gnupgHome = home
		os.Setenv("GNUPGHOME", home)
	}
	t.Cleanup(func() {
		// gpg starts an agent per home; stop it with the test.
		exec.Command("gpgconf", "--homedir", passSetup.gnupgHome, "--kill", "gpg-agent").Run()
	})
	dir := storeDir(t)
	cmd := exec.Command("pass", "init", passSetup.keyID)
	cmd.Env = append(os.Environ(), "PASSWORD_STORE_DIR="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pass init: %v\n%s", err, out)
	}
	return dir
}

// runUnderSecretService runs the secret-service subtest again in a child
// test process under a private D-Bus session with a headless
// gnome-keyring-daemon, whose "login" collection it creates and unlocks
// with a fake password. (The keyring library looks for the bus once, as
// the program starts, so the bus must exist before the process does.)
func runUnderSecretService(t *testing.T) {
	runSecretServiceChild(t, "-test.run=^TestKeyringStoreConformance$/^secret-service$")
}

// runSecretServiceChild runs the test binary with args, under a D-Bus
// session as runUnderSecretService describes, and returns its output.
func runSecretServiceChild(t testing.TB, args ...string) string {
	t.Helper()
	for _, tool := range []string{"dbus-run-session", "gnome-keyring-daemon"} {
		if _, err := exec.LookPath(tool); err != nil {
			skipOrFail(t, "secret-service backend needs %s (Debian: apt-get install --no-install-recommends gnome-keyring dbus-user-session)", tool)
		}
	}
	home := t.TempDir()
	runtimeDir := filepath.Join(home, "run")
	if err := os.Mkdir(runtimeDir, 0o700); err != nil {
		t.Fatal(err)
	}
	script := `printf %s "$KEYRING_UNLOCK" | gnome-keyring-daemon --unlock --components=secrets >/dev/null && exec "$@"`
	args = append([]string{"--", "sh", "-c", script, "sh", os.Args[0], "-test.count=1"}, args...)
	if testing.Verbose() {
		args = append(args, "-test.v")
	}
	cmd := exec.Command("dbus-run-session", args...)
	cmd.Env = append(os.Environ(), "CREDPROXY_TEST_SECRET_SERVICE=1", "KEYRING_UNLOCK=fake-login-password",
		"HOME="+home, "XDG_DATA_HOME="+filepath.Join(home, "data"), "XDG_RUNTIME_DIR="+runtimeDir)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "PASS") {
		t.Fatalf("secret-service run: %v\n%s", err, out)
	}
	if testing.Verbose() {
		t.Logf("child run:\n%s", out)
	}
	return string(out)
}

// keyringConfig returns backend settings with the given pass directory and
// service name.
func keyringConfig(passDir, service string) keyring.Config {
	return keyring.Config{PassDir: passDir, ServiceName: service}
}

// counterToken is the token the cross-process tests write: its counter n
// is also in the access and refresh tokens, so a token from one write
// with a counter from another is caught.
func counterToken(n int) Token {
	tok, err := ParseToken(fmt.Appendf(nil, `{"access_token":"fake-access-%d","refresh_token":"fake-refresh-%d","n":%d}`, n, n, n))
	if err != nil {
		panic(err)
	}
	return tok
}

// counterOf checks that tok is a whole counterToken and returns its counter.
func counterOf(tok Token) (int, error) {
	raw, ok := tok.Field("n")
	if !ok {
		return 0, errors.New("token has no counter")
	}
	n, err := strconv.Atoi(string(raw))
	if err != nil {
		return 0, err
	}
	if !tok.Equal(counterToken(n)) {
		return 0, fmt.Errorf("token %d is not whole", n)
	}
	return n, nil
}

// counterStore returns a new file store, and its directory, holding
// counterToken(0) for provider p.
func counterStore(t *testing.T) (string, *KeyringStore) {
	t.Helper()
	dir := storeDir(t)
	st := openFileStore(t, dir)
	if err := st.SaveToken(context.Background(), "p", "", counterToken(0)); err != nil {
		t.Fatal(err)
	}
	return dir, st
}

// runStoreHelper is the body of a helper process for the cross-process
// tests, working on the file store in dir:
//
//   - "save-loop": saves counterToken(1), (2), ... for ever, printing each
//     counter once its save has returned.
//   - "increment": CREDPROXY_TEST_COUNT times, under LockToken, reads the
//     token and saves it with its counter plus one; then prints "done".
//   - "hold-lock": takes the lock, prints "locked" and waits to be killed.
//   - "save": saves counterToken(CREDPROXY_TEST_COUNT) once; prints "done".
//   - "remove": removes the token; prints "done".
func runStoreHelper(job, dir string) int {
	st, err := OpenKeyringStore(KeyringOptions{Backend: "file", Dir: dir, Password: fixedPassword(fakeStorePassword)})
	if err != nil {
		fmt.Println(err)
		return 2
	}
	ctx := context.Background()
	switch job {
	case "save-loop":
		for n := 1; ; n++ {
			if err := st.SaveToken(ctx, "p", "", counterToken(n)); err != nil {
				fmt.Println(err)
				return 1
			}
			fmt.Println(n)
		}
	case "increment":
		count, _ := strconv.Atoi(os.Getenv("CREDPROXY_TEST_COUNT"))
		for range count {
			unlock, err := st.LockToken(ctx, "p", "")
			if err != nil {
				fmt.Println(err)
				return 1
			}
			tok, err := st.GetToken(ctx, "p", "")
			if err != nil {
				fmt.Println(err)
				return 1
			}
			n, err := counterOf(tok)
			if err == nil {
				err = st.SaveToken(ctx, "p", "", counterToken(n+1))
			}
			if err != nil {
				fmt.Println(err)
				return 1
			}
			unlock()
		}
		fmt.Println("done")
	case "save", "remove":
		n, _ := strconv.Atoi(os.Getenv("CREDPROXY_TEST_COUNT"))
		err := st.SaveToken(ctx, "p", "", counterToken(n))
		if job == "remove" {
			err = st.RemoveToken(ctx, "p", "")
		}
		if err != nil {
			fmt.Println(err)
			return 1
		}
		fmt.Println("done")
	case "hold-lock":
		if _, err := st.LockToken(ctx, "p", ""); err != nil {
			fmt.Println(err)
			return 1
		}
		fmt.Println("locked")
		select {}
	}
	return 0
}

// storeHelper starts a helper process (see runStoreHelper) and returns it
// with a reader of its output lines. It is killed at cleanup.
func storeHelper(t *testing.T, job, dir string, env ...string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "CREDPROXY_TEST_STORE_HELPER="+job, "CREDPROXY_TEST_STORE_DIR="+dir)
	cmd.Env = append(cmd.Env, env...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd, bufio.NewScanner(out)
}

// A writer killed with SIGKILL at random points, hundreds of times, never
// leaves a token that is damaged, empty or lost: each time, the store
// holds the last token whose save returned or the one after it.
func TestKeyringFileStoreSurvivesKilledWriters(t *testing.T) {
	t.Parallel() // a process or processes of its own; overlaps the others
	rounds := scaled(200)
	dir, st := counterStore(t)
	ctx := context.Background()
	last, sawOld, sawNew := 0, 0, 0
	for range rounds {
		cmd, lines := storeHelper(t, "save-loop", dir)
		// Let the writer finish one save, then kill it at a random point
		// of the saves that follow. The pause is jitter for the kill point,
		// not a wait for anything.
		if !lines.Scan() {
			t.Fatalf("writer printed nothing: %v", cmd.Wait())
		}
		time.Sleep(time.Duration(rand.IntN(20000)) * time.Microsecond)
		cmd.Process.Kill()
		acked := 0
		for ok := true; ok; ok = lines.Scan() {
			acked, _ = strconv.Atoi(lines.Text())
		}
		cmd.Wait()

		tok, err := openFileStore(t, dir).GetToken(ctx, "p", "")
		if err != nil {
			t.Fatalf("after a kill (last acknowledged save %d): %v", acked, err)
		}
		n, err := counterOf(tok)
		switch {
		case err != nil:
			t.Fatalf("after a kill (last acknowledged save %d): %v", acked, err)
		case n == acked:
			sawOld++
		case n == acked+1:
			sawNew++
		default:
			t.Fatalf("after a kill the store holds save %d; the last acknowledged was %d", n, acked)
		}
		last = n
		// The next writer counts from 1 again; start it from a known token.
		if err := st.SaveToken(ctx, "p", "", counterToken(0)); err != nil {
			t.Fatal(err)
		}
	}
	staged, _ := os.ReadDir(filepath.Join(dir, stagingDirName))
	t.Logf("%d kills: the last acknowledged token %d times, the one being written %d times, damaged 0 (last counter %d, %d staging leftovers)",
		rounds, sawOld, sawNew, last, len(staged))
}

// A reader in another process than the writer never sees a torn token
// nor a stale one: every read returns a whole token, at least as new as
// the last save that had returned when the read began, and the counters
// never go back.
func TestKeyringFileStoreReaderNeverSeesTornWrites(t *testing.T) {
	t.Parallel()       // a process or processes of its own; overlaps the others
	want := scaled(50) // new tokens to see
	dir, st := counterStore(t)
	ctx := context.Background()
	_, lines := storeHelper(t, "save-loop", dir)
	if !lines.Scan() {
		t.Fatal("writer printed nothing")
	}
	var acked atomic.Int64 // the last save the writer reported done
	go func() {
		for lines.Scan() {
			n, _ := strconv.Atoi(lines.Text())
			acked.Store(int64(n))
		}
	}()
	prev, changes, reads := 0, 0, 0
	for deadline := time.Now().Add(20 * time.Second); changes < want && time.Now().Before(deadline); reads++ {
		saved := int(acked.Load())
		tok, err := st.GetToken(ctx, "p", "")
		if err != nil {
			t.Fatalf("read beside a writer: %v", err)
		}
		n, err := counterOf(tok)
		if err != nil || n < prev || n < saved {
			t.Fatalf("read beside a writer: counter %d after %d, with save %d done before the read: %v", n, prev, saved, err)
		}
		if n != prev {
			changes++
		}
		prev = n
	}
	if changes < want {
		t.Fatalf("only %d of %d reads saw a new token in 20s: the reads did not overlap the writes", changes, reads)
	}
	t.Logf("%d reads beside a writer: %d saw a new token, 0 torn, 0 stale", reads, changes)
}

// R8.3 across processes: two processes incrementing one token under
// LockToken lose no update.
func TestKeyringLockSerialisesProcesses(t *testing.T) {
	t.Parallel() // a process or processes of its own; overlaps the others
	dir, st := counterStore(t)
	ctx := context.Background()
	count := scaled(200)
	cmdA, a := storeHelper(t, "increment", dir, fmt.Sprint("CREDPROXY_TEST_COUNT=", count))
	cmdB, b := storeHelper(t, "increment", dir, fmt.Sprint("CREDPROXY_TEST_COUNT=", count))
	for _, h := range []struct {
		cmd   *exec.Cmd
		lines *bufio.Scanner
	}{{cmdA, a}, {cmdB, b}} {
		if !h.lines.Scan() || h.lines.Text() != "done" {
			t.Fatalf("incrementer: %q, %v", h.lines.Text(), h.cmd.Wait())
		}
	}
	tok, err := st.GetToken(ctx, "p", "")
	if err != nil {
		t.Fatal(err)
	}
	if n, err := counterOf(tok); n != 2*count || err != nil {
		t.Fatalf("after 2 × %d increments the counter is %d (%v): %d updates lost", count, n, err, 2*count-n)
	}
	t.Logf("2 processes × %d locked increments: counter %d, 0 lost", count, 2*count)
}

// The lock of a killed holder is free at once; until then a waiter gives
// up at its deadline with an error that says why.
func TestKeyringLockFreedWhenHolderIsKilled(t *testing.T) {
	dir := storeDir(t)
	st := openFileStore(t, dir)
	holder, lines := storeHelper(t, "hold-lock", dir)
	if !lines.Scan() || lines.Text() != "locked" {
		t.Fatalf("holder: %q", lines.Text())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := st.LockToken(ctx, "p", ""); !errors.Is(err, context.DeadlineExceeded) ||
		!strings.Contains(err.Error(), "locked by another process") {
		t.Fatalf("LockToken while another process holds it = %v", err)
	}
	holder.Process.Kill()
	holder.Wait()
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	unlock, err := st.LockToken(ctx, "p", "")
	if err != nil {
		t.Fatalf("LockToken after the holder was killed = %v", err)
	}
	unlock()
	unlock() // a second call is harmless
}

// R8.3: the server takes the store's cross-process lock around
// save_token, so a save waits for another process's hold and fails at the
// store deadline while it lasts; it succeeds once the holder is gone.
func TestServerSaveTakesTheStoresLock(t *testing.T) {
	dir := storeDir(t)
	st := openFileStore(t, dir)
	_, path := startServer(t, Options{Store: st, StoreTimeout: 200 * time.Millisecond})
	c := newTestClient(t, path, ClientOptions{})
	ctx := context.Background()
	// A token that exists: removing one that does not takes no lock.
	if err := st.SaveToken(ctx, "p", "", mustToken(t, `{"access_token":"a0"}`)); err != nil {
		t.Fatal(err)
	}
	holder, lines := storeHelper(t, "hold-lock", dir)
	if !lines.Scan() || lines.Text() != "locked" {
		t.Fatalf("holder: %q", lines.Text())
	}
	err := c.SaveToken(ctx, "p", "", mustToken(t, `{"access_token":"a1"}`))
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != CodeInternalError || re.Message != "credential store timed out" {
		t.Fatalf("save_token while another process holds the lock = %v", err)
	}
	if err := c.RemoveToken(ctx, "p", ""); !errors.Is(err, ErrInternal) {
		t.Fatalf("remove_token while another process holds the lock = %v", err)
	}
	holder.Process.Kill()
	holder.Wait()
	if err := c.SaveToken(ctx, "p", "", mustToken(t, `{"access_token":"a1"}`)); err != nil {
		t.Fatalf("save_token after the holder was killed = %v", err)
	}
	if got, err := st.GetToken(ctx, "p", ""); err != nil || string(got.AccessToken()) != "a1" {
		t.Fatalf("stored token %v", err)
	}
}

// R2: OpenStore gives sandbox code the proxy and host code the keyring,
// behind one interface. In the sandbox, API-key writes fail with the
// spec's message and a dead socket is an error, not a fallback.
func TestOpenStoreChoosesProxyOrKeyring(t *testing.T) {
	ctx := context.Background()
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	t.Setenv(KeyringPasswordEnv, fakeStorePassword)
	t.Setenv(KeyringBackendEnv, "")

	t.Run("host", func(t *testing.T) {
		t.Setenv(SocketEnv, "")
		st, err := OpenStore(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		if err := st.SaveAPIKey(ctx, "openai", fakeAPIKey); err != nil {
			t.Fatal(err)
		}
		if err := st.SaveToken(ctx, "anthropic", "", mustToken(t, anthropicToken)); err != nil {
			t.Fatal(err)
		}
		if runtime.GOOS == "linux" {
			if !fileExists(filepath.Join(os.Getenv("XDG_CONFIG_HOME"), "credproxy", "credproxy+apikey+openai")) {
				t.Error("the host store is not in the user's config directory")
			}
		}
	})

	t.Run("sandbox", func(t *testing.T) {
		host, err := OpenKeyringStore(KeyringOptions{})
		if err != nil {
			t.Fatal(err)
		}
		_, path := startServer(t, Options{Store: host})
		t.Setenv(SocketEnv, path)
		st, err := OpenStore(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		if key, err := st.GetAPIKey(ctx, "openai"); err != nil || key != fakeAPIKey {
			t.Errorf("GetAPIKey through the proxy: %v", err)
		}
		tok, err := st.GetToken(ctx, "anthropic", "")
		if err != nil || string(tok.Reveal()) != anthropicTokenSanitised {
			t.Errorf("GetToken through the proxy = %s, %v", tok.Reveal(), err)
		}
		err = st.SaveAPIKey(ctx, "openai", "sk-fake-new")
		if !errors.Is(err, ErrHostOnly) || !strings.Contains(err.Error(), "API key management is not available in sandbox mode; manage keys on the host") {
			t.Errorf("SaveAPIKey in the sandbox = %v", err)
		}
		if err := st.RemoveAPIKey(ctx, "openai"); !errors.Is(err, ErrHostOnly) {
			t.Errorf("RemoveAPIKey in the sandbox = %v", err)
		}
		if key, _ := host.GetAPIKey(ctx, "openai"); key != fakeAPIKey {
			t.Error("the sandbox changed the host's API key")
		}
	})

	t.Run("sandbox with a dead socket", func(t *testing.T) {
		t.Setenv(SocketEnv, filepath.Join(t.TempDir(), "gone.sock"))
		st, err := OpenStore(ctx)
		if err == nil || st != nil {
			t.Fatalf("OpenStore with a dead socket = %v, %v; want an error and no store", st, err)
		}
	})
}

// The file backend keeps every item encrypted in private files: no secret
// appears in any file of the store, files are 0600 and the directory 0700.
func TestKeyringFileStoreKeepsSecretsEncryptedAndPrivate(t *testing.T) {
	dir := storeDir(t)
	st := openFileStore(t, dir)
	ctx := context.Background()
	if err := st.SaveToken(ctx, "anthropic", "", mustToken(t, anthropicToken)); err != nil {
		t.Fatal(err)
	}
	if err := st.SaveAPIKey(ctx, "openai", fakeAPIKey); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("store directory: %v, %v", fi.Mode(), err)
	}
	files := 0
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		files++
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, secret := range []string{fakeAccess, fakeRefresh, fakeAPIKey, fakeStorePassword} {
			if strings.Contains(string(data), secret) {
				t.Errorf("%s holds a secret in clear", path)
			}
		}
		if fi, _ := d.Info(); runtime.GOOS != "windows" && fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v", path, fi.Mode())
		}
		return nil
	})
	if err != nil || files < 3 {
		t.Fatalf("walked %d files: %v", files, err)
	}
}

// A wrong password is refused when the store opens, with an error that
// says what to do, and writes nothing; files in the directory that are not
// items are not listed.
func TestKeyringFileStoreRefusesWrongPassword(t *testing.T) {
	dir := storeDir(t)
	st := openFileStore(t, dir)
	ctx := context.Background()
	if err := st.SaveAPIKey(ctx, "openai", fakeAPIKey); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadDir(dir)
	_, err := OpenKeyringStore(KeyringOptions{Dir: dir, Password: fixedPassword("fake-wrong-password")})
	if err == nil || !strings.Contains(err.Error(), "created with another one") || !strings.Contains(err.Error(), KeyringPasswordEnv) {
		t.Fatalf("open with a wrong password = %v", err)
	}
	if strings.Contains(err.Error(), "fake-wrong-password") {
		t.Fatal("the error quotes the password")
	}
	if after, _ := os.ReadDir(dir); len(after) != len(before) {
		t.Fatalf("a refused open changed the directory: %d entries, then %d", len(before), len(after))
	}
	if _, err := OpenKeyringStore(KeyringOptions{Dir: dir, Password: fixedPassword("")}); err == nil {
		t.Fatal("an empty password was accepted")
	}

	for _, stray := range []string{"notes.txt", "credproxy+apikey+bad name", "credproxy+apikey+a+b", "credproxy+token+p"} {
		os.WriteFile(filepath.Join(dir, stray), []byte("x"), 0o600)
	}
	if keys, err := st.ListAPIKeys(ctx); err != nil || !slices.Equal(keys, []string{"openai"}) {
		t.Fatalf("ListAPIKeys with stray files = %q, %v", keys, err)
	}
	if providers, err := st.ListProviders(ctx); err != nil || len(providers) != 0 {
		t.Fatalf("ListProviders with stray files = %q, %v", providers, err)
	}
}

// "auto" falls back to the file backend where no OS keyring answers, as on
// a headless Linux machine with no D-Bus session bus.
func TestKeyringAutoFallsBackToFile(t *testing.T) {
	if runtime.GOOS != "linux" || slices.Contains(keyring.AvailableBackends(), keyring.SecretServiceBackend) {
		t.Skip("an OS keyring may answer here")
	}
	st, err := OpenKeyringStore(KeyringOptions{Backend: "auto", Dir: storeDir(t), Password: fixedPassword(fakeStorePassword)})
	if err != nil {
		t.Fatal(err)
	}
	if st.Backend() != "file" {
		t.Fatalf("auto chose %s", st.Backend())
	}
	if text := fmt.Sprintf("%v %+v %#v", st, st, st); strings.Contains(text, fakeStorePassword) {
		t.Fatalf("the store prints its password: %s", text)
	}
}

// The store's directory must be private, as the socket's is (R3.2).
func TestKeyringStoreRefusesOpenDirectory(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("no Unix modes")
	}
	dir := t.TempDir() // mode 0755
	_, err := OpenKeyringStore(KeyringOptions{Dir: dir, Password: fixedPassword(fakeStorePassword)})
	if err == nil || !strings.Contains(err.Error(), "chmod 700") {
		t.Fatalf("open in a 0755 directory = %v", err)
	}
	if _, err := OpenKeyringStore(KeyringOptions{Backend: "gnome", Dir: storeDir(t)}); err == nil || !strings.Contains(err.Error(), "unknown keyring backend") {
		t.Fatalf("unknown backend = %v", err)
	}
}

// The file store's cost per call: dominated by the key derivation of each
// item (PBES2, 8192 rounds of HMAC-SHA256) and, for saves, two fsyncs.
func BenchmarkKeyringFileStore(b *testing.B) {
	st := openFileStore(b, storeDir(b))
	ctx := context.Background()
	tok := counterToken(1)
	if err := st.SaveToken(ctx, "p", "", tok); err != nil { // for GetToken run alone
		b.Fatal(err)
	}
	b.Run("SaveToken", func(b *testing.B) {
		for b.Loop() {
			if err := st.SaveToken(ctx, "p", "", tok); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("GetToken", func(b *testing.B) {
		for b.Loop() {
			if _, err := st.GetToken(ctx, "p", ""); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("LockToken", func(b *testing.B) {
		for b.Loop() {
			unlock, err := st.LockToken(ctx, "p", "")
			if err != nil {
				b.Fatal(err)
			}
			unlock()
		}
	})
}

// hungKeyring is a keyring backend that never answers until released,
// like a Secret Service waiting on an unlock prompt nobody sees.
type hungKeyring struct {
	keyring.Keyring // nil: any other method would panic
	release         chan struct{}
}

func (h hungKeyring) Get(string) (keyring.Item, error) {
	<-h.release
	return keyring.Item{}, keyring.ErrKeyNotFound
}

// Store contract: reads honour ctx even when the backend hangs. A read
// returns at its deadline, and so does a read queued behind it.
func TestKeyringStoreReadReturnsWhenBackendHangs(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		st := &KeyringStore{ring: hungKeyring{release: release}, backend: "secret-service", service: "credproxy",
			calls: make(chan struct{}, 1)}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		start := time.Now()
		errs := make(chan error, 2)
		for range 2 {
			go func() {
				_, err := st.GetToken(ctx, "p", "")
				errs <- err
			}()
		}
		for range 2 {
			if err := <-errs; !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("GetToken on a hung backend = %v", err)
			}
		}
		if waited := time.Since(start); waited != 15*time.Second {
			t.Errorf("GetToken returned after %v, want the 15s deadline", waited)
		}
		close(release) // the abandoned call finishes and frees the backend
		synctest.Wait()
		if _, err := st.GetToken(context.Background(), "p", ""); !errors.Is(err, ErrNotFound) {
			t.Errorf("GetToken once the backend answers = %v", err)
		}
	})
}
