package credproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// roundTripperFunc adapts a function to http.RoundTripper.
type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// The real credential never shows in what the front says of its own: its
// answers when the upstream cannot be reached, hangs up, or fails with an
// error that quotes the request's credential; when the store fails with
// secrets in its error, holds nothing, or holds a credential that cannot
// go in a header. Nor does it show in the server's log, at any level. A
// redirect from the upstream is passed to the sandbox, not followed.
func TestInjectNeverReflectsTheCredential(t *testing.T) {
	closed := newUpstream(t, nil)
	closed.Close()
	hangup := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "100")
		io.WriteString(w, "partial")
		c, _, _ := w.(http.Hijacker).Hijack()
		c.Close()
	})
	evil := newUpstream(t, nil)
	redirect := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, evil.URL+"/steal", http.StatusFound)
	})
	quoting := roundTripperFunc(func(r *http.Request) (*http.Response, error) {
		return nil, fmt.Errorf("proxy refused %s with header %q", r.URL, r.Header.Get("Authorization")+r.Header.Get("X-Api-Key"))
	})
	badToken := NewMemoryStore()
	badToken.SaveToken(t.Context(), "anthropic", "", mustToken(t, `{"access_token":"`+fakeRealAccess+`\r\nX-Injected: yes"}`))

	var said strings.Builder // everything the front answered
	for _, tc := range []struct {
		name  string
		store Store
		rt    http.RoundTripper
		up    *upstream
		want  int
	}{
		{"unreachable", injectStore(t), nil, closed, 502},
		{"hangs up", injectStore(t), nil, hangup, 200}, // the status may come; the body breaks off
		{"redirects", injectStore(t), nil, redirect, 302},
		{"quotes the credential", injectStore(t), quoting, closed, 502},
		{"store fails", brokenStore{}, nil, evil, 502},
		{"store empty", NewMemoryStore(), nil, evil, 502},
		{"credential with CR LF", badToken, nil, evil, 502},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, logs := injectServer(t, tc.store, Options{InjectTransport: tc.rt})
			sess := startSession(t, srv, SessionOptions{Policy: injectGrant, Routes: []Route{tokenRoute(tc.up), keyRoute(tc.up)}})
			c := frontClient(t, sess)
			for _, r := range []struct{ path, header, value string }{
				{"/anthropic/v1/messages?q=1", "Authorization", bearer(sess.Phantom())},
				{"/openai/v1/models", "x-api-key", string(sess.Phantom())},
			} {
				req, _ := http.NewRequestWithContext(t.Context(), "POST", "http://sandbox"+r.path, strings.NewReader(`{}`))
				req.Header.Set(r.header, r.value)
				resp, err := c.Do(req)
				if err != nil {
					// Only when the upstream hung up: before the front
					// wrote anything, it breaks the connection too.
					if tc.up != hangup {
						t.Fatal(err)
					}
					fmt.Fprintln(&said, err)
					continue
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if r.header == "Authorization" && resp.StatusCode != tc.want {
					t.Errorf("%s: %d %q, want %d", r.path, resp.StatusCode, body, tc.want)
				}
				fmt.Fprintf(&said, "%d %v %s\n", resp.StatusCode, resp.Header, body)
			}
			sess.Close()
			for _, secret := range []string{fakeRealAccess, fakeRealKey, fakeRefresh, fakeAPIKey} {
				if strings.Contains(said.String(), secret) || strings.Contains(logs.String(), secret) {
					t.Errorf("%s reflected:\n%s\nlog:\n%s", secret, said.String(), logs)
				}
			}
		})
	}
	if n := evil.requests.Load(); n != 0 {
		t.Errorf("the redirect was followed: %d requests at its target", n)
	}
}

// Sessions with fronts, closed while a stream is open through them, a
// keep-alive connection idles and another trickles its headers, leave the
// process with the goroutines and file descriptors it had before, and no
// directory behind.
func TestInjectSessionsLeaveNothingBehind(t *testing.T) {
	started := make(chan struct{}, 100)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/v1/stream" {
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: first\n\n")
		w.(http.Flusher).Flush()
		started <- struct{}{}
		<-r.Context().Done() // until the front goes
	})
	srv, _ := injectServer(t, injectStore(t), Options{})
	base := testSocketDir(t)
	goroutines, fds := resourceCounts()
	for i := range 20 {
		sess, err := srv.NewSession(SessionOptions{Policy: injectGrant, Routes: []Route{tokenRoute(up)}, Dir: filepath.Join(base, strconv.Itoa(i))})
		if err != nil {
			t.Fatal(err)
		}
		c := frontClient(t, sess)
		if status, _, _ := call(t, c, "GET", "/anthropic/v1/models", "Authorization", bearer(sess.Phantom()), nil); status != 200 {
			t.Fatalf("status %d", status)
		}
		req, _ := http.NewRequestWithContext(t.Context(), "GET", "http://sandbox/anthropic/v1/stream", nil)
		req.Header.Set("Authorization", bearer(sess.Phantom()))
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		<-started
		slow, _ := net.Dial("unix", sess.InjectSocketPath())
		io.WriteString(slow, "GET /anthropic/v1/models HTTP/1.1\r\nHost: s\r\n")
		sess.Close()
		if _, err := io.ReadAll(resp.Body); err == nil {
			t.Error("the stream ended cleanly when its session closed; want it cut off")
		}
		resp.Body.Close()
		slow.Close()
		c.Transport.(*http.Transport).CloseIdleConnections()
	}
	waitUntil(t, func() bool {
		g, f := resourceCounts()
		return g <= goroutines && f <= fds
	})
	if entries, err := filepath.Glob(filepath.Join(base, "*")); err != nil || len(entries) != 0 {
		t.Errorf("left in %s: %v %v", base, entries, err)
	}
}

// Server.Shutdown lets a stream through a front finish and then returns
// nil; past its context's end, it cuts the stream off and returns the
// context's error. Either way the session's directory is gone.
func TestInjectShutdownLetsStreamsFinish(t *testing.T) {
	for _, finish := range []bool{true, false} {
		t.Run(fmt.Sprintf("finish=%v", finish), func(t *testing.T) {
			release := make(chan struct{})
			started := make(chan struct{}, 1)
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				io.WriteString(w, "data: first\n\n")
				w.(http.Flusher).Flush()
				started <- struct{}{}
				select {
				case <-release:
					io.WriteString(w, "data: last\n\n")
				case <-r.Context().Done():
				}
			})
			srv, _ := injectServer(t, injectStore(t), Options{})
			sess := injectSession(t, srv, tokenRoute(up))
			req, _ := http.NewRequestWithContext(t.Context(), "GET", "http://sandbox/anthropic/v1/stream", nil)
			req.Header.Set("Authorization", bearer(sess.Phantom()))
			resp, err := frontClient(t, sess).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			<-started
			ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
			defer cancel()
			if finish {
				ctx = t.Context()
				time.AfterFunc(100*time.Millisecond, func() { close(release) })
			}
			err = srv.Shutdown(ctx)
			body, readErr := io.ReadAll(resp.Body)
			switch {
			case finish && (err != nil || readErr != nil || string(body) != "data: first\n\ndata: last\n\n"):
				t.Errorf("Shutdown: %v; the stream: %q, %v; want nil and both events", err, body, readErr)
			case !finish && (!errors.Is(err, context.DeadlineExceeded) || readErr == nil):
				t.Errorf("Shutdown: %v; the stream: %q, %v; want the deadline, and the stream cut off", err, body, readErr)
			}
			if entries, _ := filepath.Glob(filepath.Join(sess.Dir(), "*")); len(entries) != 0 {
				t.Errorf("left after Shutdown: %v", entries)
			}
		})
	}
}

// The front has a connection cap of its own, the session's
// MaxConnections: one more connection is closed at once, and logged.
func TestInjectFrontHasItsOwnConnectionCap(t *testing.T) {
	up := newUpstream(t, nil)
	srv, logs := injectServer(t, injectStore(t), Options{})
	sess := startSession(t, srv, SessionOptions{Policy: injectGrant, Routes: []Route{tokenRoute(up)}, MaxConnections: 2})
	c := frontClient(t, sess)
	if status, _, _ := call(t, c, "GET", "/anthropic/v1/models", "Authorization", bearer(sess.Phantom()), nil); status != 200 {
		t.Fatalf("status %d", status)
	}
	second, _ := net.Dial("unix", sess.InjectSocketPath())
	defer second.Close()
	waitUntil(t, func() bool { sess.inject.mu.Lock(); defer sess.inject.mu.Unlock(); return sess.inject.conns == 2 })
	third, _ := net.Dial("unix", sess.InjectSocketPath())
	defer third.Close()
	third.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := third.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("a third connection: read %d bytes, %v; want EOF", n, err)
	}
	if !strings.Contains(logs.String(), `"reason":"connection cap reached","socket":"inject.sock"`) {
		t.Errorf("no refusal logged:\n%s", logs)
	}
	second.Close()
	waitUntil(t, func() bool { sess.inject.mu.Lock(); defer sess.inject.mu.Unlock(); return sess.inject.conns == 1 })
	if status, _, _ := call(t, c, "GET", "/anthropic/v1/models", "Authorization", bearer(sess.Phantom()), nil); status != 200 {
		t.Errorf("after the second closed: %d", status)
	}
}

// NewSession refuses routes that could not be served as written, saying
// which and why, and creates nothing.
func TestInjectRoutesAreCheckedWhenTheSessionStarts(t *testing.T) {
	tls := Route{Name: "a", Upstream: "https://api.example.com/v1", Provider: "anthropic"}
	with := func(f func(*Route)) []Route { r := tls; f(&r); return []Route{r} }
	for i, tc := range []struct {
		routes    []Route
		transport bool
		want      string // in the error; "" for none
	}{
		{with(func(r *Route) {}), false, ""},
		{with(func(r *Route) { r.Upstream = "http://127.0.0.1:8080" }), true, ""},
		{with(func(r *Route) { r.Upstream = "http://[::1]:8080/base/" }), true, ""},
		{with(func(r *Route) {
			r.Header = "x-api-key"
			r.Methods = []string{"GET"}
			r.PathPrefixes = []string{"/v1/messages", "/"}
		}), false, ""},
		{with(func(r *Route) { r.Upstream = "http://127.0.0.1:8080" }), false, "not https"},
		{with(func(r *Route) { r.Upstream = "http://localhost:8080" }), true, "not https"},
		{with(func(r *Route) { r.Upstream = "http://api.example.com" }), true, "not https"},
		{with(func(r *Route) { r.Upstream = "ftp://api.example.com" }), false, "https URL"},
		{with(func(r *Route) { r.Upstream = "https://user:pw@api.example.com" }), false, "no user"},
		{with(func(r *Route) { r.Upstream = "https://api.example.com/?a=b" }), false, "no user, query"},
		{with(func(r *Route) { r.Upstream = "https:///v1" }), false, "with a host"},
		{with(func(r *Route) { r.Upstream = "https://api.example.com/a/../b" }), false, "not a clean path"},
		{with(func(r *Route) { r.Name = "" }), false, "not a name"},
		{with(func(r *Route) { r.Name = ".." }), false, "not a name"},
		{with(func(r *Route) { r.Name = "a/b" }), false, "not a name"},
		{with(func(r *Route) { r.Key = "k" }), false, "exactly one of Provider and Key"},
		{with(func(r *Route) { r.Provider = "" }), false, "exactly one of Provider and Key"},
		{with(func(r *Route) { r.Provider = "x y" }), false, "not a name"},
		{with(func(r *Route) { r.Bucket = "b/c" }), false, "not a name"},
		{with(func(r *Route) { r.Header = "Host" }), false, "cannot carry a credential"},
		{with(func(r *Route) { r.Header = "proxy-authorization" }), false, "cannot carry a credential"},
		{with(func(r *Route) { r.Header = "x api key" }), false, "cannot carry a credential"},
		{with(func(r *Route) { r.Methods = []string{"CONNECT"} }), false, "cannot be allowed"},
		{with(func(r *Route) { r.PathPrefixes = []string{"v1"} }), false, "not a clean absolute path"},
		{with(func(r *Route) { r.PathPrefixes = []string{"/v1/../admin"} }), false, "not a clean absolute path"},
		{with(func(r *Route) { r.PathPrefixes = []string{"/v1%2fadmin"} }), false, "not a clean absolute path"},
		{with(func(r *Route) { r.MaxRequestBody = -1 }), false, "negative"},
		{append(with(func(r *Route) {}), tls), false, "two routes"},
		{with(func(r *Route) { r.Provider = "gemini" }), false, "does not allow"},
		{with(func(r *Route) { r.Bucket = "work" }), false, "does not allow"},
		{with(func(r *Route) { r.Provider, r.Key = "", "other" }), false, "does not allow"},
	} {
		opts := Options{Store: NewMemoryStore()}
		if tc.transport {
			opts.InjectTransport = http.DefaultTransport
		}
		srv := sessionServer(t, opts)
		dir := filepath.Join(testSocketDir(t), "s")
		sess, err := srv.NewSession(SessionOptions{Policy: injectGrant, Routes: tc.routes, Dir: dir})
		if err == nil {
			sess.Close()
		}
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("case %d: %v, want an error with %q", i, err, tc.want)
		}
		if _, statErr := os.Lstat(dir); err != nil && !os.IsNotExist(statErr) {
			t.Errorf("case %d: the refused session left %s", i, dir)
		}
	}
}

// Each request through the front is put to the session's Policy, as
// get_token or get_api_key would be, with the peer and the route's name
// in Request.Route (a request on the socket has none): a denial is 403,
// with an audit line, and nothing is forwarded.
func TestInjectAsksTheSessionsPolicyForEachRequest(t *testing.T) {
	up := newUpstream(t, nil)
	srv, logs := injectServer(t, injectStore(t), Options{})
	var asked []Request
	var deny atomic.Bool
	policy := PolicyFunc(func(_ context.Context, r *Request) error {
		asked = append(asked, *r)
		if deny.Load() {
			return ErrProviderDenied
		}
		return nil
	})
	viaFront := 0
	telling := PolicyFunc(func(ctx context.Context, r *Request) error {
		if r.Route != "" {
			viaFront++
		}
		return policy.Authorize(ctx, r)
	})
	sess := startSession(t, srv, SessionOptions{Policy: telling, Routes: []Route{tokenRoute(up), keyRoute(up)}})
	c := frontClient(t, sess)
	call(t, c, "GET", "/anthropic/v1/models", "Authorization", bearer(sess.Phantom()), nil)
	call(t, c, "GET", "/openai/v1/models", "x-api-key", string(sess.Phantom()), nil)
	if _, err := sessionClient(t, sess).GetAPIKey(t.Context(), "openai"); err != nil || viaFront != 2 {
		t.Errorf("get_api_key on the socket: %v; %d of 3 requests were told apart as the front's, want 2", err, viaFront)
	}
	asked = asked[:2]
	uid, _ := asked[0].Peer.UID()
	if len(asked) != 2 || asked[0].Op != OpGetToken || asked[0].Provider != "anthropic" || asked[0].Bucket != DefaultBucket ||
		asked[0].Route != "anthropic" || asked[1].Op != OpGetAPIKey || asked[1].Key != "openai" || asked[1].Route != "openai" ||
		uid != os.Geteuid() {
		t.Errorf("the policy was asked %+v", asked)
	}
	deny.Store(true)
	if status, body, _ := call(t, c, "GET", "/anthropic/v1/models", "Authorization", bearer(sess.Phantom()), nil); status != 403 || up.requests.Load() != 2 {
		t.Errorf("denied: %d %q after %d upstream requests, want 403 after 2", status, body, up.requests.Load())
	}
	if !strings.Contains(logs.String(), `"reason":"the session's policy does not allow this route"`) {
		t.Errorf("no refusal logged:\n%s", logs)
	}
}

// Server.Shutdown does not wait for a connection to the front that has
// sent nothing (net/http alone would wait 5 s for it).
func TestInjectShutdownDoesNotWaitForSilentConnections(t *testing.T) {
	up := newUpstream(t, nil)
	srv, _ := injectServer(t, injectStore(t), Options{})
	sess := injectSession(t, srv, tokenRoute(up))
	silent, err := net.Dial("unix", sess.InjectSocketPath())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	waitUntil(t, func() bool { sess.inject.mu.Lock(); defer sess.inject.mu.Unlock(); return len(sess.inject.fresh) == 1 })
	start := time.Now()
	if err := srv.Shutdown(t.Context()); err != nil || time.Since(start) > 2*time.Second {
		t.Errorf("Shutdown: %v after %v, want nil at once", err, time.Since(start))
	}
}
