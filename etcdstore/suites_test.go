package etcdstore

import (
	"fmt"
	"sync"
	"testing"

	"github.com/credproxy/credproxy"
	"github.com/credproxy/credproxy/credproxytest"
)

// The core's exported suites on EtcdStore: the Store contract, and a
// server and its clients serving from it, on a real three-member cluster.
// Each test of a suite gets a prefix of its own; asked again for the same
// test, newStore opens a second store on that prefix, a second host of
// the fleet, with its own connection, cache and lock session.
func TestEtcdStoreSuites(t *testing.T) {
	c := newCluster(t)
	var mu sync.Mutex
	prefixes := map[*testing.T]string{}
	newStore := func(t *testing.T) credproxy.Store {
		mu.Lock()
		prefix, ok := prefixes[t]
		if !ok {
			prefix = fmt.Sprintf("/suites/%d/", len(prefixes))
			prefixes[t] = prefix
		}
		mu.Unlock()
		return c.openStore(t, prefix)
	}
	t.Run("store", func(t *testing.T) { credproxytest.TestStore(t, newStore) })
	t.Run("server", func(t *testing.T) { credproxytest.TestServer(t, newStore) })
}
