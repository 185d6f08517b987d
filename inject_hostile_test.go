package credproxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

// Hostile requests to the injection front, written byte for byte on its
// socket where an HTTP client would not send them. Each is refused, and
// nothing reaches the upstream.

// rawFront writes raw on a new connection to the session's front and
// returns the status of each response read until the server closes the
// connection, and whether it did (within 5 s).
func rawFront(t testing.TB, sess *Session, raw string) (statuses []int, closed bool) {
	t.Helper()
	c, err := net.Dial("unix", sess.InjectSocketPath())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			var ne net.Error
			return statuses, !(errors.As(err, &ne) && ne.Timeout())
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		statuses = append(statuses, resp.StatusCode)
	}
}

// hostileFront is a session with a token route allowed only under
// /v1/models and a key route, both to up.
func hostileFront(t *testing.T) (*Session, *upstream) {
	t.Helper()
	up := newUpstream(t, nil)
	srv, _ := injectServer(t, injectStore(t), Options{})
	rt := tokenRoute(up)
	rt.PathPrefixes = []string{"/v1/models"}
	rt.MaxRequestBody = 1024
	kr := keyRoute(up)
	kr.MaxRequestBody = 1024
	return injectSession(t, srv, rt, kr), up
}

// rawGet is a request for target with the session's phantom, that asks the
// server to close the connection after answering.
func rawGet(sess *Session, target string) string {
	return "GET " + target + " HTTP/1.1\r\nHost: sandbox\r\nAuthorization: Bearer " + string(sess.Phantom()) + "\r\nConnection: close\r\n\r\n"
}

// Paths that could mean another path to some server on the way, or after
// decoding, are refused with 400 before any route is looked up; an
// encoded route name is no route's name. A traversal never escapes the
// route's path prefix or reaches another route. A path that passes
// reaches the upstream as it was sent.
func TestInjectRefusesPathTraversalAndEncodedSlashes(t *testing.T) {
	sess, up := hostileFront(t)
	for i, tc := range []struct {
		target string
		want   int
	}{
		{"/anthropic/v1/models/../../../openai/v1/x", 400},
		{"/anthropic/../openai/v1/models", 400},
		{"/anthropic/./v1/models", 400},
		{"/anthropic/v1/models/..", 400},
		{"/anthropic/v1/models/%2e%2e/%2E%2E/x", 400},
		{"/anthropic/v1/models/.%2e/x", 400},
		{"/anthropic/v1/models/%2e", 400},
		{"/anthropic/v1/models%2f..%2fx", 400},
		{"/anthropic/v1/models%2F..%2Fx", 400},
		{"/anthropic/v1/models%5c..%5cx", 400},
		{"/anthropic/v1/models%5C..%5Cx", 400},
		{"/anthropic/v1/models\\..\\x", 400},
		{"/anthropic//v1/models", 400},
		{"//anthropic/v1/models", 400},
		{"/anthropic/v1/models%00", 400},
		{"/anthropic/v1/models%0d%0aX-Injected:%20yes", 400},
		{"/anthropic/v1/mo%zzdels", 400},
		{"/anthropic/v1/models#/../../openai", 400},
		{"/anthropic/v1/models/\xc0\xae\xc0\xae/x", 400}, // overlong UTF-8 dots
		{"/anthropic/v1/models/{x}", 400},
		{"/anthropic/v1/models/claude:generate;v=1@x", 200}, // what RFC 3986 allows
		{"/anthropic/v1/models/caf%C3%A9", 200},
		{"/%61nthropic/v1/models", 404},
		{"/anthropic%2fv1/models", 400},
		{"/anthropic/v1/modelsX", 403},
		{"/anthropic/v1/models/claude", 200}, // the control: allowed
	} {
		before := up.requests.Load()
		statuses, _ := rawFront(t, sess, rawGet(sess, tc.target))
		reached := up.requests.Load() - before
		if len(statuses) != 1 || statuses[0] != tc.want || (tc.want == 200) != (reached == 1) {
			t.Errorf("case %d: GET %s: statuses %v, %d upstream requests; want [%d]", i, tc.target, statuses, reached, tc.want)
		}
		if reached != 1 {
			continue
		}
		if got, _ := up.last(t); got.URL.EscapedPath() != "/api"+strings.TrimPrefix(tc.target, "/anthropic") {
			t.Errorf("case %d: the upstream got %s, want the path as sent", i, got.URL.EscapedPath())
		}
	}
}

// An absolute URL naming another host (or the upstream itself), CONNECT
// and "*" are refused with 400; a Host header naming another server is
// ignored: the request goes to the route's upstream, with its Host.
func TestInjectRefusesAbsoluteURLsAndIgnoresTheHostHeader(t *testing.T) {
	sess, up := hostileFront(t)
	evil := newUpstream(t, nil)
	evilHost := strings.TrimPrefix(evil.URL, "https://")
	for i, target := range []string{
		evil.URL + "/anthropic/v1/models",
		"http://" + evilHost + "/anthropic/v1/models",
		up.URL + "/anthropic/v1/models",
		"*",
	} {
		if statuses, _ := rawFront(t, sess, rawGet(sess, target)); len(statuses) != 1 || statuses[0] != 400 {
			t.Errorf("case %d: GET %s: %v, want [400]", i, target, statuses)
		}
	}
	connect := "CONNECT " + evilHost + " HTTP/1.1\r\nHost: " + evilHost + "\r\nAuthorization: Bearer " + string(sess.Phantom()) + "\r\nConnection: close\r\n\r\n"
	if statuses, _ := rawFront(t, sess, connect); len(statuses) != 1 || statuses[0] != 400 {
		t.Errorf("CONNECT: %v, want [400]", statuses)
	}
	if n := up.requests.Load() + evil.requests.Load(); n != 0 {
		t.Fatalf("%d requests reached an upstream, want 0", n)
	}
	other := strings.Replace(rawGet(sess, "/anthropic/v1/models"), "Host: sandbox", "Host: "+evilHost, 1)
	if statuses, _ := rawFront(t, sess, other); len(statuses) != 1 || statuses[0] != 200 {
		t.Fatalf("Host: %s: %v, want [200]", evilHost, statuses)
	}
	got, _ := up.last(t)
	if n := evil.requests.Load(); n != 0 || got.Host != strings.TrimPrefix(up.URL, "https://") {
		t.Errorf("the Host header steered the request: %d requests at the other server, Host %q at the upstream", n, got.Host)
	}
}

// Request smuggling shapes: two differing Content-Lengths, or a
// Transfer-Encoding other than one "chunked", are refused by net/http. A
// Content-Length beside Transfer-Encoding: chunked is read as chunked
// (RFC 9112 allows it, and net/http does it) and the front then closes the
// connection, so the request hidden after the chunked body is never read:
// without the phantom nothing is forwarded, and with it exactly one
// request reaches the upstream, with the chunked body and framing of its
// own.
func TestInjectRefusesRequestSmuggling(t *testing.T) {
	sess, up := hostileFront(t)
	auth := "Authorization: Bearer " + string(sess.Phantom()) + "\r\n"
	hidden := "GET /openai/v1/models HTTP/1.1\r\nHost: sandbox\r\nx-api-key: " + string(sess.Phantom()) + "\r\n\r\n"
	chunk := fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", 5, "hello")
	for i, tc := range []struct {
		raw  string
		want []int
	}{
		{"POST /openai/v1/x HTTP/1.1\r\nHost: s\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", []int{400}},
		{"POST /openai/v1/x HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + chunk, []int{501}},
		{"POST /openai/v1/x HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n" + chunk, []int{501}},
		{"POST /openai/v1/x HTTP/1.1\r\nHost: s\r\nContent-Length: -5\r\n\r\nhello", []int{400}},
		// Without the phantom: 401, then the connection closes.
		{"POST /openai/v1/x HTTP/1.1\r\nHost: s\r\nContent-Length: " + fmt.Sprint(len(chunk)) + "\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + hidden, []int{401}},
	} {
		statuses, closed := rawFront(t, sess, tc.raw)
		if fmt.Sprint(statuses) != fmt.Sprint(tc.want) || !closed {
			t.Errorf("case %d: %v (closed %v), want %v and a closed connection", i, statuses, closed, tc.want)
		}
	}
	if n := up.requests.Load(); n != 0 {
		t.Fatalf("%d requests reached the upstream, want 0", n)
	}
	// With the phantom: one request, the chunked one.
	raw := "POST /anthropic/v1/models HTTP/1.1\r\nHost: s\r\n" + auth + "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + hidden
	statuses, closed := rawFront(t, sess, raw)
	if fmt.Sprint(statuses) != "[200]" || !closed {
		t.Errorf("CL and TE with the phantom: %v (closed %v), want [200] and a closed connection", statuses, closed)
	}
	got, body := up.last(t)
	if n := up.requests.Load(); n != 1 || string(body) != "hello" || got.URL.Path != "/api/v1/models" {
		t.Errorf("upstream: %d requests, last %s with %q; want 1, /api/v1/models with \"hello\"", n, got.URL.Path, body)
	}
}

// Header injection: a CR or NUL inside a header value or the request
// line is refused by net/http with 400; nothing is forwarded.
func TestInjectRefusesHeaderInjection(t *testing.T) {
	sess, up := hostileFront(t)
	auth := "Authorization: Bearer " + string(sess.Phantom()) + "\r\n"
	for i, raw := range []string{
		"GET /anthropic/v1/models HTTP/1.1\r\nHost: s\r\n" + auth + "X-A: a\rX-Injected: yes\r\n\r\n",
		"GET /anthropic/v1/models HTTP/1.1\r\nHost: s\r\n" + auth + "X-A: a\x00b\r\n\r\n",
		"GET /anthropic/v1/models HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer " + string(sess.Phantom()) + "\rX-B: c\r\n\r\n",
		"GET /anthropic/v1/models\rX-Injected: yes HTTP/1.1\r\nHost: s\r\n" + auth + "\r\n",
		"GET /anthropic/v1/models HTTP/1.1\r\nHost: s\r\n" + auth + "X A: b\r\n\r\n",
		"GET /anthropic/v1/models HTTP/1.1\r\nHost: s\r\n" + auth + "X-A\r\n\r\n",
	} {
		if statuses, _ := rawFront(t, sess, raw); len(statuses) != 1 || statuses[0] != 400 {
			t.Errorf("case %d: %v, want [400]", i, statuses)
		}
	}
	if n := up.requests.Load(); n != 0 {
		t.Errorf("%d requests reached the upstream, want 0", n)
	}
}

// Headers past 64 KiB are refused with 431; a body past the route's
// bound with 413, whether its Content-Length says so (nothing forwarded)
// or it is chunked and goes on past it (nothing forwarded on a token
// route, which keeps bodies for a retry; on a key route, which streams
// from the first byte, the upstream never gets the whole body).
func TestInjectRefusesOversizedHeadersAndBodies(t *testing.T) {
	sess, up := hostileFront(t)
	auth := "Authorization: Bearer " + string(sess.Phantom()) + "\r\n"
	big := "GET /anthropic/v1/models HTTP/1.1\r\nHost: s\r\n" + auth + "X-Big: " + strings.Repeat("a", 70<<10) + "\r\n\r\n"
	if statuses, _ := rawFront(t, sess, big); len(statuses) != 1 || statuses[0] != 431 {
		t.Errorf("70 KiB header: %v, want [431]", statuses)
	}
	declared := "POST /anthropic/v1/models HTTP/1.1\r\nHost: s\r\n" + auth + "Content-Length: 1025\r\nConnection: close\r\n\r\n" + strings.Repeat("b", 1025)
	if statuses, _ := rawFront(t, sess, declared); len(statuses) != 1 || statuses[0] != 413 {
		t.Errorf("declared 1025-byte body: %v, want [413]", statuses)
	}
	chunks := fmt.Sprintf("400\r\n%s\r\n400\r\n%s\r\n0\r\n\r\n", strings.Repeat("c", 1024), strings.Repeat("d", 1024))
	chunked := "POST /anthropic/v1/models HTTP/1.1\r\nHost: s\r\n" + auth + "Transfer-Encoding: chunked\r\n\r\n" + chunks
	if statuses, _ := rawFront(t, sess, chunked); len(statuses) != 1 || statuses[0] != 413 {
		t.Errorf("chunked 2 KiB body: %v, want [413]", statuses)
	}
	if n := up.requests.Load(); n != 0 {
		t.Fatalf("%d requests reached the upstream, want 0", n)
	}
	keyed := "POST /openai/v1/files HTTP/1.1\r\nHost: s\r\nx-api-key: " + string(sess.Phantom()) + "\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
	if statuses, _ := rawFront(t, sess, keyed); len(statuses) != 1 || statuses[0] != 413 {
		t.Errorf("chunked 2 KiB body on a key route: %v, want [413]", statuses)
	}
	up.mu.Lock()
	defer up.mu.Unlock()
	for _, b := range up.bodies {
		if len(b) > 1024 {
			t.Errorf("the upstream received %d bytes of a body bounded at 1024", len(b))
		}
	}
}

// Connections that trickle their headers (slowloris) do not hold other
// clients up, and are cut off once the header timeout passes, without an
// answer; nothing of theirs is forwarded.
func TestInjectSlowlorisDoesNotHoldOthers(t *testing.T) {
	defer func(d time.Duration) { injectReadHeaderTimeout = d }(injectReadHeaderTimeout)
	injectReadHeaderTimeout = 500 * time.Millisecond
	sess, up := hostileFront(t)
	var slow []net.Conn
	for range 8 {
		c, err := net.Dial("unix", sess.InjectSocketPath())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET /anthropic/v1/models HTTP/1.1\r\nHost: s\r\nX-Slow: a")
		slow = append(slow, c)
	}
	c := frontClient(t, sess)
	for range 5 {
		if status, _, _ := call(t, c, "GET", "/anthropic/v1/models", "Authorization", bearer(sess.Phantom()), nil); status != 200 {
			t.Fatalf("a well-behaved client while 8 connections trickle: %d", status)
		}
	}
	start := time.Now()
	for i, sc := range slow {
		sc.SetReadDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(sc, "a") // one more byte, within the timeout for the first ones
		n, err := sc.Read(make([]byte, 1))
		var ne net.Error
		if n != 0 || err == nil || errors.As(err, &ne) && ne.Timeout() {
			t.Errorf("slow connection %d: read %d bytes, %v; want it closed without an answer", i, n, err)
		}
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("slow connections closed after %v, want about 500ms", took)
	}
	if n := up.requests.Load(); n != 5 {
		t.Errorf("%d requests reached the upstream, want the 5 of the well-behaved client", n)
	}
}

// FuzzInjectPath: every raw path the front lets through means one path
// to every reader: it decodes, has no '.' or '..' segment, empty segment,
// slash, backslash or control character hidden in an escape, and is
// forwarded byte for byte as it was sent.
func FuzzInjectPath(f *testing.F) {
	for _, seed := range []string{"/anthropic/v1/messages", "/a/%2e%2E/b", "/a/.%2e", "/a%2fb", "/a%5Cb", "/a//b", "/a/b/", "/",
		"/a/caf%C3%A9", "/a/b:c;d=e@f", "/a/%00", "/a/%zz", "/a\\b", "/a/b#c", "/a/\xc0\xae"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		if badRawPath(raw) != "" {
			return
		}
		decoded, err := url.PathUnescape(raw)
		if err != nil {
			t.Fatalf("%q passed but does not decode: %v", raw, err)
		}
		rawSegs, segs := strings.Split(raw, "/"), strings.Split(decoded, "/")
		if len(rawSegs) != len(segs) {
			t.Fatalf("%q passed with an encoded slash: %q", raw, decoded)
		}
		for i, seg := range segs {
			if seg == "." || seg == ".." || seg == "" && i != 0 && i != len(segs)-1 || strings.ContainsAny(seg, "\\\x00\r\n\x7f") {
				t.Fatalf("%q passed, decoding to %q", raw, decoded)
			}
		}
		if u := (url.URL{Path: decoded, RawPath: raw}); u.EscapedPath() != raw {
			t.Fatalf("%q passed but would be forwarded as %q", raw, u.EscapedPath())
		}
	})
}
