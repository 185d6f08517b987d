// Package etcdstore is a [credproxy.Store] kept in an etcd cluster, so that
// a fleet of hosts shares one set of credentials. Call [Open] with the
// cluster's endpoints and a 32-byte data key; the tests show a real
// three-member cluster in use.
//
// It lives in a module of its own so that the etcd client, and everything
// it brings, is paid for only by programs that use it.
//
// # Security
//
// Every value is sealed on the host before it is sent: AES-256-GCM with a
// random nonce, and the item's full etcd key bound as associated data, so
// an item copied or moved to another name (another provider, bucket, API
// key, kind or [Options.Prefix]) fails to open with an error wrapping
// [ErrUnseal] instead of being served under the wrong name. etcd, its
// snapshots and its backups hold ciphertext and item names only: the names
// of providers, buckets and API keys are not secret.
//
// [Open] checks the data key against the store: a value under the prefix
// (keycheck), sealed with the fleet's key by the first store opened
// there, must open, else Open fails with an error wrapping [ErrUnseal]
// that names both keys' ids. A host given the wrong key therefore never
// writes items the others cannot open.
//
// The data key never leaves the host and is the host's to keep: in the
// system keyring (for example as a credproxy API key in a
// [credproxy.KeyringStore]), in a file readable only by the service's
// user, or in the environment of a service manager that loads it from a
// credential store. Every host of a fleet needs the same key.
//
// Sealing keeps values secret and bound to their names; it cannot keep
// them current. Someone who can write to etcd (an operator, a compromised
// member, a restored backup or snapshot) can put back a value that the
// same item held earlier, and it opens: it was sealed for that very key
// with the same data key. Hosts then serve the older token or API key, and
// refresh with the older refresh token, which a provider that rotates
// refresh tokens treats as reuse (it may revoke the login). Such a
// rollback is not detected; restoring a backup of the store is one.
// Rotating the data key ([EtcdStore.Reseal]) and dropping the old one
// ends the replay of everything sealed before. Guard write access to the
// cluster and its backups as you would the credentials' availability.
//
// # Rotating the data key
//
// Each value names, by a one-way id ([DataKeyID]), the data key that
// sealed it; a store opens values sealed with [Options.DataKey] or any of
// [Options.OldDataKeys], and seals with DataKey only. To rotate:
//
//  1. Give every host the new key as DataKey and the old one in
//     OldDataKeys, and restart them one by one. Until the last one
//     restarts, hosts with the old configuration cannot open values the
//     others write (they fail with [ErrUnseal] naming the new key's id).
//     To have no such window, first add the new key to every host's
//     OldDataKeys (a rolling restart), then swap the two (another).
//  2. Run [EtcdStore.Reseal] once, from any one host: it seals again with
//     DataKey every item that is sealed otherwise.
//  3. Drop the old key from OldDataKeys, and destroy it.
//
// Reseal is safe while hosts serve: a write that races it wins.
//
// # Reads, the cache and faults
//
// [Open] loads every item under the prefix into memory, and a watch keeps
// that copy current, so while the cluster is healthy a read (GetToken,
// GetAPIKey, the lists) is a map lookup, with no round trip: a host serves
// get_token at about MemoryStore's cost. Items are cached opened, since
// anyone who can read the process's memory can read the data key in it
// too. The store's own writes are visible to its next read at once;
// another host's writes are visible once the watch brings them (a median
// of 0.3 ms and a 99th percentile of 8 ms, the write included, on a
// loopback test cluster; see STATUS.md).
// [EtcdStore.LockToken] waits for the cache to catch up with the revision
// at which the lock was granted, so the holder of a lock reads whatever
// the previous holder, on any host, wrote under it.
//
// When the watch breaks (history compacted, its member lost its leader,
// or nothing heard from the cluster for about five seconds) the store logs
// it at Warn to [Options.Logger], reads through to the cluster, and loads
// and watches again (backing off up to two seconds), logging at Info once
// its cache is current again. When the cluster cannot answer (no quorum,
// or no member reachable), a read serves the cached value if there is one
// and logs, at most every 30 s, that a possibly stale value was served; if
// there is none, it fails with an error wrapping [ErrUnavailable]. Writes
// never fall back: without a quorum they fail with [ErrUnavailable] within
// [Options.RequestTimeout].
package etcdstore

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/credproxy/credproxy"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
)

var (
	// ErrUnseal is returned, wrapped with the item's key, when a value read
	// from etcd does not open with the data key: it was sealed with another
	// key, altered, or copied from another item's name.
	ErrUnseal = errors.New("credproxy: etcdstore: value does not open with the data key (another key, altered, or copied from another item)")

	// ErrConflict is returned by [EtcdStore.UpdateToken] and
	// [EtcdStore.Reseal] when other writers changed the item on every one
	// of their attempts.
	ErrConflict = errors.New("credproxy: etcdstore: item changed by other writers on every attempt")

	// ErrUnavailable is wrapped by the error of a request the cluster could
	// not answer within [Options.RequestTimeout] (or the caller's context):
	// it has no quorum, no leader, or no member is reachable from this
	// host. Check that a majority of the members are up and that this host
	// reaches them at [Options.Endpoints]. A write that fails with it was
	// not confirmed and is not visible; as with any store behind a
	// consensus protocol, one that reached a leader just before quorum was
	// lost may still be applied when quorum returns. Reads fail with it
	// only when the store has no cached value to serve (see the package
	// doc).
	ErrUnavailable = errors.New("credproxy: etcdstore: etcd cluster unavailable (no quorum, or no member reachable)")
)

// DefaultPrefix is the etcd key prefix of a store whose [Options.Prefix]
// is empty.
const DefaultPrefix = "/credproxy/"

// DefaultDialTimeout is how long [Open] waits for the cluster when
// [Options.DialTimeout] is zero.
const DefaultDialTimeout = 5 * time.Second

// DefaultRequestTimeout bounds each request to the cluster when
// [Options.RequestTimeout] is zero.
const DefaultRequestTimeout = 5 * time.Second

// DataKeySize is the length in bytes of [Options.DataKey]: an AES-256 key.
const DataKeySize = 32

// Options configures [Open]. Endpoints and DataKey are required; every
// other field has a working zero value.
type Options struct {
	// Endpoints are the cluster's client URLs, such as
	// "https://etcd1.example:2379". Required.
	Endpoints []string

	// TLS, if not nil, is used to connect to the endpoints, client
	// certificates included. Nil means plain connections, which suit a
	// cluster reached only over loopback or a private, trusted network.
	TLS *tls.Config

	// Username and Password, if Username is not empty, authenticate to a
	// cluster with etcd's authentication enabled. Empty means none.
	Username string
	Password string

	// Prefix is put before every key the store writes, so that one cluster
	// can serve other data, or several stores. Empty means [DefaultPrefix].
	// A "/" is added if it does not end with one. Items are bound to their
	// full key, prefix included (see the package doc), so a store's data
	// cannot be moved under another prefix without sealing it again.
	Prefix string

	// DataKey is the 32-byte AES-256 key that seals every value. Required.
	// Open copies it. Where it comes from is the host's choice; see the
	// package doc.
	DataKey []byte

	// DialTimeout bounds Open's first contact with the cluster. Zero means
	// [DefaultDialTimeout].
	DialTimeout time.Duration

	// LockTTL is the TTL of the lease that holds the store's token locks
	// ([EtcdStore.LockToken]), in whole seconds (rounded up; etcd may raise
	// a very short one to its minimum). It is how long a lock outlives a
	// holder that died or was cut off from the cluster: shorter frees a
	// dead host's locks sooner, but a host that cannot reach the cluster
	// for that long loses its locks. Zero means [DefaultLockTTL] (10 s).
	LockTTL time.Duration

	// RequestTimeout bounds each request to the cluster (a read that goes
	// through to it, a write, one attempt of UpdateToken), so that a
	// cluster without quorum makes a call fail with [ErrUnavailable]
	// instead of hanging; the caller's context bounds it too, if sooner.
	// It does not bound LockToken's wait for a lock held by another,
	// which only ctx ends. Zero means [DefaultRequestTimeout] (5 s).
	RequestTimeout time.Duration

	// Logger receives the store's few log records: the read cache's watch
	// breaking (Warn) and recovering (Info), and a possibly stale value
	// served while the cluster is unavailable (Warn, at most one every 30
	// s). Records carry etcd keys (item names, which are not secret) and
	// etcd's errors, never a value. Nil means discard.
	Logger *slog.Logger

	// OldDataKeys are data keys that still open values but no longer
	// seal any: the keys a rotation replaced, kept until
	// [EtcdStore.Reseal] has sealed everything with DataKey (see the
	// package doc). Each is 32 bytes; Open copies them. Empty means none.
	OldDataKeys [][]byte
}

// EtcdStore is a [credproxy.Store], [credproxy.StoreCloser] and
// [credproxy.TokenLocker] kept in
// etcd, with every value sealed (see the package doc). It is safe for
// concurrent use, by any number of goroutines and hosts on one cluster.
// Reads are served from a cache in memory kept current by a watch, writes
// are round trips (see the package doc). The zero EtcdStore is not usable;
// call [Open].
type EtcdStore struct {
	cli        *clientv3.Client
	prefix     string
	seal       *sealer
	closed     atomic.Bool
	log        *slog.Logger
	reqTimeout time.Duration

	// The read cache (cache.go) and its watcher goroutine (cachewatch.go),
	// which stopWatch stops and watchDone tells has ended.
	cache     *cache
	stopWatch context.CancelFunc
	watchDone chan struct{}

	// Token locks (lock.go): one session (lease) for all of them, started
	// at the first LockToken and again after a lost lease.
	lockTTL   int64 // seconds
	locals    keyedMutex
	sessStart chan struct{} // held while a session is being started
	sessMu    sync.Mutex    // guards sess
	sess      *concurrency.Session
}

var (
	_ credproxy.StoreCloser  = (*EtcdStore)(nil)
	_ credproxy.TokenUpdater = (*EtcdStore)(nil)
)

// Open connects to the cluster that opts names and returns its store.
// It loads every item under the prefix into the read cache, in one request
// that also checks that the cluster answers (and accepts the credentials)
// within opts.DialTimeout, so a wrong endpoint, password or certificate
// fails here, not at the first request (if the cluster did not answer in
// time, Open spends up to 200 ms more asking the connection why, so that
// the error names a refused connection or a TLS failure); then it starts
// the watch that keeps the cache current. The caller closes the store when done with it.
func Open(ctx context.Context, opts Options) (*EtcdStore, error) {
	if len(opts.Endpoints) == 0 {
		return nil, errors.New("credproxy: etcdstore: Options.Endpoints is empty")
	}
	sl, err := newSealer(opts.DataKey, opts.OldDataKeys...)
	if err != nil {
		return nil, err
	}
	prefix := opts.Prefix
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	lockTTL, err := lockTTLSeconds(opts.LockTTL)
	if err != nil {
		return nil, err
	}
	timeout := opts.DialTimeout
	if timeout <= 0 {
		timeout = DefaultDialTimeout
	}
	reqTimeout := opts.RequestTimeout
	if reqTimeout <= 0 {
		reqTimeout = DefaultRequestTimeout
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   append([]string(nil), opts.Endpoints...),
		TLS:         opts.TLS,
		Username:    opts.Username,
		Password:    opts.Password,
		DialTimeout: timeout,
		Logger:      zap.NewNop(), // the library is silent unless asked
	})
	if err != nil {
		return nil, fmt.Errorf("credproxy: etcdstore: connect: %w", err)
	}
	// The cache is loaded here rather than at the first read: this request
	// is the first contact Open needs anyway, and the first get_token then
	// costs what the others do.
	pctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	resp, err := cli.Get(pctx, prefix, clientv3.WithPrefix())
	if err != nil {
		err = explainTimeout(ctx, cli, err)
		cli.Close()
		return nil, fmt.Errorf("credproxy: etcdstore: first contact with %v: %w", opts.Endpoints, err)
	}
	s := &EtcdStore{
		cli: cli, prefix: prefix, seal: sl, log: log, reqTimeout: reqTimeout,
		cache:   newCache(prefix, sl, log),
		lockTTL: lockTTL, sessStart: make(chan struct{}, 1),
		watchDone: make(chan struct{}),
	}
	if err := s.checkDataKey(pctx, resp.Kvs); err != nil {
		cli.Close()
		return nil, err
	}
	s.cache.load(resp.Kvs, resp.Header.Revision)
	s.cache.setCurrent(true)
	wctx, stop := context.WithCancel(context.Background())
	s.stopWatch = stop
	go s.runWatch(wctx, resp.Header.Revision)
	return s, nil
}

// Close stops the cache's watch (and waits for its goroutine), releases
// every token lock the store holds (it revokes their lease; if that fails,
// they go when the lease expires) and closes the connection to the
// cluster. It may be called more than once; later
// calls, and the store's methods after it, return an error wrapping
// [net.ErrClosed].
func (s *EtcdStore) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	s.stopWatch()
	<-s.watchDone
	s.closeSession()
	if err := s.cli.Close(); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("credproxy: etcdstore: close: %w", err)
	}
	return nil
}

// Key layout, under the prefix. Names cannot hold "/" (see checkNames), so
// no two items share a key and no name reaches outside its directory.
const (
	tokensDir  = "tokens/"  // tokens/<provider>/<bucket>
	apiKeysDir = "apikeys/" // apikeys/<name>
)

func (s *EtcdStore) tokenKey(provider, bucket string) string {
	return s.prefix + tokensDir + provider + "/" + bucket
}

func (s *EtcdStore) apiKeyKey(name string) string { return s.prefix + apiKeysDir + name }

// begin is the entry check of every method: the store is open, ctx has not
// ended, and the names are valid.
func (s *EtcdStore) begin(ctx context.Context, names ...string) error {
	if s.closed.Load() {
		return fmt.Errorf("credproxy: etcdstore: store is closed: %w", net.ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("credproxy: etcdstore: %w", err)
	}
	return checkNames(names...)
}

// checkNames applies the core's name rule, ^[A-Za-z0-9._@-]{1,64}$ (see
// [credproxy.Store]), which the server checks first too. The core does not
// export its check, so it is repeated here.
func checkNames(names ...string) error {
	for _, n := range names {
		if !validName(n) {
			return fmt.Errorf("credproxy: etcdstore: name must match ^[A-Za-z0-9._@-]{1,64}$: %w", credproxy.ErrInvalidRequest)
		}
	}
	return nil
}

func validName(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '.', c == '_', c == '@', c == '-':
		default:
			return false
		}
	}
	return true
}

func normalBucket(bucket string) string {
	if bucket == "" {
		return credproxy.DefaultBucket
	}
	return bucket
}

// wrapErr gives an etcd error the package prefix and, when ctx has ended,
// makes it wrap ctx.Err() as the Store contract asks.
func wrapErr(ctx context.Context, op string, err error) error {
	if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
		return fmt.Errorf("credproxy: etcdstore: %s: %w (%w)", op, cerr, err)
	}
	return fmt.Errorf("credproxy: etcdstore: %s: %w", op, err)
}
