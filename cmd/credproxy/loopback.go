package main

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"html"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync/atomic"
	"time"
)

// defaultCallbackPath is the redirect URI's path when the provider names
// no redirect_url.
const defaultCallbackPath = "/callback"

// callback is the loopback redirect target of a browser login (RFC 8252,
// section 7.3): a listener on 127.0.0.1 that takes one answer on its path,
// the provider's redirect carrying the code or an error, and then closes,
// so that nothing else can reach it. Requests to other paths (a browser's
// favicon, say) get 404 and are not the answer.
type callback struct {
	redirect string // the redirect URI the provider is given
	path     string
	state    string
	ln       net.Listener
	srv      *http.Server
	served   chan struct{}
	answered atomic.Bool
	answer   chan callbackAnswer
}

type callbackAnswer struct {
	code string
	err  error
}

// listenCallback starts the redirect target for a login whose state is
// state: on 127.0.0.1 and a free port, with the path /callback, unless
// redirectURL (the provider's redirect_url, a loopback http URL with a
// port, as providers.go checks: 127.0.0.1 or [::1], never localhost)
// names them.
func listenCallback(redirectURL, state string) (*callback, error) {
	host, port, path := "127.0.0.1", "0", defaultCallbackPath
	if redirectURL != "" {
		u, err := url.Parse(redirectURL)
		if err != nil {
			return nil, fmt.Errorf("redirect_url: %w", err)
		}
		host, port, path = u.Hostname(), u.Port(), u.EscapedPath()
		if path == "" {
			path = "/"
		}
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(host, port))
	if err != nil {
		return nil, fmt.Errorf("listening for the provider's redirect: %w (is another login running?)", err)
	}
	cb := &callback{redirect: redirectURL, path: path, state: state, ln: ln,
		served: make(chan struct{}), answer: make(chan callbackAnswer, 1)}
	if cb.redirect == "" {
		cb.redirect = "http://" + ln.Addr().String() + path
	}
	cb.srv = &http.Server{Handler: cb, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		defer close(cb.served)
		cb.srv.Serve(ln)
	}()
	return cb, nil
}

// ServeHTTP takes the first request on the callback path as the answer.
// It closes the listener before it writes its page, so that once the
// browser has the page, no other connection can be made.
func (cb *callback) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.EscapedPath() != cb.path {
		http.NotFound(w, r)
		return
	}
	if !cb.answered.CompareAndSwap(false, true) {
		// Another request on a connection the browser kept open.
		writePage(w, http.StatusGone, "This login is over.")
		return
	}
	cb.ln.Close()
	code, err := cb.check(r.URL.Query())
	if err != nil {
		writePage(w, http.StatusBadRequest, "The login failed: "+err.Error()+".")
	} else {
		writePage(w, http.StatusOK, "credproxy has the provider's answer and finishes the login in the terminal.")
	}
	cb.answer <- callbackAnswer{code, err}
}

// check reads the provider's answer: the state first, compared in
// constant time, so that an answer to some other login (a stale tab, or
// another program on this machine) ends this one without being read
// further; then an error (RFC 6749, section 4.1.2.1), or the code.
func (cb *callback) check(q url.Values) (string, error) {
	if subtle.ConstantTimeCompare([]byte(q.Get("state")), []byte(cb.state)) != 1 {
		return "", errors.New("the answer at the redirect URI carries the wrong state, so it is not the answer to this login (an old browser tab, or another program)")
	}
	if e := q.Get("error"); e != "" {
		msg := "the provider refused the login: " + quoteCut(e)
		if d := q.Get("error_description"); d != "" {
			msg += " (" + quoteCut(d) + ")"
		}
		return "", errors.New(msg)
	}
	code := q.Get("code")
	if code == "" {
		return "", errors.New("the answer at the redirect URI has neither a code nor an error")
	}
	return code, nil
}

// quoteCut quotes text from the browser's URL, which anyone on this
// machine could have sent, so that it cannot move the terminal's cursor
// or fill it: Go-quoted, at most 200 bytes.
func quoteCut(s string) string {
	const most = 200
	if len(s) > most {
		s = s[:most]
	}
	return strconv.Quote(s)
}

// writePage answers the browser with a page that says msg and that the
// window can be closed. It carries no token, and the browser must not
// keep it, nor name the redirect URI, which carries the code, to anyone.
func writePage(w http.ResponseWriter, status int, msg string) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	fmt.Fprintf(w, "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>credproxy login</title></head>\n"+
		"<body><p>%s</p><p>You can close this window.</p></body></html>\n", html.EscapeString(msg))
}

// wait returns the code, or the error the answer carried, or ctx's error
// if ctx ends first.
func (cb *callback) wait(ctx context.Context) (string, error) {
	select {
	case a := <-cb.answer:
		return a.code, a.err
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// close stops the listener if no answer did, lets the page being written
// reach the browser (a second at most), and returns once the server has
// stopped.
func (cb *callback) close() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if cb.srv.Shutdown(ctx) != nil {
		cb.srv.Close()
	}
	<-cb.served
}
