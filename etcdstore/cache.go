package etcdstore

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/credproxy/credproxy"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// The read cache. Open loads every item under the prefix with one Get, and
// a goroutine (cachewatch.go) keeps the copy current with a watch from the
// next revision. While the watch is healthy, reads are answered from
// memory, at the cost of a map lookup under a read lock, as MemoryStore's
// are.
//
// The cache holds items opened and parsed, not sealed. Opening on every
// read would cost an AES-GCM open and a JSON parse (microseconds) per
// get_token, the cost the cache exists to remove, and would protect
// nothing: whoever can read this process's memory can read the data key in
// it too, and with it every sealed value; and the tokens it serves are in
// memory anyway while they are served. MemoryStore, the keyring cache and
// the server hold plaintext the same way. Sealing is what keeps plaintext
// out of etcd, its snapshots and its backups; it stays exactly as it was.

// cacheEntry is what the cache knows of one etcd key.
type cacheEntry struct {
	rev    int64            // mod revision of the value, or the revision of its deletion
	gone   bool             // deleted at rev (a tombstone, kept so an older event cannot revive it)
	token  credproxy.Token  // for keys under tokens/
	secret credproxy.Secret // for keys under apikeys/
	err    error            // the value did not open or parse: returned to its readers
}

// cache is the store's copy of its items. It is safe for concurrent use.
type cache struct {
	tokens, apiKeys string // the full key prefixes of the two kinds of items
	seal            *sealer

	mu      sync.RWMutex
	entries map[string]cacheEntry // full etcd key → entry
	rev     int64                 // every change up to rev has been applied (watch or load)
	floor   int64                 // reads are served from memory only once rev ≥ floor
	changed chan struct{}         // closed and replaced when rev, floor or current change

	current  atomic.Bool   // the watch is healthy (cachewatch.go)
	down     atomic.Bool   // the last round trip failed: no quorum, or no member reachable
	progress chan struct{} // asks the watcher for a progress notification (capacity 1)

	log   *slog.Logger
	stale staleLog
}

func newCache(prefix string, sl *sealer, log *slog.Logger) *cache {
	return &cache{
		tokens:   prefix + tokensDir,
		apiKeys:  prefix + apiKeysDir,
		seal:     sl,
		entries:  make(map[string]cacheEntry),
		changed:  make(chan struct{}),
		progress: make(chan struct{}, 1),
		log:      log,
	}
}

// holds reports whether key names an item the cache keeps: lock keys, and
// anything else under the prefix, are not items.
func (c *cache) holds(key string) bool {
	return strings.HasPrefix(key, c.tokens) || strings.HasPrefix(key, c.apiKeys)
}

// decode opens and parses a value read from etcd for key, at revision rev.
// A failure is kept in the entry, so reading that item fails as a read
// through would, and reading the others does not.
func (c *cache) decode(key string, value []byte, rev int64) cacheEntry {
	e := cacheEntry{rev: rev}
	pt, err := c.seal.open(key, value)
	switch {
	case err != nil:
		e.err = err
	case strings.HasPrefix(key, c.tokens):
		e.token, e.err = parseStored(key, pt)
	default:
		e.secret = credproxy.Secret(pt)
	}
	return e
}

// notifyLocked wakes the waiters of waitRev. c.mu is held.
func (c *cache) notifyLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// put records e for key unless the cache already has the same or a newer
// revision of it: events from the watch, a write's own result and a read
// through may arrive in any order, and the newest always wins.
func (c *cache) put(key string, e cacheEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.putLocked(key, e)
}

func (c *cache) putLocked(key string, e cacheEntry) {
	if old, ok := c.entries[key]; ok && old.rev >= e.rev {
		return
	}
	c.entries[key] = e
}

// load replaces the cache with a snapshot of every item taken at revision
// rev. An entry newer than the snapshot (this store's own write, made
// while the snapshot was in flight) is kept.
func (c *cache) load(kvs []*mvccpb.KeyValue, rev int64) {
	fresh := make(map[string]cacheEntry, len(kvs))
	for _, kv := range kvs {
		if key := string(kv.Key); c.holds(key) {
			fresh[key] = c.decode(key, kv.Value, kv.ModRevision)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for key, e := range c.entries {
		if e.rev > rev {
			fresh[key] = e
		}
	}
	c.entries = fresh
	c.rev = rev
	c.notifyLocked()
}

// applyEvents records a batch of watch events, in revision order.
func (c *cache) applyEvents(evs []*clientv3.Event) {
	if len(evs) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, ev := range evs {
		key := string(ev.Kv.Key)
		if !c.holds(key) {
			continue
		}
		if ev.Type == mvccpb.DELETE {
			c.putLocked(key, cacheEntry{rev: ev.Kv.ModRevision, gone: true})
		} else {
			c.putLocked(key, c.decode(key, ev.Kv.Value, ev.Kv.ModRevision))
		}
	}
	// A watch response's header may name a revision past its last event
	// (a watcher catching up gets its backlog in batches), so only the
	// events themselves say how far the cache has got.
	c.advanceLocked(evs[len(evs)-1].Kv.ModRevision)
}

// advance records that every change up to rev has been applied (a
// progress notification says so).
func (c *cache) advance(rev int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.advanceLocked(rev)
	// No event older than rev can come any more, so tombstones up to it
	// have done their work.
	for key, e := range c.entries {
		if e.gone && e.rev <= rev {
			delete(c.entries, key)
		}
	}
}

func (c *cache) advanceLocked(rev int64) {
	if rev > c.rev {
		c.rev = rev
		c.notifyLocked()
	}
}

// setCurrent records whether the watch is healthy.
func (c *cache) setCurrent(ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.current.Store(ok)
	c.notifyLocked()
}

// fresh reports whether reads may be served from memory: the watch is
// healthy and has reached every revision a caller was promised (floor).
func (c *cache) fresh() bool {
	if !c.current.Load() {
		return false
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.rev >= c.floor
}

// freshLookup is read's fast path, the one a healthy store's get_token
// takes: under one read lock, it reports whether the cache is fresh and,
// if so, looks up the key made of parts. The key is built on the stack and
// the map indexed with string(bytes), which does not allocate.
func (c *cache) freshLookup(parts ...string) (e cacheEntry, found, fresh bool) {
	if !c.current.Load() {
		return cacheEntry{}, false, false
	}
	var buf [256]byte
	k := buf[:0]
	for _, p := range parts {
		k = append(k, p...)
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.rev < c.floor {
		return cacheEntry{}, false, false
	}
	e, found = c.entries[string(k)]
	return e, found && !e.gone, true
}

// lookup returns the entry of key if the cache has a value for it.
func (c *cache) lookup(key string) (cacheEntry, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	e, ok := c.entries[key]
	return e, ok && !e.gone
}

// names returns the names directly under dir (a full key prefix ending in
// "/"), as list does from etcd.
func (c *cache) names(dir string) []string {
	set := make(map[string]struct{})
	c.mu.RLock()
	for key, e := range c.entries {
		if e.gone || !strings.HasPrefix(key, dir) {
			continue
		}
		if name, _, _ := strings.Cut(key[len(dir):], "/"); name != "" {
			set[name] = struct{}{}
		}
	}
	c.mu.RUnlock()
	return sortedNames(set)
}

// waitRev makes every later read see the cluster as of revision rev at
// least: it raises the floor under which reads go through to the cluster,
// then waits (until ctx ends) for the watch to reach rev, so that reads
// stay in memory. If the watch is broken it returns at once: reads go
// through anyway. LockToken uses it so that the holder of a lock reads
// whatever the previous holder wrote.
func (c *cache) waitRev(ctx context.Context, rev int64) error {
	c.mu.Lock()
	c.floor = max(c.floor, rev)
	c.mu.Unlock()
	for {
		c.mu.RLock()
		done := c.rev >= rev || !c.current.Load()
		changed := c.changed
		c.mu.RUnlock()
		if done {
			return nil
		}
		// rev may be another tenant's change, outside the prefix: only a
		// progress notification tells the cache it has passed it.
		select {
		case c.progress <- struct{}{}:
		default:
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// staleLogEvery bounds how often serving a possibly stale value is logged.
const staleLogEvery = 30 * time.Second

// staleLog rate-limits the warning that a cached value was served because
// the cluster could not be asked.
type staleLog struct {
	mu         sync.Mutex
	last       time.Time
	suppressed int
}

// served logs, at most once per staleLogEvery, that a possibly stale
// value of key was served. Only the key (item names, not secret) and the
// etcd error are logged, never a value.
func (c *cache) served(key string, cause error) {
	c.stale.mu.Lock()
	now := time.Now()
	if !c.stale.last.IsZero() && now.Sub(c.stale.last) < staleLogEvery {
		c.stale.suppressed++
		c.stale.mu.Unlock()
		return
	}
	n := c.stale.suppressed
	c.stale.last, c.stale.suppressed = now, 0
	c.stale.mu.Unlock()
	c.log.Warn("etcdstore: etcd cluster unavailable, served a possibly stale cached value",
		"key", key, "err", cause, "stale_reads_not_logged", n)
}
