package etcdstore

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// testCluster is a real etcd cluster of three members, in process, on
// loopback ports, with its data in a test's temporary directory.
type testCluster struct {
	members   []*embed.Etcd
	endpoints []string
	key       []byte // the data key of the stores newStore opens
	next      atomic.Int64
}

// newCluster starts a three-member cluster for t and stops it when t ends.
// Starting one takes a second or two, so a test shares it among its
// subtests and gives each store its own prefix (see newStore).
func newCluster(t *testing.T) *testCluster {
	t.Helper()
	const n = 3
	// Ports are picked by listening on port 0 and closing: another process
	// could take one in between, which only fails this run, loudly.
	peer, client := freePorts(t, n), freePorts(t, n)
	var initial []string
	for i := range n {
		initial = append(initial, fmt.Sprintf("m%d=http://127.0.0.1:%d", i, peer[i]))
	}
	c := &testCluster{key: make([]byte, DataKeySize)}
	rand.Read(c.key)
	dir := t.TempDir()
	for i := range n {
		cfg := embed.NewConfig()
		cfg.Name = fmt.Sprintf("m%d", i)
		cfg.Dir = fmt.Sprintf("%s/m%d", dir, i)
		pu := mustURL(t, fmt.Sprintf("http://127.0.0.1:%d", peer[i]))
		cu := mustURL(t, fmt.Sprintf("http://127.0.0.1:%d", client[i]))
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
		cfg.InitialCluster = strings.Join(initial, ",")
		cfg.InitialClusterToken = "credproxy-test"
		cfg.ClusterState = embed.ClusterStateFlagNew
		cfg.Logger = "zap"
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		cfg.UnsafeNoFsync = true // test data: speed over durability
		cfg.EnableGRPCGateway = false
		e, err := embed.StartEtcd(cfg)
		if err != nil {
			c.stop()
			t.Fatalf("start etcd member %d: %v", i, err)
		}
		c.members = append(c.members, e)
		c.endpoints = append(c.endpoints, cu.String())
	}
	t.Cleanup(c.stop)
	timeout := time.After(30 * time.Second)
	for i, e := range c.members {
		select {
		case <-e.Server.ReadyNotify():
		case err := <-e.Err():
			t.Fatalf("etcd member %d: %v", i, err)
		case <-timeout:
			t.Fatalf("etcd member %d not ready after 30s", i)
		}
	}
	return c
}

func (c *testCluster) stop() {
	for _, e := range c.members {
		e.Close()
	}
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
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ports []int
	var ls []net.Listener
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

func mustURL(t *testing.T, s string) url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return *u
}

// A store on a cluster that does not answer fails at Open, within its
// DialTimeout, not at its first request; so do options without endpoints
// or a 32-byte data key.
func TestOpenFailsEarly(t *testing.T) {
	port := freePorts(t, 1)[0]
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
