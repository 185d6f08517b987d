package etcdstore

import (
	"context"
	"maps"
	"slices"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// The read and write paths the Store methods share: reads from the cache
// or through to the cluster, and writes that record their result in the
// cache.

// read returns the entry of key, an item key. While the cache is fresh it
// is a lookup in memory. Otherwise it reads through to the cluster; if the
// cluster cannot answer, it serves the cached value, if there is one, and
// logs that it did (rate-limited); if there is none, the error wraps
// [ErrUnavailable]. found is false, with a nil error, when there is no
// such item. An entry that holds an error (a value that does not open)
// is returned as that error.
func (s *EtcdStore) read(ctx context.Context, key string) (e cacheEntry, found bool, err error) {
	if s.cache.fresh() {
		e, found = s.cache.lookup(key)
		return e, found, e.err
	}
	// The last round trip found the cluster unavailable: serve a cached
	// value without making every read wait for the timeout again. The
	// watcher keeps trying, and clears down when the cluster answers.
	if s.cache.down.Load() {
		if e, found = s.cache.lookup(key); found {
			s.cache.served(key, ErrUnavailable)
			return e, true, e.err
		}
	}
	rctx, cancel := s.requestCtx(ctx)
	defer cancel()
	resp, err := s.cli.Get(rctx, key)
	if err != nil {
		if !isUnavailable(err) {
			return cacheEntry{}, false, wrapErr(ctx, "get "+key, err)
		}
		s.cache.down.Store(true)
		if e, found = s.cache.lookup(key); found {
			s.cache.served(key, err)
			return e, true, e.err
		}
		return cacheEntry{}, false, failure(ctx, "get "+key+" (no cached value to serve)", err)
	}
	s.cache.down.Store(false)
	if len(resp.Kvs) == 0 {
		// Absent as of this revision: a tombstone keeps an older cached
		// value from being served later as the last known one.
		s.cache.put(key, cacheEntry{rev: resp.Header.Revision, gone: true})
		return cacheEntry{}, false, nil
	}
	kv := resp.Kvs[0]
	e = s.cache.decode(key, kv.Value, kv.ModRevision)
	s.cache.put(key, e)
	return e, true, e.err
}

// list returns the names directly under dir (a full key prefix ending in
// "/"), up to the next "/": the providers of tokens/, the buckets of
// tokens/<provider>/, the API keys of apikeys/. Like read, it answers from
// the cache while it is fresh, else reads keys (only) through to the
// cluster, and serves the cached names if the cluster cannot answer.
func (s *EtcdStore) list(ctx context.Context, dir string) ([]string, error) {
	if s.cache.fresh() {
		return s.cache.names(dir), nil
	}
	if s.cache.down.Load() {
		s.cache.served(dir, ErrUnavailable)
		return s.cache.names(dir), nil
	}
	rctx, cancel := s.requestCtx(ctx)
	defer cancel()
	resp, err := s.cli.Get(rctx, dir, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		if !isUnavailable(err) {
			return nil, wrapErr(ctx, "list "+dir, err)
		}
		s.cache.down.Store(true)
		s.cache.served(dir, err)
		return s.cache.names(dir), nil
	}
	s.cache.down.Store(false)
	set := make(map[string]struct{})
	for _, kv := range resp.Kvs {
		if name, _, _ := strings.Cut(string(kv.Key[len(dir):]), "/"); name != "" {
			set[name] = struct{}{}
		}
	}
	return sortedNames(set), nil
}

func sortedNames(set map[string]struct{}) []string {
	return slices.Sorted(maps.Keys(set))
}

// put seals plaintext for key and writes it, bounded by the request
// timeout, and returns the write's revision (the key's new mod revision).
func (s *EtcdStore) put(ctx context.Context, op, key string, plaintext []byte) (int64, error) {
	rctx, cancel := s.requestCtx(ctx)
	defer cancel()
	resp, err := s.cli.Put(rctx, key, string(s.seal.seal(key, plaintext)))
	if err != nil {
		return 0, failure(ctx, op+" "+key, err)
	}
	return resp.Header.Revision, nil
}

// remove deletes key, bounded by the request timeout, and records the
// deletion in the cache (read-your-writes).
func (s *EtcdStore) remove(ctx context.Context, op, key string) error {
	rctx, cancel := s.requestCtx(ctx)
	defer cancel()
	resp, err := s.cli.Delete(rctx, key)
	if err != nil {
		return failure(ctx, op+" "+key, err)
	}
	s.cache.put(key, cacheEntry{rev: resp.Header.Revision, gone: true})
	return nil
}
