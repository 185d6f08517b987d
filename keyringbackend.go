package credproxy

import (
	"context"
	"errors"
	"io/fs"
	"os"

	"github.com/99designs/keyring"
)

// keys lists item names. The file backend's own listing drops directory
// read errors and lists directories, so the store reads the directory
// itself.
func (s *KeyringStore) keys(ring keyring.Keyring) ([]string, error) {
	if s.backend != string(keyring.FileBackend) {
		return ring.Keys()
	}
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		if e.Type().IsRegular() {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// get returns the data of item, or an error wrapping ErrNotFound.
func (s *KeyringStore) get(ctx context.Context, item string) ([]byte, error) {
	data, err := read(ctx, s, func(ring keyring.Keyring) ([]byte, error) {
		it, err := ring.Get(item)
		return it.Data, err
	})
	switch {
	case errors.Is(err, keyring.ErrKeyNotFound):
		return nil, ErrNotFound
	case err != nil && s.backend == string(keyring.FileBackend) && ctx.Err() == nil:
		// The file backend's decryption errors say nothing useful to a user.
		return nil, errors.New("the item cannot be decrypted: it was written with another password or is damaged")
	}
	return data, err
}

// set writes item. The file backend writes through staging (see writeFile).
func (s *KeyringStore) set(ctx context.Context, item keyring.Item) error {
	if s.backend == string(keyring.FileBackend) {
		if err := ctx.Err(); err != nil {
			return err
		}
		return s.writeFile(item)
	}
	return s.write(ctx, func(ring keyring.Keyring) error { return ring.Set(item) })
}

// remove deletes item; an absent item is not an error. Backends disagree on
// what removing an absent item returns (the file backend: the raw
// os.Remove error; pass: a failed command), so on an error the store asks
// whether the item is still there.
func (s *KeyringStore) remove(ctx context.Context, item string) error {
	err := s.write(ctx, func(ring keyring.Keyring) error { return ring.Remove(item) })
	if err == nil || errors.Is(err, keyring.ErrKeyNotFound) || errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if _, getErr := s.get(ctx, item); errors.Is(getErr, ErrNotFound) {
		return nil
	}
	return err
}

// read runs fn on the backend and returns its result, or ctx.Err() as soon
// as ctx ends, leaving fn to finish in the background: the keyring library
// cannot stop a call, and a read left running changes nothing.
func read[T any](ctx context.Context, s *KeyringStore, fn func(keyring.Keyring) (T, error)) (T, error) {
	var zero T
	if err := s.acquire(ctx); err != nil {
		return zero, err
	}
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		defer s.release()
		v, err := fn(s.ring)
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-ctx.Done():
		return zero, ctx.Err()
	}
}

// write runs fn on the backend to completion. Returning early would let
// the caller release its lock on the item while the write still runs.
func (s *KeyringStore) write(ctx context.Context, fn func(keyring.Keyring) error) error {
	if err := s.acquire(ctx); err != nil {
		return err
	}
	defer s.release()
	return fn(s.ring)
}

// acquire waits for the turn to call a backend that is not safe for
// concurrent use (all but the file backend), or for ctx to end.
func (s *KeyringStore) acquire(ctx context.Context) error {
	if s.calls == nil {
		return ctx.Err()
	}
	select {
	case s.calls <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *KeyringStore) release() {
	if s.calls != nil {
		<-s.calls
	}
}
