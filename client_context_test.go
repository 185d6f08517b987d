package credproxy

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// F6: a call whose context is already done is never sent, whether the
// client has connected yet or not, and fails with "credproxy: <op>: " and
// the context's error, which it wraps. The server's audit log, one record
// per request it read, counts what reached it.
func TestClientNeverSendsWithADoneContext(t *testing.T) {
	logger, logs := debugLogger()
	srv, path, served := launchServer(t, Options{Store: defaultStore(t), Logger: logger, RateLimit: -1})
	c := NewClient(path, ClientOptions{})
	canceled, cancel := context.WithCancel(t.Context())
	cancel()
	expired, cancel := context.WithDeadline(t.Context(), time.Now().Add(-time.Second))
	defer cancel()
	wrong := 0
	calls := func() {
		for _, tc := range []struct {
			ctx  context.Context
			want error
		}{{canceled, context.Canceled}, {expired, context.DeadlineExceeded}} {
			for range 200 {
				_, err := c.HasAPIKey(tc.ctx, "openai")
				if !errors.Is(err, tc.want) || err.Error() != "credproxy: has_api_key: "+tc.want.Error() {
					if wrong++; wrong <= 3 {
						t.Errorf("HasAPIKey with a done context = %v, want credproxy: has_api_key: %v", err, tc.want)
					}
				}
			}
		}
	}
	calls() // before the client has connected
	if _, err := c.HasAPIKey(t.Context(), "openai"); err != nil {
		t.Fatal(err)
	}
	calls() // on the connection
	if wrong > 0 {
		t.Errorf("%d of 800 calls with a done context failed otherwise", wrong)
	}
	c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil { // waits for every request it read
		t.Fatal(err)
	}
	<-served
	if n := strings.Count(logs.String(), `"msg":"credproxy: request"`); n != 1 {
		t.Errorf("the server read %d requests, want 1: calls with a done context were sent", n)
	}
}

// F6: a call whose context ends while it waits fails with the same text
// at every stage it can be waiting in, "credproxy: <op>: context
// canceled", wrapping context.Canceled.
func TestClientReportsACanceledCallTheSameAtEveryStage(t *testing.T) {
	const want = "credproxy: has_api_key: context canceled"
	silent := func(nc net.Conn) { io.Copy(io.Discard, nc) } // reads everything, answers nothing
	for _, tc := range []struct {
		name  string
		opts  ClientOptions
		serve func(nc net.Conn)
		// busy, if set, is a call made first that keeps the client busy
		// so that the call under test waits behind it.
		busy bool
	}{
		{name: "handshake", serve: silent},
		{name: "connecting, behind another call's handshake", serve: silent, busy: true},
		{name: "waiting for a free slot", opts: ClientOptions{MaxInFlight: 1}, serve: afterHandshake(silent), busy: true},
		{name: "waiting for the response", serve: afterHandshake(silent)},
		{name: "waiting to retry", serve: answerEach(new(atomic.Int32), func(_ int, req request) string {
			return rateLimited(req, 5)
		})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				c := pipeClient(t, tc.opts, tc.serve)
				call := func(ctx context.Context) <-chan error {
					done := make(chan error, 1)
					go func() { _, err := c.HasAPIKey(ctx, "openai"); done <- err }()
					return done
				}
				if tc.busy {
					ctx, cancel := context.WithCancel(t.Context())
					defer cancel()
					call(ctx)
					synctest.Wait()
				}
				ctx, cancel := context.WithCancel(t.Context())
				done := call(ctx)
				synctest.Wait()
				select {
				case err := <-done:
					t.Fatalf("returned before its context ended: %v", err)
				default:
				}
				cancel()
				if err := <-done; !errors.Is(err, context.Canceled) || err.Error() != want {
					t.Errorf("got %q, want %q", err, want)
				}
			})
		})
	}
}

// F6: a call waiting for its turn to write, behind a write the server does
// not read, fails like any other when its context is canceled; the write
// under way fails at its deadline, with the same form of text.
func TestClientReportsAWaitingWriteTheSameWay(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		c := pipeClient(t, ClientOptions{}, afterHandshake(func(net.Conn) { <-release }))
		t.Cleanup(func() { close(release) })
		call := func(ctx context.Context) <-chan error {
			done := make(chan error, 1)
			go func() { _, err := c.HasAPIKey(ctx, "openai"); done <- err }()
			return done
		}
		writing, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		first := call(writing)
		synctest.Wait() // its write is blocked: nobody reads
		waiting, cancel := context.WithCancel(t.Context())
		second := call(waiting)
		synctest.Wait()
		cancel()
		if err := <-second; !errors.Is(err, context.Canceled) || err.Error() != "credproxy: has_api_key: context canceled" {
			t.Errorf("waiting to write: got %q", err)
		}
		if err := <-first; !errors.Is(err, context.DeadlineExceeded) || err.Error() != "credproxy: has_api_key: context deadline exceeded" {
			t.Errorf("writing past the deadline: got %q", err)
		}
	})
}
