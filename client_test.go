package credproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeServer accepts one connection on a fresh socket and hands it to
// serve after answering the handshake as a real server does. It stands in
// for server behaviours the real server has but cannot be made to show on
// demand (answering out of order, dying mid-request).
func fakeServer(t *testing.T, serve func(c net.Conn)) string {
	t.Helper()
	path := filepath.Join(testSocketDir(t), "fake.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		if _, err := readFrame(c, nil); err != nil {
			return
		}
		if err := writeFrame(c, handshakeOK); err != nil {
			return
		}
		serve(c)
	})
	return path
}

// R24: responses are matched to calls by id, whatever their order.
func TestClientMatchesOutOfOrderResponses(t *testing.T) {
	path := fakeServer(t, func(c net.Conn) {
		var ids []string
		for range 3 {
			frame, err := readFrame(c, nil)
			if err != nil {
				return
			}
			req, _ := decodeRequest(frame)
			ids = append(ids, req.id)
		}
		// Answer in reverse order; each answer names its own id.
		for i := len(ids) - 1; i >= 0; i-- {
			data := fmt.Sprintf(`{"key":"key-for-%s"}`, ids[i])
			frame := appendOKStart(nil, ids[i])
			writeFrame(c, append(append(frame, data...), '}'))
		}
		readFrame(c, nil) // hold the connection until the client closes
	})
	c := newTestClient(t, path, ClientOptions{})
	if err := c.connectForTest(); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	results := make([]string, 3)
	for i := range 3 {
		wg.Go(func() {
			key, err := c.GetAPIKey(context.Background(), fmt.Sprintf("k%d", i))
			if err != nil {
				t.Error(err)
				return
			}
			results[i] = string(key)
		})
	}
	wg.Wait()
	seen := map[string]bool{}
	for _, r := range results {
		if !strings.HasPrefix(r, "key-for-") || seen[r] {
			t.Errorf("results %v: each call must get the answer to its own id", results)
		}
		seen[r] = true
	}
}

// connectForTest connects now, so that calls made concurrently afterwards
// share one connection.
func (c *Client) connectForTest() error {
	_, err := c.connect(context.Background())
	return err
}

// R29.3: when the connection is lost, every pending call fails promptly
// with ErrConnectionLost, and later calls fail the same way: nothing is
// retried and no new connection is made.
func TestClientFailsPendingCallsOnConnectionLoss(t *testing.T) {
	gated := newGatedStore(defaultStore(t))
	srv, path, _ := launchServer(t, Options{Store: gated})
	c := newTestClient(t, path, ClientOptions{})
	var pending []<-chan error
	for range 3 {
		pending = append(pending, getTokenAsync(c, "anthropic"))
	}
	for range 3 {
		<-gated.entered
	}
	srv.Close() // the host dies
	for _, got := range pending {
		if err := <-got; !errors.Is(err, ErrConnectionLost) ||
			err.Error() != "credproxy: credential proxy connection lost; restart the session" {
			t.Errorf("pending call: %v, want ErrConnectionLost", err)
		}
	}
	// A new server at the same path must not be trusted implicitly.
	srv2 := restartAt(t, path)
	defer srv2.Close()
	if _, err := c.HasAPIKey(context.Background(), "openai"); !errors.Is(err, ErrConnectionLost) {
		t.Errorf("call after the loss: %v, want ErrConnectionLost", err)
	}
	// A client that opted in reconnects.
	c2 := newTestClient(t, path, ClientOptions{Reconnect: true})
	if _, err := c2.HasAPIKey(context.Background(), "openai"); err != nil {
		t.Fatal(err)
	}
	srv2.Close()
	// A call made before the client notices the loss would fail with
	// ErrConnectionLost (nothing is retried); wait until it has noticed.
	waitUntil(t, func() bool { c2.mu.Lock(); defer c2.mu.Unlock(); return c2.cc == nil })
	srv3 := restartAt(t, path)
	defer srv3.Close()
	if _, err := c2.HasAPIKey(context.Background(), "openai"); err != nil {
		t.Errorf("Reconnect client after a loss: %v", err)
	}
}

func restartAt(t *testing.T, path string) *Server {
	t.Helper()
	srv, err := NewServer(Options{Store: defaultStore(t)})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := ListenPath(path)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	return srv
}

// R29.3: a server that dies in the middle of a response (a partial frame)
// fails the pending call with ErrConnectionLost.
func TestClientFailsOnPartialResponse(t *testing.T) {
	path := fakeServer(t, func(c net.Conn) {
		readFrame(c, nil)
		c.Write([]byte{0, 0, 1, 0, '{', '"'}) // 256 bytes announced, 2 sent
	})
	c := newTestClient(t, path, ClientOptions{})
	if _, err := c.GetAPIKey(context.Background(), "openai"); !errors.Is(err, ErrConnectionLost) {
		t.Errorf("GetAPIKey = %v, want ErrConnectionLost", err)
	}
}

// R24: many goroutines share one client, each getting its own answer; the
// client keeps within the server's in-flight cap, so none is refused.
func TestClientIsSafeForConcurrentCallers(t *testing.T) {
	st := NewMemoryStore()
	for i := range 50 {
		st.SaveToken(context.Background(), fmt.Sprintf("p%d", i), "", mustToken(t, fmt.Sprintf(`{"access_token":"at-%d","refresh_token":"rt"}`, i)))
	}
	_, path := startServer(t, Options{Store: st, RateLimit: -1})
	c := newTestClient(t, path, ClientOptions{})
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() {
			for range 20 {
				tok, err := c.GetToken(context.Background(), fmt.Sprintf("p%d", i), "")
				if err != nil || string(tok.AccessToken()) != fmt.Sprintf("at-%d", i) {
					t.Errorf("p%d: %v %q", i, err, string(tok.AccessToken()))
					return
				}
			}
		})
	}
	wg.Wait()
}

// R23.3: every code maps to its sentinel through errors.Is, and errors.As
// still yields the code and the retry delay.
func TestRemoteErrorsMatchSentinels(t *testing.T) {
	for code, want := range map[Code]error{
		CodeNotFound: ErrNotFound, CodeInvalidRequest: ErrInvalidRequest, CodeUnauthorized: ErrDenied,
		CodeRateLimited: ErrRateLimited, CodeInternalError: ErrInternal, CodeUnknownVersion: ErrUnknownVersion,
		CodeResourceExhausted: ErrResourceExhausted, CodeRefreshNotAvailable: ErrRefreshNotAvailable,
		CodeReauthRequired: ErrReauthRequired, CodeProviderNotFound: ErrProviderNotFound,
	} {
		var err error = fmt.Errorf("wrapped: %w", &RemoteError{Op: OpGetToken, Code: code, Message: "m"})
		if !errors.Is(err, want) {
			t.Errorf("%s does not match %v", code, want)
		}
		if errors.Is(err, ErrConnectionLost) || (code != CodeNotFound && errors.Is(err, ErrNotFound)) {
			t.Errorf("%s matches a sentinel of another code", code)
		}
	}
	// Over the wire, with the retry delay (which a client that retries
	// would wait out).
	_, path := startServer(t, Options{Store: defaultStore(t), RateLimit: 1, RateBurst: 1})
	c := newTestClient(t, path, ClientOptions{NoRateLimitRetry: true})
	c.HasAPIKey(context.Background(), "openai")
	_, err := c.HasAPIKey(context.Background(), "openai")
	var re *RemoteError
	if !errors.Is(err, ErrRateLimited) || !errors.As(err, &re) || re.RetryAfter != time.Second {
		t.Errorf("second call at 1 request/s: %v (%+v), want RATE_LIMITED with RetryAfter 1s", err, re)
	}
}

// F6: the codes the reference implementation's hosts send match the
// nearest sentinel, over a real socket: its denials ErrDenied, its
// failures on the host ErrInternal, its schema errors ErrInvalidRequest,
// a cancelled operation context.Canceled, a host that must log in again
// ErrReauthRequired, a provider it cannot serve ErrProviderNotFound, and
// a login session it no longer has (not found, expired, used) ErrNotFound.
// A code no implementation defines matches ErrInternal, the catch-all.
func TestClientMapsOtherImplementationsCodes(t *testing.T) {
	cases := []struct {
		code Code
		want error
	}{
		{"FORBIDDEN", ErrDenied}, {"PERMISSION_DENIED", ErrDenied}, {"ACCESS_DENIED", ErrDenied},
		{"REFRESH_FAILED", ErrInternal}, {"EXCHANGE_FAILED", ErrInternal}, {"POLL_FAILED", ErrInternal},
		{"FLOW_INITIATION_FAILED", ErrInternal}, {"RESPONSE_TOO_LARGE", ErrInternal}, {"GITHUB_ERROR", ErrInternal},
		{"HOST_GH_UNAVAILABLE", ErrInternal},
		{"INVALID_PARAM", ErrInvalidRequest}, {"UNKNOWN_OP", ErrInvalidRequest},
		{"CANCELLED", context.Canceled},
		{"HOST_AUTH_REQUIRED", ErrReauthRequired},
		{"PROVIDER_NOT_CONFIGURED", ErrProviderNotFound},
		{"SESSION_NOT_FOUND", ErrNotFound}, {"SESSION_EXPIRED", ErrNotFound}, {"SESSION_ALREADY_USED", ErrNotFound},
		{"SOMETHING_NEW", ErrInternal}, {"", ErrInternal},
	}
	path := fakeServer(t, func(c net.Conn) {
		for _, tc := range cases {
			frame, err := readFrame(c, nil)
			if err != nil {
				return
			}
			req, _ := decodeRequest(frame)
			writeFrame(c, fmt.Appendf(nil, `{"id":%q,"ok":false,"code":%q,"error":"fake-message"}`, req.id, tc.code))
		}
		readFrame(c, nil) // hold the connection until the client closes
	})
	c := newTestClient(t, path, ClientOptions{})
	sentinels := []error{ErrNotFound, ErrInvalidRequest, ErrDenied, ErrRateLimited, ErrInternal, ErrUnknownVersion,
		ErrResourceExhausted, ErrRefreshNotAvailable, ErrReauthRequired, ErrProviderNotFound, ErrConnectionLost,
		ErrProviderDenied, ErrBucketDenied, ErrKeyDenied, ErrReadOnly, context.Canceled, context.DeadlineExceeded}
	for _, tc := range cases {
		_, err := c.GetAPIKey(t.Context(), "openai")
		var re *RemoteError
		if !errors.As(err, &re) || re.Code != tc.code || re.Message != "fake-message" {
			t.Fatalf("%q: %v, want a RemoteError with that code", tc.code, err)
		}
		for _, s := range sentinels {
			if errors.Is(err, s) != (s == tc.want) {
				t.Errorf("%q: errors.Is(err, %v) = %v, want it to match %v alone", tc.code, s, !(s == tc.want), tc.want)
			}
		}
	}
}

// F6: a "denied" member that is not a string names no kind, and does not
// make the response malformed: the connection goes on.
func TestClientIgnoresADeniedMemberOfAnotherType(t *testing.T) {
	path := fakeServer(t, func(c net.Conn) {
		for _, answer := range []string{
			`{"id":%q,"ok":false,"code":"UNAUTHORIZED","error":"fake-message","denied":{"kind":"provider"}}`,
			`{"id":%q,"ok":false,"code":"UNAUTHORIZED","error":"fake-message","denied":"provider"}`,
			`{"id":%q,"ok":true,"data":{"exists":true}}`,
		} {
			frame, err := readFrame(c, nil)
			if err != nil {
				return
			}
			req, _ := decodeRequest(frame)
			writeFrame(c, fmt.Appendf(nil, answer, req.id))
		}
		readFrame(c, nil) // hold the connection until the client closes
	})
	c := newTestClient(t, path, ClientOptions{})
	_, err := c.HasAPIKey(t.Context(), "openai")
	var re *RemoteError
	if !errors.As(err, &re) || re.Denied != "" || !errors.Is(err, ErrDenied) || errors.Is(err, ErrProviderDenied) {
		t.Errorf("with an object for denied: %v (%+v), want UNAUTHORIZED of no kind", err, re)
	}
	if _, err := c.HasAPIKey(t.Context(), "openai"); !errors.Is(err, ErrProviderDenied) {
		t.Errorf("with denied \"provider\": %v, want ErrProviderDenied", err)
	}
	if ok, err := c.HasAPIKey(t.Context(), "openai"); err != nil || !ok {
		t.Errorf("next call: %v, %v; want the connection in sync", ok, err)
	}
}

// R2, R10: the client is a Store; the writes the protocol does not carry
// fail with the spec's message.
func TestClientRefusesAPIKeyWrites(t *testing.T) {
	var st Store = NewClient("/nonexistent", ClientOptions{})
	want := "credproxy: API key management is not available in sandbox mode; manage keys on the host"
	if err := st.SaveAPIKey(context.Background(), "k", "v"); !errors.Is(err, ErrHostOnly) || err.Error() != want {
		t.Errorf("SaveAPIKey = %v", err)
	}
	if err := st.RemoveAPIKey(context.Background(), "k"); !errors.Is(err, ErrHostOnly) {
		t.Errorf("RemoveAPIKey = %v", err)
	}
}

// A closed client fails calls with an error matching net.ErrClosed;
// Close is idempotent.
func TestClosedClientFailsCalls(t *testing.T) {
	_, path := startServer(t, Options{Store: defaultStore(t)})
	c := NewClient(path, ClientOptions{})
	if _, err := c.HasAPIKey(context.Background(), "openai"); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c.Close()
	if _, err := c.HasAPIKey(context.Background(), "openai"); !errors.Is(err, net.ErrClosed) {
		t.Errorf("call after Close = %v, want net.ErrClosed", err)
	}
}

// The client finds the socket through LLXPRT_CREDENTIAL_SOCKET, and says
// so when it is not set.
func TestNewClientFromEnv(t *testing.T) {
	t.Setenv(SocketEnv, "")
	if _, err := NewClientFromEnv(ClientOptions{}); err == nil || !strings.Contains(err.Error(), SocketEnv) {
		t.Errorf("without %s: %v", SocketEnv, err)
	}
	_, path := startServer(t, Options{Store: defaultStore(t)})
	t.Setenv(SocketEnv, path)
	c, err := NewClientFromEnv(ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if key, err := c.GetAPIKey(context.Background(), "openai"); err != nil || key != fakeAPIKey {
		t.Errorf("GetAPIKey = %v", err)
	}
}

// Dial connects and handshakes at once: a missing server is reported with
// its path, an incompatible one as ErrUnknownVersion.
func TestDialReportsMissingAndIncompatibleServers(t *testing.T) {
	missing := filepath.Join(testSocketDir(t), "none.sock")
	if _, err := Dial(context.Background(), missing, ClientOptions{}); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("Dial(missing) = %v, want an error naming the path", err)
	}
	path := filepath.Join(testSocketDir(t), "v2.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		readFrame(c, nil)
		writeFrame(c, handshakeFail)
	}()
	if _, err := Dial(context.Background(), path, ClientOptions{}); !errors.Is(err, ErrUnknownVersion) {
		t.Errorf("Dial(v2-only server) = %v, want ErrUnknownVersion", err)
	}
}
