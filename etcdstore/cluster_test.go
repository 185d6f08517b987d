package etcdstore

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/credproxy/credproxy/etcdstore/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// testCluster is a real three-member etcd cluster (etcdtest) with the
// helpers the store's tests use.
type testCluster struct {
	*etcdtest.Cluster
	endpoints []string
	key       []byte // the data key of the stores newStore opens
	next      atomic.Int64
}

// newCluster starts a three-member cluster for t and stops it when t ends.
// Starting one takes a second or two, so a test shares it among its
// subtests and gives each store its own prefix (see newStore).
func newCluster(t *testing.T) *testCluster {
	t.Helper()
	c := etcdtest.Start(t, 3)
	return &testCluster{Cluster: c, endpoints: c.Endpoints(), key: c.DataKey}
}

// newStore opens a store on the cluster under a prefix of its own, so
// stores of one cluster never see each other's items, and closes it when
// t ends.
func (c *testCluster) newStore(t *testing.T) *EtcdStore {
	t.Helper()
	return c.openStore(t, fmt.Sprintf("/test/%d/", c.next.Add(1)))
}

// openStore opens a store on the cluster under prefix, with the cluster's
// data key: two calls with one prefix are two hosts sharing a store.
func (c *testCluster) openStore(t *testing.T, prefix string) *EtcdStore {
	t.Helper()
	st, err := Open(t.Context(), Options{Endpoints: c.endpoints, Prefix: prefix, DataKey: c.key})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("Close = %v", err)
		}
	})
	return st
}

// rawClient returns a plain etcd client of the cluster, as etcdctl would
// be: it sees what etcd stores.
func (c *testCluster) rawClient(t *testing.T) *clientv3.Client {
	t.Helper()
	return c.Client(t)
}

// A store on a cluster that does not answer fails at Open, within its
// DialTimeout, not at its first request; so do options without endpoints
// or a 32-byte data key.
func TestOpenFailsEarly(t *testing.T) {
	port := etcdtest.FreePorts(t, 1)[0]
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	_, err := Open(ctx, Options{
		Endpoints:   []string{fmt.Sprintf("http://127.0.0.1:%d", port)},
		DataKey:     make([]byte, DataKeySize),
		DialTimeout: 500 * time.Millisecond,
	})
	if err == nil {
		t.Fatal("Open of a cluster that is not there succeeded")
	}
	for i, opts := range []Options{
		{DataKey: make([]byte, DataKeySize)},
		{Endpoints: []string{"http://127.0.0.1:1"}},
		{Endpoints: []string{"http://127.0.0.1:1"}, DataKey: make([]byte, 16)},
	} {
		if st, err := Open(ctx, opts); err == nil {
			st.Close()
			t.Errorf("%d: Open(%+v) succeeded, want an error for a missing option", i, opts)
		}
	}
}
