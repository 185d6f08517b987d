package credproxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// injection is one request through the front, as the proxy's Rewrite,
// Transport and ErrorHandler see it (from the request's context).
type injection struct {
	f       *injectFront
	rt      *route
	peer    Peer
	rawRest string // the request's path after /<Name>, as sent
	cred    Secret // the real credential, as injected last
	// tooLarge is set once the request's body went past its bound, and
	// badBody once reading it failed otherwise (a malformed chunk, say):
	// the sandbox's error, not the upstream's.
	tooLarge atomic.Bool
	badBody  atomic.Bool
}

type injectionKey struct{}

// ServeHTTP serves one request to the front: it checks the request's
// form, route, phantom credential and the route's rules, in that order,
// refusing what fails before anything is forwarded, then forwards it with
// the real credential.
func (f *injectFront) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !f.enter() {
		http.Error(w, "credproxy: session closed", http.StatusServiceUnavailable)
		return
	}
	defer f.handlers.Done()
	if len(r.TransferEncoding) > 0 {
		// net/http reads a request with both Transfer-Encoding: chunked
		// and a Content-Length by the former and drops the latter, as
		// RFC 9112 (section 6.1) allows, without a word; the same
		// section says to close the connection after answering such a
		// request, so that nothing that followed the body is taken for
		// another request. Chunked requests are rare from SDKs: all are
		// answered so.
		w.Header().Set("Connection", "close")
	}
	peer, _ := r.Context().Value(peerKey{}).(Peer)
	rt, rawRest, status, reason := f.match(r)
	if status != 0 {
		f.refuse(w, r, peer, rt, status, reason)
		return
	}
	if r.ContentLength > rt.MaxRequestBody {
		f.refuse(w, r, peer, rt, http.StatusRequestEntityTooLarge, "request body too large")
		return
	}
	inj := &injection{f: f, rt: rt, peer: peer, rawRest: rawRest}
	cred, fail := f.credential(r.Context(), rt, peer)
	if fail != nil {
		fail.write(w)
		return
	}
	inj.cred = cred
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = &boundedBody{ReadCloser: http.MaxBytesReader(w, r.Body, rt.MaxRequestBody), inj: inj}
	}
	f.proxy.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), injectionKey{}, inj)))
}

// match checks what the request asks for, and returns its route and the
// rest of its path as sent, or the status and reason to refuse it with.
func (f *injectFront) match(r *http.Request) (rt *route, rawRest string, status int, reason string) {
	if r.Method == http.MethodConnect {
		return nil, "", http.StatusBadRequest, "CONNECT is not supported"
	}
	// The request target as sent: a path, never an absolute URL (which
	// would name another host) nor an authority or "*".
	raw, _, _ := strings.Cut(r.RequestURI, "?")
	if !strings.HasPrefix(raw, "/") {
		return nil, "", http.StatusBadRequest, "request target must be a path"
	}
	if bad := badRawPath(raw); bad != "" {
		return nil, "", http.StatusBadRequest, bad
	}
	name, rest, hasRest := strings.Cut(raw[1:], "/")
	rt = f.routes[name]
	if rt == nil {
		return nil, "", http.StatusNotFound, "no such route"
	}
	if hasRest {
		rawRest = "/" + rest
	}
	if !f.presented(r, rt) {
		return rt, "", http.StatusUnauthorized, "missing or wrong phantom credential"
	}
	decoded, _ := url.PathUnescape(rawRest) // badRawPath checked every escape
	if !rt.allows(r.Method, decoded) {
		return rt, "", http.StatusForbidden, "method or path not allowed on this route"
	}
	return rt, rawRest, 0, ""
}

// presented reports whether the request carries the session's phantom
// where the route's Header says, and only once. The comparison takes the
// same time whatever was sent.
func (f *injectFront) presented(r *http.Request, rt *route) bool {
	values := r.Header.Values(rt.header)
	if len(values) != 1 {
		return false
	}
	v := values[0]
	if rt.bearer {
		scheme, cred, ok := strings.Cut(v, " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") {
			return false
		}
		v = strings.TrimLeft(cred, " ")
	}
	d := sha256.Sum256([]byte(v))
	return subtle.ConstantTimeCompare(d[:], f.phantom[:]) == 1
}

// refuse answers a request the front will not forward with status and a
// one-line reason, and logs the refusal with the session and the peer.
func (f *injectFront) refuse(w http.ResponseWriter, r *http.Request, peer Peer, rt *route, status int, reason string) {
	attrs := []slog.Attr{slog.String("socket", injectSocketName), slog.String("method", logOp(r.Method)), slog.Int("status", status)}
	if rt != nil {
		attrs = append(attrs, slog.String("route", rt.Name))
	}
	f.srv.refused(f.ss, peer, "request", reason, attrs...)
	http.Error(w, "credproxy: "+reason, status)
}

// frontFailure is the front's own answer to a request it could not forward:
// a status and a fixed text, never one that carries a credential or an
// upstream's or store's words.
type frontFailure struct {
	status     int
	msg        string
	retryAfter time.Duration // for 503
}

func (e *frontFailure) write(w http.ResponseWriter) {
	if e.retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(max(1, int((e.retryAfter+time.Second-1)/time.Second))))
	}
	http.Error(w, "credproxy: "+e.msg, e.status)
}

// credential returns the real credential of rt as get_token or
// get_api_key would serve it to the session, or the failure to answer
// with instead; its cause is logged on the host.
func (f *injectFront) credential(ctx context.Context, rt *route, peer Peer) (Secret, *frontFailure) {
	s := f.srv
	ctx, cancel := context.WithTimeout(ctx, s.opts.StoreTimeout)
	defer cancel()
	if err := f.ss.policy.Authorize(ctx, rt.request(peer)); err != nil {
		s.refused(f.ss, peer, "request", "the session's policy does not allow this route",
			slog.String("socket", injectSocketName), slog.String("route", rt.Name), slog.String("policy", err.Error()))
		return "", &frontFailure{status: http.StatusForbidden, msg: "the session's grant does not allow this route"}
	}
	var cred Secret
	var err error
	if rt.Key != "" {
		cred, err = s.opts.Store.GetAPIKey(ctx, rt.Key)
	} else {
		var tok Token
		if tok, err = s.opts.Store.GetToken(ctx, rt.Provider, rt.Bucket); err == nil {
			if tok, err = s.tokenToServe(ctx, rt.Provider, rt.Bucket, tok); err == nil {
				s.tokenServed(f.ss, rt.Provider, rt.Bucket, tok)
				cred = tok.AccessToken()
			}
		}
	}
	var later *retryLater
	switch {
	case err == nil && (cred == "" || !validHeaderValue(string(cred))):
		s.log.Warn("credproxy: injection front: the stored credential cannot be sent in a header", "session", f.ss.id,
			"route", rt.Name, "provider", rt.Provider, "bucket", rt.Bucket, "key", rt.Key)
		return "", &frontFailure{status: http.StatusBadGateway, msg: "the host's credential for this route is unusable"}
	case err == nil:
		return cred, nil
	case errors.Is(err, ErrNotFound):
		return "", &frontFailure{status: http.StatusBadGateway, msg: "the host holds no credential for this route"}
	case errors.Is(err, ErrReauthRequired), errors.Is(err, ErrRefreshNotAvailable):
		return "", &frontFailure{status: http.StatusBadGateway, msg: "the host's token for this route has expired; log in again on the host"}
	case errors.As(err, &later):
		return "", &frontFailure{status: http.StatusServiceUnavailable, msg: "the host's token for this route has expired; retry later", retryAfter: later.after}
	}
	op := OpGetToken
	if rt.Key != "" {
		op = OpGetAPIKey
	}
	s.logStoreError(op, args{provider: rt.Provider, bucket: rt.Bucket, name: rt.Key}, err)
	return "", &frontFailure{status: http.StatusBadGateway, msg: "the host could not read the credential for this route"}
}

// validHeaderValue reports whether v can be sent as a header value: no
// control characters (CR and LF above all) and no leading or trailing
// space.
func validHeaderValue(v string) bool {
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < 0x20 || c == 0x7f {
			return false
		}
	}
	return strings.TrimSpace(v) == v
}

// rewrite makes the upstream request: the route's upstream and the rest
// of the path, the query as sent, the upstream's Host, no credential or
// hop-by-hop header of the sandbox's, and the real credential. (httputil
// has already removed the hop-by-hop headers the request named and the
// Forwarded and X-Forwarded-* headers; nothing is added that tells who
// sent it.)
func (f *injectFront) rewrite(pr *httputil.ProxyRequest) {
	inj := pr.In.Context().Value(injectionKey{}).(*injection)
	u := *inj.rt.upstream
	raw := u.EscapedPath() + inj.rawRest
	if raw == "" {
		raw = "/"
	}
	u.Path, _ = url.PathUnescape(raw)
	u.RawPath = raw
	u.RawQuery = pr.In.URL.RawQuery
	pr.Out.URL = &u
	pr.Out.Host = ""
	h := pr.Out.Header
	for name := range h {
		if strings.HasPrefix(name, "Proxy-") {
			delete(h, name)
		}
	}
	for _, name := range credentialHeaders {
		h.Del(name)
	}
	for _, name := range [...]string{"Connection", "Keep-Alive", "Te", "Trailer", "Transfer-Encoding", "Upgrade"} {
		h.Del(name)
	}
	h.Del(inj.rt.header)
	setCredential(pr.Out, inj.rt, inj.cred)
}

func setCredential(req *http.Request, rt *route, cred Secret) {
	if rt.bearer {
		req.Header.Set("Authorization", "Bearer "+string(cred))
	} else {
		req.Header.Set(rt.header, string(cred))
	}
}

// injectTransport sends a request upstream with the session's transport.
// For a token route, an upstream's 401 leads to one host-side refresh
// (refresh_token's, for the session: the cooldown and the single flight
// apply, so a sandbox cannot make the host call the provider more than
// once per cooldown) and, if the refresh gave another token and the
// request's body could be kept (at most 1 MiB), one retry with it.
// Otherwise the upstream's 401 goes back as it came.
type injectTransport struct{ f *injectFront }

func (t injectTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	inj := req.Context().Value(injectionKey{}).(*injection)
	f := t.f
	if inj.rt.Provider == "" {
		return f.transport.RoundTrip(req)
	}
	var replay []byte
	replayable := req.Body == nil || req.Body == http.NoBody
	if !replayable {
		body := req.Body
		buf, err := io.ReadAll(io.LimitReader(body, injectReplayBuffer+1))
		if err != nil {
			body.Close()
			return nil, err
		}
		if len(buf) <= injectReplayBuffer {
			replay, replayable = buf, true
			body.Close()
			req.Body = io.NopCloser(bytes.NewReader(buf))
			req.ContentLength = int64(len(buf))
		} else {
			req.Body = struct {
				io.Reader
				io.Closer
			}{io.MultiReader(bytes.NewReader(buf), body), body}
		}
	}
	resp, err := f.transport.RoundTrip(req)
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	fresh, ok := f.refreshAfter401(req.Context(), inj)
	if !ok || !replayable {
		return resp, nil // the upstream's 401, as it came
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	retry := req.Clone(req.Context())
	if replay != nil {
		retry.Body = io.NopCloser(bytes.NewReader(replay))
	}
	setCredential(retry, inj.rt, fresh)
	return f.transport.RoundTrip(retry)
}

// refreshAfter401 asks the host to refresh the route's token after the
// upstream refused the one injected, as refresh_token does for the
// session, and returns the new access token if there is one that differs.
func (f *injectFront) refreshAfter401(ctx context.Context, inj *injection) (Secret, bool) {
	s, rt := f.srv, inj.rt
	ctx, cancel := context.WithTimeout(ctx, s.opts.StoreTimeout)
	defer cancel()
	tok, err := s.refresh.refresh(ctx, rt.Provider, rt.Bucket, want{session: f.ss})
	if err != nil {
		s.log.Debug("credproxy: injection front: no retry after the upstream's 401; refresh failed",
			"session", f.ss.id, "route", rt.Name, "err", redact(err.Error(), string(inj.cred)))
		return "", false
	}
	s.tokenServed(f.ss, rt.Provider, rt.Bucket, tok)
	fresh := tok.AccessToken()
	if fresh == "" || fresh == inj.cred || !validHeaderValue(string(fresh)) {
		return "", false
	}
	inj.cred = fresh
	return fresh, true
}

// forwarded logs each upstream response at debug level.
func (f *injectFront) forwarded(resp *http.Response) error {
	inj := resp.Request.Context().Value(injectionKey{}).(*injection)
	f.srv.log.Debug("credproxy: injected", "session", f.ss.id, "peer", inj.peer, "route", inj.rt.Name,
		"method", resp.Request.Method, "status", resp.StatusCode)
	return nil
}

// proxyError answers a request that could not be forwarded, or whose
// upstream gave no response: 413 for a body past its bound, 502
// otherwise, with a fixed text. The error, which may quote the request,
// is logged on the host, redacted.
func (f *injectFront) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	inj := r.Context().Value(injectionKey{}).(*injection)
	var tooLarge *http.MaxBytesError
	if inj.tooLarge.Load() || errors.As(err, &tooLarge) {
		f.refuse(w, r, inj.peer, inj.rt, http.StatusRequestEntityTooLarge, "request body too large")
		return
	}
	if inj.badBody.Load() {
		// Refused, so logged within the session's refusal budget: a
		// sandbox must not fill the host's log, nor blame the upstream.
		f.refuse(w, r, inj.peer, inj.rt, http.StatusBadRequest, "malformed request body")
		return
	}
	if r.Context().Err() != nil {
		// The sandbox went away, or the session closed: nobody reads this.
		w.WriteHeader(http.StatusBadGateway)
		return
	}
	f.srv.log.Warn("credproxy: injection front: upstream request failed", "session", f.ss.id, "route", inj.rt.Name,
		"err", redactCut(err.Error(), string(inj.cred)))
	http.Error(w, "credproxy: the upstream could not be reached", http.StatusBadGateway)
}

// boundedBody is a request body under http.MaxBytesReader that notes when
// the bound was passed, however the transport reports the error.
type boundedBody struct {
	io.ReadCloser
	inj *injection
}

func (b *boundedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	var tooLarge *http.MaxBytesError
	switch {
	case err == nil || err == io.EOF:
	case errors.As(err, &tooLarge):
		b.inj.tooLarge.Store(true)
	default:
		b.inj.badBody.Store(true)
	}
	return n, err
}
