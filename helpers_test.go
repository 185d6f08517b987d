package credproxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-json-experiment/json"
)

// Obviously fake credentials used across the tests. Each is long and
// unique, so that a scan of bytes or text for it cannot match by accident.
const (
	fakeAccess  = "fake-access-token-AAAA1111"
	fakeRefresh = "fake-refresh-token-RRRR9999-must-never-leave-the-host"
	fakeAPIKey  = "sk-fake-api-key-KKKK5555"
)

// testSocketDir returns a new private directory with a short path: the
// test name that t.TempDir puts in its path can push a socket path past
// macOS's 103 usable bytes.
func testSocketDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "cp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// launchServer serves opts on a new socket and returns the server, the
// socket path and the channel that receives Serve's result. Stopping it is
// the test's business; cleanup only makes sure it is closed.
func launchServer(t testing.TB, opts Options) (*Server, string, <-chan error) {
	t.Helper()
	srv, err := NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := Listen(testSocketDir(t))
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return srv, ln.Addr().String(), served
}

// startServer is launchServer for tests that leave the server running: at
// cleanup it shuts the server down and checks that Serve returned
// ErrServerClosed.
func startServer(t testing.TB, opts Options) (*Server, string) {
	t.Helper()
	srv, path, served := launchServer(t, opts)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return srv, path
}

// getTokenAsync calls GetToken in a goroutine and returns its outcome.
func getTokenAsync(c *Client, provider string) <-chan error {
	got := make(chan error, 1)
	go func() {
		_, err := c.GetToken(context.Background(), provider, "")
		got <- err
	}()
	return got
}

// newTestClient returns a client for path that is closed at cleanup.
func newTestClient(t testing.TB, path string, opts ClientOptions) *Client {
	t.Helper()
	c := NewClient(path, opts)
	t.Cleanup(func() { c.Close() })
	return c
}

// mustToken parses a token or fails the test.
func mustToken(t testing.TB, js string) Token {
	t.Helper()
	tok, err := ParseToken([]byte(js))
	if err != nil {
		t.Fatalf("ParseToken(%s): %v", js, err)
	}
	return tok
}

// storeWith returns a new test store (see newTestStore) holding the given
// tokens (keyed "provider/bucket") and API keys.
func storeWith(t testing.TB, tokens map[string]string, keys map[string]string) Store {
	t.Helper()
	st := newTestStore(t)
	ctx := context.Background()
	for pb, js := range tokens {
		provider, bucket, _ := strings.Cut(pb, "/")
		if err := st.SaveToken(ctx, provider, bucket, mustToken(t, js)); err != nil {
			t.Fatal(err)
		}
	}
	for name, key := range keys {
		if err := st.SaveAPIKey(ctx, name, Secret(key)); err != nil {
			t.Fatal(err)
		}
	}
	return st
}

// rawConn speaks the protocol by hand, frame by frame, to test what the
// client library never sends.
type rawConn struct {
	t testing.TB
	c net.Conn
}

// dialRaw connects to path. Reads and writes give up after 10s, so a test
// that waits for a frame that never comes fails instead of hanging.
func dialRaw(t testing.TB, path string) *rawConn {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &rawConn{t: t, c: c}
}

func (r *rawConn) send(payload string) {
	r.t.Helper()
	if err := writeFrame(r.c, []byte(payload)); err != nil {
		r.t.Fatalf("write frame: %v", err)
	}
}

func (r *rawConn) sendBytes(b []byte) {
	r.t.Helper()
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

// recv reads one frame and returns its payload.
func (r *rawConn) recv() string {
	r.t.Helper()
	frame, err := readFrame(r.c, nil)
	if err != nil {
		r.t.Fatalf("read frame: %v", err)
	}
	return string(frame)
}

// recvMap reads one frame and decodes it.
func (r *rawConn) recvMap() map[string]any {
	r.t.Helper()
	frame := r.recv()
	var m map[string]any
	if err := json.Unmarshal([]byte(frame), &m); err != nil {
		r.t.Fatalf("response %s: %v", frame, err)
	}
	return m
}

func (r *rawConn) handshake() {
	r.t.Helper()
	r.send(`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`)
	if got := r.recv(); got != string(handshakeOK) {
		r.t.Fatalf("handshake reply %s, want %s", got, handshakeOK)
	}
}

// expectServing checks that the connection is open and in sync: a request
// sent now gets its own answer next. (The stores the tests use hold an
// API key called openai.)
func (r *rawConn) expectServing(id string) {
	r.t.Helper()
	r.send(`{"v":1,"id":"` + id + `","op":"has_api_key","payload":{"name":"openai"}}`)
	if got, want := r.recv(), `{"id":"`+id+`","ok":true,"data":{"exists":true}}`; got != want {
		r.t.Fatalf("probe %s: got %s, want %s", id, got, want)
	}
}

// expectClosed checks that the server closes the connection with nothing
// more to read.
func (r *rawConn) expectClosed() {
	r.t.Helper()
	n, err := io.Copy(io.Discard, r.c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		r.t.Fatalf("connection still open after %d more bytes", n)
	}
	if n != 0 {
		r.t.Fatalf("read %d more bytes before the close, want 0", n)
	}
}

// wantFailure checks that m is a failure response with the given id, code and
// message (message "" skips the check).
func wantFailure(t testing.TB, m map[string]any, id string, code Code, msg string) {
	t.Helper()
	if m["ok"] != false || m["id"] != id || m["code"] != string(code) || (msg != "" && m["error"] != msg) {
		t.Fatalf("response %v, want failure id=%q code=%s error=%q", m, id, code, msg)
	}
}

// logBuffer collects log output from many goroutines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// debugLogger returns a logger that records everything, at debug level
// and above, as JSON lines in the returned buffer.
func debugLogger() (*slog.Logger, *logBuffer) {
	var b logBuffer
	return slog.New(slog.NewJSONHandler(&b, &slog.HandlerOptions{Level: slog.LevelDebug})), &b
}

// brokenStore is a Store whose backend is unusable, like a locked keyring:
// every call fails, and the error text quotes secrets, as careless
// backends do, to prove that the server keeps such text to itself.
type brokenStore struct{}

var errBackend = errors.New("keyring locked; last item was " + fakeRefresh + " / " + fakeAPIKey)

func (brokenStore) GetToken(context.Context, string, string) (Token, error) {
	return Token{}, errBackend
}
func (brokenStore) SaveToken(context.Context, string, string, Token) error { return errBackend }
func (brokenStore) RemoveToken(context.Context, string, string) error      { return errBackend }
func (brokenStore) ListProviders(context.Context) ([]string, error)        { return nil, errBackend }
func (brokenStore) ListBuckets(context.Context, string) ([]string, error)  { return nil, errBackend }
func (brokenStore) GetAPIKey(context.Context, string) (Secret, error)      { return "", errBackend }
func (brokenStore) SaveAPIKey(context.Context, string, Secret) error       { return errBackend }
func (brokenStore) RemoveAPIKey(context.Context, string) error             { return errBackend }
func (brokenStore) ListAPIKeys(context.Context) ([]string, error)          { return nil, errBackend }

// gatedStore is a Store whose token reads wait until the gate opens or
// their context ends, like a keyring waiting for the user to unlock it.
// entered receives a value each time a read starts waiting.
type gatedStore struct {
	Store
	gate    chan struct{}
	entered chan struct{}
}

func newGatedStore(st Store) *gatedStore {
	return &gatedStore{Store: st, gate: make(chan struct{}), entered: make(chan struct{}, 100)}
}

func (g *gatedStore) GetToken(ctx context.Context, provider, bucket string) (Token, error) {
	g.entered <- struct{}{}
	select {
	case <-g.gate:
		return g.Store.GetToken(ctx, provider, bucket)
	case <-ctx.Done():
		return Token{}, ctx.Err()
	}
}

func jsonUnmarshal(s string, v any) error { return json.Unmarshal([]byte(s), v) }

// jsonUnmarshalCaseless decodes log records into structs with Go-cased
// field names.
func jsonUnmarshalCaseless(s string, v any) error {
	return json.Unmarshal([]byte(s), v, json.MatchCaseInsensitiveNames(true))
}

// pipeClient returns a client whose connections are net.Pipes, the
// server's end of each served by serve, which starts with the handshake
// (see afterHandshake). It is for tests in a testing/synctest bubble,
// where time is fake and a real socket cannot go: call it inside the
// bubble. serve must return once the client closes its end; the client
// is closed at cleanup.
func pipeClient(t *testing.T, opts ClientOptions, serve func(nc net.Conn)) *Client {
	t.Helper()
	var wg sync.WaitGroup
	opts.dial = func(ctx context.Context) (net.Conn, error) {
		client, server := net.Pipe()
		wg.Go(func() {
			defer server.Close()
			serve(server)
		})
		return client, nil
	}
	c := NewClient("pipe", opts)
	t.Cleanup(func() { c.Close(); wg.Wait() })
	return c
}

// afterHandshake is a serve function for pipeClient that answers the
// handshake as a real server does, then hands the connection to serve.
func afterHandshake(serve func(nc net.Conn)) func(net.Conn) {
	return func(nc net.Conn) {
		if _, err := readFrame(nc, nil); err != nil {
			return
		}
		if err := writeFrame(nc, handshakeOK); err != nil {
			return
		}
		serve(nc)
	}
}

// answerEach is a serve function for pipeClient: after the handshake, it
// reads each request and writes what answer returns for it, if anything,
// counting the requests in received. n counts from 1.
func answerEach(received *atomic.Int32, answer func(n int, req request) string) func(net.Conn) {
	return afterHandshake(func(nc net.Conn) {
		for {
			frame, err := readFrame(nc, nil)
			if err != nil {
				return
			}
			req, _ := decodeRequest(frame)
			if resp := answer(int(received.Add(1)), req); resp != "" {
				if err := writeFrame(nc, []byte(resp)); err != nil {
					return
				}
			}
		}
	})
}

// rateLimited is the failure response to req with code RATE_LIMITED and
// retryAfter seconds.
func rateLimited(req request, retryAfter int) string {
	return string(appendFailure(nil, req.id, &protoError{code: CodeRateLimited, msg: "rate limit exceeded"}, retryAfter))
}

// okResponse is the success response to req with data.
func okResponse(req request, data string) string {
	return string(appendOKStart(nil, req.id)) + data + "}"
}

// decodeRequest decodes one frame with a decoder of its own.
func decodeRequest(frame []byte) (request, *protoError) {
	var d requestDecoder
	return d.decode(frame)
}
