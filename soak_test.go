package credproxy

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var soak = flag.Duration("soak", 0, "run TestSoak for this long (e.g. -soak=2m); 0 skips it")

// TestSoak (opt-in: go test -run TestSoak -soak=2m) runs mixed operations
// on 64 connections for the given time, each connection closing at random
// and a new one taking its place, and reports the errors (there must be
// none), the process's RSS at the start and the end, and the goroutines
// left once the clients are gone.
func TestSoak(t *testing.T) {
	if *soak == 0 {
		t.Skip("opt-in: -soak=DURATION")
	}
	st := NewMemoryStore()
	ctx := context.Background()
	for i := range 20 {
		st.SaveToken(ctx, fmt.Sprintf("p%d", i), "", mustToken(t, anthropicToken))
		st.SaveAPIKey(ctx, fmt.Sprintf("k%d", i), fakeAPIKey)
	}
	srv, path := startServer(t, Options{Store: st, RateLimit: -1})
	startRSS := rssKB()
	startGoroutines := runtime.NumGoroutine()
	deadline := time.Now().Add(*soak)
	var requests, errs, reconnects atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for w := range 64 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			c := NewClient(path, ClientOptions{})
			defer func() { c.Close() }()
			for time.Now().Before(deadline) {
				p := fmt.Sprintf("p%d", rng.IntN(20))
				var err error
				switch rng.IntN(6) {
				case 0, 1:
					_, err = c.GetToken(ctx, p, "")
				case 2:
					err = c.SaveToken(ctx, p, "", mustToken(t, `{"access_token":"a","n":1}`))
				case 3:
					_, err = c.GetAPIKey(ctx, fmt.Sprintf("k%d", rng.IntN(20)))
				case 4:
					_, err = c.ListProviders(ctx)
				default:
					_, err = c.ListBuckets(ctx, p)
				}
				requests.Add(1)
				if err != nil {
					errs.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				}
				if rng.IntN(200) == 0 { // a random disconnect
					c.Close()
					c = NewClient(path, ClientOptions{})
					reconnects.Add(1)
				}
			}
		})
	}
	wg.Wait()
	waitUntil(t, func() bool { return serverConns(srv) == 0 })
	endRSS := rssKB()
	t.Logf("soak %v: %d requests (%.0f/s), %d errors, %d reconnects; RSS %d KB at start, %d KB at the end; goroutines %d at start, %d at the end",
		*soak, requests.Load(), float64(requests.Load())/soak.Seconds(), errs.Load(), reconnects.Load(),
		startRSS, endRSS, startGoroutines, runtime.NumGoroutine())
	if errs.Load() != 0 {
		t.Errorf("%d errors; the first: %v", errs.Load(), firstErr.Load())
	}
}

// rssKB returns the process's resident set size in KB (Linux), or 0.
func rssKB() int {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			var kb int
			fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), &kb)
			return kb
		}
	}
	return 0
}
