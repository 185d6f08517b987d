package credproxy

import (
	"context"
	"errors"
	"sync"
)

// lockToken takes the per-key lock of provider and bucket: the server's
// own, and then the store's cross-process one if it offers one
// ([TokenLocker]). The returned function releases both.
func (s *Server) lockToken(ctx context.Context, provider, bucket string) (unlock func(), err error) {
	unlockOwn, err := s.locks.lock(ctx, tokenKey(provider, bucket))
	if err != nil {
		return nil, err
	}
	unlockStore, err := s.lockStore(ctx, provider, bucket)
	if err != nil {
		unlockOwn()
		return nil, err
	}
	return func() { unlockStore(); unlockOwn() }, nil
}

// lockStore takes the store's cross-process lock of provider and bucket,
// if the store offers one ([TokenLocker]).
func (s *Server) lockStore(ctx context.Context, provider, bucket string) (unlock func(), err error) {
	locker, ok := s.opts.Store.(TokenLocker)
	if !ok {
		return func() {}, nil
	}
	return locker.LockToken(ctx, provider, bucket)
}

// updateToken changes the token of provider and bucket with update: by
// the store's [TokenUpdater] if it has one, else by GetToken and
// SaveToken, which the caller's locks make safe within one process and,
// with a [TokenLocker], across processes.
func (s *Server) updateToken(ctx context.Context, provider, bucket string, update func(stored Token, found bool) (Token, error)) (Token, error) {
	st := s.opts.Store
	if up, ok := st.(TokenUpdater); ok {
		return up.UpdateToken(ctx, provider, bucket, update)
	}
	stored, err := st.GetToken(ctx, provider, bucket)
	found := err == nil
	if err != nil && !errors.Is(err, ErrNotFound) {
		return Token{}, err
	}
	tok, err := update(stored, found)
	if err != nil {
		return Token{}, err
	}
	if err := st.SaveToken(ctx, provider, bucket, tok); err != nil {
		return Token{}, err
	}
	return tok, nil
}

func tokenKey(provider, bucket string) string { return provider + ":" + bucket }

// keyedMutex serialises work per key (provider:bucket) inside one process:
// save_token's read-merge-write and remove_token take it, so a
// logout arriving during a save waits for it and then wins. Waiting honours
// ctx. Entries exist only while held or waited for.
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*keyLock
}

type keyLock struct {
	ch      chan struct{} // holds one token while the lock is held
	waiters int           // holders and waiters, guarded by keyedMutex.mu
}

// lock acquires the lock for key, or returns ctx.Err() if ctx ends first.
// The returned function releases it.
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
