package credproxy

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
)

// BenchmarkGetToken measures get_token round trips over a real Unix socket
// (rate limit off) at 1, 16 and 64 connections, and in the same run the
// floor: the same client against a bare server on the same framing that
// answers a fixed response without decoding anything. The two are
// measured in alternating slices. Custom metrics: req/s and p50/p99
// latency for both, the ratios to the floor, the allocations per round
// trip (the client allocates nothing, so they are the server's), and the
// process's CPU time per round trip for both (client and server: the
// difference is the server's own work). The single-connection case runs on
// one CPU (GOMAXPROCS=1): across CPUs, each round trip's wake-ups make its
// latency bimodal.
//
// conns=16/audit-log runs with the audit log on (debug level, JSON, to
// io.Discard), to state its cost; conns=16/info-logger with a real logger
// at Info level, where the audit log is off, to show that off costs
// nothing next to the default (nil) logger the other cases use.
// conns=16/session serves the connections through a Session (capability
// token, Grant, its rate budget off too), the way a sandbox is served.
func BenchmarkGetToken(b *testing.B) {
	for _, c := range []struct {
		conns  int
		logger string // "": none; "session": through a session; else a JSON logger to io.Discard
		level  slog.Level
	}{{1, "", 0}, {16, "", 0}, {64, "", 0}, {16, "audit-log", slog.LevelDebug}, {16, "info-logger", slog.LevelInfo}, {16, "session", 0}} {
		conns := c.conns
		name := fmt.Sprintf("conns=%d", conns)
		if c.logger != "" {
			name += "/" + c.logger
		}
		b.Run(name, func(b *testing.B) {
			if conns == 1 {
				defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
			}
			request := frameOf(`{"v":1,"id":"1","op":"get_token","payload":{"provider":"anthropic"}}`)
			st := NewMemoryStore()
			st.SaveToken(context.Background(), "anthropic", "", mustToken(b, anthropicToken))
			opts := Options{Store: st, RateLimit: -1}
			if c.logger != "" && c.logger != "session" {
				opts.Logger = slog.New(slog.NewJSONHandler(io.Discard, &slog.HandlerOptions{Level: c.level}))
			}
			srv, path := startServer(b, opts)
			handshake := `{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`
			if c.logger == "session" {
				sess := startSession(b, srv, SessionOptions{Policy: &Grant{Providers: []string{"anthropic"}}, RateLimit: -1})
				path = sess.SocketPath()
				handshake = `{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1,"capabilityToken":"` + string(sess.CapabilityToken()) + `"}}`
			}
			floorPath := startFloorServer(b, frameOf(`{"id":"1","ok":true,"data":`+anthropicTokenSanitised+`}`))
			floorConns := dial(b, floorPath, conns, "")
			serverConns := dial(b, path, conns, handshake)

			// The two alternate in slices, so that both meet the same
			// moments of a noisy machine: measured one after the other,
			// their ratio drifted by a third between runs.
			var floor, server load
			b.ResetTimer()
			for i := range benchSlices {
				n := b.N/benchSlices + min(1, max(0, b.N%benchSlices-i))
				floor.add(b, floorConns, n, request)
				server.add(b, serverConns, n, request)
			}
			b.StopTimer()

			b.ReportMetric(server.perSecond(), "req/s")
			b.ReportMetric(floor.perSecond(), "floor-req/s")
			b.ReportMetric(server.perSecond()/floor.perSecond(), "ratio-req/s")
			b.ReportMetric(us(server.quantile(0.50)), "p50-µs")
			b.ReportMetric(us(server.quantile(0.99)), "p99-µs")
			b.ReportMetric(us(floor.quantile(0.50)), "floor-p50-µs")
			b.ReportMetric(us(server.quantile(0.50))/us(floor.quantile(0.50)), "ratio-p50")
			b.ReportMetric(server.allocs(), "allocs/req")
			b.ReportMetric(us(server.cpu)/float64(len(server.latencies)), "cpu-µs/req")
			b.ReportMetric(us(floor.cpu)/float64(len(floor.latencies)), "floor-cpu-µs/req")
			b.ReportMetric(us(floor.quantile(0.99)), "floor-p99-µs")
			b.ReportMetric(0, "ns/op") // the custom metrics say it better
		})
	}
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// benchSlices is how many alternating slices the floor and the server
// are measured in.
const benchSlices = 20

// load accumulates what round trips measured.
type load struct {
	latencies []time.Duration // sorted by quantile
	elapsed   time.Duration
	mallocs   uint64 // whole process
	cpu       time.Duration
}

func (l *load) perSecond() float64 { return float64(len(l.latencies)) / l.elapsed.Seconds() }
func (l *load) allocs() float64    { return float64(l.mallocs) / float64(len(l.latencies)) }

func (l *load) quantile(q float64) time.Duration {
	if len(l.latencies) == 0 {
		return 0
	}
	slices.Sort(l.latencies)
	return l.latencies[int(float64(len(l.latencies)-1)*q)]
}

// dial opens conns connections to path and sends each the handshake, if
// it is not "".
func dial(b *testing.B, path string, conns int, handshake string) []net.Conn {
	b.Helper()
	clients := make([]net.Conn, conns)
	for i := range clients {
		c, err := net.Dial("unix", path)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		if handshake != "" {
			writeFrame(c, []byte(handshake))
			if reply, err := readFrame(c, nil); err != nil || string(reply) != string(handshakeOK) {
				b.Fatalf("handshake: %s, %v", reply, err)
			}
		}
		clients[i] = c
	}
	return clients
}

// add sends n requests spread over clients, each connection one request at
// a time, and adds what it measured to l. The client side reuses its
// buffers and allocates nothing per request.
func (l *load) add(b *testing.B, clients []net.Conn, n int, request []byte) {
	b.Helper()
	conns := len(clients)
	latencies := make([][]time.Duration, conns)
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	mallocs := ms.Mallocs
	cpu := processCPU()
	start := time.Now()
	var wg sync.WaitGroup
	for i, c := range clients {
		share := n / conns
		if i < n%conns {
			share++
		}
		lat := make([]time.Duration, 0, share)
		wg.Go(func() {
			buf := make([]byte, 0, 4096)
			var header [4]byte
			for range share {
				t0 := time.Now()
				if _, err := c.Write(request); err != nil {
					b.Error(err)
					return
				}
				if _, err := io.ReadFull(c, header[:]); err != nil {
					b.Error(err)
					return
				}
				size := int(binary.BigEndian.Uint32(header[:]))
				buf = slices.Grow(buf[:0], size)[:size]
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Error(err)
					return
				}
				lat = append(lat, time.Since(t0))
			}
			latencies[i] = lat
		})
	}
	wg.Wait()
	l.elapsed += time.Since(start)
	l.cpu += processCPU() - cpu
	runtime.ReadMemStats(&ms)
	l.mallocs += ms.Mallocs - mallocs
	for _, lat := range latencies {
		l.latencies = append(l.latencies, lat...)
	}
}

// startFloorServer serves the floor: it reads each frame (header, then
// payload, with no buffering) and writes response, decoding nothing.
func startFloorServer(b *testing.B, response []byte) string {
	b.Helper()
	ln, err := net.Listen("unix", testSocketDir(b)+"/floor.sock")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	b.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				buf := make([]byte, MaxFrameSize)
				var header [4]byte
				for {
					if _, err := io.ReadFull(c, header[:]); err != nil {
						return
					}
					if _, err := io.ReadFull(c, buf[:binary.BigEndian.Uint32(header[:])]); err != nil {
						return
					}
					if _, err := c.Write(response); err != nil {
						return
					}
				}
			})
		}
	})
	return ln.Addr().String()
}

// BenchmarkClient measures Client calls over a real Unix socket (rate
// limit off), get_token and has_api_key, one caller and 16 callers sharing
// the client. The allocations reported are the whole process's: the
// client's and the server's (one per request, see BenchmarkGetToken); a
// get_token's include parsing the token, has_api_key's show the call
// itself.
func BenchmarkClient(b *testing.B) {
	for _, op := range []Op{OpGetToken, OpHasAPIKey} {
		for _, callers := range []int{1, 16} {
			b.Run(fmt.Sprintf("%s/callers=%d", op, callers), func(b *testing.B) {
				st := NewMemoryStore()
				st.SaveToken(context.Background(), "anthropic", "", mustToken(b, anthropicToken))
				st.SaveAPIKey(context.Background(), "openai", fakeAPIKey)
				_, path := startServer(b, Options{Store: st, RateLimit: -1})
				c := newTestClient(b, path, ClientOptions{})
				call := func() error {
					if op == OpGetToken {
						_, err := c.GetToken(context.Background(), "anthropic", "")
						return err
					}
					_, err := c.HasAPIKey(context.Background(), "openai")
					return err
				}
				if err := call(); err != nil {
					b.Fatal(err)
				}
				b.ReportAllocs()
				b.SetParallelism(max(1, callers/runtime.GOMAXPROCS(0)))
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						if err := call(); err != nil {
							b.Error(err)
							return
						}
					}
				})
			})
		}
	}
}
