package credproxy

import (
	"context"
	"io"
	"maps"
	"os"
	"slices"
	"sync"
)

// Store holds the host's credentials: OAuth tokens, one per provider and
// bucket, and API keys by name. A [Server] serves from a Store; a [Client]
// implements Store too, so code can be written once for the host and the
// sandbox.
//
// The contract every implementation keeps:
//   - Names are valid (1 to 64 characters from [A-Za-z0-9._@-]); the server
//     checks them first, and an implementation may reject others with an
//     error wrapping [ErrInvalidRequest]. A bucket of "" means
//     [DefaultBucket].
//   - GetToken and GetAPIKey return an error wrapping [ErrNotFound] for an
//     absent item. RemoveToken and RemoveAPIKey of an absent item succeed.
//   - SaveToken stores the token whole, as given: with its refresh token and
//     every member exactly as it is. Merging is the caller's business.
//   - List methods return names in any order; the server sorts them.
//   - Methods are safe for concurrent use and honour ctx: when it ends, they
//     return promptly with an error wrapping ctx.Err().
//   - Errors may be logged by the host but are never sent to a peer, so
//     their text may be specific; they must not contain a secret.
type Store interface {
	GetToken(ctx context.Context, provider, bucket string) (Token, error)
	SaveToken(ctx context.Context, provider, bucket string, token Token) error
	RemoveToken(ctx context.Context, provider, bucket string) error
	ListProviders(ctx context.Context) ([]string, error)
	ListBuckets(ctx context.Context, provider string) ([]string, error)

	GetAPIKey(ctx context.Context, name string) (Secret, error)
	SaveAPIKey(ctx context.Context, name string, key Secret) error
	RemoveAPIKey(ctx context.Context, name string) error
	ListAPIKeys(ctx context.Context) ([]string, error)
}

// StoreCloser is a [Store] that holds resources until it is closed, as the
// stores [OpenStore] returns do.
type StoreCloser interface {
	Store
	io.Closer
}

// OpenStore returns the store this process should use, so that code that
// runs both on the host and in a sandbox never needs to know which it is
// in:
//
//   - When the environment variable [SocketEnv] is set (in a sandbox), a
//     [*Client] of the credential proxy at that path, connected and past the
//     handshake. If it cannot connect, OpenStore fails; it never falls back
//     to a keyring the sandbox should not have. Writes the protocol does not
//     offer fail: API-key writes with [ErrHostOnly] ("API key management is
//     not available in sandbox mode; manage keys on the host"), and a saved
//     token's refresh token is dropped by the server.
//   - Otherwise (on the host), the [*KeyringStore] that [OpenKeyringStore]
//     opens with zero [KeyringOptions]: the backend named by
//     [KeyringBackendEnv] or the encrypted file store, in
//     [DefaultKeyringDir].
//
// The caller closes the store when done with it.
func OpenStore(ctx context.Context) (StoreCloser, error) {
	// Each branch returns a nil interface on error, not a nil pointer in one.
	if os.Getenv(SocketEnv) != "" {
		c, err := NewClientFromEnv(ClientOptions{})
		if err != nil {
			return nil, err
		}
		dctx, cancel := context.WithTimeout(ctx, c.opts.RequestTimeout)
		defer cancel()
		if _, err := c.connect(dctx); err != nil {
			return nil, err
		}
		return c, nil
	}
	st, err := OpenKeyringStore(KeyringOptions{})
	if err != nil {
		return nil, err
	}
	return st, nil
}

// MemoryStore is a [Store] that keeps credentials in memory. It is a
// complete implementation, safe for concurrent use, suited to tests,
// examples and hosts that load credentials from elsewhere at start. Tokens
// are immutable and strings are copied by value, so no caller can alias
// what it holds. The zero MemoryStore is not usable; call [NewMemoryStore].
type MemoryStore struct {
	mu     sync.RWMutex
	tokens map[string]map[string]Token // provider → bucket → token
	keys   map[string]Secret
}

// NewMemoryStore returns an empty MemoryStore.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{
		tokens: make(map[string]map[string]Token),
		keys:   make(map[string]Secret),
	}
}

var _ StoreCloser = (*MemoryStore)(nil)

// Close does nothing and returns nil: a MemoryStore holds nothing but
// memory. It is there so that a MemoryStore can stand wherever a
// [StoreCloser] is expected, like a [KeyringStore]; the store stays usable.
func (m *MemoryStore) Close() error { return nil }

func checkNames(names ...string) error {
	for _, n := range names {
		if !validName(n) {
			return errorf("name must match ^[A-Za-z0-9._@-]{1,64}$: %w", ErrInvalidRequest)
		}
	}
	return nil
}

func normalBucket(bucket string) string {
	if bucket == "" {
		return DefaultBucket
	}
	return bucket
}

// GetToken returns the token of provider and bucket.
func (m *MemoryStore) GetToken(ctx context.Context, provider, bucket string) (Token, error) {
	bucket = normalBucket(bucket)
	if err := begin(ctx, provider, bucket); err != nil {
		return Token{}, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	t, ok := m.tokens[provider][bucket]
	if !ok {
		return Token{}, errorf("no token for provider %s bucket %s: %w", provider, bucket, ErrNotFound)
	}
	return t, nil
}

// SaveToken stores token for provider and bucket, replacing any other.
func (m *MemoryStore) SaveToken(ctx context.Context, provider, bucket string, token Token) error {
	bucket = normalBucket(bucket)
	if err := begin(ctx, provider, bucket); err != nil {
		return err
	}
	if _, ok := token.lookup(fieldAccessToken); !ok {
		return errorf("token has no access_token: %w", ErrInvalidRequest)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.tokens[provider] == nil {
		m.tokens[provider] = make(map[string]Token)
	}
	m.tokens[provider][bucket] = token
	return nil
}

// RemoveToken deletes the token of provider and bucket, if there is one.
func (m *MemoryStore) RemoveToken(ctx context.Context, provider, bucket string) error {
	bucket = normalBucket(bucket)
	if err := begin(ctx, provider, bucket); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.tokens[provider], bucket)
	if len(m.tokens[provider]) == 0 {
		delete(m.tokens, provider)
	}
	return nil
}

// ListProviders returns the providers that have at least one token.
func (m *MemoryStore) ListProviders(ctx context.Context) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return slices.Sorted(maps.Keys(m.tokens)), nil
}

// ListBuckets returns the buckets of provider that hold a token.
func (m *MemoryStore) ListBuckets(ctx context.Context, provider string) ([]string, error) {
	if err := begin(ctx, provider); err != nil {
		return nil, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return slices.Sorted(maps.Keys(m.tokens[provider])), nil
}

// GetAPIKey returns the API key called name.
func (m *MemoryStore) GetAPIKey(ctx context.Context, name string) (Secret, error) {
	if err := begin(ctx, name); err != nil {
		return "", err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	k, ok := m.keys[name]
	if !ok {
		return "", errorf("no API key %s: %w", name, ErrNotFound)
	}
	return k, nil
}

// SaveAPIKey stores key under name, replacing any other.
func (m *MemoryStore) SaveAPIKey(ctx context.Context, name string, key Secret) error {
	if err := begin(ctx, name); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.keys[name] = key
	return nil
}

// RemoveAPIKey deletes the API key called name, if there is one.
func (m *MemoryStore) RemoveAPIKey(ctx context.Context, name string) error {
	if err := begin(ctx, name); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.keys, name)
	return nil
}

// ListAPIKeys returns the names of the stored API keys.
func (m *MemoryStore) ListAPIKeys(ctx context.Context) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return slices.Sorted(maps.Keys(m.keys)), nil
}

// begin is the common entry check of MemoryStore methods.
func begin(ctx context.Context, names ...string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return checkNames(names...)
}

// TokenUpdater is implemented by a [Store] that can change one token by
// a read-modify-write that no other writer can interleave with, even one
// on another host that lost its [TokenLocker] lock: a compare-and-swap on
// the item's version, retried with the winner's value. The server uses it,
// when the store offers it, for save_token's merge and for saving a
// refreshed token, instead of GetToken followed by SaveToken; a store
// whose reads may lag its writes (a cache kept by a watch) needs it, since
// a merge over a stale read would drop what another host wrote.
//
// UpdateToken calls update with the stored token of provider and bucket
// ("" for [DefaultBucket]) and found false if there is none, and stores
// what update returns, unless update returns an error, which UpdateToken
// then returns, wrapped or not, having stored nothing. It may call update
// more than once, each time with the newest stored token, so update must
// have no effects beyond its result. It returns the token it stored.
type TokenUpdater interface {
	UpdateToken(ctx context.Context, provider, bucket string, update func(stored Token, found bool) (Token, error)) (Token, error)
}

// TokenLocker is implemented by a [Store] that can serialise work on one
// token across processes. The server takes the lock, after its own
// in-process one, around the read-merge-write of save_token and around
// remove_token, so two hosts serving one store never interleave them.
// [KeyringStore] implements it.
//
// LockToken blocks until it holds the lock of provider and bucket ("" for
// [DefaultBucket]) or ctx ends; then it returns an error wrapping
// ctx.Err(). The lock must be released when its holder dies, and unlock
// must be safe to call more than once.
type TokenLocker interface {
	LockToken(ctx context.Context, provider, bucket string) (unlock func(), err error)
}
