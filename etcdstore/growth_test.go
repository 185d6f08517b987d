package etcdstore

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// A sandbox with a write grant cannot grow the fleet's etcd without limit:
// etcd keeps every revision of a key until the cluster is compacted, so
// each save_token of a large token adds its size to the database, where a
// keyring store would overwrite one file. Past the backend quota (2 GiB
// by default) etcd raises its NOSPACE alarm and refuses every write, the
// fleet's refreshes included.
//
// Finding 3 of the attack review: not fixed. Here 60 saves of a token of
// about 60 KB, one connection's default burst (60; then 60/s), leave
// about 3.6 MB of readable history in etcd.
func TestSandboxSavesDoNotGrowEtcdWithoutLimit(t *testing.T) {
	t.Skip("finding 3: every save_token is a new etcd revision, kept until compaction; a sandbox with -allow-write grows etcd (about 3.6 MB/s per connection) towards its NOSPACE alarm, which stops every host's writes. Needs a write budget per session in the core, and auto-compaction on the cluster (README)")
	c := newCluster(t)
	st := c.newStore(t)
	ctx := t.Context()
	if err := st.SaveToken(ctx, "anthropic", "", mustToken(t, anthropicToken)); err != nil {
		t.Fatal(err)
	}
	srv, err := credproxy.NewServer(credproxy.Options{Store: st,
		Policy: &credproxy.Grant{Providers: []string{"anthropic"}, Write: true}})
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "cpg")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	ln, err := credproxy.Listen(dir)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
		if err := <-served; !errors.Is(err, credproxy.ErrServerClosed) {
			t.Errorf("Serve = %v", err)
		}
	}()
	cl := credproxy.NewClient(ln.Addr().String(), credproxy.ClientOptions{})
	defer cl.Close()

	raw := c.rawClient(t)
	key := st.tokenKey("anthropic", credproxy.DefaultBucket)
	first, err := raw.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	pad := strings.Repeat("x", 60_000)
	for i := range 60 {
		tok := mustToken(t, `{"access_token":"fake-sandbox-`+string(rune('a'+i%26))+`","pad":"`+pad+`"}`)
		if err := cl.SaveToken(ctx, "anthropic", "", tok); err != nil {
			t.Fatalf("save %d: %v", i, err)
		}
	}
	// Every value the saves wrote is still in etcd, readable by revision
	// (lock keys' revisions come in between).
	last, err := raw.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	kept := 0
	for rev := first.Header.Revision + 1; rev <= last.Header.Revision; rev++ {
		resp, err := raw.Get(ctx, key, clientv3.WithRev(rev))
		if err != nil {
			t.Fatalf("get at revision %d: %v", rev, err)
		}
		if len(resp.Kvs) == 1 && resp.Kvs[0].ModRevision == rev {
			kept += len(resp.Kvs[0].Value)
		}
	}
	if kept > 2<<20 {
		t.Errorf("60 saves by one sandbox left %d bytes of history in etcd; want a bound", kept)
	}
}
