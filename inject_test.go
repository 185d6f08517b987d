package credproxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The injection front (issue 16), tested through its real Unix socket
// against local HTTPS upstreams that record what they receive.

// Obviously fake real credentials: what the host holds and the sandbox
// must never see.
const (
	fakeRealAccess  = "fake-real-access-token-XXXX1111"
	fakeRealAccess2 = "fake-real-access-token-XXXX2222"
	fakeRealKey     = "sk-fake-real-api-key-XXXX3333"
)

// upstream is a local HTTPS server standing for a provider's API. It
// counts the requests that reach it and keeps a copy of each.
type upstream struct {
	*httptest.Server
	requests atomic.Int32
	mu       sync.Mutex
	seen     []*http.Request // with their bodies read into body
	bodies   [][]byte
}

// newUpstream starts an upstream that answers with h (nil: 200 and a
// small JSON body), closed at cleanup.
func newUpstream(t testing.TB, h http.HandlerFunc) *upstream {
	t.Helper()
	if h == nil {
		h = func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("X-Upstream", "yes")
			io.WriteString(w, `{"ok":true}`)
		}
	}
	u := &upstream{}
	u.Server = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.requests.Add(1)
		body, _ := io.ReadAll(r.Body)
		u.mu.Lock()
		u.seen = append(u.seen, r.Clone(context.Background()))
		u.bodies = append(u.bodies, body)
		u.mu.Unlock()
		h(w, r)
	}))
	t.Cleanup(u.Close)
	return u
}

// last returns the last request the upstream received, and its body.
func (u *upstream) last(t testing.TB) (*http.Request, []byte) {
	t.Helper()
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.seen) == 0 {
		t.Fatal("no request reached the upstream")
	}
	return u.seen[len(u.seen)-1], u.bodies[len(u.bodies)-1]
}

// injectStore holds the fake real credentials: an OAuth token for
// "anthropic" (valid for an hour) and an API key "openai".
func injectStore(t testing.TB) *MemoryStore {
	t.Helper()
	st := NewMemoryStore()
	tok := mustToken(t, fmt.Sprintf(`{"access_token":%q,"refresh_token":%q,"expiry":%d}`, fakeRealAccess, fakeRefresh, time.Now().Add(time.Hour).Unix()))
	if err := st.SaveToken(context.Background(), "anthropic", "", tok); err != nil {
		t.Fatal(err)
	}
	if err := st.SaveAPIKey(context.Background(), "openai", fakeRealKey); err != nil {
		t.Fatal(err)
	}
	return st
}

// injectServer starts a server on st whose fronts trust the test
// upstreams' certificate, with a debug log, closed at cleanup.
func injectServer(t testing.TB, st Store, opts Options) (*Server, *logBuffer) {
	t.Helper()
	logger, logs := debugLogger()
	opts.Store, opts.Logger = st, logger
	if opts.InjectTransport == nil {
		ca := httptest.NewTLSServer(http.NotFoundHandler()) // every httptest server has the same certificate
		opts.InjectTransport = ca.Client().Transport
		ca.Close()
	}
	return sessionServer(t, opts), logs
}

// tokenRoute and keyRoute are the usual routes to up: Anthropic-style
// with a bearer token, and OpenAI-style with an x-api-key.
func tokenRoute(up *upstream) Route {
	return Route{Name: "anthropic", Upstream: up.URL + "/api", Provider: "anthropic"}
}

func keyRoute(up *upstream) Route {
	return Route{Name: "openai", Upstream: up.URL, Key: "openai", Header: "x-api-key"}
}

var injectGrant = &Grant{Providers: []string{"anthropic"}, Keys: []string{"openai"}}

// injectSession starts a session of srv with routes, closed at cleanup.
func injectSession(t testing.TB, srv *Server, routes ...Route) *Session {
	t.Helper()
	return startSession(t, srv, SessionOptions{Policy: injectGrant, Routes: routes})
}

// frontClient returns an HTTP client whose connections go to the
// session's injection front, and that follows no redirect.
func frontClient(t testing.TB, sess *Session) *http.Client {
	t.Helper()
	path := sess.InjectSocketPath()
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		DisableCompression: true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// call sends method to path through c with header set to value (none if
// value is ""), and returns the status and body.
func call(t testing.TB, c *http.Client, method, path, header, value string, body io.Reader) (int, string, http.Header) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, "http://sandbox"+path, body)
	if err != nil {
		t.Fatal(err)
	}
	if value != "" {
		req.Header.Set(header, value)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

func bearer(s Secret) string { return "Bearer " + string(s) }

// The front forwards each route to its upstream with the real credential
// in place of the phantom: a bearer token for a token route (under the
// upstream's path prefix, query as sent), the bare key in x-api-key for
// a key route; every other credential header of the sandbox's is
// removed, the upstream's Host is used, nothing names the host, and the
// upstream's answer comes back as it was.
func TestInjectForwardsWithTheRealCredential(t *testing.T) {
	up := newUpstream(t, nil)
	srv, _ := injectServer(t, injectStore(t), Options{})
	sess := injectSession(t, srv, tokenRoute(up), keyRoute(up))
	c := frontClient(t, sess)

	req, _ := http.NewRequestWithContext(t.Context(), "POST", "http://evil.example/anthropic/v1/messages?beta=true&x=%2F", strings.NewReader(`{"model":"m"}`))
	req.Host = "evil.example"
	req.Header.Set("Authorization", bearer(sess.Phantom()))
	req.Header.Set("Cookie", "session=sandbox-cookie")
	req.Header.Set("X-Api-Key", "sandbox-key")
	req.Header.Set("Proxy-Authorization", "Basic c2FuZGJveA==")
	req.Header.Set("X-Forwarded-For", "10.9.8.7")
	req.Header.Set("Forwarded", "for=10.9.8.7")
	req.Header.Set("Api-Key", "sandbox-key")
	req.Header.Set("X-Goog-Api-Key", "sandbox-key")
	req.Header.Set("Proxy-Connection", "keep-alive")
	req.Header.Set("Connection", "keep-alive, X-Hop")
	req.Header.Set("X-Hop", "hop")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Te", "trailers")
	req.Header.Set("Anthropic-Version", "2023-06-01")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != `{"ok":true}` || resp.Header.Get("X-Upstream") != "yes" {
		t.Fatalf("got %d %q (X-Upstream %q), want the upstream's 200", resp.StatusCode, body, resp.Header.Get("X-Upstream"))
	}
	got, gotBody := up.last(t)
	for name, want := range map[string]string{
		"Authorization": "Bearer " + fakeRealAccess, "Anthropic-Version": "2023-06-01",
		"Cookie": "", "X-Api-Key": "", "Proxy-Authorization": "", "X-Forwarded-For": "", "Forwarded": "", "Via": "",
		"Api-Key": "", "X-Goog-Api-Key": "", "Proxy-Connection": "", "Connection": "", "X-Hop": "", "Upgrade": "", "Te": "",
		"X-Forwarded-Host": "", "X-Forwarded-Proto": "",
	} {
		if v := got.Header.Get(name); v != want {
			t.Errorf("upstream got %s: %q, want %q", name, v, want)
		}
	}
	if want := strings.TrimPrefix(up.URL, "https://"); got.Host != want {
		t.Errorf("upstream got Host %q, want %q", got.Host, want)
	}
	if got.URL.Path != "/api/v1/messages" || got.URL.RawQuery != "beta=true&x=%2F" || string(gotBody) != `{"model":"m"}` {
		t.Errorf("upstream got %s ?%s body %q", got.URL.Path, got.URL.RawQuery, gotBody)
	}

	status, _, _ := call(t, c, "GET", "/openai/v1/models", "x-api-key", string(sess.Phantom()), nil)
	got, _ = up.last(t)
	if status != 200 || got.Header.Get("X-Api-Key") != fakeRealKey || got.Header.Get("Authorization") != "" || got.URL.Path != "/v1/models" {
		t.Errorf("key route: %d; upstream got x-api-key %q, Authorization %q at %s", status, got.Header.Get("X-Api-Key"), got.Header.Get("Authorization"), got.URL.Path)
	}
}

// A request without the session's phantom, with a wrong one, with
// another session's, or with the phantom in another header than the
// route's, is refused with 401 and logged; nothing reaches the upstream.
func TestInjectRefusesAMissingOrWrongPhantom(t *testing.T) {
	up := newUpstream(t, nil)
	srv, logs := injectServer(t, injectStore(t), Options{})
	sess := injectSession(t, srv, tokenRoute(up), keyRoute(up))
	other := injectSession(t, srv, tokenRoute(up), keyRoute(up))
	c := frontClient(t, sess)
	for i, tc := range []struct{ path, header, value string }{
		{"/anthropic/v1/messages", "Authorization", ""},
		{"/anthropic/v1/messages", "Authorization", bearer(other.Phantom())},
		{"/anthropic/v1/messages", "Authorization", "Bearer " + fakeRealAccess},
		{"/anthropic/v1/messages", "Authorization", string(sess.Phantom())},            // no scheme
		{"/anthropic/v1/messages", "Authorization", "Basic " + string(sess.Phantom())}, // another scheme
		{"/anthropic/v1/messages", "x-api-key", string(sess.Phantom())},                // not where the route looks
		{"/anthropic/v1/messages", "Authorization", bearer(sess.Phantom()) + "x"},
		{"/openai/v1/models", "x-api-key", string(other.Phantom())},
		{"/openai/v1/models", "Authorization", bearer(sess.Phantom())},
	} {
		status, body, _ := call(t, c, "GET", tc.path, tc.header, tc.value, nil)
		if status != http.StatusUnauthorized || strings.Contains(body, string(sess.Phantom())) {
			t.Errorf("case %d: got %d %q, want 401 without the phantom", i, status, body)
		}
	}
	if n := up.requests.Load(); n != 0 {
		t.Errorf("%d requests reached the upstream, want 0", n)
	}
	if n := strings.Count(logs.String(), `"reason":"missing or wrong phantom credential"`); n != 9 {
		t.Errorf("%d refusals logged, want 9:\n%s", n, logs)
	}
	// Both headers at once: refused too (the route's header must be the
	// only place, once).
	req, _ := http.NewRequestWithContext(t.Context(), "GET", "http://sandbox/anthropic/v1/messages", nil)
	req.Header.Add("Authorization", bearer(sess.Phantom()))
	req.Header.Add("Authorization", bearer(sess.Phantom()))
	resp, err := c.Do(req)
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("two Authorization headers: %v %v, want 401", resp, err)
	}
	resp.Body.Close()
}

// An unknown route is 404; a method or path the route does not allow is
// 403 with a one-line body and an audit line naming the route; nothing
// reaches the upstream. Path prefixes match whole segments.
func TestInjectRefusesWhatTheRouteDoesNotAllow(t *testing.T) {
	up := newUpstream(t, nil)
	srv, logs := injectServer(t, injectStore(t), Options{})
	rt := tokenRoute(up)
	rt.PathPrefixes = []string{"/v1/messages", "/v1/models/"}
	sess := injectSession(t, srv, rt)
	c := frontClient(t, sess)
	auth := bearer(sess.Phantom())
	for i, tc := range []struct {
		method, path string
		want         int
	}{
		{"GET", "/nope/v1/messages", 404},
		{"GET", "/", 404},
		{"GET", "/Anthropic/v1/messages", 404},
		{"DELETE", "/anthropic/v1/messages", 403},
		{"PUT", "/anthropic/v1/messages", 403},
		{"POST", "/anthropic/v1/messages2", 403},
		{"POST", "/anthropic/v1", 403},
		{"POST", "/anthropic", 403},
		{"GET", "/anthropic/v1/complete", 403},
		{"POST", "/anthropic/v1/messages", 200},
		{"POST", "/anthropic/v1/messages/count_tokens", 200},
		{"GET", "/anthropic/v1/models", 200},
		{"GET", "/anthropic/v1/models/claude", 200},
	} {
		before := up.requests.Load()
		status, body, _ := call(t, c, tc.method, tc.path, "Authorization", auth, nil)
		reached := up.requests.Load() - before
		if status != tc.want || (tc.want == 200) != (reached == 1) {
			t.Errorf("case %d: %s %s: %d %q, %d upstream requests; want %d", i, tc.method, tc.path, status, body, reached, tc.want)
		}
		if status == 403 && (body != "credproxy: method or path not allowed on this route\n") {
			t.Errorf("case %d: 403 body %q", i, body)
		}
	}
	if n := strings.Count(logs.String(), `"reason":"method or path not allowed on this route"`); n != 6 {
		t.Errorf("%d 403 refusals logged, want 6:\n%s", n, logs)
	}
	if !strings.Contains(logs.String(), `"route":"anthropic"`) || strings.Contains(logs.String(), string(sess.Phantom())) {
		t.Errorf("the audit lines should name the route and never the phantom:\n%s", logs)
	}
}

// Server-sent events reach the sandbox as the upstream sends them: the
// first event arrives while the upstream still holds back the second.
func TestInjectStreamsServerSentEventsAsTheyCome(t *testing.T) {
	next := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 3 {
			fmt.Fprintf(w, "event: delta\ndata: {\"n\":%d}\n\n", i)
			w.(http.Flusher).Flush()
			select {
			case <-next:
			case <-r.Context().Done():
				return
			}
		}
	})
	srv, _ := injectServer(t, injectStore(t), Options{})
	sess := injectSession(t, srv, tokenRoute(up))
	req, _ := http.NewRequestWithContext(t.Context(), "POST", "http://sandbox/anthropic/v1/messages", strings.NewReader(`{"stream":true}`))
	req.Header.Set("Authorization", bearer(sess.Phantom()))
	resp, err := frontClient(t, sess).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("Content-Type %q", ct)
	}
	br := bufio.NewReader(resp.Body)
	for i := range 3 {
		for _, want := range []string{"event: delta\n", fmt.Sprintf("data: {\"n\":%d}\n", i), "\n"} {
			line, err := br.ReadString('\n')
			if line != want {
				t.Fatalf("event %d: read %q (%v), want %q", i, line, err, want)
			}
		}
		next <- struct{}{} // the upstream sends the next event only now
	}
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Errorf("after the last event: %q, %v", rest, err)
	}
}

// A session with routes listens on inject.sock beside its own socket, in
// its directory, which holds those two and nothing else (both 0600); its
// phantom is "cp-phantom-" and 48 hex characters, its own, and never
// printed; closing the session removes both sockets and the directory. A
// session without routes has no front.
func TestInjectSocketSitsBesideTheSessionSocket(t *testing.T) {
	up := newUpstream(t, nil)
	srv, _ := injectServer(t, injectStore(t), Options{})
	plain := startSession(t, srv, SessionOptions{Policy: injectGrant})
	if plain.InjectSocketPath() != "" {
		t.Errorf("a session without routes has InjectSocketPath %q", plain.InjectSocketPath())
	}
	sess, err := srv.NewSession(SessionOptions{Policy: injectGrant, Routes: []Route{tokenRoute(up)}})
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(sess.Dir(), "inject.sock"); sess.InjectSocketPath() != want {
		t.Errorf("InjectSocketPath %q, want %q", sess.InjectSocketPath(), want)
	}
	entries, _ := os.ReadDir(sess.Dir())
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
		if fi, err := os.Lstat(filepath.Join(sess.Dir(), e.Name())); err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v %v, want a 0600 socket", e.Name(), fi.Mode(), err)
		}
	}
	if want := []string{"inject.sock", filepath.Base(sess.SocketPath())}; !slices.Equal(names, want) {
		t.Errorf("%s holds %q, want %q", sess.Dir(), names, want)
	}
	if !regexp.MustCompile(`^cp-phantom-[0-9a-f]{48}$`).MatchString(string(sess.Phantom())) || sess.Phantom() == plain.Phantom() {
		t.Errorf("phantom is not cp-phantom- and 48 hex characters of its own")
	}
	for _, printed := range []string{fmt.Sprint(sess), fmt.Sprintf("%+v %#v %s %q", sess, sess, sess, sess)} {
		if strings.Contains(printed, string(sess.Phantom())) {
			t.Errorf("printed session shows its phantom: %s", printed)
		}
	}
	if status, _, _ := call(t, frontClient(t, sess), "GET", "/anthropic/v1/models", "Authorization", bearer(sess.Phantom()), nil); status != 200 {
		t.Errorf("status %d", status)
	}
	sess.Close()
	if _, err := os.Lstat(sess.Dir()); !os.IsNotExist(err) {
		t.Errorf("session directory after Close: %v", err)
	}
}
