package credproxy

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The injection front's cost, each against the same local TLS upstream
// reached straight, in the same run: the two take turns, so that both
// meet the same moments of a noisy machine. The figures are in README.md,
// "Injection mode".

// benchFront is a session with a token route to a local TLS upstream
// (HTTP/1.1, as httptest serves by default), a client of its front, and
// a client of the upstream itself.
type benchFront struct {
	sess   *Session
	front  *http.Client
	direct *http.Client
	up     *httptest.Server
}

func newBenchFront(b *testing.B, h http.HandlerFunc) *benchFront {
	b.Helper()
	up := httptest.NewUnstartedServer(h)
	up.StartTLS()
	b.Cleanup(up.Close)
	srv, err := NewServer(Options{Store: injectStore(b), InjectTransport: up.Client().Transport})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { srv.Close() })
	sess := startSession(b, srv, SessionOptions{Policy: injectGrant, Routes: []Route{{Name: "anthropic", Upstream: up.URL, Provider: "anthropic"}}, MaxConnections: 1000})
	direct := up.Client()
	b.Cleanup(direct.CloseIdleConnections)
	return &benchFront{sess: sess, front: frontClient(b, sess), direct: direct, up: up}
}

// get sends GET path through the front, or straight to the upstream,
// and returns the response.
func (bf *benchFront) get(b *testing.B, viaFront bool, path string) *http.Response {
	base, c := bf.up.URL, bf.direct
	if viaFront {
		base, c = "http://sandbox/anthropic", bf.front
	}
	req, _ := http.NewRequest("GET", base+path, nil)
	req.Header.Set("Authorization", bearer(bf.sess.Phantom()))
	resp, err := c.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	return resp
}

func percentile(d []time.Duration, p float64) time.Duration {
	slices.Sort(d)
	return d[int(float64(len(d)-1)*p)]
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// BenchmarkInjectCall: a non-streaming call (GET, a 60-byte JSON answer)
// through the front and straight, alternately, on keep-alive
// connections. Metrics: p50 and p99 of each, and the p50 the front adds.
func BenchmarkInjectCall(b *testing.B) {
	bf := newBenchFront(b, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"id":"msg_01","type":"message","content":[],"usage":{}}`)
	})
	var lat [2][]time.Duration // direct, front
	for b.Loop() {
		for i, viaFront := range []bool{false, true} {
			start := time.Now()
			resp := bf.get(b, viaFront, "/v1/messages")
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			lat[i] = append(lat[i], time.Since(start))
		}
	}
	direct, front := percentile(lat[0], 0.5), percentile(lat[1], 0.5)
	b.ReportMetric(micros(direct), "direct-p50-µs")
	b.ReportMetric(micros(front), "front-p50-µs")
	b.ReportMetric(micros(front-direct), "added-p50-µs")
	b.ReportMetric(micros(percentile(lat[0], 0.99)), "direct-p99-µs")
	b.ReportMetric(micros(percentile(lat[1], 0.99)), "front-p99-µs")
}

// BenchmarkInjectSSE: a stream of 20 server-sent events, 5 ms apart,
// each carrying the time the upstream sent it, read through the front
// and straight, alternately. Metrics: each event's delay from send to
// arrival (p50, p99, max) and the gaps between arrivals (p50, min): batching
// would show as delays near the interval and gaps near zero.
func BenchmarkInjectSSE(b *testing.B) {
	const events, interval = 20, 5 * time.Millisecond
	bf := newBenchFront(b, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for range events {
			fmt.Fprintf(w, "event: delta\ndata: %d\n\n", time.Now().UnixNano())
			w.(http.Flusher).Flush()
			<-tick.C
		}
	})
	var delay, gap [2][]time.Duration
	for b.Loop() {
		for i, viaFront := range []bool{false, true} {
			resp := bf.get(b, viaFront, "/v1/messages")
			br := bufio.NewReader(resp.Body)
			var last time.Time
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					break
				}
				sent, ok := strings.CutPrefix(strings.TrimSpace(line), "data: ")
				if !ok {
					continue
				}
				now := time.Now()
				ns, _ := strconv.ParseInt(sent, 10, 64)
				delay[i] = append(delay[i], now.Sub(time.Unix(0, ns)))
				if !last.IsZero() {
					gap[i] = append(gap[i], now.Sub(last))
				}
				last = now
			}
			resp.Body.Close()
		}
	}
	for i, name := range []string{"direct", "front"} {
		b.ReportMetric(micros(percentile(delay[i], 0.5)), name+"-delay-p50-µs")
		b.ReportMetric(micros(percentile(delay[i], 0.99)), name+"-delay-p99-µs")
		b.ReportMetric(micros(percentile(delay[i], 1)), name+"-delay-max-µs")
		b.ReportMetric(micros(percentile(gap[i], 0.5)), name+"-gap-p50-µs")
		b.ReportMetric(micros(percentile(gap[i], 0)), name+"-gap-min-µs")
	}
}

// BenchmarkInjectOpenStreams: the heap in use (after a GC) and the
// goroutines that 200 open streams take, through the front and straight;
// the difference per stream is the front's (its connection from the
// sandbox and the one to the upstream, with their buffers, and the
// handler's). Client and upstream share the process, and count in both.
// Goroutine stacks are not in the heap figures: the runtime keeps freed
// stacks for reuse, so no delta of its stack memory is a stream's.
func BenchmarkInjectOpenStreams(b *testing.B) {
	const streams = 200
	release := make(chan struct{})
	bf := newBenchFront(b, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: open\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	defer close(release)
	var bytes, goroutines [2]float64
	_, idle := memInUse()
	for b.Loop() {
		for i, viaFront := range []bool{false, true} {
			// The last round's streams are closed; wait for their
			// goroutines to end.
			for deadline := time.Now().Add(10 * time.Second); runtime.NumGoroutine() > idle && time.Now().Before(deadline); {
				time.Sleep(time.Millisecond)
			}
			heap0, g0 := memInUse()
			open := make([]*http.Response, streams)
			var wg sync.WaitGroup
			for j := range open {
				wg.Go(func() {
					open[j] = bf.get(b, viaFront, "/v1/messages")
					bufio.NewReader(open[j].Body).ReadString('\n') // the stream is open
				})
			}
			wg.Wait()
			heap1, g1 := memInUse()
			bytes[i] = float64(int64(heap1)-int64(heap0)) / streams
			goroutines[i] = float64(g1-g0) / streams
			for _, resp := range open {
				resp.Body.Close()
			}
			bf.front.Transport.(*http.Transport).CloseIdleConnections()
			bf.direct.CloseIdleConnections()
		}
	}
	b.ReportMetric(bytes[0], "direct-heap-B/stream")
	b.ReportMetric(bytes[1], "front-heap-B/stream")
	b.ReportMetric(bytes[1]-bytes[0], "added-heap-B/stream")
	b.ReportMetric(goroutines[1]-goroutines[0], "added-goroutines/stream")
}

// memInUse returns the heap in use, after two GCs (the second empties the
// sync.Pools, the copy buffers' included), and the number of goroutines.
func memInUse() (uint64, int) {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc, runtime.NumGoroutine()
}
