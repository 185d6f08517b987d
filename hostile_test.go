package credproxy

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The hostile-client suite (issue 6): each case attacks a fresh server
// over a real socket while a well-behaved client keeps using it, and
// checks that the client is served during the attack and after it, and
// that the process's goroutines and file descriptors return to their
// baseline once the attacker is gone.

// resourceCounts returns the process's goroutines and open file
// descriptors (Linux; elsewhere only goroutines are counted).
func resourceCounts() (goroutines, fds int) {
	entries, _ := os.ReadDir("/proc/self/fd")
	return runtime.NumGoroutine(), len(entries)
}

// hostile is one attack: it gets the socket path and probe, which checks
// that the well-behaved client is served, and must leave no connection of
// its own open when it returns.
type hostile struct {
	name   string
	opts   Options
	attack func(t *testing.T, srv *Server, path string, probe func(string))
}

// bigToken is 60 KB: a few of its answers fill the socket buffers.
var bigToken = `{"access_token":"` + strings.Repeat("x", 60000) + `"}`

// heapBound is what the server may hold, at most, for its connections: a
// frame buffer of up to MaxFrameSize and a 4 KB read buffer for each of
// DefaultMaxConnections, plus the process's own few megabytes; the peak
// heap in use during every attack must stay under it.
const heapBound = DefaultMaxConnections*(MaxFrameSize+4096) + 16<<20

func TestHostileClients(t *testing.T) {
	for _, h := range hostileCases() {
		t.Run(h.name, func(t *testing.T) {
			opts := h.opts
			opts.Store = storeWith(t, map[string]string{"anthropic/default": anthropicToken, "big/default": bigToken},
				map[string]string{"openai": fakeAPIKey})
			srv, path := startServer(t, opts)
			good := newTestClient(t, path, ClientOptions{RequestTimeout: 5 * time.Second})
			probe := func(when string) {
				t.Helper()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				if ok, err := good.HasAPIKey(ctx, "openai"); err != nil || !ok {
					t.Fatalf("well-behaved client %s: %v", when, err)
				}
			}
			probe("before")
			goroutines, fds := resourceCounts()
			runtime.GC() // earlier cases' garbage is not this attack's
			var peak atomic.Uint64
			stop := make(chan struct{})
			var sampler sync.WaitGroup
			sampler.Go(func() { samplePeakHeap(&peak, stop) })
			h.attack(t, srv, path, probe)
			close(stop)
			sampler.Wait()
			if peak.Load() > heapBound {
				t.Errorf("peak heap in use %.1f MB, over the bound of %.1f MB", mb(peak.Load()), mb(heapBound))
			}
			t.Logf("peak heap in use during the attack: %.1f MB (bound %.1f MB)", mb(peak.Load()), mb(heapBound))
			probe("after")
			waitUntil(t, func() bool { return serverConns(srv) == 1 })
			waitUntil(t, func() bool {
				g, f := resourceCounts()
				return g <= goroutines && f <= fds
			})
		})
	}
}

// attacker dials path and returns the connection, closed at cleanup.
func attacker(t *testing.T, path string) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	return c
}

// handshaken dials path and completes the handshake.
func handshaken(t *testing.T, path string) *rawConn {
	t.Helper()
	r := &rawConn{t: t, c: attacker(t, path)}
	r.handshake()
	return r
}

// frames seals each payload into a frame and concatenates them.
func frames(payloads ...string) []byte {
	var b []byte
	for _, p := range payloads {
		f, _ := sealFrame(append(startFrame(nil), p...))
		b = append(b, f...)
	}
	return b
}

func hostileCases() []hostile {
	return []hostile{
		{name: "oversize header", attack: func(t *testing.T, srv *Server, path string, probe func(string)) {
			r := handshaken(t, path)
			r.sendBytes([]byte{0xff, 0xff, 0xff, 0xff, '{'})
			wantFailure(t, r.recvMap(), "unknown", CodeInvalidRequest, "frame too large")
			r.expectClosed()
			r.c.Close()
		}},
		{name: "zero-length header", attack: func(t *testing.T, srv *Server, path string, probe func(string)) {
			r := handshaken(t, path)
			r.sendBytes([]byte{0, 0, 0, 0})
			wantFailure(t, r.recvMap(), "unknown", CodeInvalidRequest, "empty frame")
			r.expectClosed()
			r.c.Close()
		}},
		{name: "10000 tiny frames in one write", opts: Options{RateLimit: -1}, attack: func(t *testing.T, srv *Server, path string, probe func(string)) {
			r := handshaken(t, path)
			payloads := make([]string, 10000)
			for i := range payloads {
				payloads[i] = "{}"
			}
			burst := frames(payloads...)
			written := make(chan error, 1)
			go func() { _, err := r.c.Write(burst); written <- err }()
			probe("during the burst")
			for i := range payloads {
				m := r.recvMap()
				if m["ok"] != false {
					t.Fatalf("answer %d: %v", i, m)
				}
			}
			if err := <-written; err != nil {
				t.Fatal(err)
			}
			r.expectServing("after 10000 frames")
			r.c.Close()
		}},
		{name: "1000 connections trickling a byte a second", attack: trickle},
		{name: "255 connections each holding a half-sent maximum frame", attack: func(t *testing.T, srv *Server, path string, probe func(string)) {
			var conns []*rawConn
			header := []byte{0, 1, 0, 0} // 65536 bytes
			part := make([]byte, MaxFrameSize-100)
			for range DefaultMaxConnections - 1 { // the probe's connection is the last
				r := handshaken(t, path)
				r.sendBytes(append(header, part...))
				conns = append(conns, r)
			}
			probe("with every other connection holding a frame buffer")
			for _, r := range conns {
				r.c.Close()
			}
		}},
		{name: "connections beyond the cap", opts: Options{MaxConnections: 8}, attack: func(t *testing.T, srv *Server, path string, probe func(string)) {
			var conns []*rawConn
			for range 7 { // the probe's connection is the eighth
				conns = append(conns, handshaken(t, path))
			}
			extra := &rawConn{t: t, c: attacker(t, path)}
			extra.expectClosed()
			extra.c.Close()
			probe("at the cap")
			for _, c := range conns {
				c.c.Close()
			}
		}},
		{name: "disconnects mid-request", attack: func(t *testing.T, srv *Server, path string, probe func(string)) {
			full := frames(`{"v":1,"id":"x","op":"get_token","payload":{"provider":"anthropic"}}`)
			for i := range 100 {
				r := handshaken(t, path)
				r.sendBytes(full[:1+i%(len(full)-1)]) // a header or part of a frame
				r.c.Close()
			}
		}},
		{name: "disconnects mid-response", attack: func(t *testing.T, srv *Server, path string, probe func(string)) {
			for range 100 {
				r := handshaken(t, path)
				r.sendBytes(frames(`{"v":1,"id":"x","op":"get_token","payload":{"provider":"big"}}`))
				r.c.(*net.UnixConn).CloseRead()
				r.c.Close()
			}
		}},
		{name: "never reads its answers", opts: Options{WriteTimeout: 300 * time.Millisecond}, attack: func(t *testing.T, srv *Server, path string, probe func(string)) {
			r := handshaken(t, path)
			var reqs []string
			for i := range 100 {
				reqs = append(reqs, fmt.Sprintf(`{"v":1,"id":"%d","op":"get_token","payload":{"provider":"big"}}`, i))
			}
			go r.c.Write(frames(reqs...)) // may block: nobody reads the answers
			probe("while a peer ignores its answers")
			// The server gives up on it at the write deadline, on its own.
			waitUntil(t, func() bool { return serverConns(srv) == 1 })
			r.c.Close()
		}},
		{name: "hostile JSON", attack: func(t *testing.T, srv *Server, path string, probe func(string)) {
			r := handshaken(t, path)
			deep := strings.Repeat("[", 30000) + strings.Repeat("]", 30000)
			for i, p := range []string{
				"{\"v\":1,\"id\":\"u\",\"op\":\"get_token\",\"payload\":{\"provider\":\"p\xff\"}}",
				`{"v":1,"id":"d","op":"get_token","payload":{"provider":"p","x":` + deep + `}}`,
				`{"v":1e999999,"id":"n","op":"get_token","payload":{"provider":"p"}}`,
				`{"v":1,"id":"dup","op":"get_token","payload":{"provider":"a","provider":"b"}}`,
				`{"v":1,"id":"dup2","id":"dup3","op":"get_token","payload":{"provider":"a"}}`,
				`{"v":1,"id":"h","op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`,
				"\x00\x01\x02",
			} {
				r.send(p)
				if m := r.recvMap(); m["ok"] != false {
					t.Errorf("hostile frame %d answered %v", i, m)
				}
				r.expectServing(fmt.Sprint("after hostile frame ", i))
			}
			r.send(`{"v":1,"id":123456789012345678901234567890123456789,"op":"has_api_key","payload":{"name":"k"}}`)
			if got := r.recv(); got != `{"id":"123456789012345678901234567890123456789","ok":true,"data":{"exists":false}}` {
				t.Errorf("a huge numeric id is not echoed digit for digit, as a string: %s", got)
			}
			r.send(`{"v":1,"id":"s","op":"save_token","payload":{"provider":"huge","token":{"access_token":"a","expiry":-1e400,"n":-0.0e-999999,"big":1e400}}}`)
			if m := r.recvMap(); m["ok"] != true {
				t.Errorf("a token with huge numbers: %v", m)
			}
			r.send(`{"v":1,"id":"g","op":"get_token","payload":{"provider":"huge"}}`)
			if got := r.recv(); got != `{"id":"g","ok":true,"data":{"access_token":"a","expiry":-1e400,"n":-0.0e-999999,"big":1e400}}` {
				t.Errorf("huge numbers did not pass through exactly: %s", got)
			}
			r.c.Close()
		}},
		{name: "requests after a refused handshake", attack: func(t *testing.T, srv *Server, path string, probe func(string)) {
			r := &rawConn{t: t, c: attacker(t, path)}
			r.sendBytes(frames(`{"v":1,"op":"handshake","payload":{"minVersion":7,"maxVersion":9}}`,
				`{"v":1,"id":"after","op":"get_token","payload":{"provider":"anthropic"}}`))
			if got := r.recv(); got != string(handshakeFail) {
				t.Fatalf("refused handshake answered %s", got)
			}
			r.expectClosed()
			r.c.Close()
		}},
	}
}

// trickle opens 1000 connections, four times the connection cap, that send
// a handshake one byte a second and never finish it; a new client must
// still get in and be served, every second, while they trickle.
func trickle(t *testing.T, srv *Server, path string, probe func(string)) {
	const n = 1000
	hello := frames(`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`)
	conns := make([]net.Conn, 0, n)
	for range n {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		conns = append(conns, c)
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for second := range 3 {
		for _, c := range conns {
			c.SetWriteDeadline(time.Now().Add(10 * time.Millisecond))
			c.Write(hello[second : second+1]) // evicted ones fail; that is the point
		}
		fresh := NewClient(path, ClientOptions{RequestTimeout: 5 * time.Second})
		if ok, err := fresh.HasAPIKey(context.Background(), "openai"); err != nil || !ok {
			t.Errorf("a new client during the trickle, second %d: %v", second, err)
		}
		fresh.Close()
		probe(fmt.Sprint("during the trickle, second ", second))
		time.Sleep(time.Second) // the attack's own pace: a byte a second
	}
}

func mb(n uint64) float64 { return float64(n) / (1 << 20) }

// samplePeakHeap records the largest heap in use until stop closes.
func samplePeakHeap(peak *atomic.Uint64, stop <-chan struct{}) {
	var ms runtime.MemStats
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		runtime.ReadMemStats(&ms)
		if ms.HeapInuse > peak.Load() {
			peak.Store(ms.HeapInuse)
		}
		select {
		case <-stop:
			return
		case <-tick.C:
		}
	}
}
