package credproxy

import (
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// startSession starts a session of srv in a new short directory, closed at
// cleanup.
func startSession(t testing.TB, srv *Server, opts SessionOptions) *Session {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = filepath.Join(testSocketDir(t), "s")
	}
	sess, err := srv.NewSession(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sess.Close() })
	return sess
}

// sessionServer starts a server on store, for sessions only, shut down at
// cleanup.
func sessionServer(t testing.TB, opts Options) *Server {
	t.Helper()
	srv, err := NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

// sessionClient returns a client of sess with its capability token.
func sessionClient(t testing.TB, sess *Session) *Client {
	t.Helper()
	return newTestClient(t, sess.SocketPath(), ClientOptions{CapabilityToken: sess.CapabilityToken()})
}

// handshakeWith completes a handshake that presents token.
func (r *rawConn) handshakeWith(token Secret) {
	r.t.Helper()
	r.send(`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1,"capabilityToken":"` + string(token) + `"}}`)
	if got := r.recv(); got != string(handshakeOK) {
		r.t.Fatalf("handshake reply %s, want %s", got, handshakeOK)
	}
}

var grantAll = &Grant{Providers: []string{GrantAll}, Buckets: []string{GrantAll}, Keys: []string{GrantAll}}

// S1: each session listens alone in a 0700 directory of its own, by an
// absolute path; two sessions of one server share nothing on disk. By
// default the directory is session-{id} in the per-user directory.
func TestSessionListensAloneInItsOwnDirectory(t *testing.T) {
	srv := sessionServer(t, Options{Store: NewMemoryStore()})
	a := startSession(t, srv, SessionOptions{Policy: grantAll})
	b, err := srv.NewSession(SessionOptions{Policy: grantAll})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	base, _ := DefaultSocketDir()
	if want := filepath.Join(base, "session-"+b.ID()); b.Dir() != want {
		t.Errorf("default session directory %s, want %s", b.Dir(), want)
	}
	for _, s := range []*Session{a, b} {
		if !filepath.IsAbs(s.SocketPath()) || filepath.Dir(s.SocketPath()) != s.Dir() {
			t.Errorf("socket %s is not an absolute path in %s", s.SocketPath(), s.Dir())
		}
		if !regexp.MustCompile(`^llxprt-cred-\d+-[0-9a-f]{8}\.sock$`).MatchString(filepath.Base(s.SocketPath())) {
			t.Errorf("socket name %s", filepath.Base(s.SocketPath()))
		}
		entries, err := os.ReadDir(s.Dir())
		if err != nil || len(entries) != 1 || entries[0].Name() != filepath.Base(s.SocketPath()) {
			t.Errorf("%s holds %v (%v), want its socket only", s.Dir(), entries, err)
		}
		if fi, err := os.Stat(s.Dir()); err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("%s: %v %v", s.Dir(), fi.Mode(), err)
		}
		if fi, err := os.Stat(s.SocketPath()); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v %v", s.SocketPath(), fi.Mode(), err)
		}
		if !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(string(s.CapabilityToken())) {
			t.Errorf("capability token is not 64 lowercase hex characters")
		}
		if got := s.Environ(); !slices.Equal(got, []string{SocketEnv + "=" + s.SocketPath(), CapabilityFDEnv + "=3"}) {
			t.Errorf("Environ() = %q", got)
		}
	}
	if a.Dir() == b.Dir() || a.CapabilityToken() == b.CapabilityToken() {
		t.Error("two sessions share a directory or a token")
	}
}

// S1, S2: the session's directory must be new, or empty and private; a
// directory with anything in it (a killed run's socket, say) is refused
// with an error that says what to do, and a directory the session did not
// create is left in place when it closes.
func TestSessionDirectoryMustBeNewOrEmpty(t *testing.T) {
	srv := sessionServer(t, Options{Store: NewMemoryStore()})
	dir := filepath.Join(testSocketDir(t), "s")
	os.Mkdir(dir, 0o700)
	os.WriteFile(filepath.Join(dir, "stale.sock"), nil, 0o600)
	if _, err := srv.NewSession(SessionOptions{Policy: grantAll, Dir: dir}); err == nil || !strings.Contains(err.Error(), "is not empty") {
		t.Errorf("NewSession in a non-empty directory: %v", err)
	}
	os.Remove(filepath.Join(dir, "stale.sock"))
	os.Chmod(dir, 0o755)
	if _, err := srv.NewSession(SessionOptions{Policy: grantAll, Dir: dir}); err == nil || !strings.Contains(err.Error(), "chmod 700") {
		t.Errorf("NewSession in an open directory: %v", err)
	}
	os.Chmod(dir, 0o700)
	sess, err := srv.NewSession(SessionOptions{Policy: grantAll, Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	sess.Close()
	if entries, err := os.ReadDir(dir); err != nil || len(entries) != 0 {
		t.Errorf("after Close, the directory the caller made: %v, %v", entries, err)
	}
	// Not the per-user directory, where other sessions' directories go,
	// nor a directory above it, nor one in the store's directory.
	tmp := testSocketDir(t)
	t.Setenv("TMPDIR", tmp)
	perUser, _ := DefaultSocketDir()
	for _, d := range []string{perUser, tmp} {
		if _, err := srv.NewSession(SessionOptions{Policy: grantAll, Dir: d}); err == nil || !strings.Contains(err.Error(), "holds, the per-user socket directory") {
			t.Errorf("NewSession in %s: %v", d, err)
		}
	}
	ks := openFileStore(t, storeDir(t))
	ksrv := sessionServer(t, Options{Store: ks})
	if _, err := ksrv.NewSession(SessionOptions{Policy: grantAll, Dir: filepath.Join(ks.Dir(), ".staging")}); err == nil ||
		!strings.Contains(err.Error(), "inside the credential store's directory") {
		t.Errorf("NewSession in the store's staging directory: %v", err)
	}
	if _, err := srv.NewSession(SessionOptions{Dir: dir}); err == nil || !strings.Contains(err.Error(), "Policy is nil") {
		t.Errorf("NewSession without a policy: %v", err)
	}
	if _, err := srv.NewSession(SessionOptions{Dir: dir, Policy: &Grant{Providers: []string{"anthropic/work"}}}); err == nil ||
		!strings.Contains(err.Error(), `Grant.Providers: "anthropic/work" is not a name`) {
		t.Errorf("NewSession with a grant that names no possible name: %v", err)
	}
}

// S3: a session's handshake must present its capability token; anything
// else gets exactly the UNAUTHORIZED reply, then the connection closes.
// The token is checked before the version, so a peer without it learns
// nothing more.
func TestSessionHandshakeNeedsItsCapabilityToken(t *testing.T) {
	logger, logs := debugLogger()
	srv := sessionServer(t, Options{Store: defaultStore(t), Logger: logger})
	sess := startSession(t, srv, SessionOptions{Policy: grantAll})
	other := startSession(t, srv, SessionOptions{Policy: grantAll})
	tok := string(sess.CapabilityToken())
	hs := func(payload string) string { return `{"v":1,"op":"handshake","payload":` + payload + `}` }
	refused := []struct{ name, frame string }{
		{"no payload", `{"v":1,"op":"handshake"}`},
		{"no token", hs(`{"minVersion":1,"maxVersion":1}`)},
		{"empty", hs(`{"minVersion":1,"maxVersion":1,"capabilityToken":""}`)},
		{"wrong", hs(`{"minVersion":1,"maxVersion":1,"capabilityToken":"` + strings.Repeat("0", 64) + `"}`)},
		{"another session's", hs(`{"minVersion":1,"maxVersion":1,"capabilityToken":"` + string(other.CapabilityToken()) + `"}`)},
		{"short", hs(`{"minVersion":1,"maxVersion":1,"capabilityToken":"` + tok[:63] + `"}`)},
		{"long", hs(`{"minVersion":1,"maxVersion":1,"capabilityToken":"` + tok + `0"}`)},
		{"with a newline", hs(`{"minVersion":1,"maxVersion":1,"capabilityToken":"` + tok + `\n"}`)},
		{"upper case", hs(`{"minVersion":1,"maxVersion":1,"capabilityToken":"` + strings.ToUpper(tok) + `"}`)},
		{"not hex", hs(`{"minVersion":1,"maxVersion":1,"capabilityToken":"` + strings.Repeat("z", 64) + `"}`)},
		{"a number", hs(`{"minVersion":1,"maxVersion":1,"capabilityToken":12345}`)},
		{"null", hs(`{"minVersion":1,"maxVersion":1,"capabilityToken":null}`)},
		{"an object", hs(`{"minVersion":1,"maxVersion":1,"capabilityToken":{"token":"` + tok + `"}}`)},
		{"wrong, with no common version", hs(`{"minVersion":7,"maxVersion":9,"capabilityToken":"x"}`)},
	}
	for _, tc := range refused {
		r := dialRaw(t, sess.SocketPath())
		r.send(tc.frame)
		if got := r.recv(); got != string(handshakeUnauthorized) {
			t.Errorf("%s: reply %s, want %s", tc.name, got, handshakeUnauthorized)
		}
		r.expectClosed()
	}
	if n := strings.Count(logs.String(), `"reason":"invalid or missing capability token"`); n != len(refused) {
		t.Errorf("%d refusals logged, want %d:\n%s", n, len(refused), logs)
	}
	r := dialRaw(t, sess.SocketPath())
	r.send(hs(`{"minVersion":7,"maxVersion":9,"capabilityToken":"` + tok + `"}`))
	if got := r.recv(); got != string(handshakeFail) {
		t.Errorf("the right token with no common version: %s", got)
	}
	r = dialRaw(t, sess.SocketPath())
	r.handshakeWith(sess.CapabilityToken())
	r.expectServing("1")
}

// S3 through the client: the client presents ClientOptions.CapabilityToken;
// without it, or with the token of another session (a process of one
// sandbox that found another sandbox's socket), the handshake is refused
// with an error that matches ErrDenied.
func TestClientPresentsItsCapabilityToken(t *testing.T) {
	srv := sessionServer(t, Options{Store: defaultStore(t)})
	a := startSession(t, srv, SessionOptions{Policy: grantAll})
	b := startSession(t, srv, SessionOptions{Policy: grantAll})
	ctx := t.Context()
	if _, err := sessionClient(t, a).GetToken(ctx, "anthropic", ""); err != nil {
		t.Fatalf("with the token: %v", err)
	}
	for name, opts := range map[string]ClientOptions{
		"no token":                {},
		"the other session's one": {CapabilityToken: b.CapabilityToken()},
	} {
		_, err := newTestClient(t, a.SocketPath(), opts).GetToken(ctx, "anthropic", "")
		var re *RemoteError
		if !errors.Is(err, ErrDenied) || !errors.As(err, &re) || re.Message != "invalid or missing capability token" {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// S5: closing a session revokes it. A connection that was served before
// is closed, its client's next call fails, the socket and directory are
// gone, and the server's other sessions go on.
func TestClosingASessionRevokesIt(t *testing.T) {
	srv := sessionServer(t, Options{Store: defaultStore(t)})
	sess := startSession(t, srv, SessionOptions{Policy: grantAll})
	other := startSession(t, srv, SessionOptions{Policy: grantAll})
	ctx := t.Context()
	client := sessionClient(t, sess)
	if _, err := client.GetToken(ctx, "anthropic", ""); err != nil {
		t.Fatal(err)
	}
	raw := dialRaw(t, sess.SocketPath())
	raw.handshakeWith(sess.CapabilityToken())
	if err := sess.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	raw.expectClosed()
	if _, err := client.GetToken(ctx, "anthropic", ""); err == nil {
		t.Error("a call after the session closed was served")
	}
	if _, err := os.Stat(sess.Dir()); !os.IsNotExist(err) {
		t.Errorf("session directory after Close: %v", err)
	}
	if err := sess.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := sessionClient(t, other).GetToken(ctx, "anthropic", ""); err != nil {
		t.Errorf("the other session after one closed: %v", err)
	}
}

// S5: a session closed while one of its requests waits on the store ends
// that request at once (its client's call fails, the store call's context
// ends) and Close returns when its goroutines have; another session's
// request waiting on the same store is not touched.
func TestClosingASessionEndsItsRequestsInFlight(t *testing.T) {
	gated := newGatedStore(defaultStore(t))
	srv := sessionServer(t, Options{Store: gated})
	sess := startSession(t, srv, SessionOptions{Policy: grantAll})
	other := startSession(t, srv, SessionOptions{Policy: grantAll})
	doomed := getTokenAsync(sessionClient(t, sess), "anthropic")
	spared := getTokenAsync(sessionClient(t, other), "anthropic")
	<-gated.entered
	<-gated.entered
	sess.Close()
	select {
	case err := <-doomed:
		if !errors.Is(err, ErrConnectionLost) {
			t.Errorf("the closed session's call: %v, want ErrConnectionLost", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the closed session's call is still waiting")
	}
	select {
	case err := <-spared:
		t.Fatalf("the other session's call ended: %v", err)
	default:
	}
	close(gated.gate)
	if err := <-spared; err != nil {
		t.Errorf("the other session's call: %v", err)
	}
}

// S5: Shutdown and Close of the server end every session: their
// directories are removed.
func TestServerShutdownEndsSessions(t *testing.T) {
	srv, err := NewServer(Options{Store: NewMemoryStore()})
	if err != nil {
		t.Fatal(err)
	}
	a := startSession(t, srv, SessionOptions{Policy: grantAll})
	b := startSession(t, srv, SessionOptions{Policy: grantAll})
	if err := srv.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*Session{a, b} {
		if _, err := os.Stat(s.Dir()); !os.IsNotExist(err) {
			t.Errorf("%s after Shutdown: %v", s.Dir(), err)
		}
	}
	if _, err := srv.NewSession(SessionOptions{Policy: grantAll, Dir: filepath.Join(testSocketDir(t), "s")}); !errors.Is(err, ErrServerClosed) {
		t.Errorf("NewSession after Shutdown: %v", err)
	}
}

// S9: each session has its own connection cap. One sandbox that holds
// more handshaken, idle connections than its cap is refused the extra
// ones, and every other session, and the plain socket, keep being served.
func TestOneSessionsConnectionFloodDoesNotLockOutAnother(t *testing.T) {
	logger, logs := debugLogger()
	srv := sessionServer(t, Options{Store: defaultStore(t), Logger: logger})
	flooded := startSession(t, srv, SessionOptions{Policy: grantAll, MaxConnections: 8})
	other := startSession(t, srv, SessionOptions{Policy: grantAll, MaxConnections: 8})
	for range 8 {
		dialRaw(t, flooded.SocketPath()).handshakeWith(flooded.CapabilityToken())
	}
	extra := dialRaw(t, flooded.SocketPath())
	// The server may have closed it before this write: either way, no reply.
	writeFrame(extra.c, []byte(`{"v":1,"op":"handshake","payload":{"capabilityToken":"`+string(flooded.CapabilityToken())+`","minVersion":1,"maxVersion":1}}`))
	extra.expectClosed()
	if !strings.Contains(logs.String(), `"session":"`+flooded.ID()+`"`) || !strings.Contains(logs.String(), "connection cap reached") {
		t.Errorf("the refused connection was not logged with its session:\n%s", logs)
	}
	// Silent connections beyond the cap push out each other, not the
	// session's handshaken ones, nor anyone else's.
	for range 20 {
		dialRaw(t, other.SocketPath())
	}
	r := dialRaw(t, other.SocketPath())
	r.handshakeWith(other.CapabilityToken())
	r.expectServing("1")
}

// S9: a session's rate budget is shared by its connections, on top of
// each connection's own limit.
func TestSessionRateBudgetIsShared(t *testing.T) {
	srv := sessionServer(t, Options{Store: defaultStore(t)})
	sess := startSession(t, srv, SessionOptions{Policy: grantAll, RateLimit: 0.001, RateBurst: 10})
	var limited, served int
	for range 2 {
		r := dialRaw(t, sess.SocketPath())
		r.handshakeWith(sess.CapabilityToken())
		for i := range 6 {
			r.send(`{"v":1,"id":"` + strconv.Itoa(i) + `","op":"has_api_key","payload":{"name":"openai"}}`)
			switch m := r.recvMap(); m["ok"] {
			case true:
				served++
			default:
				if m["code"] == string(CodeRateLimited) && m["retryAfter"].(float64) >= 1 {
					limited++
				}
			}
		}
	}
	if served != 10 || limited != 2 {
		t.Errorf("12 requests on two connections of a session with a burst of 10: %d served, %d rate limited", served, limited)
	}
}

// sessionSuite is a store with two providers, three tokens and two keys.
func sessionSuiteStore(t testing.TB) Store {
	return storeWith(t, map[string]string{
		"anthropic/default": anthropicToken,
		"anthropic/work":    `{"access_token":"work-access","refresh_token":"work-refresh"}`,
		"openai/default":    `{"access_token":"openai-access"}`,
	}, map[string]string{"openai": fakeAPIKey, "zeta": "sk-fake-zeta"})
}

func second[T any](_ T, err error) error { return err }

// S6: a session is read-only unless its grant allows writes: save_token
// and remove_token are refused with the reference's message and the
// host's token is untouched; with Write, a save merges (the host's refresh
// token stays) and a remove deletes.
func TestSessionWritesOnlyWhenGranted(t *testing.T) {
	st := sessionSuiteStore(t)
	srv := sessionServer(t, Options{Store: st})
	ctx := t.Context()
	before, _ := st.GetToken(ctx, "anthropic", "")
	ro := sessionClient(t, startSession(t, srv, SessionOptions{Policy: &Grant{Providers: []string{"anthropic"}}}))
	planted := mustToken(t, `{"access_token":"planted","expiry":99999999999}`)
	for what, err := range map[string]error{
		"save_token":   ro.SaveToken(ctx, "anthropic", "", planted),
		"remove_token": ro.RemoveToken(ctx, "anthropic", ""),
	} {
		var re *RemoteError
		if !errors.As(err, &re) || re.Code != CodeUnauthorized || re.Message != "sandbox connections cannot modify tokens" {
			t.Errorf("read-only %s: %v", what, err)
		}
	}
	if after, err := st.GetToken(ctx, "anthropic", ""); err != nil || !after.Equal(before) {
		t.Fatalf("the host's token changed under a read-only session: %v", err)
	}
	rw := sessionClient(t, startSession(t, srv, SessionOptions{Policy: &Grant{Providers: []string{"anthropic"}, Write: true}}))
	if err := rw.SaveToken(ctx, "anthropic", "", planted); err != nil {
		t.Fatal(err)
	}
	if after, _ := st.GetToken(ctx, "anthropic", ""); string(after.AccessToken()) != "planted" || after.RefreshToken() != before.RefreshToken() {
		t.Errorf("a granted save did not merge")
	}
	if err := rw.SaveToken(ctx, "openai", "", planted); !errors.Is(err, ErrDenied) {
		t.Errorf("a save outside the grant: %v", err)
	}
	if err := rw.RemoveToken(ctx, "anthropic", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := st.GetToken(ctx, "anthropic", ""); !errors.Is(err, ErrNotFound) {
		t.Errorf("a granted remove left the token: %v", err)
	}
}

// S7: a session that may write creates at most MaxNewTokens tokens (16 by
// default); updates of existing tokens are not counted, each session has
// its own count, and the refusal matches ErrDenied.
func TestSessionCreatesAtMostMaxNewTokens(t *testing.T) {
	st := NewMemoryStore()
	srv := sessionServer(t, Options{Store: st, RateLimit: -1})
	ctx := t.Context()
	writeAll := &Grant{Providers: []string{GrantAll}, Buckets: []string{GrantAll}, Write: true}
	tok := mustToken(t, `{"access_token":"x"}`)
	for _, tc := range []struct {
		max, want int
	}{{0, DefaultMaxNewTokens}, {5, 5}, {-1, 40}} {
		sess := startSession(t, srv, SessionOptions{Policy: writeAll, MaxNewTokens: tc.max, RateLimit: -1})
		c := sessionClient(t, sess)
		created := 0
		for i := range 40 {
			err := c.SaveToken(ctx, "p"+sess.ID(), "b"+strconv.Itoa(i), tok)
			switch {
			case err == nil:
				created++
			case !errors.Is(err, ErrDenied) || !strings.Contains(err.Error(), "this session may create no more tokens"):
				t.Fatalf("save %d: %v", i, err)
			}
		}
		if created != tc.want {
			t.Errorf("MaxNewTokens %d: created %d of 40, want %d", tc.max, created, tc.want)
		}
		if err := c.SaveToken(ctx, "p"+sess.ID(), "b0", tok); err != nil {
			t.Errorf("MaxNewTokens %d: updating a token it created: %v", tc.max, err)
		}
		buckets, _ := st.ListBuckets(ctx, "p"+sess.ID())
		if len(buckets) != tc.want {
			t.Errorf("MaxNewTokens %d: the store holds %d buckets, want %d", tc.max, len(buckets), tc.want)
		}
	}
}

// S7: a list never fails for its size. With more names than fit in a
// frame, the list answers as many, in order, as fit, and the host's log
// says it was cut short.
func TestListNeverFailsForSize(t *testing.T) {
	logger, logs := debugLogger()
	st := NewMemoryStore()
	ctx := t.Context()
	tok := mustToken(t, `{"access_token":"x"}`)
	for i := range 2000 {
		st.SaveToken(ctx, "anthropic", strings.Repeat("b", 60)+strconv.Itoa(1000+i), tok)
	}
	srv := sessionServer(t, Options{Store: st, Logger: logger})
	c := sessionClient(t, startSession(t, srv, SessionOptions{Policy: grantAll}))
	buckets, err := c.ListBuckets(ctx, "anthropic")
	if err != nil {
		t.Fatalf("list_buckets of 2000 long names: %v", err)
	}
	if len(buckets) < 900 || len(buckets) >= 2000 || !slices.IsSorted(buckets) || buckets[0] != strings.Repeat("b", 60)+"1000" {
		t.Errorf("got %d buckets, sorted %v", len(buckets), slices.IsSorted(buckets))
	}
	if !strings.Contains(logs.String(), "list cut short to fit a frame") {
		t.Errorf("no log of the cut:\n%s", logs)
	}
}

// S7 on the keyring store: the cross-process lock is taken only for
// tokens that exist or may be created, so a sandbox naming new tokens
// cannot leave a lock file per name in the store's directory.
func TestSandboxCannotFillTheStoresLockDirectory(t *testing.T) {
	dir := storeDir(t)
	st := openFileStore(t, dir)
	srv := sessionServer(t, Options{Store: st, RateLimit: -1})
	c := sessionClient(t, startSession(t, srv, SessionOptions{RateLimit: -1, MaxNewTokens: 3,
		Policy: &Grant{Providers: []string{GrantAll}, Buckets: []string{GrantAll}, Write: true}}))
	ctx := t.Context()
	tok := mustToken(t, `{"access_token":"x"}`)
	for i := range 30 {
		c.RemoveToken(ctx, "p", "absent"+strconv.Itoa(i))
		c.SaveToken(ctx, "p", "new"+strconv.Itoa(i), tok)
	}
	locks, err := os.ReadDir(filepath.Join(dir, lockDirName))
	if err != nil {
		t.Fatal(err)
	}
	if len(locks) > 3 {
		t.Errorf("%d lock files after 30 removes of absent tokens and 30 creations beyond a limit of 3", len(locks))
	}
}

// A grant that names tokens that do not exist gets NOT_FOUND for them,
// and nothing else changes.
func TestGrantOfAbsentNamesIsNotFound(t *testing.T) {
	srv := sessionServer(t, Options{Store: sessionSuiteStore(t)})
	c := sessionClient(t, startSession(t, srv, SessionOptions{Policy: &Grant{Providers: []string{"nobody"}, Keys: []string{"none"}}}))
	ctx := t.Context()
	if _, err := c.GetToken(ctx, "nobody", ""); !errors.Is(err, ErrNotFound) {
		t.Errorf("get_token of a granted absent provider: %v", err)
	}
	if _, err := c.GetAPIKey(ctx, "none"); !errors.Is(err, ErrNotFound) {
		t.Errorf("get_api_key of a granted absent key: %v", err)
	}
	if ok, err := c.HasAPIKey(ctx, "none"); ok || err != nil {
		t.Errorf("has_api_key of a granted absent key: %v %v", ok, err)
	}
}

// A server closes a connection idle past its session's IdleTimeout; the
// client, which had nothing pending, reconnects on its next call.
func TestClientReconnectsAfterTheServerClosedItAsIdle(t *testing.T) {
	srv := sessionServer(t, Options{Store: defaultStore(t)})
	sess := startSession(t, srv, SessionOptions{Policy: grantAll, IdleTimeout: 50 * time.Millisecond})
	c := sessionClient(t, sess)
	ctx := t.Context()
	if _, err := c.GetToken(ctx, "anthropic", ""); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	nc := c.cc.nc
	c.mu.Unlock()
	// Wait for the server to close it: the client's reader sees the end.
	for {
		c.mu.Lock()
		gone := c.cc == nil
		c.mu.Unlock()
		if gone {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := c.GetToken(ctx, "anthropic", ""); err != nil {
		t.Errorf("the call after the server's idle close: %v", err)
	}
	if _, err := nc.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) && err != io.EOF {
		t.Errorf("the old connection: %v", err)
	}
}

// S5: nothing of a closed session survives. 50 sessions, each with
// handshaken, refused and silent connections and a request waiting on
// the store when it closes, leave the process with the goroutines and file
// descriptors it had before, and no directory behind; the server serves a
// new session afterwards.
func TestSessionsLeaveNothingBehind(t *testing.T) {
	gated := newGatedStore(defaultStore(t))
	srv := sessionServer(t, Options{Store: gated})
	base := testSocketDir(t)
	goroutines, fds := resourceCounts()
	for i := range 50 {
		sess, err := srv.NewSession(SessionOptions{Policy: grantAll, Dir: filepath.Join(base, strconv.Itoa(i))})
		if err != nil {
			t.Fatal(err)
		}
		ok, _ := net.Dial("unix", sess.SocketPath())
		writeFrame(ok, []byte(`{"v":1,"op":"handshake","payload":{"capabilityToken":"`+string(sess.CapabilityToken())+`"}}`))
		readFrame(ok, nil)
		writeFrame(ok, []byte(`{"v":1,"id":"1","op":"get_token","payload":{"provider":"anthropic"}}`))
		<-gated.entered // the request waits on the store
		refused, _ := net.Dial("unix", sess.SocketPath())
		writeFrame(refused, []byte(`{"v":1,"op":"handshake"}`))
		silent, _ := net.Dial("unix", sess.SocketPath())
		sess.Close()
		for _, c := range []net.Conn{ok, refused, silent} {
			c.Close()
		}
	}
	waitUntil(t, func() bool {
		g, f := resourceCounts()
		return g <= goroutines && f <= fds
	})
	if entries, err := os.ReadDir(base); err != nil || len(entries) != 0 {
		t.Errorf("left in %s: %v %v", base, entries, err)
	}
	close(gated.gate)
	if _, err := sessionClient(t, startSession(t, srv, SessionOptions{Policy: grantAll})).GetToken(t.Context(), "anthropic", ""); err != nil {
		t.Errorf("a new session after 50 closed: %v", err)
	}
}

// S7: a sandbox that may write cannot grow a stored token without limit,
// one new member a save: a save whose merged token could no longer be
// served is refused, and the stored token is still served.
func TestSavesCannotGrowATokenWithoutLimit(t *testing.T) {
	st := sessionSuiteStore(t)
	srv := sessionServer(t, Options{Store: st, RateLimit: -1})
	c := sessionClient(t, startSession(t, srv, SessionOptions{RateLimit: -1,
		Policy: &Grant{Providers: []string{"anthropic"}, Write: true}}))
	ctx := t.Context()
	refused := 0
	for i := range 5 {
		err := c.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"a","pad`+strconv.Itoa(i)+`":"`+strings.Repeat("x", 20000)+`"}`))
		var re *RemoteError
		switch {
		case err == nil:
		case errors.As(err, &re) && re.Code == CodeInvalidRequest && re.Message == "token too large once merged with the stored one":
			refused++
		default:
			t.Fatalf("save %d: %v", i, err)
		}
	}
	if refused != 2 {
		t.Errorf("5 saves of 20 KB members each: %d refused, want 2", refused)
	}
	if tok, err := c.GetToken(ctx, "anthropic", ""); err != nil || len(tok.Names()) < 4 {
		t.Errorf("the stored token after the refusals: %v", err)
	}
	if stored, _ := st.GetToken(ctx, "anthropic", ""); len(stored.Reveal()) > maxSavedToken {
		t.Errorf("stored token of %d bytes", len(stored.Reveal()))
	}
}
