package etcdstore

import (
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
	"github.com/credproxy/credproxy/etcdstore/etcdtest"
)

// Benchmarks of the store on a real three-member cluster in this process.
// Run them with
//
//	go test -run '^$' -bench . -benchtime 2s .
//
// (-benchtime 200x gives BenchmarkWriteVisibility its 200 writes.)

// benchStores opens n stores on one new cluster, under one prefix (n
// hosts sharing a store).
func benchStores(b *testing.B, n int) []*EtcdStore {
	b.Helper()
	c := etcdtest.Start(b, 3)
	var sts []*EtcdStore
	for range n {
		st, err := Open(b.Context(), Options{Endpoints: c.Endpoints(), Prefix: "/bench/", DataKey: c.DataKey})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { st.Close() })
		sts = append(sts, st)
	}
	return sts
}

// BenchmarkGetToken compares get_token on EtcdStore, served from its
// cache, with MemoryStore, in one run: one goroutine, and 16 at once. For
// "16", the metric etcd/memory is MemoryStore's time per call divided by
// EtcdStore's: the share of MemoryStore's throughput EtcdStore reaches
// (the target is at least 0.5).
func BenchmarkGetToken(b *testing.B) {
	etcd := benchStores(b, 1)[0]
	mem := credproxy.NewMemoryStore()
	tok := mustToken(b, anthropicToken)
	for _, st := range []credproxy.Store{etcd, mem} {
		if err := st.SaveToken(b.Context(), "anthropic", "", tok); err != nil {
			b.Fatal(err)
		}
	}
	get := func(b *testing.B, st credproxy.Store) {
		if _, err := st.GetToken(b.Context(), "anthropic", ""); err != nil {
			b.Fatal(err)
		}
	}
	for _, s := range []struct {
		name string
		st   credproxy.Store
	}{{"etcd", etcd}, {"memory", mem}} {
		b.Run(s.name+"/1", func(b *testing.B) {
			for b.Loop() {
				get(b, s.st)
			}
		})
	}
	b.Run("16", func(b *testing.B) {
		perCall := func(st credproxy.Store) float64 {
			start := time.Now()
			run16(b.N, func() { get(b, st) })
			return float64(time.Since(start).Nanoseconds()) / float64(b.N)
		}
		e, m := perCall(etcd), perCall(mem)
		b.ReportMetric(e, "etcd-ns/op")
		b.ReportMetric(m, "memory-ns/op")
		b.ReportMetric(m/e, "etcd/memory")
	})
}

// run16 makes n calls of f spread over 16 goroutines.
func run16(n int, f func()) {
	const g = 16
	var wg sync.WaitGroup
	for i := range g {
		wg.Go(func() {
			for range n/g + min(1, max(0, n%g-i)) {
				f()
			}
		})
	}
	wg.Wait()
}

// BenchmarkWriteVisibility measures how long a write by one host takes to
// be visible to another host's GetToken (through its watch): p50 and p99
// over b.N writes, timed from the start of SaveToken.
func BenchmarkWriteVisibility(b *testing.B) {
	sts := benchStores(b, 2)
	w, r := sts[0], sts[1]
	ctx := b.Context()
	var lat []time.Duration
	n := 0
	for b.Loop() {
		n++
		start := time.Now()
		if err := w.SaveToken(ctx, "p", "", counterToken(b, n)); err != nil {
			b.Fatal(err)
		}
		for {
			got, err := r.GetToken(ctx, "p", "")
			if err == nil && counter(b, got) == n {
				break
			}
			runtime.Gosched()
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}

// BenchmarkLockToken measures a token lock's round trip: LockToken, then
// unlock, uncontended, on a store whose lock session is already started.
func BenchmarkLockToken(b *testing.B) {
	st := benchStores(b, 1)[0]
	ctx := b.Context()
	for b.Loop() {
		unlock, err := st.LockToken(ctx, "p", "")
		if err != nil {
			b.Fatal(err)
		}
		unlock()
	}
}
