package etcdstore

import (
	"context"
	"errors"
	"log/slog"
	"runtime"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// The store under a cluster that loses members, quorum, or its watch's
// history. Each test starts its own cluster, since it breaks it.

// With one member of three stopped, the cluster keeps its quorum: both
// hosts go on reading and writing, and see each other's writes.
func TestFaultOneMemberDown(t *testing.T) {
	c := newCluster(t)
	a, recA := c.openLogged(t, "/fleet/", 0)
	b, _ := c.openLogged(t, "/fleet/", 0)
	ctx := t.Context()
	if err := a.SaveToken(ctx, "p", "", tokenN(t, 1)); err != nil {
		t.Fatal(err)
	}
	c.Stop(0)
	for n := 2; n <= 5; n++ {
		w, r := a, b
		if n%2 == 1 {
			w, r = b, a
		}
		if err := w.SaveToken(ctx, "p", "", tokenN(t, n)); err != nil {
			t.Fatalf("write %d with one member down: %v", n, err)
		}
		waitFor(t, "the other host to see the write", func() bool {
			got, err := r.GetToken(ctx, "p", "")
			return err == nil && counter(t, got) == n
		})
	}
	if n := recA.count(slog.LevelWarn, msgStale); n != 0 {
		t.Errorf("a served stale values with a quorum up:\n%s", recA.text())
	}
}

// With two members of three stopped there is no quorum: writes fail with
// ErrUnavailable within the request timeout, reads serve every value
// written before (and log that they may be stale), and nothing is lost.
// When the members come back the store converges: the watch is
// re-established (logged at Info), and a write made by another host after
// recovery becomes visible.
func TestFaultNoQuorum(t *testing.T) {
	c := newCluster(t)
	const timeout = time.Second
	a, recA := c.openLogged(t, "/fleet/", timeout)
	b, _ := c.openLogged(t, "/fleet/", timeout)
	ctx := t.Context()
	if err := a.SaveToken(ctx, "p", "", tokenN(t, 1)); err != nil {
		t.Fatal(err)
	}
	if err := b.SaveAPIKey(ctx, "k", fakeAPIKey); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a to see b's key", func() bool { k, err := a.GetAPIKey(ctx, "k"); return err == nil && k == fakeAPIKey })
	c.Stop(1)
	c.Stop(2)

	for _, st := range []*EtcdStore{a, b} {
		start := time.Now()
		err := st.SaveToken(ctx, "p", "", tokenN(t, 99))
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("write without quorum = %v, want ErrUnavailable", err)
		}
		if d := time.Since(start); d > timeout+2*time.Second {
			t.Errorf("write without quorum took %v, want about the %v timeout", d, timeout)
		}
	}
	waitFor(t, "a to log its broken watch", func() bool { return recA.count(slog.LevelWarn, msgBroken) > 0 })
	got, err := a.GetToken(ctx, "p", "")
	if err != nil || counter(t, got) != 1 {
		t.Fatalf("read without quorum = %d, %v; want the cached token 1", counter(t, got), err)
	}
	if k, err := a.GetAPIKey(ctx, "k"); err != nil || k != fakeAPIKey {
		t.Fatalf("read of the other host's key without quorum = %v", err)
	}
	if names, err := a.ListProviders(ctx); err != nil || len(names) != 1 {
		t.Fatalf("list without quorum = %v, %v", names, err)
	}
	if recA.count(slog.LevelWarn, msgStale) == 0 {
		t.Errorf("no warning that a possibly stale value was served:\n%s", recA.text())
	}

	c.Restart(1)
	c.Restart(2)
	waitFor(t, "a's watch to be re-established", func() bool { return recA.count(slog.LevelInfo, msgRecovered) > 0 })
	if err := b.SaveToken(ctx, "p", "", tokenN(t, 2)); err != nil {
		t.Fatalf("write after recovery: %v", err)
	}
	waitFor(t, "a to see b's write after recovery", func() bool {
		got, err := a.GetToken(ctx, "p", "")
		return err == nil && counter(t, got) == 2
	})
	// Nothing written before the outage was lost, and the refused writes
	// did not appear.
	raw := c.rawClient(t)
	resp, err := raw.Get(ctx, "/fleet/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil || len(resp.Kvs) != 3 {
		t.Fatalf("keys after recovery = %v, %v; want the token, the key and the data key check", resp.Kvs, err)
	}
}

// A member that loses its leader while holding the watch cancels it
// (WithRequireLeader), so the store notices within the election time and
// reads through, instead of serving from a watch that will never deliver
// the majority's writes. The store reaches only member 0, as a host
// partitioned with it would.
func TestFaultWatchNeedsLeader(t *testing.T) {
	c := newCluster(t)
	st, rec := c.openLogged(t, "/p/", time.Second, c.Endpoint(0))
	ctx := t.Context()
	if err := st.SaveToken(ctx, "p", "", tokenN(t, 1)); err != nil {
		t.Fatal(err)
	}
	c.Stop(1)
	c.Stop(2)
	waitFor(t, "the watch on a leaderless member to break", func() bool { return rec.count(slog.LevelWarn, msgBroken) > 0 })
	if !strings.Contains(rec.text(), "no leader") {
		t.Errorf("the watch broke, but not because its member lost the leader:\n%s", rec.text())
	}
}

// A watch whose history was compacted while it was away ends with
// ErrCompacted when it resumes; the store logs it, loads the items again,
// and sees the changes it missed.
func TestFaultCompactedWatch(t *testing.T) {
	c := newCluster(t)
	st, rec := c.openLogged(t, "/p/", time.Second, c.Endpoint(0))
	writer := c.openStore(t, "/p/")
	raw := c.rawClient(t)
	ctx := t.Context()
	if err := writer.SaveToken(ctx, "p", "", tokenN(t, 1)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the first write", func() bool { got, err := st.GetToken(ctx, "p", ""); return err == nil && counter(t, got) == 1 })
	c.Stop(0) // st's only member: its watch waits to resume
	if err := writer.SaveToken(ctx, "p", "", tokenN(t, 2)); err != nil {
		t.Fatal(err)
	}
	// The watch resumes after the last event it had (the first write), so
	// compacting past the missed write, which a change elsewhere makes
	// possible, takes the history it needs.
	resp, err := raw.Put(ctx, "/elsewhere", "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Compact(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	c.Restart(0)
	waitFor(t, "the watch to break and come back", func() bool { return rec.count(slog.LevelInfo, msgRecovered) > 0 })
	waitFor(t, "the missed write", func() bool { got, err := st.GetToken(ctx, "p", ""); return err == nil && counter(t, got) == 2 })
	if !strings.Contains(rec.text(), "compacted") {
		t.Errorf("the watch did not break by compaction:\n%s", rec.text())
	}
}

// With every member stopped, a healthy store's reads keep answering from
// its cache, and once it notices it logs that the values may be stale; a
// read of an item it has no value for fails within ctx's deadline with an
// error wrapping ErrUnavailable that says what to check.
func TestFaultClusterGone(t *testing.T) {
	c := newCluster(t)
	st, rec := c.openLogged(t, "/p/", time.Second)
	ctx := t.Context()
	if err := st.SaveToken(ctx, "p", "", tokenN(t, 1)); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		c.Stop(i)
	}
	waitFor(t, "a stale-value warning", func() bool {
		got, err := st.GetToken(ctx, "p", "")
		if err != nil || counter(t, got) != 1 {
			t.Fatalf("read with the cluster gone = %d, %v; want the cached token", counter(t, got), err)
		}
		return rec.count(slog.LevelWarn, msgStale) > 0
	})
	if rec.count(slog.LevelWarn, msgBroken) != 1 {
		t.Errorf("want one broken-watch warning:\n%s", rec.text())
	}
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	start := time.Now()
	_, err := st.GetToken(rctx, "other", "")
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "no quorum") {
		t.Fatalf("read of an uncached item = %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("read of an uncached item took %v", d)
	}
}

// Close stops the watch goroutine and the etcd client's: none of the
// store's goroutines outlive it.
func TestCloseStopsWatch(t *testing.T) {
	c := newCluster(t)
	st, err := Open(t.Context(), Options{Endpoints: c.endpoints, Prefix: "/p/", DataKey: c.key})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SaveToken(t.Context(), "p", "", tokenN(t, 1)); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stacks(), "(*EtcdStore).runWatch") {
		t.Fatal("no watch goroutine while the store is open")
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the store's goroutines to end", func() bool {
		s := stacks()
		return !strings.Contains(s, "etcdstore.(*EtcdStore)") && !strings.Contains(s, "(*watchGRPCStream)")
	})
}

func stacks() string {
	buf := make([]byte, 1<<20)
	return string(buf[:runtime.Stack(buf, true)])
}
