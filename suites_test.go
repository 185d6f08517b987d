package credproxy_test

import (
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/credproxy/credproxy"
	"github.com/credproxy/credproxy/credproxytest"
)

// The exported suites run here on the core's stores. This file is in the
// external test package because credproxytest imports credproxy: the
// package's own tests cannot import it, so they reach the store suite
// through credproxy.StoreSuite, set below (see export_test.go).
func init() { credproxy.StoreSuite = credproxytest.TestStore }

// skipInRerun skips a test in TestKeyringServerSuite's re-run of this
// binary: these tests already run both stores in the first run.
func skipInRerun(t *testing.T) {
	if os.Getenv("CREDPROXY_TEST_STORE") != "" {
		t.Skip("the suites run on every core store in the first run")
	}
}

func TestMemoryStoreSuites(t *testing.T) {
	skipInRerun(t)
	var mu sync.Mutex
	stores := map[*testing.T]*credproxy.MemoryStore{}
	newStore := func(t *testing.T) credproxy.Store {
		// One value serves as both "hosts": a MemoryStore cannot be
		// shared otherwise.
		mu.Lock()
		defer mu.Unlock()
		if stores[t] == nil {
			stores[t] = credproxy.NewMemoryStore()
		}
		return stores[t]
	}
	t.Run("store", func(t *testing.T) { credproxytest.TestStore(t, newStore) })
	t.Run("server", func(t *testing.T) { credproxytest.TestServer(t, newStore) })
}

// The file backend: two stores opened on one directory are two hosts (or
// processes) sharing it, with its cross-process lock.
func TestKeyringFileStoreSuites(t *testing.T) {
	skipInRerun(t)
	var mu sync.Mutex
	dirs := map[*testing.T]string{}
	newStore := func(t *testing.T) credproxy.Store {
		mu.Lock()
		dir, ok := dirs[t]
		if !ok {
			// A directory of its own: t.TempDir's has mode 0755, and a
			// store wants a private one.
			dir = filepath.Join(t.TempDir(), "store")
			dirs[t] = dir
		}
		mu.Unlock()
		st, err := credproxy.OpenKeyringStore(credproxy.KeyringOptions{Backend: "file", Dir: dir,
			Password: func() (string, error) { return "fake-store-password-PPPP7777", nil }})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		return st
	}
	t.Run("store", func(t *testing.T) { credproxytest.TestStore(t, newStore) })
	t.Run("server", func(t *testing.T) { credproxytest.TestServer(t, newStore) })
}
