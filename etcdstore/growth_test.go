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
// Finding 3 of the attack review: 60 saves of a token of about 60 KB in
// one go, within one connection's request budget, left 3.6 MB of history
// in etcd. A session's token writes now have a budget of their own
// (SessionOptions.WriteRate: a burst of 10, then one a second), so the
// same 60 saves leave at most 10 values, and the rest are RATE_LIMITED.
func TestSandboxSavesDoNotGrowEtcdWithoutLimit(t *testing.T) {
	c := newCluster(t)
	st := c.newStore(t)
	ctx := t.Context()
	if err := st.SaveToken(ctx, "anthropic", "", mustToken(t, anthropicToken)); err != nil {
		t.Fatal(err)
	}
	srv, err := credproxy.NewServer(credproxy.Options{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	dir, err := os.MkdirTemp("", "cpg")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sess, err := srv.NewSession(credproxy.SessionOptions{Dir: dir + "/s",
		Policy: &credproxy.Grant{Providers: []string{"anthropic"}, Write: true}})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	cl := credproxy.NewClient(sess.SocketPath(), credproxy.ClientOptions{CapabilityToken: sess.CapabilityToken()})
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
		if err := cl.SaveToken(ctx, "anthropic", "", tok); err != nil && !errors.Is(err, credproxy.ErrRateLimited) {
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
	if kept > 10*61_000 {
		t.Errorf("60 saves by one sandbox left %d bytes of history in etcd; want a bound", kept)
	}
}
