package credproxy

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// anthropicToken is a stored token with a refresh token and
// provider-specific members whose exact form must survive: a big integer
// that float64 would round, a float with a trailing zero, a null, a nested
// object and a non-ASCII string.
const anthropicToken = `{"access_token":"` + fakeAccess + `","refresh_token":"` + fakeRefresh + `",` +
	`"expiry":9999999999,"token_type":"Bearer","scope":null,"account_id":"acct-42",` +
	`"big":12345678901234567890,"ratio":1.50,"nested":{"a":[1,2.0,"x"]},"name":"Zoë"}`

// The stored token as get_token must return it: every member but the
// refresh token, byte for byte.
const anthropicTokenSanitised = `{"access_token":"` + fakeAccess + `",` +
	`"expiry":9999999999,"token_type":"Bearer","scope":null,"account_id":"acct-42",` +
	`"big":12345678901234567890,"ratio":1.50,"nested":{"a":[1,2.0,"x"]},"name":"Zoë"}`

func defaultStore(t testing.TB) Store {
	return storeWith(t, map[string]string{
		"anthropic/default": anthropicToken,
		"anthropic/work":    `{"access_token":"work-access","refresh_token":"work-refresh"}`,
		"openai/default":    `{"access_token":"openai-access"}`,
		"gemini/default":    `{"access_token":"gemini-access"}`,
	}, map[string]string{"openai": fakeAPIKey, "anthropic": "sk-fake-other", "zeta": "sk-fake-zeta"})
}

// --- Socket (R3, R25) ---

// R3.1: the default socket path is
// {realpath(tmp)}/llxprt-cred-{uid}/llxprt-cred-{pid}-{8 hex}.sock.
func TestListenUsesDefaultPathPattern(t *testing.T) {
	ln, err := Listen("")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	tmp, err := filepath.EvalSymlinks(os.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	pattern := "^" + regexp.QuoteMeta(filepath.Join(tmp, fmt.Sprintf("llxprt-cred-%d", os.Getuid()))+string(filepath.Separator)+
		fmt.Sprintf("llxprt-cred-%d-", os.Getpid())) + "[0-9a-f]{8}\\.sock$"
	if path := ln.Addr().String(); !regexp.MustCompile(pattern).MatchString(path) {
		t.Errorf("socket path %s does not match %s", path, pattern)
	}
	dir, err := DefaultSocketDir()
	if err != nil || filepath.Dir(ln.Addr().String()) != dir {
		t.Errorf("DefaultSocketDir() = %q, %v; want the socket's directory", dir, err)
	}
}

// R3.1: two listeners in one process get different, unguessable names.
func TestListenNamesDifferEachTime(t *testing.T) {
	dir := testSocketDir(t)
	a, err := Listen(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := Listen(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if a.Addr().String() == b.Addr().String() {
		t.Errorf("both listeners at %s", a.Addr())
	}
}

// R3.2, R3.3: the socket directory is 0700 and the socket 0600.
func TestListenCreatesPrivateDirectoryAndSocket(t *testing.T) {
	dir := filepath.Join(testSocketDir(t), "new")
	ln, err := Listen(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	di, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := di.Mode().Perm(); got != 0o700 {
		t.Errorf("directory mode %#o, want 0700", got)
	}
	si, err := os.Stat(ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if si.Mode()&fs.ModeSocket == 0 || si.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want a socket with 0600", si.Mode())
	}
}

// R3.2, R25.1: an existing socket directory that is a symlink, writable by
// group or others, not a directory, or owned by another uid is refused
// with an error naming the path and the problem.
func TestListenRefusesUnsafeDirectory(t *testing.T) {
	base := testSocketDir(t)
	real := filepath.Join(base, "real")
	if err := os.Mkdir(real, 0o700); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	open := filepath.Join(base, "open")
	if err := os.Mkdir(open, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o775); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(base, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct{ dir, want string }{
		{link, "is a symbolic link"},
		{open, "writable by group or others"},
		{file, "not a directory"},
	}
	if os.Geteuid() == 0 {
		theirs := filepath.Join(base, "theirs")
		if err := os.Mkdir(theirs, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(theirs, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		cases = append(cases, struct{ dir, want string }{theirs, "is owned by uid 65534"})
	}
	for _, tc := range cases {
		ln, err := Listen(tc.dir)
		if err == nil {
			ln.Close()
			t.Errorf("Listen(%s) succeeded, want an error containing %q", tc.dir, tc.want)
			continue
		}
		if !strings.Contains(err.Error(), tc.dir) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Listen(%s) error %q, want the path and %q", tc.dir, err, tc.want)
		}
	}
}

// R3.4: a path longer than sun_path allows is refused before bind with its
// length and the limit, never truncated.
func TestListenPathRefusesTooLongPath(t *testing.T) {
	dir := testSocketDir(t)
	path := filepath.Join(dir, strings.Repeat("x", maxSocketPathLen-len(dir))+".sock")
	_, err := ListenPath(path)
	if err == nil {
		t.Fatalf("ListenPath of a %d-byte path succeeded", len(path))
	}
	for _, want := range []string{path, strconv.Itoa(len(path)), strconv.Itoa(maxSocketPathLen)} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("something was created at the long path: %v", err)
	}
	// The longest allowed path works.
	ok := filepath.Join(dir, strings.Repeat("y", maxSocketPathLen-len(dir)-1))
	ln, err := ListenPath(ok)
	if err != nil {
		t.Fatalf("ListenPath of a %d-byte path: %v", len(ok), err)
	}
	ln.Close()
}

// R25.4: a stale socket file (nothing accepts there) is removed and the
// server binds; a live one is refused with "address already in use".
func TestListenPathReplacesStaleSocketButNotLiveOne(t *testing.T) {
	dir := testSocketDir(t)
	path := filepath.Join(dir, "s.sock")
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close() // leaves the file, as a crashed server would
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("stale socket file missing: %v", err)
	}
	ln, err := ListenPath(path)
	if err != nil {
		t.Fatalf("ListenPath over a stale socket: %v", err)
	}
	defer ln.Close()

	_, err = ListenPath(path)
	if err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("ListenPath over a live socket: %v, want address already in use", err)
	}
	// The live server's socket is untouched.
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("live socket gone: %v", err)
	}
	c.Close()
}

// R25.2: stopping the server closes the listener, ends every connection and
// removes the socket file.
func TestShutdownRemovesSocketAndEndsConnections(t *testing.T) {
	srv, path, served := launchServer(t, Options{Store: defaultStore(t)})

	idle := dialRaw(t, path)
	idle.handshake()
	pending := dialRaw(t, path) // never handshakes

	if err := srv.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve returned %v, want ErrServerClosed", err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("socket file still there: %v", err)
	}
	idle.expectClosed()
	pending.expectClosed()
	if _, err := net.Dial("unix", path); err == nil {
		t.Error("dial after shutdown succeeded")
	}
}

// R25.2, R25.3: Shutdown and Close may be called twice and before Serve;
// Serve afterwards returns ErrServerClosed and closes its listener.
func TestStopIsIdempotentAndServeAfterStopFails(t *testing.T) {
	srv, err := NewServer(Options{Store: NewMemoryStore()})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := srv.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	ln, err := Listen(testSocketDir(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(ln); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve after Shutdown = %v, want ErrServerClosed", err)
	}
	if _, err := os.Lstat(ln.Addr().String()); !os.IsNotExist(err) {
		t.Errorf("Serve left its listener's socket behind: %v", err)
	}
}

// R25.3: Shutdown lets a request in flight finish and its response reach
// the client, while new connections are refused.
func TestShutdownLetsInFlightRequestFinish(t *testing.T) {
	gated := newGatedStore(defaultStore(t))
	srv, path, _ := launchServer(t, Options{Store: gated})
	c := newTestClient(t, path, ClientOptions{})
	got := getTokenAsync(c, "anthropic")
	<-gated.entered
	stopped := make(chan error, 1)
	go func() { stopped <- srv.Shutdown(context.Background()) }()
	// Shutdown closes the listener before it waits for the request.
	waitUntil(t, func() bool { _, err := os.Lstat(path); return os.IsNotExist(err) })
	close(gated.gate)
	if err := <-got; err != nil {
		t.Errorf("in-flight get_token failed: %v", err)
	}
	if err := <-stopped; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
}

// R25.3: when its context ends first, Shutdown closes everything and
// returns the context's error; the store call sees its context cancelled.
func TestShutdownContextExpiryForcesClose(t *testing.T) {
	gated := newGatedStore(defaultStore(t))
	srv, path, _ := launchServer(t, Options{Store: gated})
	c := newTestClient(t, path, ClientOptions{})
	got := getTokenAsync(c, "anthropic")
	<-gated.entered
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := srv.Shutdown(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Shutdown = %v, want context.Canceled", err)
	}
	if err := <-got; !errors.Is(err, ErrConnectionLost) {
		t.Errorf("pending call = %v, want ErrConnectionLost", err)
	}
}

// waitUntil polls cond, for state that changes in another goroutine with
// no event to wait on; it fails the test after 10s.
func waitUntil(t testing.TB, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

// --- Peer credentials (R4) ---

// R4: the policy sees the peer the kernel reported.
func TestPolicySeesPeerCredentials(t *testing.T) {
	peers := make(chan Peer, 1)
	policy := PolicyFunc(func(_ context.Context, req *Request) error {
		peers <- req.Peer
		return nil
	})
	_, path := startServer(t, Options{Store: defaultStore(t), Policy: policy})
	c := newTestClient(t, path, ClientOptions{})
	if _, err := c.HasAPIKey(t.Context(), "openai"); err != nil {
		t.Fatal(err)
	}
	p := <-peers
	uid, uidOK := p.UID()
	gid, gidOK := p.GID()
	pid, pidOK := p.PID()
	if !uidOK || uid != os.Geteuid() || !gidOK || gid != os.Getegid() || !pidOK || pid != os.Getpid() {
		t.Errorf("peer %v, want uid=%d gid=%d pid=%d", p, os.Geteuid(), os.Getegid(), os.Getpid())
	}
}

// --- Handshake (R6) ---

// R6.1, R6.2: compatible handshakes, including a later TypeScript client's
// v2 offer and the version-only form, get the version 1 reply.
func TestHandshakeAcceptsCompatibleVersions(t *testing.T) {
	_, path := startServer(t, Options{Store: defaultStore(t)})
	for _, hs := range []string{
		`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`,
		`{"v":2,"op":"handshake","payload":{"minVersion":1,"maxVersion":2,"capabilityToken":"x"}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":0,"maxVersion":99999999999999999999999}}`,
		`{"v":1,"op":"handshake"}`,
		`{"v":1,"op":"handshake","payload":null}`,
		`{"v":1,"op":"handshake","payload":{}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":null,"maxVersion":null}}`,
		`{"v":1,"op":"handshake","payload":"not an object"}`,
		`{"op":"handshake","v":1,"extra":[1,2,3],"id":"h1"}`,
	} {
		r := dialRaw(t, path)
		r.send(hs)
		if got := r.recv(); got != string(handshakeOK) {
			t.Errorf("handshake %s: reply %s, want %s", hs, got, handshakeOK)
		}
	}
}

// R6.3: an incompatible handshake gets UNKNOWN_VERSION and the connection
// is closed.
func TestHandshakeRefusesIncompatibleVersions(t *testing.T) {
	_, path := startServer(t, Options{Store: defaultStore(t)})
	for _, hs := range []string{
		`{"v":1,"op":"handshake","payload":{"minVersion":2,"maxVersion":3}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":0,"maxVersion":0}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":0}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":1}}`,
		`{"v":1,"op":"handshake","payload":{"maxVersion":1}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":1.0,"maxVersion":1}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1e0}}`,
		`{"v":1,"op":"handshake","payload":{"minVersion":"1","maxVersion":"1"}}`,
		`{"v":2,"op":"handshake"}`,
		`{"v":1.0,"op":"handshake"}`,
		`{"v":"1","op":"handshake"}`,
		`{"op":"handshake"}`,
	} {
		r := dialRaw(t, path)
		r.send(hs)
		if got := r.recv(); got != string(handshakeFail) {
			t.Errorf("handshake %s: reply %s, want %s", hs, got, handshakeFail)
		}
		r.expectClosed()
	}
}

// R6.1: a first frame that is not a handshake gets "handshake required",
// echoing its id, and the connection is closed; the request does not reach
// the store.
func TestRequestBeforeHandshakeIsRefused(t *testing.T) {
	st := defaultStore(t)
	_, path := startServer(t, Options{Store: st})
	r := dialRaw(t, path)
	r.send(`{"v":1,"id":"first","op":"save_token","payload":{"provider":"intruder","token":{"access_token":"planted"}}}`)
	wantFailure(t, r.recvMap(), "first", CodeInvalidRequest, "handshake required")
	r.expectClosed()
	if _, err := st.GetToken(t.Context(), "intruder", ""); !errors.Is(err, ErrNotFound) {
		t.Errorf("the pre-handshake save reached the store: %v", err)
	}

	r = dialRaw(t, path)
	r.send(`{"v":1,"op":"get_token"}`)
	wantFailure(t, r.recvMap(), "unknown", CodeInvalidRequest, "handshake required")
	r.expectClosed()

	r = dialRaw(t, path)
	r.send(`not json`)
	wantFailure(t, r.recvMap(), "unknown", CodeInvalidRequest, "")
	r.expectClosed()
}

// R6: after the handshake, another handshake is an unknown operation and
// the connection stays usable.
func TestSecondHandshakeIsUnknownOperation(t *testing.T) {
	_, path := startServer(t, Options{Store: defaultStore(t)})
	r := dialRaw(t, path)
	r.handshake()
	r.send(`{"v":1,"id":"h2","op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`)
	wantFailure(t, r.recvMap(), "h2", CodeInvalidRequest, "unknown operation")
	r.expectServing("after")
}

// --- Framing (R5) ---

// R5.1: frames split at every byte, header included, and frames sent
// together in one write are each answered.
func TestFramesSplitAnywhereAndConcatenatedAreRead(t *testing.T) {
	_, path := startServer(t, Options{Store: defaultStore(t)})
	r := dialRaw(t, path)
	r.handshake()
	var frame []byte
	for i := range 3 {
		req := fmt.Sprintf(`{"v":1,"id":"%d","op":"has_api_key","payload":{"name":"openai"}}`, i)
		frame = append(frame, startFrame(nil)...)
		frame = append(frame, req...)
		sealFrame(frame[len(frame)-len(req)-frameHeaderLen:])
	}
	for _, b := range frame[:len(frame)/3] { // the first frame, a byte at a time
		r.sendBytes([]byte{b})
	}
	r.sendBytes(frame[len(frame)/3:]) // the other two in one write
	var ids []string
	for range 3 {
		m := r.recvMap()
		ids = append(ids, m["id"].(string))
	}
	slices.Sort(ids)
	if !slices.Equal(ids, []string{"0", "1", "2"}) {
		t.Errorf("answered ids %v, want 0 1 2", ids)
	}
}

// R5.2, R5.4: a header over the limit, or of zero, gets one INVALID_REQUEST
// frame and the connection is closed, before and after the handshake.
func TestOversizeAndEmptyHeadersCloseTheConnection(t *testing.T) {
	_, path := startServer(t, Options{Store: defaultStore(t)})
	for _, tc := range []struct {
		header []byte
		msg    string
	}{
		{[]byte{0, 1, 0, 1}, "frame too large"}, // 65537
		{[]byte{0xff, 0xff, 0xff, 0xff}, "frame too large"},
		{[]byte{0, 0, 0, 0}, "empty frame"},
	} {
		for _, handshaken := range []bool{false, true} {
			r := dialRaw(t, path)
			if handshaken {
				r.handshake()
			}
			r.sendBytes(tc.header)
			wantFailure(t, r.recvMap(), "unknown", CodeInvalidRequest, tc.msg)
			r.expectClosed()
		}
	}
}

// R5.2: a frame of exactly the maximum size is read.
func TestMaximumSizeFrameIsAccepted(t *testing.T) {
	_, path := startServer(t, Options{Store: defaultStore(t)})
	r := dialRaw(t, path)
	r.handshake()
	req := `{"v":1,"id":"big","op":"has_api_key","payload":{"name":"openai"},"pad":"`
	req += strings.Repeat("p", MaxFrameSize-len(req)-2) + `"}`
	if len(req) != MaxFrameSize {
		t.Fatalf("request is %d bytes", len(req))
	}
	r.send(req)
	if got := r.recv(); got != `{"id":"big","ok":true,"data":{"exists":true}}` {
		t.Errorf("reply %s", got)
	}
}

// R5: a complete frame that is not a JSON object gets INVALID_REQUEST with
// id "unknown", and the connection stays in sync and open.
func TestMalformedFramesAfterHandshakeKeepConnectionOpen(t *testing.T) {
	_, path := startServer(t, Options{Store: defaultStore(t)})
	r := dialRaw(t, path)
	r.handshake()
	for _, bad := range []string{
		`not json`,
		`[1,2,3]`,
		`"string"`,
		`{"v":1,"id":"x","op":"get_token"`,
		`{"v":1,"id":"x","op":"get_token"} trailing`,
		"{\"v\":1,\"id\":\"x\",\"op\":\"get_\xfftoken\"}",
		`{"v":1,"id":"x","op":"get_token","payload":{"provider":"a","provider":"b"}}`,
		`{"v":1,"id":"x","id":"y","op":"get_token"}`,
		`{"v":1,"id":"x","op":"save_token","payload":{"provider":"a","token":{"access_token":"t","x":{"k":1,"k":2}}}}`,
		strings.Repeat("[", 20000) + strings.Repeat("]", 20000),
	} {
		r.send(bad)
		wantFailure(t, r.recvMap(), "unknown", CodeInvalidRequest, "")
	}
	r.expectServing("ok")
}

// --- Requests (R6.4, R7, R23) ---

// R6.4: ids are echoed; an integer id as its decimal string; a missing,
// empty, too long or otherwise typed id gets id "unknown".
func TestRequestIDsAreEchoedOrUnknown(t *testing.T) {
	_, path := startServer(t, Options{Store: defaultStore(t)})
	r := dialRaw(t, path)
	r.handshake()
	long := strings.Repeat("i", maxIDLen)
	for _, tc := range []struct{ id, want string }{
		{`"abc"`, "abc"},
		{`"` + long + `"`, long},
		{`42`, "42"},
		{`-7`, "-7"},
		{`123456789012345678901234567890`, "123456789012345678901234567890"},
		{`"\u00e9\n"`, "é\n"},
	} {
		r.send(`{"v":1,"id":` + tc.id + `,"op":"has_api_key","payload":{"name":"openai"}}`)
		if m := r.recvMap(); m["ok"] != true || m["id"] != tc.want {
			t.Errorf("id %s: response %v, want ok with id %q", tc.id, m, tc.want)
		}
	}
	for _, id := range []string{`""`, `1.5`, `1e3`, `true`, `null`, `{"a":1}`, `["x"]`, `"` + long + `x"`} {
		r.send(`{"v":1,"id":` + id + `,"op":"has_api_key","payload":{"name":"openai"}}`)
		wantFailure(t, r.recvMap(), "unknown", CodeInvalidRequest, "id must be a non-empty string or an integer")
	}
	r.send(`{"v":1,"op":"has_api_key","payload":{"name":"openai"}}`)
	wantFailure(t, r.recvMap(), "unknown", CodeInvalidRequest, "id must be a non-empty string or an integer")
}

// R7.1, R7.2: payloads are validated, field by field, before any store call;
// messages name the member, never its value.
func TestInvalidPayloadsAreRefusedBeforeTheStore(t *testing.T) {
	// Every store call would hang for an hour: an answer proves the
	// request was refused without one.
	hung := newGatedStore(defaultStore(t))
	_, path := startServer(t, Options{Store: hung, StoreTimeout: time.Hour})
	r := dialRaw(t, path)
	r.handshake()
	secretish := "VALUE-" + fakeRefresh
	for _, tc := range []struct{ op, payload, msg string }{
		{"get_token", `{}`, "provider is required"},
		{"get_token", `{"provider":""}`, "provider is required"},
		{"get_token", `{"provider":null}`, "provider is required"},
		{"get_token", `{"provider":7}`, "provider must be a string"},
		{"get_token", `{"provider":"` + secretish + `/x"}`, "provider must match ^[A-Za-z0-9._@-]{1,64}$"},
		{"get_token", `{"provider":"a b"}`, "provider must match ^[A-Za-z0-9._@-]{1,64}$"},
		{"get_token", `{"provider":"` + strings.Repeat("a", 65) + `"}`, "provider must match ^[A-Za-z0-9._@-]{1,64}$"},
		{"get_token", `{"provider":"anthropic","bucket":""}`, "bucket must match ^[A-Za-z0-9._@-]{1,64}$"},
		{"get_token", `{"provider":"anthropic","bucket":"../x"}`, "bucket must match ^[A-Za-z0-9._@-]{1,64}$"},
		{"get_token", `{"provider":"anthropic","bucket":["x"]}`, "bucket must be a string"},
		{"get_token", `{"Provider":"anthropic"}`, `unknown payload member "Provider"`},
		{"get_token", `{"provider":"anthropic","extra":1}`, `unknown payload member "extra"`},
		{"get_token", `{"provider":"anthropic","bad name!":1}`, "unknown payload member"},
		{"save_token", `{"provider":"anthropic"}`, "token is required"},
		{"save_token", `{"provider":"anthropic","token":null}`, "token is required"},
		{"save_token", `{"provider":"anthropic","token":"` + secretish + `"}`, "token: must be a JSON object"},
		{"save_token", `{"provider":"anthropic","token":{}}`, "token: access_token is required"},
		{"save_token", `{"provider":"anthropic","token":{"access_token":""}}`, "token: access_token must be a non-empty string"},
		{"save_token", `{"provider":"anthropic","token":{"access_token":5}}`, "token: access_token must be a non-empty string"},
		{"save_token", `{"provider":"anthropic","token":{"access_token":"a","refresh_token":5}}`, "token: refresh_token must be a string"},
		{"save_token", `{"provider":"anthropic","token":{"access_token":"a","expiry":"` + secretish + `"}}`, "token: expiry must be Unix seconds (a number) or an RFC 3339 time"},
		{"list_buckets", `{}`, "provider is required"},
		{"list_buckets", `{"provider":"anthropic","bucket":"default"}`, `unknown payload member "bucket"`},
		{"get_api_key", `{"name":"` + secretish + `!"}`, "name must match ^[A-Za-z0-9._@-]{1,64}$"},
		{"has_api_key", `{}`, "name is required"},
		{"list_providers", `{"provider":"anthropic"}`, `unknown payload member "provider"`},
		{"list_api_keys", `{"x":null}`, `unknown payload member "x"`},
		{"get_token", `[]`, "payload must be an object"},
		{"get_token", `"anthropic"`, "payload must be an object"},
	} {
		r.send(`{"v":1,"id":"v","op":"` + tc.op + `","payload":` + tc.payload + `}`)
		got := r.recv()
		if strings.Contains(got, "VALUE-") {
			t.Errorf("%s %s: response quotes the value: %s", tc.op, tc.payload, got)
		}
		var m map[string]any
		if err := jsonUnmarshal(got, &m); err != nil {
			t.Fatal(err)
		}
		wantFailure(t, m, "v", CodeInvalidRequest, tc.msg)
	}
	select {
	case <-hung.entered:
		t.Error("an invalid request reached the store")
	default:
	}
}

// R6.4: member names match exactly and unknown envelope members are
// ignored; null for an optional member means absent.
func TestEnvelopeNamesAreExactAndNullMeansAbsent(t *testing.T) {
	_, path := startServer(t, Options{Store: defaultStore(t)})
	r := dialRaw(t, path)
	r.handshake()
	r.send(`{"v":1,"id":"a","OP":"get_token","payload":{"provider":"anthropic"}}`)
	wantFailure(t, r.recvMap(), "a", CodeInvalidRequest, "op must be a string")
	r.send(`{"v":1,"ID":"b","op":"get_token","payload":{"provider":"anthropic"}}`)
	wantFailure(t, r.recvMap(), "unknown", CodeInvalidRequest, "")
	r.send(`{"v":1,"id":"c","op":"Get_Token","payload":{"provider":"anthropic"}}`)
	wantFailure(t, r.recvMap(), "c", CodeInvalidRequest, "unknown operation")
	r.send(`{"v":99,"id":"d","op":"get_token","future":{"x":1},"payload":{"provider":"anthropic","bucket":null}}`)
	if got := r.recv(); got != `{"id":"d","ok":true,"data":`+anthropicTokenSanitised+`}` {
		t.Errorf("get_token with null bucket and unknown envelope member: %s", got)
	}
	r.send(`{"v":1,"id":"e","op":"list_providers"}`)
	if got := r.recv(); got != `{"id":"e","ok":true,"data":{"providers":["anthropic","gemini","openai"]}}` {
		t.Errorf("list_providers without payload: %s", got)
	}
	r.send(`{"v":1,"id":"f","op":"list_providers","payload":null}`)
	if m := r.recvMap(); m["ok"] != true {
		t.Errorf("list_providers with null payload: %v", m)
	}
}

// --- Operations (R8, R9, R10, R12) ---

// The operations as served from a store (get_token, save_token's merge,
// remove_token, lists, API keys, not-found, concurrent saves) are tested
// by credproxytest.TestServer, on every store (suites_test.go).

// R8.4, R23.5: when the store fails, remove_token still succeeds, lists are
// empty, reads are INTERNAL_ERROR, and the store's error text (which here
// quotes secrets) reaches neither the client nor, unredacted, the log.
func TestStoreFailuresAreDegradedAndNeverLeak(t *testing.T) {
	logger, logs := debugLogger()
	_, path := startServer(t, Options{Store: brokenStore{}, Logger: logger})
	c := newTestClient(t, path, ClientOptions{})
	ctx := t.Context()
	if err := c.RemoveToken(ctx, "anthropic", ""); err != nil {
		t.Errorf("RemoveToken with a failing store = %v, want success", err)
	}
	for name, list := range map[string]func() ([]string, error){
		"providers": func() ([]string, error) { return c.ListProviders(ctx) },
		"buckets":   func() ([]string, error) { return c.ListBuckets(ctx, "anthropic") },
		"keys":      func() ([]string, error) { return c.ListAPIKeys(ctx) },
	} {
		if got, err := list(); err != nil || got == nil || len(got) != 0 {
			t.Errorf("list %s with a failing store = %v, %v; want [] and no error", name, got, err)
		}
	}
	var errs []error
	_, err := c.GetToken(ctx, "anthropic", "")
	errs = append(errs, err)
	_, err = c.GetAPIKey(ctx, "openai")
	errs = append(errs, err)
	_, err = c.HasAPIKey(ctx, "openai")
	errs = append(errs, err)
	errs = append(errs, c.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"`+fakeAccess+`"}`)))
	for _, err := range errs {
		if !errors.Is(err, ErrInternal) || err.Error() != "credproxy: "+string(opOf(err))+": credential store error (INTERNAL_ERROR)" {
			t.Errorf("error %v, want INTERNAL_ERROR with the fixed text", err)
		}
	}
	log := logs.String()
	if !strings.Contains(log, "store error") {
		t.Errorf("store errors not logged:\n%s", log)
	}
	for _, secret := range []string{fakeRefresh, fakeAPIKey, fakeAccess} {
		if strings.Contains(log, secret) {
			t.Errorf("log contains %q:\n%s", secret, log)
		}
	}
}

func opOf(err error) Op {
	var re *RemoteError
	if errors.As(err, &re) {
		return re.Op
	}
	return ""
}

// refresh_token: a server without refreshers answers PROVIDER_NOT_FOUND.
func TestRefreshWithoutRefresherIsProviderNotFound(t *testing.T) {
	_, path := startServer(t, Options{Store: defaultStore(t)})
	r := dialRaw(t, path)
	r.handshake()
	r.send(`{"v":1,"id":"r","op":"refresh_token","payload":{"provider":"anthropic"}}`)
	wantFailure(t, r.recvMap(), "r", CodeProviderNotFound, "")
}

// --- Policy (R21) ---

// R21.1, R21.2: requests for providers, buckets or API keys outside the
// allow-list are UNAUTHORIZED, with a message naming the kind of name.
func TestAllowListScopesRequests(t *testing.T) {
	policy := &AllowList{Providers: []string{"anthropic"}, Buckets: []string{"default"}, Keys: []string{"openai"}}
	_, path := startServer(t, Options{Store: defaultStore(t), Policy: policy})
	r := dialRaw(t, path)
	r.handshake()
	for _, tc := range []struct{ op, payload, msg string }{
		{"get_token", `{"provider":"openai"}`, "provider not allowed"},
		{"get_token", `{"provider":"anthropic","bucket":"work"}`, "bucket not allowed"},
		{"save_token", `{"provider":"openai","token":{"access_token":"x"}}`, "provider not allowed"},
		{"remove_token", `{"provider":"anthropic","bucket":"work"}`, "bucket not allowed"},
		{"get_bucket_stats", `{"provider":"gemini"}`, "provider not allowed"},
		{"list_buckets", `{"provider":"openai"}`, "provider not allowed"},
		{"get_api_key", `{"name":"anthropic"}`, "API key not allowed"},
		{"has_api_key", `{"name":"zeta"}`, "API key not allowed"},
		{"refresh_token", `{"provider":"gemini"}`, "provider not allowed"},
	} {
		r.send(`{"v":1,"id":"p","op":"` + tc.op + `","payload":` + tc.payload + `}`)
		wantFailure(t, r.recvMap(), "p", CodeUnauthorized, tc.msg)
	}
	c := newTestClient(t, path, ClientOptions{})
	if _, err := c.GetToken(t.Context(), "openai", ""); !errors.Is(err, ErrDenied) {
		t.Errorf("GetToken(openai) = %v, want ErrDenied", err)
	}
	if _, err := c.GetToken(t.Context(), "anthropic", ""); err != nil {
		t.Errorf("GetToken(anthropic) = %v", err)
	}
}

// R21.3: lists are filtered through the policy, each kind of name against
// its own set only. S6: a provider is listed only if the client may use
// one of its buckets (openai has none but "default", which is not allowed).
func TestAllowListFiltersLists(t *testing.T) {
	policy := &AllowList{Providers: []string{"anthropic", "openai"}, Buckets: []string{"work"}, Keys: []string{"zeta", "gemini"}}
	_, path := startServer(t, Options{Store: defaultStore(t), Policy: policy})
	c := newTestClient(t, path, ClientOptions{})
	ctx := t.Context()
	if got, err := c.ListProviders(ctx); err != nil || !slices.Equal(got, []string{"anthropic"}) {
		t.Errorf("ListProviders = %v, %v", got, err)
	}
	if got, err := c.ListBuckets(ctx, "anthropic"); err != nil || !slices.Equal(got, []string{"work"}) {
		t.Errorf("ListBuckets = %v, %v", got, err)
	}
	// "anthropic" and "openai" are allowed providers, not allowed keys.
	if got, err := c.ListAPIKeys(ctx); err != nil || !slices.Equal(got, []string{"zeta"}) {
		t.Errorf("ListAPIKeys = %v, %v", got, err)
	}
}

// R21: a host's own policy decides per request and can change scope at
// run time; any error it returns denies with a generic message.
func TestCustomPolicyDecidesPerRequest(t *testing.T) {
	var mu sync.Mutex
	profile := "anthropic"
	policy := PolicyFunc(func(_ context.Context, req *Request) error {
		mu.Lock()
		defer mu.Unlock()
		if req.Provider != "" && req.Provider != profile {
			return errors.New("profile " + profile + " does not include " + req.Provider)
		}
		return nil
	})
	_, path := startServer(t, Options{Store: defaultStore(t), Policy: policy})
	c := newTestClient(t, path, ClientOptions{})
	if _, err := c.GetToken(t.Context(), "anthropic", ""); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	profile = "openai"
	mu.Unlock()
	_, err := c.GetToken(t.Context(), "anthropic", "")
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != CodeUnauthorized || re.Message != "request not allowed" {
		t.Errorf("after the profile switch: %v, want UNAUTHORIZED with a generic message", err)
	}
	if got, _ := c.ListProviders(t.Context()); !slices.Equal(got, []string{"openai"}) {
		t.Errorf("ListProviders after the switch = %v", got)
	}
}

// --- Limits (R22, R5.3) ---

// R22.1: requests past a burst of 60 on one connection are RATE_LIMITED
// with a retryAfter of at least one second; the handshake does not count. (The
// in-flight cap is raised so that it cannot answer first; the burst is one
// write, read at once, so the bucket has no time to refill.
// TestRateLimitAtFixedInstant checks the same with a frozen clock.)
func TestBurstOverRateLimitIsRefused(t *testing.T) {
	// A MemoryStore whatever the suite runs on: a slow store would slow the
	// reading of the burst, and the bucket refills in real time.
	st := NewMemoryStore()
	st.SaveAPIKey(t.Context(), "openai", fakeAPIKey)
	_, path := startServer(t, Options{Store: st, MaxInFlight: 100})
	r := dialRaw(t, path)
	r.handshake()
	const burst = 70
	var frames []byte
	for i := range burst {
		req := fmt.Sprintf(`{"v":1,"id":"%d","op":"has_api_key","payload":{"name":"openai"}}`, i)
		f, _ := sealFrame(append(startFrame(nil), req...))
		frames = append(frames, f...)
	}
	r.sendBytes(frames) // one write: the requests arrive as one burst
	limited := map[string]float64{}
	for range burst {
		m := r.recvMap()
		if m["ok"] == false {
			if m["code"] != string(CodeRateLimited) {
				t.Fatalf("failure %v", m)
			}
			limited[m["id"].(string)] = m["retryAfter"].(float64)
		}
	}
	for i := range defaultRateBurst {
		if _, ok := limited[strconv.Itoa(i)]; ok {
			t.Errorf("request %d of the burst was limited", i)
		}
	}
	// The bucket refills at 60/s of real time while the burst is read, so
	// on a loaded machine a request or two past the 60th may still pass;
	// TestRateLimitAtFixedInstant pins the 61st exactly on a frozen clock.
	if len(limited) == 0 {
		t.Errorf("none of the %d requests past the burst of %d was limited", burst-defaultRateBurst, defaultRateBurst)
	}
	for id, after := range limited {
		if after < 1 || after != float64(int(after)) {
			t.Errorf("request %s: retryAfter %v, want a whole number >= 1", id, after)
		}
	}
	c := newTestClient(t, path, ClientOptions{})
	if _, err := c.HasAPIKey(t.Context(), "openai"); err != nil {
		t.Errorf("another connection was limited too: %v", err)
	}
}

// R22: a negative RateLimit switches the limit off: 16 callers sharing one
// connection make 1,000 calls without a refusal.
func TestRateLimitCanBeSwitchedOff(t *testing.T) {
	_, path := startServer(t, Options{Store: defaultStore(t), RateLimit: -1})
	c := newTestClient(t, path, ClientOptions{})
	var wg sync.WaitGroup
	for range DefaultMaxInFlight {
		wg.Go(func() {
			for range 1000 / DefaultMaxInFlight {
				if _, err := c.ListAPIKeys(context.Background()); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
}

// In-flight cap: while 16 requests of one connection wait on the store, a
// 17th is RESOURCE_EXHAUSTED; they all complete once the store answers.
func TestSeventeenthRequestInFlightIsRefused(t *testing.T) {
	gated := newGatedStore(defaultStore(t))
	_, path := startServer(t, Options{Store: gated})
	r := dialRaw(t, path)
	r.handshake()
	for i := range DefaultMaxInFlight {
		r.send(fmt.Sprintf(`{"v":1,"id":"%d","op":"get_token","payload":{"provider":"anthropic"}}`, i))
	}
	for range DefaultMaxInFlight {
		<-gated.entered
	}
	r.send(`{"v":1,"id":"17th","op":"get_token","payload":{"provider":"anthropic"}}`)
	wantFailure(t, r.recvMap(), "17th", CodeResourceExhausted, "")
	close(gated.gate)
	for range DefaultMaxInFlight {
		if m := r.recvMap(); m["ok"] != true {
			t.Errorf("response %v", m)
		}
	}
}

// Connection cap: connections that never complete a handshake cannot lock
// a new client out (the oldest is dropped); when every connection has
// completed its handshake, a new one is refused.
func TestConnectionCapDropsOldestPendingConnection(t *testing.T) {
	logger, logs := debugLogger()
	_, path := startServer(t, Options{Store: defaultStore(t), MaxConnections: 4, Logger: logger})
	var silent []*rawConn
	for range 4 {
		silent = append(silent, dialRaw(t, path))
	}
	c := newTestClient(t, path, ClientOptions{})
	if _, err := c.HasAPIKey(t.Context(), "openai"); err != nil {
		t.Fatalf("client locked out by silent connections: %v", err)
	}
	silent[0].expectClosed() // the oldest made room

	// Fill the rest with handshaken connections: now nobody can be dropped.
	for _, s := range silent[1:] {
		s.handshake()
	}
	late := dialRaw(t, path)
	late.expectClosed()
	if !strings.Contains(logs.String(), "connection cap reached") {
		t.Errorf("refusal not logged:\n%s", logs)
	}
	if _, err := c.HasAPIKey(t.Context(), "openai"); err != nil {
		t.Errorf("established client disturbed: %v", err)
	}
}

// A client that never reads its responses is disconnected once a write
// has waited WriteTimeout, and the server goes on serving others.
func TestPeerThatNeverReadsIsDisconnected(t *testing.T) {
	big := `{"access_token":"` + strings.Repeat("x", 60000) + `"}`
	st := storeWith(t, map[string]string{"big/default": big}, nil)
	srv, path := startServer(t, Options{Store: st, WriteTimeout: 200 * time.Millisecond})
	r := dialRaw(t, path)
	r.handshake()
	// Ten 60 KB answers overflow the socket buffers, so the server's writes
	// block; the peer reads none of them.
	var burst []byte
	for i := range 10 {
		f, _ := sealFrame(append(startFrame(nil), fmt.Sprintf(`{"v":1,"id":"%d","op":"get_token","payload":{"provider":"big"}}`, i)...))
		burst = append(burst, f...)
	}
	r.sendBytes(burst)
	waitUntil(t, func() bool { return serverConns(srv) == 0 })

	c := newTestClient(t, path, ClientOptions{})
	if _, err := c.GetToken(t.Context(), "big", ""); err != nil {
		t.Errorf("server stopped serving others: %v", err)
	}
}

// R5.3: a response that would exceed the frame limit is INTERNAL_ERROR
// "response too large", and the connection goes on.
func TestOversizeResponseIsInternalError(t *testing.T) {
	big := `{"access_token":"` + strings.Repeat("x", MaxFrameSize) + `"}`
	st := storeWith(t, map[string]string{"big/default": big}, nil)
	_, path := startServer(t, Options{Store: st})
	c := newTestClient(t, path, ClientOptions{})
	_, err := c.GetToken(t.Context(), "big", "")
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != CodeInternalError || re.Message != "response too large" {
		t.Errorf("GetToken(big) = %v, want INTERNAL_ERROR response too large", err)
	}
	if _, err := c.HasAPIKey(t.Context(), "x"); err != nil {
		t.Errorf("next call: %v", err)
	}
}

// --- Logging (R28) ---

// R28: each request is logged at debug with op, names, peer, code and
// duration, and no secret appears in any record.
func TestAuditLogRecordsRequestsWithoutSecrets(t *testing.T) {
	logger, logs := debugLogger()
	policy := &AllowList{Keys: []string{"openai"}}
	_, path := startServer(t, Options{Store: defaultStore(t), Logger: logger, Policy: policy})
	c := newTestClient(t, path, ClientOptions{})
	ctx := t.Context()
	c.GetToken(ctx, "anthropic", "")
	c.GetToken(ctx, "missing", "b")
	c.GetAPIKey(ctx, "openai")
	c.GetAPIKey(ctx, "zeta")
	c.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"`+fakeAccess+`-new","refresh_token":"`+fakeRefresh+`"}`))

	type record struct {
		Level, Msg, Op, Provider, Bucket, Key, Code string
		Peer                                        struct{ UID, PID int }
		Duration                                    int64
	}
	var records []record
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var rec record
		if err := jsonUnmarshalCaseless(line, &rec); err != nil {
			t.Fatalf("log line %s: %v", line, err)
		}
		if rec.Msg == "credproxy: request" || rec.Msg == "credproxy: refused" {
			records = append(records, rec)
		}
	}
	// One record a request: at debug level, or at info level for the
	// refusal (S11), which has no duration.
	want := []struct{ level, op, provider, bucket, key, code string }{
		{"DEBUG", "get_token", "anthropic", "default", "", "OK"},
		{"DEBUG", "get_token", "missing", "b", "", "NOT_FOUND"},
		{"DEBUG", "get_api_key", "", "", "openai", "OK"},
		{"INFO", "get_api_key", "", "", "zeta", "UNAUTHORIZED"},
		{"DEBUG", "save_token", "anthropic", "default", "", "OK"},
	}
	if len(records) != len(want) {
		t.Fatalf("%d request records, want %d:\n%s", len(records), len(want), logs)
	}
	for i, w := range want {
		r := records[i]
		if r.Level != w.level || r.Op != w.op || r.Provider != w.provider || r.Bucket != w.bucket || r.Key != w.key ||
			r.Code != w.code || r.Peer.UID != os.Geteuid() || r.Peer.PID != os.Getpid() || (r.Duration <= 0) != (w.level == "INFO") {
			t.Errorf("record %d: %+v, want %+v", i, r, w)
		}
	}
	for _, secret := range []string{fakeAccess, fakeRefresh, fakeAPIKey} {
		if strings.Contains(logs.String(), secret) {
			t.Errorf("log contains %q", secret)
		}
	}
}

// R28: a logger above debug level receives no record for a request that
// went well.
func TestRequestsAreNotLoggedAboveDebugLevel(t *testing.T) {
	var logs logBuffer
	quiet := slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	_, path := startServer(t, Options{Store: defaultStore(t), Logger: quiet})
	c := newTestClient(t, path, ClientOptions{})
	if _, err := c.GetToken(t.Context(), "anthropic", ""); err != nil {
		t.Fatal(err)
	}
	if logs.String() != "" {
		t.Errorf("warn-level logger received %s", logs.String())
	}
}

// --- Options ---

// NewServer refuses a nil store and negative limits with errors that say
// what to do.
func TestNewServerValidatesOptions(t *testing.T) {
	if _, err := NewServer(Options{}); err == nil || !strings.Contains(err.Error(), "Store is nil") {
		t.Errorf("NewServer without a store: %v", err)
	}
	if _, err := NewServer(Options{Store: NewMemoryStore(), MaxConnections: -1}); err == nil {
		t.Error("NewServer with a negative limit succeeded")
	}
}
