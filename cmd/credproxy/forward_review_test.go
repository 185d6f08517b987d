//go:build unix

package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
)

// Found by an attacking review. forward relays up to maxForwardedConns
// (64) connections at once and
// promises that more "wait to be accepted"; but the session run -inject
// makes has the default cap of 32 connections on its front, which closes
// the 33rd at once. An SDK with more than 32 requests in flight (parallel
// tool calls, an agent fanning out) gets connections that die without an
// answer instead of waiting: here 40 concurrent calls through forward,
// each held by the upstream for a moment, should all get the upstream's
// 200.
func TestForwardedConnectionsWaitAtTheFrontRatherThanDrop(t *testing.T) {
	release := make(chan struct{})
	var inFlight atomic.Int32
	up := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		inFlight.Add(1)
		<-release
		io.WriteString(w, "ok")
	}))
	defer up.Close()
	store := credproxy.NewMemoryStore()
	store.SaveAPIKey(context.Background(), "k", "sk-fake-real-key")
	srv, err := credproxy.NewServer(credproxy.Options{Store: store, InjectTransport: up.Client().Transport})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	dir, _ := os.MkdirTemp("", "cpa")
	defer os.RemoveAll(dir)
	routes := []credproxy.Route{{Name: "api", Upstream: up.URL, Key: "k"}}
	sess, err := srv.NewSession(injectSessionOptions(&credproxy.Grant{}, routes, dir)) // as run -inject makes it
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	_, addr := startForwarder(t, sess.InjectSocketPath(), maxForwardedConns)

	const n = 40
	tr := &http.Transport{MaxConnsPerHost: 0, MaxIdleConnsPerHost: n, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	var wg sync.WaitGroup
	errs := make(chan string, n)
	for range n {
		wg.Go(func() {
			req, _ := http.NewRequest("GET", "http://"+addr+"/api/v1/x", nil)
			req.Header.Set("Authorization", "Bearer "+string(sess.Phantom()))
			resp, err := c.Do(req)
			if err != nil {
				errs <- err.Error()
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != 200 {
				errs <- fmt.Sprint(resp.StatusCode)
			}
		})
	}
	for deadline := time.Now().Add(5 * time.Second); inFlight.Load() < 32 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	close(release)
	wg.Wait()
	close(errs)
	var failed []string
	for e := range errs {
		failed = append(failed, e)
	}
	if len(failed) > 0 {
		t.Errorf("%d of %d concurrent calls through forward failed instead of waiting: %q", len(failed), n, failed[0])
	}
}
