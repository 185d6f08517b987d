// Command lifecycle runs a credproxy server against a local OAuth2 token
// endpoint that misbehaves as providers in the field do, over a real
// socket and the real clock, and prints what a sandbox sees: provider
// calls, waits and answers. It takes about three minutes (one case watches
// a server idle for 180 s). The tests (lifecycle_test.go) check the same
// behaviour on a fake clock; this is for seeing it happen.
//
//	go run ./examples/lifecycle
package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/credproxy/credproxy"
)

const rt = "fake-refresh/AB+cd=ef&gh"

type endpoint struct {
	calls atomic.Int64
	mode  string
	n     atomic.Int64
}

func (e *endpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	e.calls.Add(1)
	r.ParseForm()
	n := e.n.Add(1)
	switch e.mode {
	case "hang":
		<-r.Context().Done()
		return
	case "429":
		w.Header().Set("Retry-After", "3600")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(429)
		fmt.Fprint(w, `{"error":"rate_limited"}`)
		return
	case "html":
		w.Header().Set("Content-Type", "text/html")
		fmt.Fprint(w, "<!doctype html><p>Sign in")
		return
	case "echo":
		body := r.PostForm.Encode()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(400)
		fmt.Fprintf(w, `{"error":"invalid_request","error_description":"bad request body: %s"}`, body)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	exp := `,"expires_in":3600`
	if e.mode == "noexp" {
		exp = ""
	}
	fmt.Fprintf(w, `{"access_token":"fake-access-%d","token_type":"Bearer"%s,"refresh_token":"fake-refresh-%d"}`, n, exp, n)
}

var (
	dirsMu sync.Mutex
	dirs   []string // socket directories, removed at the end
)

type setup struct {
	e      *endpoint
	client *credproxy.Client
	logs   *bytes.Buffer
	mu     *sync.Mutex
}

type lockedBuf struct {
	mu  *sync.Mutex
	buf *bytes.Buffer
}

func (l lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func start(mode string, stored string, opts credproxy.Options) setup {
	e := &endpoint{mode: mode}
	hs := httptest.NewServer(e)
	st := credproxy.NewMemoryStore()
	tok, err := credproxy.ParseToken([]byte(stored))
	if err != nil {
		panic(err)
	}
	st.SaveToken(context.Background(), "p", "", tok)
	var mu sync.Mutex
	logs := &bytes.Buffer{}
	opts.Store = st
	opts.Logger = slog.New(slog.NewTextHandler(lockedBuf{&mu, logs}, nil)) // default level: Info
	opts.Refreshers = map[string]credproxy.Refresher{"p": &credproxy.OAuth2Refresher{TokenURL: hs.URL, ClientID: "c", HTTPClient: hs.Client()}}
	srv, err := credproxy.NewServer(opts)
	if err != nil {
		panic(err)
	}
	dir, err := os.MkdirTemp("", "lifecycle")
	if err != nil {
		panic(err)
	}
	dirsMu.Lock()
	dirs = append(dirs, dir)
	dirsMu.Unlock()
	ln, err := credproxy.Listen(dir)
	if err != nil {
		panic(err)
	}
	go srv.Serve(ln)
	return setup{e: e, client: credproxy.NewClient(ln.Addr().String(), credproxy.ClientOptions{}), logs: logs, mu: &mu}
}

func tokenJSON(exp int64) string {
	return fmt.Sprintf(`{"access_token":"fake-access-0","refresh_token":%q,"expiry":%d}`, rt, exp)
}

func main() {
	ctx := context.Background()
	now := time.Now().Unix()
	var wg sync.WaitGroup
	out := make([]string, 8)

	wg.Go(func() { // 1. F1
		s := start("", tokenJSON(now+3600), credproxy.Options{DisableRenewal: true})
		tok, err := s.client.RefreshToken(ctx, "p", "")
		got := "a new token"
		if tok.AccessToken() == "fake-access-0" {
			got = "the stored token"
		}
		out[0] = fmt.Sprintf("1 refresh_token, token valid 1h: got %s err=%v, provider calls %d", got, err, s.e.calls.Load())
	})
	wg.Go(func() { // 2. F3 no expires_in
		s := start("noexp", tokenJSON(1000), credproxy.Options{})
		tok, _ := s.client.RefreshToken(ctx, "p", "")
		exp, ok := tok.Expiry()
		served := "no expiry"
		if ok {
			served = fmt.Sprintf("expiry %d", exp.Unix())
		}
		time.Sleep(180 * time.Second)
		out[1] = fmt.Sprintf("2 no expires_in: served %s; provider calls in 180 s: %d", served, s.e.calls.Load())
	})
	wg.Go(func() { // 3. F2 hanging endpoint
		s := start("hang", tokenJSON(now+30), credproxy.Options{DisableRenewal: true})
		var parts []string
		for range 3 {
			t0 := time.Now()
			tok, err := s.client.GetToken(ctx, "p", "")
			res := "stored token"
			if err != nil {
				res = err.Error()
			} else if tok.AccessToken() != "fake-access-0" {
				res = "other token"
			}
			parts = append(parts, fmt.Sprintf("%.1fs %s", time.Since(t0).Seconds(), res))
		}
		out[2] = "3 hanging endpoint, token expiring in 30 s: get_token ×3: " + strings.Join(parts, "; ")
	})
	wg.Go(func() { // 4. F4 429 Retry-After
		s := start("429", tokenJSON(now+50), credproxy.Options{})
		var slowest time.Duration
		fails := 0
		for t0 := time.Now(); time.Since(t0) < 20*time.Second; time.Sleep(500 * time.Millisecond) {
			t1 := time.Now()
			if _, err := s.client.GetToken(ctx, "p", ""); err != nil {
				fails++
			}
			slowest = max(slowest, time.Since(t1))
		}
		out[3] = fmt.Sprintf("4 429 Retry-After 3600, polling get_token every 0.5 s for 20 s: provider calls %d, slowest get_token %v, failures %d", s.e.calls.Load(), slowest.Round(time.Millisecond), fails)
	})
	wg.Go(func() { // 4b. HTML 200
		s := start("html", tokenJSON(now-60), credproxy.Options{DisableRenewal: true})
		t0 := time.Now()
		_, err := s.client.RefreshToken(ctx, "p", "")
		out[4] = fmt.Sprintf("4b 200 text/html: refresh_token %v after %.1fs, provider calls %d", errors.Is(err, credproxy.ErrInternal), time.Since(t0).Seconds(), s.e.calls.Load())
	})
	wg.Go(func() { // 5. F5 echo
		s := start("echo", tokenJSON(now-60), credproxy.Options{DisableRenewal: true})
		s.client.RefreshToken(ctx, "p", "")
		s.mu.Lock()
		logs := s.logs.String()
		s.mu.Unlock()
		out[5] = fmt.Sprintf("5 echoing endpoint: raw refresh token in log %v, query-escaped in log %v",
			strings.Contains(logs, rt), strings.Contains(logs, url.QueryEscape(rt)))
	})
	wg.Go(func() { // 6. F6 200 calls through one client
		s := start("", tokenJSON(now+3600), credproxy.Options{DisableRenewal: true})
		var fails, limited atomic.Int64
		var cwg sync.WaitGroup
		t0 := time.Now()
		for range 200 {
			cwg.Go(func() {
				_, err := s.client.GetToken(ctx, "p", "")
				if err != nil {
					fails.Add(1)
				}
				if errors.Is(err, credproxy.ErrRateLimited) {
					limited.Add(1)
				}
			})
		}
		cwg.Wait()
		out[6] = fmt.Sprintf("6 200 concurrent get_token through one Client, default server: %d failed (%d RATE_LIMITED), %.1fs", fails.Load(), limited.Load(), time.Since(t0).Seconds())
	})
	wg.Go(func() { // 7. token inputs
		var parts []string
		for _, in := range []string{
			`{"access_token":"fake-a","expiry":"2026-12-06T12:00:00Z"}`,
			`{"access_token":"fake-a","expiry":1733486400000}`,
			`{"access_token":"fake-a","expires_in":3600}`,
		} {
			tok, err := credproxy.ParseToken([]byte(in))
			res := "ok"
			if err != nil {
				res = err.Error()
			} else if exp, ok := tok.Expiry(); ok {
				res = "expiry " + exp.UTC().Format(time.RFC3339)
			} else {
				res = "no expiry"
			}
			parts = append(parts, in+" → "+res)
		}
		out[7] = "7 ParseToken:\n   " + strings.Join(parts, "\n   ")
	})
	wg.Wait()
	fmt.Println(strings.Join(out, "\n"))
	for _, dir := range dirs {
		os.RemoveAll(dir)
	}
}
