package etcdstore

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// waitFor polls cond until it holds, failing t after 20 s. Changes made by
// another host reach a store through its watch, so tests wait for them
// this way, never by sleeping a fixed time.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// logRecorder is a slog.Handler that keeps every record, for tests that
// check what the store logs (and that it logs no secret).
type logRecorder struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (r *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *logRecorder) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *logRecorder) WithGroup(string) slog.Handler            { return r }
func (r *logRecorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recs = append(r.recs, rec.Clone())
	return nil
}

// count returns how many records at level have a message containing msg.
func (r *logRecorder) count(level slog.Level, msg string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, rec := range r.recs {
		if rec.Level == level && strings.Contains(rec.Message, msg) {
			n++
		}
	}
	return n
}

// text returns every record, attributes included, as one string.
func (r *logRecorder) text() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	for _, rec := range r.recs {
		b.WriteString(rec.Level.String() + " " + rec.Message)
		rec.Attrs(func(a slog.Attr) bool {
			b.WriteString(" " + a.String())
			return true
		})
		b.WriteString("\n")
	}
	return b.String()
}

// Log messages the tests look for.
const (
	msgBroken    = "watch broken, reading through"
	msgRecovered = "watch re-established"
	msgStale     = "served a possibly stale cached value"
)

// openLogged opens a store on c under prefix with a recorded log and the
// given request timeout (zero for the default).
func (c *testCluster) openLogged(t *testing.T, prefix string, timeout time.Duration, endpoints ...string) (*EtcdStore, *logRecorder) {
	t.Helper()
	rec := &logRecorder{}
	if len(endpoints) == 0 {
		endpoints = c.endpoints
	}
	st, err := Open(t.Context(), Options{Endpoints: endpoints, Prefix: prefix, DataKey: c.key,
		Logger: slog.New(rec), RequestTimeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("Close = %v", err)
		}
		if strings.Contains(rec.text(), fakeRefresh) || strings.Contains(rec.text(), fakeAccess) {
			t.Errorf("the log holds a secret:\n%s", rec.text())
		}
	})
	return st, rec
}

// tokenN is a token whose access token says which write made it.
func tokenN(t testing.TB, n int) credproxy.Token {
	return counterToken(t, n)
}

// isNotFound reports whether err says there is no such item.
func isNotFound(err error) bool { return errors.Is(err, credproxy.ErrNotFound) }

// Another host (a store on the same prefix with the same data key) sees a
// write once its watch brings it, removals and lists included; the host
// that wrote sees its own write at once (read-your-writes).
func TestCacheSeesOtherHost(t *testing.T) {
	c := newCluster(t)
	a, b := c.openStore(t, "/fleet/"), c.openStore(t, "/fleet/")
	ctx := t.Context()
	for n := 1; n <= 3; n++ {
		if err := a.SaveToken(ctx, "p", "b", tokenN(t, n)); err != nil {
			t.Fatal(err)
		}
		if got, err := a.GetToken(ctx, "p", "b"); err != nil || counter(t, got) != n {
			t.Fatalf("write %d: the writer reads %v, %v; want its own write at once", n, got.Reveal(), err)
		}
		waitFor(t, "the other host to see the write", func() bool {
			got, err := b.GetToken(ctx, "p", "b")
			return err == nil && counter(t, got) == n
		})
	}
	if err := b.SaveAPIKey(ctx, "k", fakeAPIKey); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the API key and the lists on a", func() bool {
		key, err := a.GetAPIKey(ctx, "k")
		keys, _ := a.ListAPIKeys(ctx)
		provs, _ := a.ListProviders(ctx)
		buckets, _ := a.ListBuckets(ctx, "p")
		return err == nil && key == fakeAPIKey && len(keys) == 1 && len(provs) == 1 && len(buckets) == 1
	})
	if err := b.RemoveToken(ctx, "p", "b"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.GetToken(ctx, "p", "b"); !isNotFound(err) {
		t.Fatalf("the remover reads %v, want ErrNotFound at once", err)
	}
	waitFor(t, "the removal to reach a", func() bool {
		_, err := a.GetToken(ctx, "p", "b")
		provs, _ := a.ListProviders(ctx)
		return isNotFound(err) && len(provs) == 0
	})
}

// A store's reads never go back past its own last write, while its watch
// brings its earlier writes back: the cache keeps each item's newest
// revision whatever order the write's result and the events arrive in.
func TestCacheReadYourWritesNeverGoesBack(t *testing.T) {
	c := newCluster(t)
	st := c.newStore(t)
	ctx := t.Context()
	for n := 1; n <= 200; n++ {
		if err := st.SaveToken(ctx, "p", "", tokenN(t, n)); err != nil {
			t.Fatal(err)
		}
		for range 3 {
			got, err := st.GetToken(ctx, "p", "")
			if err != nil || counter(t, got) != n {
				t.Fatalf("after write %d, read %d (%v)", n, counter(t, got), err)
			}
		}
	}
}

// The cache keeps the newest revision of each item: an older value or an
// older deletion, from a late watch event or an old snapshot, never
// replaces a newer one, and a deletion is not undone by an older put.
func TestCacheKeepsNewestRevision(t *testing.T) {
	sl, err := newSealer(make([]byte, DataKeySize))
	if err != nil {
		t.Fatal(err)
	}
	c := newCache("/x/", sl, slog.New(slog.DiscardHandler))
	key := "/x/" + tokensDir + "p/b"
	value := func(n int) []byte { return sl.seal(key, tokenN(t, n).Reveal()) }
	got := func() int {
		e, ok := c.lookup(key)
		if !ok {
			return -1
		}
		return counter(t, e.token)
	}
	steps := []struct {
		name string
		do   func()
		want int // -1: absent
	}{
		{"own write at 10", func() { c.put(key, cacheEntry{rev: 10, token: tokenN(t, 10)}) }, 10},
		{"late event at 8", func() { c.put(key, c.decode(key, value(8), 8)) }, 10},
		{"event at 12", func() { c.put(key, c.decode(key, value(12), 12)) }, 12},
		{"snapshot at 11 without it", func() { c.load(nil, 11) }, 12},
		{"deletion at 15", func() { c.put(key, cacheEntry{rev: 15, gone: true}) }, -1},
		{"late put at 13", func() { c.put(key, c.decode(key, value(13), 13)) }, -1},
		{"watch passes 15", func() { c.advance(15) }, -1},
		{"put at 16", func() { c.put(key, c.decode(key, value(16), 16)) }, 16},
		{"snapshot at 20 without it", func() { c.load(nil, 20) }, -1},
	}
	for i, s := range steps {
		s.do()
		if g := got(); g != s.want {
			t.Fatalf("step %d (%s): cache holds %d, want %d", i, s.name, g, s.want)
		}
	}
}

// The holder of a token's lock reads what the previous holder, on another
// host, wrote under it, at once and without polling: LockToken waits for
// the cache to reach the revision at which the lock was granted. (The
// refresher relies on it to see that another host refreshed already.)
func TestLockHolderReadsPreviousHolder(t *testing.T) {
	c := newCluster(t)
	hosts := []*EtcdStore{c.openStore(t, "/fleet/"), c.openStore(t, "/fleet/")}
	ctx := t.Context()
	for n := 1; n <= 60; n++ {
		st := hosts[n%2]
		unlock, err := st.LockToken(ctx, "p", "")
		if err != nil {
			t.Fatal(err)
		}
		got, err := st.GetToken(ctx, "p", "")
		if n > 1 && (err != nil || counter(t, got) != n-1) {
			unlock()
			t.Fatalf("holder %d reads %d (%v), want the previous holder's %d", n, counter(t, got), err, n-1)
		}
		err = st.SaveToken(ctx, "p", "", tokenN(t, n))
		unlock()
		if err != nil {
			t.Fatal(err)
		}
	}
}

// waitRev raises the floor under which reads go through to the cluster,
// and returns once the watch has reached it, or at once when the watch is
// broken (reads go through then anyway), or when ctx ends. Step by step,
// without a cluster.
func TestCacheWaitRev(t *testing.T) {
	sl, err := newSealer(make([]byte, DataKeySize))
	if err != nil {
		t.Fatal(err)
	}
	c := newCache("/x/", sl, slog.New(slog.DiscardHandler))
	c.load(nil, 10)
	c.setCurrent(true)
	if !c.fresh() {
		t.Fatal("a current cache at 10 is not fresh")
	}
	done := make(chan error, 1)
	go func() { done <- c.waitRev(t.Context(), 12) }()
	waitFor(t, "the floor to rise", func() bool { return !c.fresh() })
	select {
	case <-c.progress: // the waiter asked for a progress notification
	case <-time.After(10 * time.Second):
		t.Fatal("waitRev did not ask for progress")
	}
	c.advance(11)
	select {
	case err := <-done:
		t.Fatalf("waitRev(12) returned %v at revision 11", err)
	default:
	}
	c.advance(12)
	if err := <-done; err != nil || !c.fresh() {
		t.Fatalf("waitRev(12) at 12 = %v, fresh %v", err, c.fresh())
	}
	// A broken watch: waitRev returns at once, and reads stay not fresh
	// after the watch is back until it reaches the floor.
	c.setCurrent(false)
	if err := c.waitRev(t.Context(), 20); err != nil {
		t.Fatal(err)
	}
	c.load(nil, 15)
	c.setCurrent(true)
	if c.fresh() {
		t.Fatal("fresh at 15 with a floor of 20: a read could miss a write the lock promised")
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := c.waitRev(ctx, 20); !errors.Is(err, context.Canceled) {
		t.Fatalf("waitRev with an ended ctx = %v", err)
	}
}

// What the cluster answers when it cannot answer counts as unavailable, so
// that a read serves the cached value and a write says the cluster is
// unavailable: etcd 3.7's codes, and etcd 3.4's (Debian's), which reports
// a request that timed out without quorum as code Unknown. A refusal
// (permission denied, a bad request) does not count.
func TestIsUnavailable(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{context.DeadlineExceeded, true},
		{status.Error(codes.Unavailable, "etcdserver: no leader"), true},
		{status.Error(codes.DeadlineExceeded, "context deadline exceeded"), true},
		{status.Error(codes.Unknown, "context deadline exceeded"), true},
		{status.Error(codes.Unknown, "etcdserver: request timed out"), true},
		{status.Error(codes.PermissionDenied, "etcdserver: permission denied"), false},
		{status.Error(codes.Unknown, "something else"), false},
		{errors.New("credproxy: not found"), false},
	} {
		if got := isUnavailable(tc.err); got != tc.want {
			t.Errorf("isUnavailable(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
