package credproxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"slices"
	"sync"
	"syscall"

	"github.com/99designs/keyring"
)

// maxCachedItems bounds the file store's cache: a store holds one item per
// token and API key, a handful in practice. Past the bound, an arbitrary
// item is dropped and is decrypted again at its next read.
const maxCachedItems = 256

// itemCache keeps the file backend's items in memory, decrypted and parsed
// (a Token or a Secret, both immutable), each with the content of the item
// file it was decrypted from. Decrypting an item costs milliseconds of CPU
// (the key derivation); reading its file costs microseconds. So every read
// reads the file, and returns the cached value only if the content is byte
// for byte the one that was decrypted: it is the same ciphertext, so the
// same item. A write by anyone, in this process or another, renamed into
// place or rewritten in place, at whatever time and size, is seen by the
// next read; a removed file is not found. Metadata (inode, size, mtime)
// would be cheaper still, but an inode is reused once freed, and an
// in-place write within one tick of the file system's clock keeps all
// three.
//
// The decrypted secrets stay in memory until the item changes, is removed
// or is dropped; the server holds what it serves in memory anyway. An
// itemCache is safe for concurrent use; its zero value is empty.
type itemCache struct {
	mu    sync.RWMutex
	items map[string]cachedItem
	// gen counts drops: a read that began before one (and decrypts for
	// milliseconds) must not put back what was just removed.
	gen uint64
}

type cachedItem struct {
	sealed []byte // the item file's content
	value  any
}

// get returns the cached item and the generation to hand to put.
func (c *itemCache) get(item string) (cachedItem, uint64) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.items[item], c.gen
}

// put caches value, unless something was dropped since the get that
// returned gen.
func (c *itemCache) put(item string, gen uint64, sealed []byte, value any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return
	}
	if c.items == nil {
		c.items = make(map[string]cachedItem)
	}
	if _, ok := c.items[item]; !ok && len(c.items) >= maxCachedItems {
		for other := range c.items {
			delete(c.items, other)
			break
		}
	}
	c.items[item] = cachedItem{sealed, value}
}

func (c *itemCache) drop(item string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.items, item)
	c.gen++
}

func (c *itemCache) len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.items)
}

// cachedGet is get for the file backend: it reads the item file, and
// decrypts and parses it only if its content is not the cached one. The
// decryption runs through read, so that it ends early with ctx.
func cachedGet[T any](ctx context.Context, s *KeyringStore, item string, parse func([]byte) (T, error)) (T, error) {
	var zero T
	if err := ctx.Err(); err != nil {
		return zero, err
	}
	cached, gen := s.cache.get(item)
	sealed, same, err := readSealed(s.itemPath(item), cached.sealed)
	if err != nil {
		s.cache.drop(item)
		if errors.Is(err, fs.ErrNotExist) {
			return zero, ErrNotFound
		}
		return zero, err
	}
	if v, ok := cached.value.(T); ok && same {
		return v, nil
	}
	data, err := read(ctx, s, func(keyring.Keyring) ([]byte, error) { return s.unseal(item, sealed) })
	if err != nil {
		if ctx.Err() != nil {
			return zero, err
		}
		s.cache.drop(item)
		// The decryption's errors say nothing useful to a user.
		return zero, errors.New("the item cannot be decrypted: it was written with another password or is damaged")
	}
	v, err := parseItem(data, parse)
	if err != nil {
		s.cache.drop(item)
		return zero, err
	}
	s.cache.put(item, gen, sealed, v)
	return v, nil
}

// sealedBufs holds the buffers readSealed compares file content in.
var sealedBufs = sync.Pool{New: func() any { return new([]byte) }}

// maxItemFile bounds what readSealed reads of an item file: the largest
// token a peer can save (a frame), sealed (base64 and JWE's envelope),
// with room to spare.
const maxItemFile = 4 * MaxFrameSize

// readSealed returns the content of the file at path. If it is exactly
// cached, it returns cached and true, having allocated nothing for it.
// It reads regular files only, opened without blocking, so that a FIFO
// or device in the item's place fails the read at once instead of
// holding it past its deadline (the read runs on the caller's goroutine;
// only a hung file system can still hold it).
func readSealed(path string, cached []byte) (sealed []byte, same bool, err error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, false, err
	}
	defer f.Close()
	fi, err := f.Stat()
	switch {
	case err != nil:
		return nil, false, err
	case !fi.Mode().IsRegular():
		return nil, false, errors.New("the item is not a regular file")
	case fi.Size() > maxItemFile:
		return nil, false, errors.New("the item file is too large")
	}
	r := io.LimitReader(f, maxItemFile+1)
	if cached == nil {
		sealed, err = io.ReadAll(r)
		if err == nil && len(sealed) > maxItemFile {
			err = errors.New("the item file is too large")
		}
		return sealed, false, err
	}
	bp := sealedBufs.Get().(*[]byte)
	defer sealedBufs.Put(bp)
	// One byte more than cached, to tell a longer file apart.
	*bp = slices.Grow((*bp)[:0], len(cached)+1)
	buf := (*bp)[:len(cached)+1]
	n, err := io.ReadFull(r, buf)
	switch {
	case err == io.ErrUnexpectedEOF && n == len(cached) && bytes.Equal(buf[:n], cached):
		return cached, true, nil
	case err != nil && err != io.ErrUnexpectedEOF && err != io.EOF:
		return nil, false, err
	}
	rest, err := io.ReadAll(r)
	sealed = append(bytes.Clone(buf[:n]), rest...)
	if err == nil && len(sealed) > maxItemFile {
		err = errors.New("the item file is too large")
	}
	return sealed, false, err
}
