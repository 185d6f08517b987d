package fleet

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
	"github.com/credproxy/credproxy/etcdstore"
)

// storeOnly hides every method of a store but the Store interface's:
// the server then finds no TokenLocker (and no TokenUpdater), as with a
// store that has no fleet-wide lock.
type storeOnly struct{ credproxy.Store }

// libraryHost is a credproxy.Server in the test process on its own
// EtcdStore (as a host process has), on the fleet's prefix, refreshing
// through an OAuth2Refresher at the fleet's provider; hideLock wraps its
// store in storeOnly.
func (f *fleet) libraryHost(hideLock bool) *credproxy.Client {
	t := f.t
	t.Helper()
	es, err := etcdstore.Open(t.Context(), etcdstore.Options{Endpoints: f.c.Endpoints(), Prefix: f.prefix, DataKey: f.c.DataKey})
	if err != nil {
		t.Fatal(err)
	}
	var st credproxy.Store = es
	if hideLock {
		st = storeOnly{es}
	}
	srv, err := credproxy.NewServer(credproxy.Options{Store: st,
		Refreshers: map[string]credproxy.Refresher{fleetProvider: &credproxy.OAuth2Refresher{TokenURL: f.p.URL, ClientID: fleetClientID}}})
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "fleet") // short: a socket path has 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	l, err := credproxy.ListenPath(filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		if err := <-served; !errors.Is(err, credproxy.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
		es.Close()
		os.RemoveAll(dir)
	})
	return credproxy.NewClient(filepath.Join(dir, "s"), credproxy.ClientOptions{})
}

// The mutation check at the level of the library: two servers in the
// test process, each on its own EtcdStore on one prefix (shared state,
// as a fleet's hosts have), under the storm of TestFleetRefreshesOnce.
// With the store as it is, the checks pass: one provider call. With its
// TokenLocker hidden (storeOnly), the second server refreshes while the
// first one's provider call is held, with the same refresh token: the
// provider sees it twice and revokes the login, and the checks fail.
// This test passes when they pass with the lock and fail without it.
func TestFleetLockIsWhatRefreshesOnce(t *testing.T) {
	for _, hide := range []bool{false, true} {
		name := "lock"
		if hide {
			name = "lock hidden"
		}
		t.Run(name, func(t *testing.T) {
			f := newFleet(t)
			_, rt0 := f.login(f.prefix)
			var clients [][]*credproxy.Client
			for range 2 {
				c := f.libraryHost(hide)
				t.Cleanup(func() { c.Close() })
				clients = append(clients, []*credproxy.Client{c})
			}
			g := f.p.hold()
			during := releaseWhenAllWait(t, f, g, 2)
			if hide {
				during = func() {
					<-g.arrived
					if !eventually(30*time.Second, func() bool { return f.p.stats().rotated == 1 }) {
						t.Fatalf("without the lock the second server did not refresh meanwhile (stats %+v)", f.p.stats())
					}
					g.release <- 0
				}
			}
			out := storm(t.Context(), t, clients, during)
			if !hide {
				checkOneRefresh(t, f.p, rt0, out, f.stored(f.prefix))
				return
			}
			// What checkOneRefresh would find, as a finding, not a failure.
			st := f.p.stats()
			failed := 0
			for _, o := range out {
				if o.err != nil {
					failed++
				}
			}
			t.Logf("lock hidden: provider stats %+v, login revoked %v, %d of %d requests failed", st, f.p.revoked(rt0), failed, len(out))
			if st.calls == 1 && !f.p.revoked(rt0) && failed == 0 {
				t.Fatalf("with the lock hidden the storm still made one provider call: the test does not need the lock")
			}
		})
	}
}
