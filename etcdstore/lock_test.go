package etcdstore

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// lockResult is what a LockToken in a goroutine reports.
type lockResult struct {
	unlock func()
	err    error
}

func lockAsync(ctx context.Context, st *EtcdStore, provider, bucket string) <-chan lockResult {
	ch := make(chan lockResult, 1)
	go func() {
		u, err := st.LockToken(ctx, provider, bucket)
		ch <- lockResult{u, err}
	}()
	return ch
}

// waitHolders waits until n holders and waiters of the lock of provider
// and bucket are in etcd (each is a key under the lock's directory), so a
// test knows a LockToken is waiting without sleeping.
func waitHolders(t *testing.T, raw *clientv3.Client, st *EtcdStore, provider, bucket string, n int) {
	t.Helper()
	dir := st.lockKey(provider, normalBucket(bucket)) + "/"
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := raw.Get(t.Context(), dir, clientv3.WithPrefix(), clientv3.WithKeysOnly())
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("lock %s: %d holders and waiters, want %d", dir, len(resp.Kvs), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitLocal waits until n holders and waiters of key are in st's
// in-process lock.
func waitLocal(t *testing.T, st *EtcdStore, key string, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st.locals.mu.Lock()
		got := 0
		if l := st.locals.locks[key]; l != nil {
			got = l.waiters
		}
		st.locals.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("in-process lock %s: %d holders and waiters, want %d", key, got, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func mustNotHave(t *testing.T, ch <-chan lockResult, what string) {
	t.Helper()
	select {
	case r := <-ch:
		t.Fatalf("%s returned (err %v) while the lock was held elsewhere", what, r.err)
	default:
	}
}

func mustGet(t *testing.T, ch <-chan lockResult, what string) func() {
	t.Helper()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("%s: %v", what, r.err)
		}
		return r.unlock
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: not granted after 30s", what)
		return nil
	}
}

// Two hosts (two stores on one prefix): while one holds a token's lock,
// the other waits, and gets it when the first unlocks. A second unlock of
// the first host's releases nothing of the second's.
func TestLockTokenExcludesOtherHost(t *testing.T) {
	c := newCluster(t)
	a, b := c.openStore(t, "/fleet/"), c.openStore(t, "/fleet/")
	raw := c.rawClient(t)
	ctx := t.Context()

	unlockA, err := a.LockToken(ctx, "p", "")
	if err != nil {
		t.Fatal(err)
	}
	gotB := lockAsync(ctx, b, "p", credproxy.DefaultBucket) // "" and DefaultBucket are one lock
	waitHolders(t, raw, a, "p", "", 2)
	mustNotHave(t, gotB, "host b's LockToken")

	unlockA()
	unlockB := mustGet(t, gotB, "host b's LockToken after host a's unlock")
	waitHolders(t, raw, a, "p", "", 1)

	// Unlock is idempotent: a second call does not release b's lock.
	unlockA()
	gotA := lockAsync(ctx, a, "p", "")
	waitHolders(t, raw, a, "p", "", 2)
	mustNotHave(t, gotA, "host a's second LockToken")
	unlockB()
	unlockB()
	mustGet(t, gotA, "host a's second LockToken after host b's unlock")()
	waitHolders(t, raw, a, "p", "", 0)
}

// Goroutines of one store exclude each other too (etcd's mutex alone
// would let two holders of one lease both in).
func TestLockTokenExcludesWithinStore(t *testing.T) {
	c := newCluster(t)
	a := c.newStore(t)
	ctx := t.Context()
	unlock, err := a.LockToken(ctx, "p", "b")
	if err != nil {
		t.Fatal(err)
	}
	// Not granted while held: a bounded wait ends with its deadline.
	dctx, dcancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer dcancel()
	if u, err := a.LockToken(dctx, "p", "b"); !errors.Is(err, context.DeadlineExceeded) {
		if err == nil {
			u()
		}
		t.Fatalf("second LockToken of one store while held = %v, want context.DeadlineExceeded", err)
	}
	wctx, cancel := context.WithCancel(ctx)
	got := lockAsync(wctx, a, "p", "b")
	waitLocal(t, a, a.lockKey("p", "b"), 2)
	mustNotHave(t, got, "second LockToken of one store")
	cancel()
	if r := <-got; !errors.Is(r.err, context.Canceled) {
		t.Fatalf("second LockToken of one store = %v, want context.Canceled", r.err)
	}
	unlock()
	mustGet(t, lockAsync(ctx, a, "p", "b"), "LockToken after unlock")()
}

// A wait ends with ctx, with an error wrapping ctx's, and leaves nothing
// in etcd; the holder is unaffected.
func TestLockTokenWaitHonoursContext(t *testing.T) {
	c := newCluster(t)
	a, b := c.openStore(t, "/fleet/"), c.openStore(t, "/fleet/")
	raw := c.rawClient(t)
	ctx := t.Context()
	unlockA, err := a.LockToken(ctx, "p", "b")
	if err != nil {
		t.Fatal(err)
	}
	defer unlockA()

	wctx, cancel := context.WithCancel(ctx)
	gotB := lockAsync(wctx, b, "p", "b")
	waitHolders(t, raw, a, "p", "b", 2)
	cancel()
	if r := <-gotB; !errors.Is(r.err, context.Canceled) {
		t.Fatalf("waiting LockToken after cancel = %v, want context.Canceled", r.err)
	}
	waitHolders(t, raw, a, "p", "b", 1)

	dctx, dcancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer dcancel()
	if _, err := b.LockToken(dctx, "p", "b"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("LockToken past its deadline = %v, want context.DeadlineExceeded", err)
	}
	// An ended ctx fails at once, as do invalid names.
	if _, err := b.LockToken(wctx, "p", "other"); !errors.Is(err, context.Canceled) {
		t.Fatalf("LockToken with a cancelled ctx = %v", err)
	}
	if _, err := b.LockToken(ctx, "p/x", "b"); !errors.Is(err, credproxy.ErrInvalidRequest) {
		t.Fatalf("LockToken of an invalid name = %v, want ErrInvalidRequest", err)
	}
}

// Different tokens do not exclude each other.
func TestLockTokenDifferentTokens(t *testing.T) {
	c := newCluster(t)
	a, b := c.openStore(t, "/fleet/"), c.openStore(t, "/fleet/")
	ctx := t.Context()
	var unlocks []func()
	for _, k := range [][3]any{{a, "p", "b1"}, {b, "p", "b2"}, {b, "q", "b1"}, {a, "q", "b2"}} {
		st, p, bk := k[0].(*EtcdStore), k[1].(string), k[2].(string)
		unlocks = append(unlocks, mustGet(t, lockAsync(ctx, st, p, bk), "LockToken "+p+"/"+bk))
	}
	for _, u := range unlocks {
		u()
	}
}

// A holder that dies without unlocking (its client closed abruptly: no
// unlock, no revoke, its keepalives stop) keeps the lock until its lease
// expires, and then the other host gets it.
func TestLockTokenReleasedWhenHolderDies(t *testing.T) {
	c := newCluster(t)
	const ttl = 2 * time.Second
	a, err := Open(t.Context(), Options{Endpoints: c.endpoints, Prefix: "/fleet/", DataKey: c.key, LockTTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	b := c.openStore(t, "/fleet/")
	raw := c.rawClient(t)
	ctx := t.Context()

	if _, err := a.LockToken(ctx, "p", "b"); err != nil {
		t.Fatal(err)
	}
	gotB := lockAsync(ctx, b, "p", "b")
	waitHolders(t, raw, a, "p", "b", 2)
	died := time.Now()
	a.cli.Close() // death: the lock is neither released nor revoked
	unlockB := mustGet(t, gotB, "host b's LockToken after host a died")
	defer unlockB()
	if waited := time.Since(died); waited < ttl/2 {
		t.Errorf("host b got the lock %v after host a died, before a's lease (%v) could expire: was it released?", waited, ttl)
	}
}

// When a store's lease is lost (here revoked behind its back, as expiry
// after a partition would), a wait in progress ends with an error, and
// the next LockToken starts a new session and works.
func TestLockTokenAfterLostLease(t *testing.T) {
	c := newCluster(t)
	a, b := c.openStore(t, "/fleet/"), c.openStore(t, "/fleet/")
	raw := c.rawClient(t)
	ctx := t.Context()

	unlockB, err := b.LockToken(ctx, "p", "b")
	if err != nil {
		t.Fatal(err)
	}
	gotA := lockAsync(ctx, a, "p", "b")
	waitHolders(t, raw, a, "p", "b", 2)
	old := a.liveSession()
	if old == nil {
		t.Fatal("no session while a LockToken waits")
	}
	if _, err := raw.Revoke(ctx, old.Lease()); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-gotA:
		if r.err == nil {
			r.unlock()
			t.Fatal("a wait on a lost lease was granted the lock")
		}
		if !errors.Is(r.err, concurrency.ErrSessionExpired) || errors.Is(r.err, context.Canceled) {
			t.Errorf("lost lease error = %v, want ErrSessionExpired, not the caller's cancel", r.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a wait on a lost lease did not end")
	}
	waitHolders(t, raw, a, "p", "b", 1)

	unlockB()
	unlockA := mustGet(t, lockAsync(ctx, a, "p", "b"), "LockToken after a lost lease")
	if s := a.liveSession(); s == nil || s.Lease() == old.Lease() {
		t.Errorf("LockToken after a lost lease did not start a new session")
	}
	gotB := lockAsync(ctx, b, "p", "b")
	waitHolders(t, raw, a, "p", "b", 2)
	mustNotHave(t, gotB, "host b's LockToken")
	unlockA()
	mustGet(t, gotB, "host b's LockToken")()
}

// Close releases the store's locks at once (it revokes the lease), and
// LockToken after Close fails with net.ErrClosed.
func TestLockTokenClose(t *testing.T) {
	c := newCluster(t)
	a, err := Open(t.Context(), Options{Endpoints: c.endpoints, Prefix: "/fleet/", DataKey: c.key})
	if err != nil {
		t.Fatal(err)
	}
	b := c.openStore(t, "/fleet/")
	raw := c.rawClient(t)
	ctx := t.Context()
	unlockA, err := a.LockToken(ctx, "p", "b")
	if err != nil {
		t.Fatal(err)
	}
	gotB := lockAsync(ctx, b, "p", "b")
	waitHolders(t, raw, a, "p", "b", 2)
	closed := time.Now()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	mustGet(t, gotB, "host b's LockToken after host a closed")()
	if waited := time.Since(closed); waited > DefaultLockTTL/2 {
		t.Errorf("host b waited %v after a's Close: the lease was not revoked", waited)
	}
	unlockA() // after Close: harmless
	if _, err := a.LockToken(ctx, "p", "b"); !errors.Is(err, net.ErrClosed) {
		t.Errorf("LockToken after Close = %v, want net.ErrClosed", err)
	}
}

// LockTTL is checked and rounded up to whole seconds.
func TestLockTTLOption(t *testing.T) {
	for _, tc := range []struct {
		in   time.Duration
		want int64
	}{{0, 10}, {time.Second, 1}, {1500 * time.Millisecond, 2}, {time.Minute, 60}} {
		if got, err := lockTTLSeconds(tc.in); err != nil || got != tc.want {
			t.Errorf("lockTTLSeconds(%v) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
	if _, err := lockTTLSeconds(-time.Second); err == nil {
		t.Error("a negative LockTTL was accepted")
	}
}
