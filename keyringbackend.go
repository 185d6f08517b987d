package credproxy

import (
	"context"
	"errors"
	"fmt"
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

// get returns the data of item parsed by parse, or an error wrapping
// ErrNotFound, or one wrapping errDamaged if parse fails. The file
// backend's items come through its cache (see cachedGet); other backends
// are asked every time.
func get[T any](ctx context.Context, s *KeyringStore, item string, parse func([]byte) (T, error)) (T, error) {
	if s.cache != nil {
		return cachedGet(ctx, s, item, parse)
	}
	var zero T
	data, err := read(ctx, s, func(ring keyring.Keyring) ([]byte, error) {
		it, err := ring.Get(item)
		return it.Data, err
	})
	if errors.Is(err, keyring.ErrKeyNotFound) {
		return zero, ErrNotFound
	}
	if err != nil {
		return zero, err
	}
	return parseItem(data, parse)
}

// errDamaged is wrapped by get's error when an item's data does not parse.
var errDamaged = errors.New("damaged")

func parseItem[T any](data []byte, parse func([]byte) (T, error)) (T, error) {
	v, err := parse(data)
	if err != nil {
		return v, fmt.Errorf("%w: %w", errDamaged, err)
	}
	return v, nil
}

// asSecret is the parse function of get for items that hold text.
func asSecret(data []byte) (Secret, error) { return Secret(data), nil }

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
	if s.cache != nil {
		s.cache.drop(item)
	}
	if err == nil || errors.Is(err, keyring.ErrKeyNotFound) || errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if _, getErr := get(ctx, s, item, asSecret); errors.Is(getErr, ErrNotFound) {
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
