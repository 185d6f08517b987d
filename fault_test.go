package credproxy

import (
	"context"
	"errors"
	"net"
	"os"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/go-json-experiment/json"
)

// Fault injection (issue 6): stores, refreshers and the socket file
// misbehaving under a running server.

// garbageStore answers with what a broken or hostile backend might hold:
// API keys that are not valid UTF-8 or hold control characters, and list
// entries that are not valid names, repeated and unsorted.
type garbageStore struct{ Store }

func (garbageStore) GetAPIKey(_ context.Context, name string) (Secret, error) {
	if name == "binary" {
		return Secret("sk-\xff\xfe\x00\n\"\\-end"), nil
	}
	return "", ErrNotFound
}

func (garbageStore) ListProviders(context.Context) ([]string, error) {
	return []string{"zeta", "../etc", "", "alpha", "zeta", strings.Repeat("x", 65), "a b", "alpha"}, nil
}

// ListBuckets gives every provider a bucket, so that the providers are
// listed (a provider without one the client may use is left out).
func (garbageStore) ListBuckets(context.Context, string) ([]string, error) {
	return []string{DefaultBucket}, nil
}

// A store's garbage never breaks the protocol: every answer is one valid
// JSON frame, an API key that is not valid UTF-8 arrives with the invalid
// bytes replaced (U+FFFD) and everything else exact, and invalid names are
// dropped from lists, which stay sorted and free of repeats.
func TestStoreGarbageIsContained(t *testing.T) {
	_, path := startServer(t, Options{Store: garbageStore{NewMemoryStore()}})
	r := dialRaw(t, path)
	r.handshake()
	r.send(`{"v":1,"id":"k","op":"get_api_key","payload":{"name":"binary"}}`)
	var got struct {
		OK   bool `json:"ok"`
		Data struct {
			Key string `json:"key"`
		} `json:"data"`
	}
	frame := r.recv()
	if err := json.Unmarshal([]byte(frame), &got); err != nil || !got.OK {
		t.Fatalf("answer %q: %v", frame, err)
	}
	if want := "sk-\ufffd\ufffd\x00\n\"\\-end"; got.Data.Key != want {
		t.Errorf("key %q, want %q", got.Data.Key, want)
	}
	r.send(`{"v":1,"id":"l","op":"list_providers"}`)
	if got := r.recv(); got != `{"id":"l","ok":true,"data":{"providers":["alpha","zeta"]}}` {
		t.Errorf("list of garbage names: %s", got)
	}
}

// A refresher that hangs (until its context ends) costs the requester the
// store deadline, INTERNAL_ERROR "refresh timed out", and nothing more:
// the refresh's own attempt deadline ends it. Shutdown lets a request
// waiting on such a refresh run to its deadline, then cancels the refresh;
// Close cancels both at once.
func TestHungRefresherTimesOutAndShutdownEndsIt(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		calls := 0
		hang := RefresherFunc(func(ctx context.Context, tok Token) (Token, error) {
			calls++
			<-ctx.Done()
			return Token{}, ctx.Err()
		})
		st := NewMemoryStore()
		st.SaveToken(context.Background(), "p", "", mustToken(t, `{"access_token":"a","refresh_token":"`+fakeRefresh+`","expiry":1}`))
		srv, connect := pipeServer(t, Options{Store: st, Refreshers: map[string]Refresher{"p": hang}, DisableRenewal: true})
		c := NewClient("pipe", ClientOptions{dial: func(context.Context) (net.Conn, error) { return connect(), nil }})
		defer c.Close()

		start := time.Now()
		_, err := c.RefreshToken(context.Background(), "p", "")
		var re *RemoteError
		if !errors.As(err, &re) || re.Message != "refresh timed out" || time.Since(start) != DefaultStoreTimeout {
			t.Fatalf("refresh with a hung refresher: %v after %v", err, time.Since(start))
		}
		synctest.Wait()
		time.Sleep(refreshAttemptTimeout) // the attempt's deadline ends the flight
		synctest.Wait()
		if calls != 1 {
			t.Errorf("refresher calls = %d, want 1 (a timeout is not retried)", calls)
		}

		go c.RefreshToken(context.Background(), "p", "") // a new flight, hung again
		synctest.Wait()
		start = time.Now()
		if err := srv.Shutdown(context.Background()); err != nil {
			t.Fatal(err)
		}
		if took := time.Since(start); took != DefaultStoreTimeout {
			t.Errorf("Shutdown with a request waiting on a hung refresh took %v, want the request's %v", took, DefaultStoreTimeout)
		}
		if calls != 2 {
			t.Errorf("refresher calls = %d, want 2", calls)
		}

		srv2, connect2 := pipeServer(t, Options{Store: st, Refreshers: map[string]Refresher{"p": hang}, DisableRenewal: true})
		c2 := NewClient("pipe", ClientOptions{dial: func(context.Context) (net.Conn, error) { return connect2(), nil }})
		defer c2.Close()
		go c2.RefreshToken(context.Background(), "p", "")
		synctest.Wait()
		start = time.Now()
		srv2.Close()
		if took := time.Since(start); took != 0 {
			t.Errorf("Close with a hung refresh took %v, want at once", took)
		}
	})
}

// The socket file deleted under a running server: connections already
// made keep working, new clients cannot connect (nothing is there), and
// Shutdown still succeeds.
func TestSocketDeletedUnderRunningServer(t *testing.T) {
	srv, path := startServer(t, Options{Store: defaultStore(t)})
	c := newTestClient(t, path, ClientOptions{})
	if _, err := c.HasAPIKey(t.Context(), "openai"); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if _, err := c.HasAPIKey(t.Context(), "openai"); err != nil {
		t.Errorf("an existing connection after the socket file was deleted: %v", err)
	}
	if _, err := Dial(t.Context(), path, ClientOptions{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a new client after the socket file was deleted: %v", err)
	}
	_ = srv
}

// The socket file replaced under a running server by another server's:
// shutting the first down leaves the second's socket in place and
// serving.
func TestShutdownLeavesAReplacementSocketAlone(t *testing.T) {
	first, path := startServer(t, Options{Store: defaultStore(t)})
	newTestClient(t, path, ClientOptions{}).HasAPIKey(t.Context(), "openai") // first is serving
	os.Remove(path)
	ln, err := ListenPath(path)
	if err != nil {
		t.Fatal(err)
	}
	second, err := NewServer(Options{Store: defaultStore(t)})
	if err != nil {
		t.Fatal(err)
	}
	go second.Serve(ln)
	defer second.Close()

	if err := first.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
	c := newTestClient(t, path, ClientOptions{})
	if _, err := c.HasAPIKey(t.Context(), "openai"); err != nil {
		t.Errorf("the replacement server after the first shut down: %v", err)
	}
}
