// Package etcdtest starts real etcd clusters for tests: members of etcd's
// own server (the embed package) in the test process, on loopback ports,
// with their data in the test's temporary directory. Tests of
// [github.com/credproxy/credproxy/etcdstore], and of programs that use it
// across processes, share it.
//
// A member can be stopped and started again on its data, so that tests can
// take a cluster's quorum away and give it back. [StartTLS] starts one that
// serves clients over TLS and requires client certificates, and
// [Cluster.EnableAuth] turns on etcd's authentication.
package etcdtest

import (
	"crypto/rand"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// DataKeySize is the size of [Cluster.DataKey]: an AES-256 key, as
// etcdstore wants.
const DataKeySize = 32

// Cluster is a running etcd cluster. Its methods are safe for concurrent
// use. Make one with [Start].
type Cluster struct {
	// DataKey is a random 32-byte key for the stores a test opens on the
	// cluster; every store of one test that shares data uses it.
	DataKey []byte

	// TLS is what a client needs to reach a cluster started by
	// [StartTLS]: nil for one started by [Start], which serves plain
	// http.
	TLS *TLS

	t         testing.TB
	cfgs      []*embed.Config
	endpoints []string

	mu       sync.Mutex
	members  []*embed.Etcd // nil for a stopped member
	rootPass string        // root's password, once EnableAuth has run

	authMu sync.Mutex // held by EnableAuth
}

// Start starts a cluster of n members (3 makes a quorum of 2) for t and
// stops it when t ends. Starting one takes a second or two. It serves
// clients plain http, and has authentication off.
func Start(t testing.TB, n int) *Cluster {
	t.Helper()
	return start(t, n, false)
}

// StartTLS is [Start] for a cluster that serves clients over TLS only, at
// https endpoints, and requires a client certificate signed by its test
// CA: [Cluster.TLS] has the files and configuration a client needs. Peer
// traffic stays plain http on loopback.
func StartTLS(t testing.TB, n int) *Cluster {
	t.Helper()
	return start(t, n, true)
}

func start(t testing.TB, n int, useTLS bool) *Cluster {
	t.Helper()
	// Ports are picked by listening on port 0 and closing: another process
	// could take one in between, which only fails this run, loudly.
	peer, client := FreePorts(t, n), FreePorts(t, n)
	var initial []string
	for i := range n {
		initial = append(initial, fmt.Sprintf("m%d=http://127.0.0.1:%d", i, peer[i]))
	}
	c := &Cluster{DataKey: make([]byte, DataKeySize), t: t, members: make([]*embed.Etcd, n)}
	rand.Read(c.DataKey)
	dir := t.TempDir()
	scheme := "http"
	var server serverTLS
	if useTLS {
		scheme = "https"
		c.TLS, server = newTLS(t, t.TempDir())
	}
	for i := range n {
		cfg := embed.NewConfig()
		cfg.Name = fmt.Sprintf("m%d", i)
		cfg.Dir = fmt.Sprintf("%s/m%d", dir, i)
		pu := mustURL(t, fmt.Sprintf("http://127.0.0.1:%d", peer[i]))
		cu := mustURL(t, fmt.Sprintf("%s://127.0.0.1:%d", scheme, client[i]))
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
		cfg.InitialCluster = strings.Join(initial, ",")
		cfg.InitialClusterToken = "credproxy-test"
		cfg.ClusterState = embed.ClusterStateFlagNew
		cfg.Logger = "zap"
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		cfg.UnsafeNoFsync = true // test data: speed over durability
		cfg.EnableGRPCGateway = false
		cfg.BcryptCost = 4 // bcrypt.MinCost: test passwords, checked fast
		if useTLS {
			cfg.ClientTLSInfo.CertFile, cfg.ClientTLSInfo.KeyFile = server.certFile, server.keyFile
			cfg.ClientTLSInfo.TrustedCAFile = server.caFile
			cfg.ClientTLSInfo.ClientCertAuth = true
		}
		c.cfgs = append(c.cfgs, cfg)
		c.endpoints = append(c.endpoints, cu.String())
	}
	t.Cleanup(c.stopAll)
	for i := range n {
		if err := c.start(i); err != nil {
			t.Fatal(err)
		}
	}
	for i := range n {
		if err := c.ready(i); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// Endpoints returns the client URLs of every member, stopped ones too.
func (c *Cluster) Endpoints() []string { return append([]string(nil), c.endpoints...) }

// Endpoint returns the client URL of member i.
func (c *Cluster) Endpoint(i int) string { return c.endpoints[i] }

// Stop stops member i (no-op if it is stopped). Its data stays, for
// [Cluster.Restart].
func (c *Cluster) Stop(i int) {
	c.mu.Lock()
	e := c.members[i]
	c.members[i] = nil
	c.mu.Unlock()
	if e != nil {
		e.Close()
	}
}

// Restart starts member i again on its data, as a member of the existing
// cluster, and waits until it has joined (which needs a quorum, itself
// included). It fails the test if the member does not come back.
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	c.cfgs[i].ClusterState = embed.ClusterStateFlagExisting
	if err := c.start(i); err != nil {
		c.t.Fatal(err)
	}
	if err := c.ready(i); err != nil {
		c.t.Fatal(err)
	}
}

func (c *Cluster) start(i int) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.members[i] != nil {
		return nil
	}
	e, err := embed.StartEtcd(c.cfgs[i])
	if err != nil {
		return fmt.Errorf("etcdtest: start member %d: %w", i, err)
	}
	c.members[i] = e
	return nil
}

// ready waits until member i serves, for at most 30 s; a member that
// starts without a quorum becomes ready once enough others are up.
func (c *Cluster) ready(i int) error {
	c.mu.Lock()
	e := c.members[i]
	c.mu.Unlock()
	if e == nil {
		return fmt.Errorf("etcdtest: member %d is stopped", i)
	}
	select {
	case <-e.Server.ReadyNotify():
		return nil
	case err := <-e.Err():
		return fmt.Errorf("etcdtest: member %d: %w", i, err)
	case <-time.After(30 * time.Second):
		return fmt.Errorf("etcdtest: member %d not ready after 30 s", i)
	}
}

func (c *Cluster) stopAll() {
	for i := range c.members {
		c.Stop(i)
	}
}

// Client returns a plain etcd client of the cluster, as etcdctl would be:
// it sees what etcd stores. It uses [Cluster.TLS] if the cluster has it,
// and is root once [Cluster.EnableAuth] has run. It is closed when the
// test ends.
func (c *Cluster) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	cfg := clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second, Logger: zap.NewNop()}
	if c.TLS != nil {
		cfg.TLS = c.TLS.Config.Clone()
	}
	c.mu.Lock()
	if c.rootPass != "" {
		cfg.Username, cfg.Password = rootUser, c.rootPass
	}
	c.mu.Unlock()
	cli, err := clientv3.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// FreePorts returns n loopback TCP ports that were free a moment ago.
func FreePorts(t testing.TB, n int) []int {
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

func mustURL(t testing.TB, s string) url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return *u
}
