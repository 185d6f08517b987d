package credproxy

import (
	"io"
	"net/http"
	"path"
	"strings"
	"sync"
	"testing"
)

// Found by an attacking review. A path segment that is a dot segment once its ";parameters" are removed
// ("..;", "..;x=1", "%2e%2e;x", "..%3b") is a parent reference to servers
// that strip path parameters before normalising (Tomcat, Jetty, Spring's
// UrlPathHelper, many Java API gateways). The front checks PathPrefixes
// on the path as sent and forwards it as sent, so on such an upstream a
// route allowed only /v1/models reaches /admin with the real credential.
func TestInjectRefusesDotSegmentsWithPathParameters(t *testing.T) {
	// A Tomcat-like upstream: drop ";..." from each segment, then
	// normalise; it reports the path it serves.
	var mu sync.Mutex
	var served []string
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		segs := strings.Split(r.URL.EscapedPath(), "/")
		for i, s := range segs {
			s, _, _ = strings.Cut(s, ";")
			segs[i] = s
		}
		p := path.Clean(strings.Join(segs, "/"))
		mu.Lock()
		served = append(served, p)
		mu.Unlock()
		io.WriteString(w, p)
	})
	srv, _ := injectServer(t, injectStore(t), Options{})
	rt := tokenRoute(up)
	rt.PathPrefixes = []string{"/v1/models"}
	sess := injectSession(t, srv, rt)
	for _, target := range []string{
		"/anthropic/v1/models/..;/..;/admin",
		"/anthropic/v1/models/..;x=1/..;/admin",
		"/anthropic/v1/models/%2e%2e;x/%2E%2E;/admin",
		"/anthropic/v1/models/.;/..;/admin",
		"/anthropic/v1/models/..%3b/..%3B/admin",
	} {
		before := up.requests.Load()
		statuses, _ := rawFront(t, sess, rawGet(sess, target))
		if len(statuses) != 1 || statuses[0] != http.StatusBadRequest || up.requests.Load() != before {
			mu.Lock()
			seen := append([]string(nil), served...)
			mu.Unlock()
			t.Errorf("GET %s: %v, %d upstream requests (upstream served %v); want [400] and nothing forwarded",
				target, statuses, up.requests.Load()-before, seen)
		}
	}
	// The control: a parameter on an ordinary segment still passes.
	if statuses, _ := rawFront(t, sess, rawGet(sess, "/anthropic/v1/models/claude;v=1")); len(statuses) != 1 || statuses[0] != 200 {
		t.Errorf("a ;parameter on an ordinary segment: %v, want [200]", statuses)
	}
}

// Found by an attacking review. A sandbox's own malformed request body (a bad chunk size) on a token
// route is answered 502 "the upstream could not be reached" and logged
// at WARN as an upstream failure, once per request, outside the session's
// refusal budget: a sandbox can write hundreds of host log lines a second
// that blame the provider. It is the sandbox's error: 400, and logged, if
// at all, within the budget.
func TestInjectMalformedBodiesAreTheSandboxsErrorNotTheUpstreams(t *testing.T) {
	up := newUpstream(t, nil)
	srv, logs := injectServer(t, injectStore(t), Options{})
	sess := injectSession(t, srv, tokenRoute(up), keyRoute(up))
	ph := string(sess.Phantom())
	const n = 300
	var statuses []int
	for i := range n {
		target, hdr := "/anthropic/v1/messages", "Authorization: Bearer "+ph
		if i%2 == 1 {
			target, hdr = "/openai/v1/chat", "x-api-key: "+ph
		}
		raw := "POST " + target + " HTTP/1.1\r\nHost: s\r\n" + hdr + "\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
		got, _ := rawFront(t, sess, raw)
		statuses = append(statuses, got...)
	}
	if got := strings.Count(logs.String(), "upstream request failed"); got > 0 {
		t.Errorf("%d of %d malformed request bodies logged as upstream failures at WARN", got, n)
	}
	if lines := strings.Count(logs.String(), "\n"); lines > 60 {
		t.Errorf("%d requests with malformed bodies wrote %d log lines; want them within the refusal budget", n, lines)
	}
	for _, s := range statuses {
		if s != http.StatusBadRequest {
			t.Errorf("a malformed chunked body answered %d, want 400", s)
			break
		}
	}
}

// Found by an attacking review. TRACE makes a server echo the request it received, headers included,
// in its body (Apache httpd's default TraceEnable is On). A route that
// lists it hands the sandbox the real credential in the answer. NewSession
// must refuse it, as it refuses CONNECT.
func TestInjectRouteRefusesTRACE(t *testing.T) {
	for _, m := range []string{"TRACE", "TRACK"} {
		if _, err := compileRoute(Route{Name: "x", Upstream: "https://api.example", Key: "k", Methods: []string{"GET", m}}, false); err == nil {
			t.Errorf("a route allowing %s was accepted", m)
		}
	}
}
