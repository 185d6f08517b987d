package etcdstore

import (
	"context"
	"fmt"

	"github.com/credproxy/credproxy"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// get reads and opens the value at key, with its mod revision, from the
// cluster (UpdateToken's read, which must not be stale). found is false,
// with a nil error, when there is no such key.
func (s *EtcdStore) get(ctx context.Context, key string) (plaintext []byte, rev int64, found bool, err error) {
	rctx, cancel := s.requestCtx(ctx)
	defer cancel()
	resp, err := s.cli.Get(rctx, key)
	if err != nil {
		return nil, 0, false, failure(ctx, "get "+key, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, false, nil
	}
	kv := resp.Kvs[0]
	pt, err := s.seal.open(key, kv.Value)
	if err != nil {
		return nil, 0, false, err
	}
	return pt, kv.ModRevision, true, nil
}

// parseStored parses a token read back from etcd. The core exports only
// ParseToken, the parser for input; a token that the core made (by
// ParseToken, NewToken or Merge) reads back the same through it, since its
// expiry is already whole Unix seconds and it has no expires_in.
func parseStored(key string, data []byte) (credproxy.Token, error) {
	tok, err := credproxy.ParseToken(data)
	if err != nil {
		return credproxy.Token{}, fmt.Errorf("credproxy: etcdstore: %s: stored token does not parse: %w", key, err)
	}
	return tok, nil
}

// GetToken returns the token of provider and bucket.
func (s *EtcdStore) GetToken(ctx context.Context, provider, bucket string) (credproxy.Token, error) {
	bucket = normalBucket(bucket)
	if err := s.begin(ctx, provider, bucket); err != nil {
		return credproxy.Token{}, err
	}
	e, found, fresh := s.cache.freshLookup(s.prefix, tokensDir, provider, "/", bucket)
	var err error
	if !fresh {
		e, found, err = s.read(ctx, s.tokenKey(provider, bucket))
	}
	if err == nil {
		err = e.err
	}
	if err != nil {
		return credproxy.Token{}, err
	}
	if !found {
		return credproxy.Token{}, fmt.Errorf("credproxy: etcdstore: no token for provider %s bucket %s: %w", provider, bucket, credproxy.ErrNotFound)
	}
	return e.token, nil
}

// SaveToken stores token for provider and bucket, whole and as given,
// replacing any other: merging is the caller's business (see
// [credproxy.Store]). To change a token without losing a concurrent
// update, use [EtcdStore.UpdateToken].
func (s *EtcdStore) SaveToken(ctx context.Context, provider, bucket string, token credproxy.Token) error {
	bucket = normalBucket(bucket)
	if err := s.begin(ctx, provider, bucket); err != nil {
		return err
	}
	if token.AccessToken() == "" {
		return fmt.Errorf("credproxy: etcdstore: token has no access_token: %w", credproxy.ErrInvalidRequest)
	}
	key := s.tokenKey(provider, bucket)
	rev, err := s.put(ctx, "save token", key, token.Reveal())
	if err != nil {
		return err
	}
	// Read-your-writes: the store's next read sees this token, even
	// before the watch brings the change back.
	s.cache.put(key, cacheEntry{rev: rev, token: token})
	return nil
}

// maxUpdateAttempts bounds UpdateToken's retries under contention. Each
// failed attempt means another writer succeeded, so the store as a whole
// makes progress; the bound only keeps one caller from spinning forever.
const maxUpdateAttempts = 64

// UpdateToken changes the token of provider and bucket by a
// read-modify-write that never loses a concurrent update: it reads the
// token (ok is false when there is none), calls update with it, and writes
// what update returns in one etcd transaction that succeeds only if the
// item's mod revision is still the one read (compare-and-swap). If another
// writer, on this host or another, changed the item in between, it calls
// update again with the newer token. update may therefore run more than
// once, and must not have side effects; an error from it is returned as
// is, with nothing written. It returns the token written.
//
// The server's save_token reads, merges ([credproxy.Token.Merge]) and
// writes under [credproxy.TokenLocker]'s lock; UpdateToken is the step that
// keeps such a merge safe even when the lock is lost mid-write. The core
// does not call it yet.
//
// After maxUpdateAttempts lost races it returns an error wrapping
// [ErrConflict]; when ctx ends, one wrapping ctx.Err().
func (s *EtcdStore) UpdateToken(ctx context.Context, provider, bucket string, update func(stored credproxy.Token, ok bool) (credproxy.Token, error)) (credproxy.Token, error) {
	bucket = normalBucket(bucket)
	if err := s.begin(ctx, provider, bucket); err != nil {
		return credproxy.Token{}, err
	}
	key := s.tokenKey(provider, bucket)
	pt, rev, found, err := s.get(ctx, key)
	if err != nil {
		return credproxy.Token{}, err
	}
	for range maxUpdateAttempts {
		var stored credproxy.Token
		if found {
			if stored, err = parseStored(key, pt); err != nil {
				return credproxy.Token{}, err
			}
		}
		next, err := update(stored, found)
		if err != nil {
			return credproxy.Token{}, err
		}
		if next.AccessToken() == "" {
			return credproxy.Token{}, fmt.Errorf("credproxy: etcdstore: token has no access_token: %w", credproxy.ErrInvalidRequest)
		}
		// An absent key has mod revision 0 in a comparison, so one
		// compare covers "still absent" as well as "unchanged".
		rctx, cancel := s.requestCtx(ctx)
		resp, err := s.cli.Txn(rctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
			Then(clientv3.OpPut(key, string(s.seal.seal(key, next.Reveal())))).
			Else(clientv3.OpGet(key)).
			Commit()
		cancel()
		if err != nil {
			return credproxy.Token{}, failure(ctx, "update token "+key, err)
		}
		if resp.Succeeded {
			s.cache.put(key, cacheEntry{rev: resp.Header.Revision, token: next})
			return next, nil
		}
		// Lost the race: the Else branch read the winner's value.
		kvs := resp.Responses[0].GetResponseRange().Kvs
		found, rev, pt = len(kvs) > 0, 0, nil
		if found {
			rev = kvs[0].ModRevision
			if pt, err = s.seal.open(key, kvs[0].Value); err != nil {
				return credproxy.Token{}, err
			}
		}
	}
	return credproxy.Token{}, fmt.Errorf("credproxy: etcdstore: update token %s %s: %w", provider, bucket, ErrConflict)
}

// RemoveToken deletes the token of provider and bucket, if there is one.
func (s *EtcdStore) RemoveToken(ctx context.Context, provider, bucket string) error {
	bucket = normalBucket(bucket)
	if err := s.begin(ctx, provider, bucket); err != nil {
		return err
	}
	return s.remove(ctx, "remove token", s.tokenKey(provider, bucket))
}

// ListProviders returns the providers that have at least one token.
func (s *EtcdStore) ListProviders(ctx context.Context) ([]string, error) {
	if err := s.begin(ctx); err != nil {
		return nil, err
	}
	return s.list(ctx, s.prefix+tokensDir)
}

// ListBuckets returns the buckets of provider that hold a token.
func (s *EtcdStore) ListBuckets(ctx context.Context, provider string) ([]string, error) {
	if err := s.begin(ctx, provider); err != nil {
		return nil, err
	}
	return s.list(ctx, s.prefix+tokensDir+provider+"/")
}

// GetAPIKey returns the API key called name.
func (s *EtcdStore) GetAPIKey(ctx context.Context, name string) (credproxy.Secret, error) {
	if err := s.begin(ctx, name); err != nil {
		return "", err
	}
	e, found, fresh := s.cache.freshLookup(s.prefix, apiKeysDir, name)
	var err error
	if !fresh {
		e, found, err = s.read(ctx, s.apiKeyKey(name))
	}
	if err == nil {
		err = e.err
	}
	if err != nil {
		return "", err
	}
	if !found {
		return "", fmt.Errorf("credproxy: etcdstore: no API key %s: %w", name, credproxy.ErrNotFound)
	}
	return e.secret, nil
}

// SaveAPIKey stores key under name, replacing any other.
func (s *EtcdStore) SaveAPIKey(ctx context.Context, name string, key credproxy.Secret) error {
	if err := s.begin(ctx, name); err != nil {
		return err
	}
	k := s.apiKeyKey(name)
	rev, err := s.put(ctx, "save API key", k, []byte(key))
	if err != nil {
		return err
	}
	s.cache.put(k, cacheEntry{rev: rev, secret: key}) // read-your-writes
	return nil
}

// RemoveAPIKey deletes the API key called name, if there is one.
func (s *EtcdStore) RemoveAPIKey(ctx context.Context, name string) error {
	if err := s.begin(ctx, name); err != nil {
		return err
	}
	return s.remove(ctx, "remove API key", s.apiKeyKey(name))
}

// ListAPIKeys returns the names of the stored API keys.
func (s *EtcdStore) ListAPIKeys(ctx context.Context) ([]string, error) {
	if err := s.begin(ctx); err != nil {
		return nil, err
	}
	return s.list(ctx, s.prefix+apiKeysDir)
}
