package credproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

// Time-dependent behaviour runs in a synctest bubble: the clock moves only
// when every goroutine in the bubble is blocked, so a five-minute timeout
// takes no real time and the assertions do not depend on machine speed.
// There is no real network inside a bubble, so the server serves one end
// of a net.Pipe through serveConn, the seam Serve itself uses.

// selfPeer is the peer a same-uid process would be.
func selfPeer() Peer {
	return Peer{uid: uint32(os.Geteuid()), gid: uint32(os.Getegid()), pid: int32(os.Getpid()), hasIDs: true}
}

// pipeServer starts a server inside the bubble and returns it with a
// function that connects a new pipe to it. The server is closed when the
// bubble's test ends.
func pipeServer(t *testing.T, opts Options) (*Server, func() net.Conn) {
	t.Helper()
	srv, err := NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv, func() net.Conn {
		client, server := net.Pipe()
		srv.serveConn(server, selfPeer(), srv.main)
		t.Cleanup(func() { client.Close() })
		return client
	}
}

// closedBy reports, without blocking, whether a read on c has ended the
// connection; reads is fed by readAll.
func closedBy(reads <-chan error) (error, bool) {
	select {
	case err := <-reads:
		return err, true
	default:
		return nil, false
	}
}

// readAll reads c to the end in a goroutine and reports how it ended.
func readAll(c net.Conn) <-chan error {
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, c)
		done <- err
	}()
	return done
}

// R6: a connection that has not completed its handshake 5 s after it was
// accepted is closed, and not a moment before.
func TestSilentConnectionIsClosedAfterHandshakeTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, connect := pipeServer(t, Options{Store: NewMemoryStore()})
		c := connect()
		reads := readAll(c)
		time.Sleep(DefaultHandshakeTimeout - time.Millisecond)
		synctest.Wait()
		if _, closed := closedBy(reads); closed {
			t.Fatal("closed before the handshake timeout")
		}
		time.Sleep(time.Millisecond)
		synctest.Wait()
		if err, closed := closedBy(reads); !closed || err != nil {
			t.Fatalf("closed=%v err=%v at the handshake timeout, want a clean close", closed, err)
		}
	})
}

// R5.3, R24.4: once a frame's first byte has arrived, the rest must follow
// within 5 s; sending a byte a second does not extend that.
func TestTrickledFrameIsCutOffAfterFrameTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, connect := pipeServer(t, Options{Store: NewMemoryStore()})
		c := connect()
		r := &rawConn{t: t, c: c}
		r.handshake()
		start := time.Now()
		frame, _ := sealFrame(append(startFrame(nil), `{"v":1,"id":"1","op":"list_api_keys"}`...))
		var writeErr error
		for _, b := range frame {
			if _, writeErr = c.Write([]byte{b}); writeErr != nil {
				break
			}
			time.Sleep(time.Second)
		}
		if writeErr == nil {
			t.Fatal("the whole frame was accepted a byte a second")
		}
		if took := time.Since(start); took < DefaultFrameTimeout || took > DefaultFrameTimeout+time.Second {
			t.Errorf("connection cut after %v, want %v", took, DefaultFrameTimeout)
		}
	})
}

// R5.3: an idle connection between frames is not cut by the frame
// timeout: a request after an hour of silence is served, with the idle
// timeout off. S9: with it on (10 minutes by default), a connection that
// sends nothing is closed after 0.9 to 1 times it, and one that keeps
// sending is not.
func TestIdleConnectionAfterHandshake(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, connect := pipeServer(t, Options{Store: NewMemoryStore(), IdleTimeout: -1})
		r := &rawConn{t: t, c: connect()}
		r.handshake()
		time.Sleep(time.Hour)
		r.send(`{"v":1,"id":"late","op":"list_api_keys"}`)
		if got := r.recv(); got != `{"id":"late","ok":true,"data":{"keys":[]}}` {
			t.Errorf("after an hour: %s", got)
		}
	})
	synctest.Test(t, func(t *testing.T) {
		_, connect := pipeServer(t, Options{Store: NewMemoryStore()})
		busy := &rawConn{t: t, c: connect()}
		busy.handshake()
		idle := &rawConn{t: t, c: connect()}
		idle.handshake()
		start := time.Now()
		closed := make(chan time.Duration)
		go func() {
			io.Copy(io.Discard, idle.c)
			closed <- time.Since(start)
		}()
		for i := range 30 { // a request a minute for half an hour
			time.Sleep(time.Minute)
			busy.send(`{"v":1,"id":"` + strconv.Itoa(i) + `","op":"list_api_keys"}`)
			busy.recv()
		}
		if took := <-closed; took < DefaultServerIdleTimeout*9/10 || took > DefaultServerIdleTimeout {
			t.Errorf("idle connection closed after %v, want 0.9 to 1 times %v", took, DefaultServerIdleTimeout)
		}
	})
}

// Store deadline: a store that does not answer within 15 s gets the request
// answered with INTERNAL_ERROR at 15 s, and the connection goes on.
func TestStoreDeadlineAnswersInternalError(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hung := newGatedStore(defaultStore(t))
		_, connect := pipeServer(t, Options{Store: hung})
		r := &rawConn{t: t, c: connect()}
		r.handshake()
		start := time.Now()
		r.send(`{"v":1,"id":"slow","op":"get_token","payload":{"provider":"anthropic"}}`)
		wantFailure(t, r.recvMap(), "slow", CodeInternalError, "credential store timed out")
		if took := time.Since(start); took != DefaultStoreTimeout {
			t.Errorf("answered after %v, want %v", took, DefaultStoreTimeout)
		}
		r.expectServing("next")
	})
}

// R22.1: with the clock frozen, requests 1 to 60 pass, the 61st is
// RATE_LIMITED with retryAfter 1, and a second later the bucket is full
// again.
func TestRateLimitAtFixedInstant(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, connect := pipeServer(t, Options{Store: defaultStore(t)})
		r := &rawConn{t: t, c: connect()}
		r.handshake()
		call := func(id int) map[string]any {
			r.send(fmt.Sprintf(`{"v":1,"id":"%d","op":"has_api_key","payload":{"name":"openai"}}`, id))
			return r.recvMap()
		}
		for i := 1; i <= defaultRateBurst; i++ {
			if m := call(i); m["ok"] != true {
				t.Fatalf("request %d: %v", i, m)
			}
		}
		m := call(61)
		wantFailure(t, m, "61", CodeRateLimited, "rate limit exceeded")
		if m["retryAfter"] != float64(1) {
			t.Errorf("retryAfter %v, want 1", m["retryAfter"])
		}
		time.Sleep(time.Second)
		for i := 62; i < 62+defaultRateBurst; i++ {
			if m := call(i); m["ok"] != true {
				t.Fatalf("request %d after refill: %v", i, m)
			}
		}
	})
}

// Client (R24): after 5 minutes with nothing pending the client closes its
// connection; the next call connects and handshakes again. A call before
// then reuses the connection.
func TestClientClosesIdleConnectionAndReconnects(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv, connect := pipeServer(t, Options{Store: defaultStore(t)})
		dials := 0
		c := NewClient("pipe", ClientOptions{dial: func(context.Context) (net.Conn, error) {
			dials++
			return connect(), nil
		}})
		defer c.Close()
		ctx := context.Background()
		if _, err := c.HasAPIKey(ctx, "openai"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(DefaultIdleTimeout - time.Second)
		if _, err := c.HasAPIKey(ctx, "openai"); err != nil || dials != 1 {
			t.Fatalf("call before the idle timeout: err=%v dials=%d, want the first connection", err, dials)
		}
		time.Sleep(DefaultIdleTimeout)
		synctest.Wait()
		if n := serverConns(srv); n != 0 {
			t.Errorf("server still has %d connections after the client went idle", n)
		}
		if _, err := c.HasAPIKey(ctx, "openai"); err != nil || dials != 2 {
			t.Fatalf("call after the idle timeout: err=%v dials=%d, want a second connection", err, dials)
		}
	})
}

func serverConns(s *Server) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Client (R24): a call times out after RequestTimeout (30 s by default),
// or when the caller's context ends, with an error matching
// context.DeadlineExceeded; a late response is dropped and the connection
// serves the next call.
func TestClientCallTimesOut(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		gated := newGatedStore(defaultStore(t))
		_, connect := pipeServer(t, Options{Store: gated, StoreTimeout: time.Hour})
		c := NewClient("pipe", ClientOptions{dial: func(context.Context) (net.Conn, error) { return connect(), nil }})
		defer c.Close()

		start := time.Now()
		_, err := c.GetToken(context.Background(), "anthropic", "")
		if took := time.Since(start); !errors.Is(err, context.DeadlineExceeded) || took != DefaultRequestTimeout {
			t.Errorf("GetToken = %v after %v, want DeadlineExceeded after %v", err, took, DefaultRequestTimeout)
		}

		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		start = time.Now()
		_, err = c.GetToken(ctx, "anthropic", "")
		if took := time.Since(start); !errors.Is(err, context.DeadlineExceeded) || took != time.Second {
			t.Errorf("GetToken with a 1s context = %v after %v", err, took)
		}

		close(gated.gate) // the late responses arrive now and are dropped
		if _, err := c.GetToken(context.Background(), "anthropic", ""); err != nil {
			t.Errorf("next call: %v", err)
		}
	})
}

// Client (R24): many calls to a server that answers one per second all
// complete, each with its own answer; the clock shows they overlapped.
func TestClientCallsShareOneConnection(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := NewMemoryStore()
		for i := range 10 {
			st.SaveAPIKey(context.Background(), "k"+strconv.Itoa(i), Secret("v"+strconv.Itoa(i)))
		}
		dials := 0
		_, connect := pipeServer(t, Options{Store: slowKeys{st}})
		c := NewClient("pipe", ClientOptions{dial: func(context.Context) (net.Conn, error) { dials++; return connect(), nil }})
		defer c.Close()
		if _, err := c.ListAPIKeys(context.Background()); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		errs := make(chan error, 10)
		for i := range 10 {
			go func() {
				key, err := c.GetAPIKey(context.Background(), "k"+strconv.Itoa(i))
				if err == nil && string(key) != "v"+strconv.Itoa(i) {
					err = fmt.Errorf("k%d = %q", i, string(key))
				}
				errs <- err
			}()
		}
		for range 10 {
			if err := <-errs; err != nil {
				t.Error(err)
			}
		}
		// Each call runs in the connection's reader until inlineBudget has
		// passed, then the next is read: they overlap, one budget apart.
		if took := time.Since(start); took != time.Second+9*inlineBudget || dials != 1 {
			t.Errorf("10 concurrent one-second calls took %v over %d connections, want %v over 1", took, dials, time.Second+9*inlineBudget)
		}
	})
}

// R24: a call queued behind a slow one on the same connection is read by
// a new reader within two budgets, and the watchdog that hands it over
// runs only while requests come: afterwards the server is back, within two
// budgets, to one reader for its one connection and no watchdog.
func TestIdleServerKeepsNoWatchdog(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := NewMemoryStore()
		st.SaveAPIKey(context.Background(), "k", Secret("v"))
		_, connect := pipeServer(t, Options{Store: slowKeys{st}})
		c := NewClient("pipe", ClientOptions{dial: func(context.Context) (net.Conn, error) { return connect(), nil }})
		defer c.Close()
		slow := make(chan error)
		go func() { _, err := c.GetAPIKey(context.Background(), "k"); slow <- err }()
		synctest.Wait()
		start := time.Now()
		if _, err := c.ListAPIKeys(context.Background()); err != nil {
			t.Fatal(err)
		}
		if took := time.Since(start); took > 2*inlineBudget {
			t.Errorf("a call behind a slow one took %v, want it handed to a new reader within %v", took, 2*inlineBudget)
		}
		if err := <-slow; err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * inlineBudget)
		synctest.Wait()
		readers, watchdogs := goroutinesIn("credproxy.(*conn).readRequests("), goroutinesIn("credproxy.(*Server).watchdog(")
		if readers != 1 || watchdogs != 0 {
			t.Errorf("idle server: %d readers and %d watchdogs, want 1 and 0", readers, watchdogs)
		}
	})
}

// goroutinesIn counts the goroutines whose stack has fn in it.
func goroutinesIn(fn string) int {
	var buf bytes.Buffer
	pprof.Lookup("goroutine").WriteTo(&buf, 2)
	n := 0
	for g := range strings.SplitSeq(buf.String(), "\n\n") {
		if strings.Contains(g, fn) {
			n++
		}
	}
	return n
}

// slowKeys answers each API key read after a second.
type slowKeys struct{ *MemoryStore }

func (s slowKeys) GetAPIKey(ctx context.Context, name string) (Secret, error) {
	time.Sleep(time.Second)
	return s.MemoryStore.GetAPIKey(ctx, name)
}

// A request's context keeps the context contract without its eager
// allocations: Err and Done agree at the deadline, whether or not Done was
// asked for first; the server's context ending ends it; a child context
// follows it; and release ends it with Canceled.
func TestRequestContextKeepsTheContract(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		base, cancelBase := context.WithCancel(context.Background())
		defer cancelBase()
		lazy := newRequestContext(base, time.Now().Add(15*time.Second))
		eager := newRequestContext(base, time.Now().Add(15*time.Second))
		child, cancelChild := context.WithCancel(eager)
		defer cancelChild()
		done := eager.Done()
		if lazy.Err() != nil || eager.Err() != nil {
			t.Fatal("ended before its deadline")
		}
		time.Sleep(15 * time.Second)
		synctest.Wait()
		select {
		case <-done:
		default:
			t.Fatal("Done not closed at the deadline")
		}
		if !errors.Is(eager.Err(), context.DeadlineExceeded) || !errors.Is(child.Err(), context.DeadlineExceeded) {
			t.Errorf("at the deadline: Err %v, child %v", eager.Err(), child.Err())
		}
		if !errors.Is(lazy.Err(), context.DeadlineExceeded) {
			t.Errorf("Err without Done at the deadline: %v", lazy.Err())
		}
		select {
		case <-lazy.Done(): // made after the deadline: closed at once
		default:
			t.Error("Done asked for after the deadline is open")
		}
		if !errors.Is(context.Cause(eager), context.DeadlineExceeded) {
			t.Errorf("Cause = %v", context.Cause(eager))
		}

		byBase := newRequestContext(base, time.Now().Add(time.Hour))
		d := byBase.Done()
		cancelBase()
		synctest.Wait()
		select {
		case <-d:
		default:
			t.Fatal("Done not closed when the server's context ended")
		}
		if !errors.Is(byBase.Err(), context.Canceled) {
			t.Errorf("after the server's context ended: %v", byBase.Err())
		}

		released := newRequestContext(context.Background(), time.Now().Add(time.Hour))
		d = released.Done()
		released.release()
		if _, open := <-d; open || !errors.Is(released.Err(), context.Canceled) {
			t.Errorf("after release: %v", released.Err())
		}
	})
}
