package credproxy

import (
	"context"
	"net"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strings"
	"unicode/utf8"
)

// Route says how a session's injection front forwards the requests of one
// provider ([SessionOptions].Routes). A request to /<Name>/rest goes to
// Upstream + /rest, with the session's phantom credential ([Session.Phantom])
// replaced by the real one: the current access token of a stored OAuth
// token (Provider, Bucket), or an API key (Key). Exactly one of Provider and
// Key is set. The zero values of the other fields are safe and say what
// they mean. A Route is a plain value: NewSession copies it.
type Route struct {
	// Name is the route's first path segment: requests to /<Name>/rest
	// go to Upstream + /rest. A valid store name (1 to 64 characters
	// from A-Z a-z 0-9 . _ @ -), not "." or "..", unique in the session.
	Name string

	// Upstream is the base URL requests are forwarded to: https only,
	// with a host and no user, query or fragment; it may have a path
	// prefix, which the rest of the request's path is appended to. http
	// is allowed only for a loopback IP address and only when
	// [Options.InjectTransport] is set, for tests.
	Upstream string

	// Provider names the stored OAuth token whose current access token is
	// injected, in Bucket ("" means [DefaultBucket]). It is read from the
	// store for each request and refreshed on the host as get_token does;
	// a 401 from the upstream leads to one host-side refresh and one
	// retry (see [SessionOptions].Routes).
	Provider string
	Bucket   string

	// Key names the stored API key injected instead of a token.
	Key string

	// Header is where the sandbox's SDK sends its credential, and where
	// the real one goes. "" or "Authorization" means
	// "Authorization: Bearer <credential>"; any other name (such as
	// "x-api-key") carries the bare credential.
	Header string

	// Methods lists the HTTP methods allowed; empty means GET and POST.
	Methods []string

	// PathPrefixes lists the paths allowed after /<Name>, each matching
	// itself and what lies below it ("/v1/messages" allows
	// /v1/messages and /v1/messages/batches, not /v1/messages2); empty
	// means every path.
	PathPrefixes []string

	// MaxRequestBody bounds a request's body, in bytes; a longer one is
	// refused with 413 and no more of it is forwarded. Zero means 32 MiB.
	MaxRequestBody int64
}

// DefaultMaxRequestBody is the bound on a request body through the
// injection front when [Route].MaxRequestBody is zero.
const DefaultMaxRequestBody = 32 << 20

// route is a Route checked and ready to serve.
type route struct {
	Route
	upstream *url.URL // with no trailing slash in its path
	header   string   // canonical
	bearer   bool     // header is Authorization, with a Bearer scheme
}

// credentialHeaders are removed from every request before the real
// credential is set: whatever the sandbox sends in them is either the
// phantom or something the upstream must not see.
var credentialHeaders = []string{"Authorization", "Proxy-Authorization", "Cookie", "X-Api-Key", "Api-Key", "X-Goog-Api-Key"}

// reservedHeaders may not carry a route's credential: the request's
// framing and routing depend on them.
var reservedHeaders = []string{"Connection", "Content-Length", "Content-Type", "Host", "Keep-Alive", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// compileRoutes checks routes and returns them by name. A Grant as policy
// must allow what each route injects: a route that could never be served
// is a mistake to report now, not a 403 later.
func compileRoutes(routes []Route, policy Policy, customTransport bool) (map[string]*route, error) {
	out := make(map[string]*route, len(routes))
	for _, r := range routes {
		cr, err := compileRoute(r, customTransport)
		if err != nil {
			return nil, err
		}
		if _, dup := out[r.Name]; dup {
			return nil, errorf("Route %q: two routes have that name", r.Name)
		}
		if g, ok := policy.(*Grant); ok {
			if err := g.Authorize(context.Background(), cr.request(Peer{})); err != nil {
				return nil, errorf("Route %q injects what the session's Grant does not allow (%s); grant it, or remove the route", r.Name, g)
			}
		}
		out[r.Name] = cr
	}
	return out, nil
}

func compileRoute(r Route, customTransport bool) (*route, error) {
	r.Methods = slices.Clone(r.Methods)
	r.PathPrefixes = slices.Clone(r.PathPrefixes)
	if !validName(r.Name) || r.Name == "." || r.Name == ".." {
		return nil, errorf("Route name %q is not a name (1 to 64 characters from A-Z a-z 0-9 . _ @ -, not . or ..)", r.Name)
	}
	bad := func(format string, args ...any) error {
		return errorf("Route %q: "+format, append([]any{r.Name}, args...)...)
	}
	switch {
	case (r.Provider == "") == (r.Key == ""):
		return nil, bad("set exactly one of Provider and Key")
	case r.Provider != "" && !validName(r.Provider), r.Key != "" && !validName(r.Key):
		return nil, bad("the provider or key name is not a name (1 to 64 characters from A-Z a-z 0-9 . _ @ -)")
	case r.Key != "" && r.Bucket != "":
		return nil, bad("Bucket is for a Provider's token, not for a Key")
	case r.Bucket != "" && !validName(r.Bucket):
		return nil, bad("Bucket %q is not a name", r.Bucket)
	case r.MaxRequestBody < 0:
		return nil, bad("MaxRequestBody is negative; use zero for the default")
	}
	if r.Provider != "" && r.Bucket == "" {
		r.Bucket = DefaultBucket
	}
	if r.MaxRequestBody == 0 {
		r.MaxRequestBody = DefaultMaxRequestBody
	}
	u, err := url.Parse(r.Upstream)
	if err != nil {
		return nil, bad("Upstream is not a URL")
	}
	switch {
	case u.Scheme == "http" && customTransport && isLoopbackIP(u.Hostname()):
	case u.Scheme == "http":
		return nil, bad("Upstream %s is not https (http is only for a loopback IP address with Options.InjectTransport set, in tests)", r.Upstream)
	case u.Scheme != "https":
		return nil, bad("Upstream must be an https URL")
	}
	if u.Host == "" || u.User != nil || u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || u.Opaque != "" {
		return nil, bad("Upstream must be a base URL with a host and no user, query or fragment")
	}
	if p := u.EscapedPath(); p != "" && (badRawPath(p) != "" || !strings.HasPrefix(p, "/")) {
		return nil, bad("Upstream's path %q is not a clean path", p)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	u.RawPath = strings.TrimSuffix(u.RawPath, "/")

	header := http.CanonicalHeaderKey(r.Header)
	if header == "" {
		header = "Authorization"
	}
	if !validHeaderName(header) || slices.Contains(reservedHeaders, header) || strings.HasPrefix(header, "Proxy-") {
		return nil, bad("Header %q cannot carry a credential", r.Header)
	}
	if len(r.Methods) == 0 {
		r.Methods = []string{http.MethodGet, http.MethodPost}
	}
	for _, m := range r.Methods {
		// CONNECT would open a tunnel; TRACE (and TRACK) have a server
		// echo the request it got, the real credential included.
		if !validHeaderName(m) || strings.EqualFold(m, http.MethodConnect) || strings.EqualFold(m, http.MethodTrace) || strings.EqualFold(m, "TRACK") {
			return nil, bad("method %q cannot be allowed", m)
		}
	}
	for _, p := range r.PathPrefixes {
		if !strings.HasPrefix(p, "/") || path.Clean(p) != strings.TrimSuffix(p, "/") && p != "/" || strings.ContainsAny(p, "%\\?#") {
			return nil, bad("path prefix %q is not a clean absolute path", p)
		}
	}
	return &route{Route: r, upstream: u, header: header, bearer: header == "Authorization"}, nil
}

// request is what the session's Policy is asked for each request of the
// route: the get_token or get_api_key the injection stands for.
func (r *route) request(peer Peer) *Request {
	if r.Key != "" {
		return &Request{Peer: peer, Op: OpGetAPIKey, Key: r.Key, Route: r.Name}
	}
	return &Request{Peer: peer, Op: OpGetToken, Provider: r.Provider, Bucket: r.Bucket, Route: r.Name}
}

// allows reports whether the route allows method on rest, the cleaned
// path after /<Name>.
func (r *route) allows(method, rest string) bool {
	if !slices.Contains(r.Methods, method) {
		return false
	}
	if len(r.PathPrefixes) == 0 {
		return true
	}
	for _, p := range r.PathPrefixes {
		if p == "/" || rest == strings.TrimSuffix(p, "/") || strings.HasPrefix(rest, strings.TrimSuffix(p, "/")+"/") {
			return true
		}
	}
	return false
}

// badRawPath says what is wrong with a request's path as it was sent
// (before any decoding), or returns "": a character RFC 3986 does not
// allow in a path (a backslash, '#', a space or a byte above 0x7f among
// them), a '..' or '.' segment, plain or percent-encoded, an empty
// segment ("//"), an encoded slash or backslash, an encoded control
// character, or a malformed escape. Paths that pass mean the same to
// every server that reads them, and are forwarded as they are.
func badRawPath(raw string) string {
	if !strings.HasPrefix(raw, "/") {
		return "not an absolute path"
	}
	if strings.Contains(raw, "\\") {
		return "backslash in path"
	}
	for i := 0; i < len(raw); i++ {
		if !isPathChar(raw[i]) {
			return "character not allowed in a path"
		}
	}
	if strings.Contains(raw, "//") {
		return "empty path segment"
	}
	for seg := range strings.SplitSeq(raw[1:], "/") {
		dec, err := url.PathUnescape(seg)
		// What some upstreams take a segment for: without ";parameters"
		// (Tomcat, Jetty, Spring drop them before normalising), and
		// without trailing spaces and dots (as Windows file systems
		// do), so that "..;x" and ".. " count as dot segments too.
		bare, _, _ := strings.Cut(dec, ";")
		bare = strings.TrimRight(bare, " .")
		switch {
		case err != nil:
			return "malformed escape in path"
		case dec == "." || dec == ".." || bare == "" && dec != "" || strings.HasPrefix(bare, ".."):
			return "dot segment in path"
		case strings.ContainsAny(dec, "/\\"):
			return "encoded slash or backslash in path"
		case !utf8.ValidString(dec):
			return "path not valid UTF-8"
		}
		for i := 0; i < len(dec); i++ {
			if dec[i] < 0x20 || dec[i] == 0x7f {
				return "control character in path"
			}
		}
	}
	return ""
}

// isPathChar reports whether c may appear in a path as sent: a pchar of
// RFC 3986 (unreserved, sub-delims, ':', '@', and '%' of an escape) or '/'.
func isPathChar(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-._~!$&'()*+,;=:@%/", c) >= 0
}

// validHeaderName reports whether s is an RFC 9110 token, as header
// names and methods are.
func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// isLoopbackIP reports whether host is a loopback IP address (not a name:
// "localhost" resolves to whatever the resolver says).
func isLoopbackIP(host string) bool {
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
