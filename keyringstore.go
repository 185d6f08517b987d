package credproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/99designs/keyring"
)

// KeyringStore is a [Store] on the host's keyring, through
// github.com/99designs/keyring. It is the store hosts use for real
// credentials; [OpenKeyringStore] opens one.
//
// Each token is one item named "<service>+token+<provider>+<bucket>" and
// each API key one item named "<service>+apikey+<name>", where service is
// "credproxy" unless [KeyringOptions.Keyring] names another. Names are
// checked against the protocol's rule (1 to 64 characters from
// [A-Za-z0-9._@-]) before they reach the keyring, so no name contains "+"
// or a path separator: no item can collide with another, and none can
// escape the store. Listing reads the backend's item names and ignores any
// that do not follow the scheme. A token is stored whole, as the JSON of
// [Token.Reveal]: refresh token and provider-specific members included.
//
// With the file backend, every write goes to a new file in a staging
// directory, is synced, and then renamed over the old item: a reader sees
// the old item or the new one, never a torn one, and a writer killed at
// any moment leaves one or the other. (The keyring library itself rewrites
// item files in place.) Other backends are as atomic as the service behind
// them.
//
// With the file backend, a read costs microseconds while the item is
// unchanged: the store reads the item's file every time, but decrypts it
// (milliseconds of CPU, nearly all key derivation) only when its content
// differs from what it last decrypted. So a write by any process is seen
// by the next read, and the decrypted items (up to 256) stay in memory.
// Other backends are asked on every read.
//
// A KeyringStore is safe for concurrent use, by goroutines and by
// processes sharing its directory. The keyring library cannot interrupt a
// call to a backend: reads return early with ctx.Err() when ctx ends and
// leave the call to finish in the background, and writes, once started, run
// to completion. The file backend reads an item's file directly, so as to
// serve it from memory: only regular files of bounded size, opened without
// blocking, so that nothing in the item's place can hold a read; a hung
// file system (network, FUSE) can. The zero KeyringStore is not usable.
type KeyringStore struct {
	ring     keyring.Keyring
	backend  string
	service  string
	dir      string
	password Secret        // file backend only; a Secret so that %v of the store hides it
	calls    chan struct{} // serialises calls to backends that are not safe for concurrent use; nil for file
	cache    *itemCache    // file backend only
	unseals  atomic.Int64  // item files decrypted, for tests
}

var (
	_ Store       = (*KeyringStore)(nil)
	_ TokenLocker = (*KeyringStore)(nil)
)

// Backend returns the name of the keyring backend in use, such as "file".
func (s *KeyringStore) Backend() string { return s.backend }

// Dir returns the store's directory.
func (s *KeyringStore) Dir() string { return s.dir }

// String describes the store by backend and directory. It and GoString keep
// fmt from printing the store's fields, the file backend's password among
// them.
func (s *KeyringStore) String() string {
	return fmt.Sprintf("credproxy.KeyringStore(%s in %s)", s.backend, s.dir)
}

// GoString is String, for %#v.
func (s *KeyringStore) GoString() string { return s.String() }

// Format writes String, whatever the verb.
func (s *KeyringStore) Format(f fmt.State, _ rune) { io.WriteString(f, s.String()) }

// Close releases the store. It exists so that a KeyringStore and a
// [Client] can be closed alike (see [OpenStore]); the keyring library holds
// nothing that needs releasing, so it always returns nil.
func (s *KeyringStore) Close() error { return nil }

// Item names. Each part is a valid name, so "+" separates them unambiguously.
func (s *KeyringStore) itemName(parts ...string) string {
	return s.service + "+" + strings.Join(parts, "+")
}

func (s *KeyringStore) tokenItem(provider, bucket string) string {
	return s.itemName("token", provider, bucket)
}

func (s *KeyringStore) apiKeyItem(name string) string { return s.itemName("apikey", name) }

// GetToken returns the token of provider and bucket.
func (s *KeyringStore) GetToken(ctx context.Context, provider, bucket string) (Token, error) {
	bucket = normalBucket(bucket)
	if err := begin(ctx, provider, bucket); err != nil {
		return Token{}, err
	}
	tok, err := get(ctx, s, s.tokenItem(provider, bucket), parseTokenAsIs)
	switch {
	case errors.Is(err, ErrNotFound):
		return Token{}, errorf("no token for provider %s bucket %s: %w", provider, bucket, ErrNotFound)
	case errors.Is(err, errDamaged):
		return Token{}, errorf("stored token for provider %s bucket %s is %w", provider, bucket, err)
	case err != nil:
		return Token{}, errorf("read token for provider %s bucket %s: %w", provider, bucket, err)
	}
	return tok, nil
}

// SaveToken stores token whole for provider and bucket, replacing any other.
func (s *KeyringStore) SaveToken(ctx context.Context, provider, bucket string, token Token) error {
	bucket = normalBucket(bucket)
	if err := begin(ctx, provider, bucket); err != nil {
		return err
	}
	if _, ok := token.lookup(fieldAccessToken); !ok {
		return errorf("token has no access_token: %w", ErrInvalidRequest)
	}
	err := s.set(ctx, keyring.Item{
		Key:   s.tokenItem(provider, bucket),
		Data:  token.Reveal(),
		Label: fmt.Sprintf("credproxy token %s/%s", provider, bucket),
	})
	if err != nil {
		return errorf("save token for provider %s bucket %s: %w", provider, bucket, err)
	}
	return nil
}

// RemoveToken deletes the token of provider and bucket, if there is one.
func (s *KeyringStore) RemoveToken(ctx context.Context, provider, bucket string) error {
	bucket = normalBucket(bucket)
	if err := begin(ctx, provider, bucket); err != nil {
		return err
	}
	if err := s.remove(ctx, s.tokenItem(provider, bucket)); err != nil {
		return errorf("remove token for provider %s bucket %s: %w", provider, bucket, err)
	}
	return nil
}

// ListProviders returns the providers that have at least one token, sorted.
func (s *KeyringStore) ListProviders(ctx context.Context) ([]string, error) {
	return s.list(ctx, func(parts []string) (string, bool) {
		if len(parts) != 3 || parts[0] != "token" {
			return "", false
		}
		return parts[1], true
	})
}

// ListBuckets returns the buckets of provider that hold a token, sorted.
func (s *KeyringStore) ListBuckets(ctx context.Context, provider string) ([]string, error) {
	if err := begin(ctx, provider); err != nil {
		return nil, err
	}
	return s.list(ctx, func(parts []string) (string, bool) {
		if len(parts) != 3 || parts[0] != "token" || parts[1] != provider {
			return "", false
		}
		return parts[2], true
	})
}

// GetAPIKey returns the API key called name.
func (s *KeyringStore) GetAPIKey(ctx context.Context, name string) (Secret, error) {
	if err := begin(ctx, name); err != nil {
		return "", err
	}
	key, err := get(ctx, s, s.apiKeyItem(name), asSecret)
	if errors.Is(err, ErrNotFound) {
		return "", errorf("no API key %s: %w", name, ErrNotFound)
	}
	if err != nil {
		return "", errorf("read API key %s: %w", name, err)
	}
	return key, nil
}

// SaveAPIKey stores key under name, replacing any other.
func (s *KeyringStore) SaveAPIKey(ctx context.Context, name string, key Secret) error {
	if err := begin(ctx, name); err != nil {
		return err
	}
	if key == "" {
		return errorf("API key %s is empty: %w", name, ErrInvalidRequest)
	}
	err := s.set(ctx, keyring.Item{Key: s.apiKeyItem(name), Data: []byte(key), Label: "credproxy API key " + name})
	if err != nil {
		return errorf("save API key %s: %w", name, err)
	}
	return nil
}

// RemoveAPIKey deletes the API key called name, if there is one.
func (s *KeyringStore) RemoveAPIKey(ctx context.Context, name string) error {
	if err := begin(ctx, name); err != nil {
		return err
	}
	if err := s.remove(ctx, s.apiKeyItem(name)); err != nil {
		return errorf("remove API key %s: %w", name, err)
	}
	return nil
}

// ListAPIKeys returns the names of the stored API keys, sorted.
func (s *KeyringStore) ListAPIKeys(ctx context.Context) ([]string, error) {
	return s.list(ctx, func(parts []string) (string, bool) {
		if len(parts) != 2 || parts[0] != "apikey" {
			return "", false
		}
		return parts[1], true
	})
}

// LockToken takes the cross-process lock of provider and bucket: an
// advisory flock(2) on a file in the store's directory, so it works with
// every backend, between processes that share the directory. The kernel
// releases it when the holder exits, however it exits. Waiting for it
// ends with ctx, with an error that wraps ctx.Err(). On systems without
// flock (Windows) it is held within the process only.
func (s *KeyringStore) LockToken(ctx context.Context, provider, bucket string) (unlock func(), err error) {
	bucket = normalBucket(bucket)
	if err := begin(ctx, provider, bucket); err != nil {
		return nil, err
	}
	path := filepath.Join(s.dir, lockDirName, s.service+"+"+provider+"+"+bucket)
	unlock, err = lockFile(ctx, path)
	if err != nil {
		if ctx.Err() != nil {
			return nil, errorf("token of provider %s bucket %s is locked by another process or request; gave up waiting: %w", provider, bucket, err)
		}
		return nil, errorf("lock token of provider %s bucket %s: %w", provider, bucket, err)
	}
	return unlock, nil
}

// list returns the sorted, distinct names that keep picks from the parts
// of this store's item names.
func (s *KeyringStore) list(ctx context.Context, keep func(parts []string) (string, bool)) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	items, err := read(ctx, s, s.keys)
	if err != nil {
		return nil, errorf("list the keyring: %w", err)
	}
	var names []string
	prefix := s.service + "+"
	for _, item := range items {
		rest, ok := strings.CutPrefix(item, prefix)
		if !ok {
			continue
		}
		parts := strings.Split(rest, "+")
		if !slices.ContainsFunc(parts, func(p string) bool { return !validName(p) }) {
			if name, ok := keep(parts); ok {
				names = append(names, name)
			}
		}
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}
