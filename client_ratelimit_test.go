package credproxy

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// countingConn counts the frames a client writes: the client writes each
// frame, the handshake included, with one Write call.
type countingConn struct {
	net.Conn
	writes *atomic.Int32
}

func (c countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// F6: 200 goroutines sharing one Client against a server with the default
// rate limit (a bucket of 60 requests per connection, refilled at 60 a
// second) all succeed, reads of every kind: a read refused with
// RATE_LIMITED waits retryAfter and is sent again. Once one read has been
// refused, the client holds every call back until the server would take a
// request again, so the server refuses at most the calls that were in
// flight (16) each time, not every call past the bucket.
func TestClientRetriesRateLimitedReads(t *testing.T) {
	_, path := startServer(t, Options{Store: defaultStore(t)})
	var writes atomic.Int32
	c := newTestClient(t, path, ClientOptions{dial: func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		nc, err := d.DialContext(ctx, "unix", path)
		return countingConn{nc, &writes}, err
	}})
	const callers = 200
	var wg sync.WaitGroup
	var failed atomic.Int32
	for i := range callers {
		wg.Go(func() {
			ctx := t.Context()
			var err error
			switch i % 7 {
			case 0:
				_, err = c.GetToken(ctx, "anthropic", "")
			case 1:
				_, err = c.GetAPIKey(ctx, "openai")
			case 2:
				_, err = c.HasAPIKey(ctx, "openai")
			case 3:
				_, err = c.ListProviders(ctx)
			case 4:
				_, err = c.ListBuckets(ctx, "anthropic")
			case 5:
				_, err = c.ListAPIKeys(ctx)
			case 6:
				_, err = c.GetBucketStats(ctx, "anthropic", "")
			}
			if err != nil {
				if failed.Add(1) <= 3 {
					t.Errorf("caller %d: %v", i, err)
				}
			}
		})
	}
	wg.Wait()
	// Every request but the handshake was served or refused, and each
	// call that succeeded was served once.
	refused := int(writes.Load()) - 1 - (callers - int(failed.Load()))
	t.Logf("%d callers: %d failed, %d requests refused with RATE_LIMITED", callers, failed.Load(), refused)
	if failed.Load() != 0 {
		t.Fatalf("%d of %d calls failed, want none", failed.Load(), callers)
	}
	// The bucket serves 60 at once and 60 after each wait of retryAfter
	// (1 s): at most 3 waits, with at most 16 calls in flight refused at
	// each, and a margin of one more.
	if refused > 4*DefaultMaxInFlight {
		t.Errorf("the server refused %d requests, want at most %d: the client kept sending while it should hold back", refused, 4*DefaultMaxInFlight)
	}
}

// F6: a refused read is sent again after exactly the server's retryAfter,
// not sooner and not later.
func TestClientWaitsRetryAfterBeforeRetryingARead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, received := refusingFirst(t, 3)
		start := time.Now()
		exists, err := c.HasAPIKey(t.Context(), "openai")
		if err != nil || !exists {
			t.Fatalf("HasAPIKey = %v, %v; want true after one retry", exists, err)
		}
		if took, n := time.Since(start), received.Load(); took != 3*time.Second || n != 2 {
			t.Errorf("HasAPIKey took %v and %d requests, want 3s (retryAfter) and 2", took, n)
		}
	})
}

// F6: a read that is refused again and again is retried until the next
// wait would not fit in the caller's deadline; then it fails at once with
// the server's RATE_LIMITED error, rather than sleeping into the deadline.
func TestClientRetriesReadsWithinTheCallersDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, received := refusingClient(t, ClientOptions{})
		ctx, cancel := context.WithTimeout(t.Context(), 10500*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := c.GetToken(ctx, "anthropic", "")
		var re *RemoteError
		if !errors.Is(err, ErrRateLimited) || !errors.As(err, &re) || re.RetryAfter != time.Second {
			t.Fatalf("GetToken = %v, want the server's RATE_LIMITED with RetryAfter 1s", err)
		}
		// Sent at 0, 1, ..., 10 s; the wait after the last would end at
		// 11 s, past the deadline.
		if took, n := time.Since(start), received.Load(); took != 10*time.Second || n != 11 || ctx.Err() != nil {
			t.Errorf("GetToken took %v and %d requests, want 10s and 11, and to return before the deadline", took, n)
		}
	})
}

// F6: writes and refresh_token are sent once: a RATE_LIMITED answer is
// the caller's to handle. (A refresh_token refused with RATE_LIMITED was
// most likely refused by the refresh cooldown, which a retry within
// seconds would not pass.)
func TestClientDoesNotRetryWritesOrRefresh(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, received := refusingClient(t, ClientOptions{})
		ctx := t.Context()
		expectSentOnce(t, received, map[string]func() error{
			"save_token": func() error {
				return c.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"fake-access"}`))
			},
			"remove_token":  func() error { return c.RemoveToken(ctx, "anthropic", "") },
			"refresh_token": func() error { _, err := c.RefreshToken(ctx, "anthropic", ""); return err },
		})
	})
}

// F6: with NoRateLimitRetry, reads are sent once too, and a refusal holds
// nothing back: the next call is sent at once.
func TestClientRateLimitRetryCanBeTurnedOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, received := refusingClient(t, ClientOptions{NoRateLimitRetry: true})
		ctx := t.Context()
		expectSentOnce(t, received, map[string]func() error{
			"get_token":   func() error { _, err := c.GetToken(ctx, "anthropic", ""); return err },
			"has_api_key": func() error { _, err := c.HasAPIKey(ctx, "openai"); return err },
			"list_providers": func() error {
				_, err := c.ListProviders(ctx)
				return err
			},
		})
	})
}

// refusingClient returns a pipeClient whose server refuses every request
// with RATE_LIMITED and retryAfter 1, and the count of requests it read.
func refusingClient(t *testing.T, opts ClientOptions) (*Client, *atomic.Int32) {
	var received atomic.Int32
	return pipeClient(t, opts, answerEach(&received, func(_ int, req request) string {
		return rateLimited(req, 1)
	})), &received
}

// refusingFirst returns a pipeClient whose server refuses the first
// request with RATE_LIMITED and retryAfter seconds, and serves the others
// (has_api_key finds the key; anything else gets {}), and the count of
// requests it read.
func refusingFirst(t *testing.T, retryAfter int) (*Client, *atomic.Int32) {
	var received atomic.Int32
	return pipeClient(t, ClientOptions{}, answerEach(&received, func(n int, req request) string {
		switch {
		case n == 1:
			return rateLimited(req, retryAfter)
		case req.op == string(OpHasAPIKey):
			return okResponse(req, `{"exists":true}`)
		}
		return okResponse(req, `{}`)
	})), &received
}

// expectSentOnce makes each call, one after the other, and checks that
// each fails at once with RATE_LIMITED after one request.
func expectSentOnce(t *testing.T, received *atomic.Int32, calls map[string]func() error) {
	t.Helper()
	for name, call := range calls {
		before, start := received.Load(), time.Now()
		err := call()
		var re *RemoteError
		if !errors.As(err, &re) || !errors.Is(err, ErrRateLimited) || re.RetryAfter != time.Second {
			t.Errorf("%s = %v, want RATE_LIMITED with RetryAfter 1s", name, err)
		}
		if n, took := received.Load()-before, time.Since(start); n != 1 || took != 0 {
			t.Errorf("%s: %d requests in %v, want 1 at once", name, n, took)
		}
	}
}

// F6: once a read has been refused, calls made while it waits are held
// back until the server's retryAfter has passed, writes included, instead
// of being sent to be refused too.
func TestClientHoldsCallsBackWhileRateLimited(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, received := refusingFirst(t, 2)
		ctx := t.Context()
		start := time.Now()
		first := make(chan error, 1)
		go func() { _, err := c.HasAPIKey(ctx, "openai"); first <- err }()
		synctest.Wait() // refused, and waiting to retry
		for name, call := range map[string]func() error{
			"has_api_key": func() error { _, err := c.HasAPIKey(ctx, "openai"); return err },
			"save_token": func() error {
				return c.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"fake-access"}`))
			},
		} {
			if err := call(); err != nil || time.Since(start) != 2*time.Second {
				t.Errorf("%s while held back: %v after %v, want success after 2s", name, err, time.Since(start))
			}
		}
		if err := <-first; err != nil {
			t.Errorf("the refused read: %v", err)
		}
		if n := received.Load(); n != 4 {
			t.Errorf("%d requests, want 4 (one refused, three served)", n)
		}
	})
}

// F6: a caller whose deadline ends before the hold does not wait for it:
// its call is sent at once (the server may take it: retryAfter is
// rounded up to whole seconds).
func TestClientSendsAtOnceWhenTheHoldOutlastsTheDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, _ := refusingFirst(t, 5)
		first := make(chan error, 1)
		go func() { _, err := c.HasAPIKey(t.Context(), "openai"); first <- err }()
		synctest.Wait()
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		start := time.Now()
		if _, err := c.HasAPIKey(ctx, "openai"); err != nil || time.Since(start) != 0 {
			t.Errorf("a call with 1s left during a 5s hold: %v after %v, want success at once", err, time.Since(start))
		}
		if err := <-first; err != nil {
			t.Errorf("the refused read: %v", err)
		}
	})
}
