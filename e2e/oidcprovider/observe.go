package oidcprovider

import (
	"bytes"
	"io"
	"net/http"
	"net/url"
	"sync"
)

// observer is the provider's handler with a record of what reached the
// endpoints the tests ask about: the grant type of each token request,
// the number of revocation requests, and the query of each authorization
// request. It keeps no token request's body: those carry secrets.
type observer struct {
	next                http.Handler
	authPath, tokenPath string
	revocationPath      string
	mu                  sync.Mutex
	grants              map[string]int
	revocations         int
	authorize           []url.Values
}

// maxForm bounds what the observer reads of a token request's body; the
// op package reads no more of a form than that either.
const maxForm = 1 << 20

func newObserver(p *Provider, next http.Handler) *observer {
	return &observer{next: next, authPath: pathOf(p.AuthURL), tokenPath: pathOf(p.TokenURL),
		revocationPath: pathOf(p.RevocationURL), grants: make(map[string]int)}
}

func pathOf(raw string) string {
	u, _ := url.Parse(raw) // checked by discover
	return u.Path
}

func (o *observer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case o.tokenPath:
		// The grant type is in the form body, which the provider reads
		// after us: read it, and put it back.
		body, err := io.ReadAll(io.LimitReader(r.Body, maxForm))
		r.Body.Close()
		r.Body = io.NopCloser(bytes.NewReader(body))
		grant := ""
		if form, perr := url.ParseQuery(string(body)); err == nil && perr == nil {
			grant = form.Get("grant_type")
		}
		o.mu.Lock()
		o.grants[grant]++
		o.mu.Unlock()
	case o.revocationPath:
		o.mu.Lock()
		o.revocations++
		o.mu.Unlock()
	case o.authPath:
		o.mu.Lock()
		o.authorize = append(o.authorize, r.URL.Query())
		o.mu.Unlock()
	}
	o.next.ServeHTTP(w, r)
}

func (o *observer) tokenCalls(grant string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.grants[grant]
}

func (o *observer) revocationCalls() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.revocations
}

func (o *observer) authorizeRequests() []url.Values {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]url.Values, len(o.authorize))
	for i, q := range o.authorize {
		out[i] = make(url.Values, len(q))
		for k, v := range q {
			out[i][k] = append([]string(nil), v...)
		}
	}
	return out
}
