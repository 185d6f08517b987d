package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/credproxy/credproxy"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// DefaultLockTTL is the lease TTL of a store's lock session when
// [Options.LockTTL] is zero.
const DefaultLockTTL = 10 * time.Second

// unlockTimeout bounds the round trip that releases a lock. If it fails,
// the lock goes when the store closes or its lease expires.
const unlockTimeout = 5 * time.Second

var _ credproxy.TokenLocker = (*EtcdStore)(nil)

// locksDir is the key directory of the token locks, under the prefix:
// locks/tokens/<provider>/<bucket>/<lease id> is one holder or waiter
// (see [concurrency.Mutex]).
const locksDir = "locks/tokens/"

func (s *EtcdStore) lockKey(provider, bucket string) string {
	return s.prefix + locksDir + provider + "/" + bucket
}

// LockToken takes the fleet-wide lock of provider and bucket ("" for
// [credproxy.DefaultBucket]): an etcd lock ([concurrency.Mutex]) at
// <prefix>locks/tokens/<provider>/<bucket>, held on the store's session
// lease. It blocks until the lock is held or ctx ends; then it returns an
// error wrapping ctx.Err(). Goroutines of one store exclude each other too
// (an in-process lock is taken first, since etcd's mutex is per lease, and
// the store has one lease).
//
// The returned unlock releases the lock (one round trip, bounded by a few
// seconds) and may be called more than once.
//
// The lock is released without unlock when its holder dies or is cut off
// from the cluster: its lease then expires after [Options.LockTTL], and
// the next waiter, on any host, gets the lock. A holder whose lease is
// lost that way is not told: its unlock is then harmless, but whatever it
// does while it believes it holds the lock may overlap with the next
// holder, so a write that must not be lost goes through
// [EtcdStore.UpdateToken], whose compare-and-swap refuses a stale write
// whatever the lock. Reads after LockToken returns see every write made
// before the lock was granted, by any host (the read cache catches up
// first). After a lost lease, the next LockToken starts a new
// session; a wait in progress when the lease is lost ends with an error
// wrapping [concurrency.ErrSessionExpired].
func (s *EtcdStore) LockToken(ctx context.Context, provider, bucket string) (unlock func(), err error) {
	bucket = normalBucket(bucket)
	if err := s.begin(ctx, provider, bucket); err != nil {
		return nil, err
	}
	key := s.lockKey(provider, bucket)
	unlockLocal, err := s.locals.lock(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("credproxy: etcdstore: lock %s: %w", key, err)
	}
	sess, err := s.session(ctx)
	if err != nil {
		unlockLocal()
		return nil, err
	}
	m := concurrency.NewMutex(sess, key)
	// The wait ends with ctx, or when the session's lease is lost (a wait
	// on a dead lease would never end, or end with a lock that is not held).
	// WithRequireLeader: a member that has lost its leader (no quorum)
	// fails the wait at once, rather than leaving it to ctx.
	lctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	stop := make(chan struct{})
	go func() {
		select {
		case <-sess.Done():
			cancel()
		case <-stop:
		}
	}()
	err = m.Lock(lctx)
	close(stop)
	cancel()
	if err != nil {
		unlockLocal()
		select {
		case <-sess.Done():
			if ctx.Err() == nil {
				return nil, fmt.Errorf("credproxy: etcdstore: lock %s: lock session lost (lease expired or revoked): %w", key, concurrency.ErrSessionExpired)
			}
		default:
		}
		return nil, failure(ctx, "lock "+key, err)
	}
	// The holder reads what the previous holder wrote: that write came
	// before the previous unlock, so before the revision at which this
	// lock was granted, and the cache must reach it before the next read
	// is served from memory (the refresher reads the token under the lock
	// to see whether another host refreshed it already).
	if err := s.cache.waitRev(ctx, m.Header().Revision); err != nil {
		uctx, cancel := context.WithTimeout(context.Background(), unlockTimeout)
		_ = m.Unlock(uctx)
		cancel()
		unlockLocal()
		return nil, wrapErr(ctx, "lock "+key+": wait for the cache", err)
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			uctx, cancel := context.WithTimeout(context.Background(), unlockTimeout)
			defer cancel()
			// An error leaves the key to the lease: it goes at Close or
			// when the lease expires. Nothing to report to the caller.
			_ = m.Unlock(uctx)
			unlockLocal()
		})
	}, nil
}

// session returns the store's lock session, starting one if there is none
// or if the last one's lease was lost. Starting one honours ctx.
func (s *EtcdStore) session(ctx context.Context) (*concurrency.Session, error) {
	if sess := s.liveSession(); sess != nil {
		return sess, nil
	}
	// One goroutine at a time starts a session; the others wait for it,
	// or for ctx.
	select {
	case s.sessStart <- struct{}{}:
		defer func() { <-s.sessStart }()
	case <-ctx.Done():
		return nil, fmt.Errorf("credproxy: etcdstore: lock session: %w", ctx.Err())
	}
	if sess := s.liveSession(); sess != nil {
		return sess, nil
	}
	// The lease is granted with ctx, so a cluster that does not answer
	// ends with the caller's wait; NewSession then only keeps it alive (on
	// the client's context, so for the store's life).
	// Bounded like any request, so that a cluster without quorum says so
	// (ErrUnavailable) rather than holding the caller to its deadline.
	gctx, cancel := s.requestCtx(ctx)
	lease, err := s.cli.Grant(gctx, s.lockTTL)
	cancel()
	if err != nil {
		return nil, failure(ctx, "lock session", err)
	}
	sess, err := concurrency.NewSession(s.cli, concurrency.WithLease(lease.ID), concurrency.WithTTL(int(s.lockTTL)))
	if err != nil {
		s.revokeQuietly(lease.ID)
		return nil, wrapErr(ctx, "lock session", err)
	}
	s.sessMu.Lock()
	defer s.sessMu.Unlock()
	if s.closed.Load() {
		sess.Orphan()
		s.revokeQuietly(lease.ID)
		return nil, fmt.Errorf("credproxy: etcdstore: store is closed: %w", net.ErrClosed)
	}
	s.sess = sess
	return sess, nil
}

// liveSession returns the current session if its lease is still kept
// alive, else nil (dropping a lost one).
func (s *EtcdStore) liveSession() *concurrency.Session {
	s.sessMu.Lock()
	defer s.sessMu.Unlock()
	if s.sess == nil {
		return nil
	}
	select {
	case <-s.sess.Done():
		// Lost: the lease expired (or was revoked) and its keys with it.
		// Its holders' unlocks still work; they delete nothing of others.
		s.sess = nil
		return nil
	default:
		return s.sess
	}
}

func (s *EtcdStore) revokeQuietly(id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), unlockTimeout)
	defer cancel()
	_, _ = s.cli.Revoke(ctx, id)
}

// closeSession revokes the lock session's lease, which releases every lock
// the store holds at once. If the revoke fails, they go when the lease
// expires.
func (s *EtcdStore) closeSession() {
	s.sessMu.Lock()
	sess := s.sess
	s.sess = nil
	s.sessMu.Unlock()
	if sess == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), unlockTimeout)
	defer cancel()
	sess.Orphan()
	_, _ = s.cli.Revoke(ctx, sess.Lease())
}

// keyedMutex serialises LockToken's callers of one store per lock key,
// honouring ctx. (The core has the same for its server; it is not
// exported.) Entries exist only while held or waited for.
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*keyLock
}

type keyLock struct {
	ch      chan struct{} // holds one token while the lock is held
	waiters int           // holders and waiters, guarded by keyedMutex.mu
}

func (k *keyedMutex) lock(ctx context.Context, key string) (unlock func(), err error) {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = make(map[string]*keyLock)
	}
	l := k.locks[key]
	if l == nil {
		l = &keyLock{ch: make(chan struct{}, 1)}
		k.locks[key] = l
	}
	l.waiters++
	k.mu.Unlock()
	select {
	case l.ch <- struct{}{}:
		return func() { <-l.ch; k.release(key, l) }, nil
	case <-ctx.Done():
		k.release(key, l)
		return nil, ctx.Err()
	}
}

func (k *keyedMutex) release(key string, l *keyLock) {
	k.mu.Lock()
	defer k.mu.Unlock()
	l.waiters--
	if l.waiters == 0 {
		delete(k.locks, key)
	}
}

// lockTTLSeconds turns Options.LockTTL into etcd's whole seconds, rounded
// up.
func lockTTLSeconds(d time.Duration) (int64, error) {
	if d < 0 {
		return 0, errors.New("credproxy: etcdstore: Options.LockTTL is negative")
	}
	if d == 0 {
		d = DefaultLockTTL
	}
	return int64((d + time.Second - 1) / time.Second), nil
}
