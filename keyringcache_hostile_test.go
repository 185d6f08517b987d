//go:build unix

package credproxy

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// fifoItem replaces the item file of p's token in the store at dir with a
// FIFO nobody writes to, and returns a function that releases any reader
// blocked opening it.
func fifoItem(t *testing.T, dir string, st *KeyringStore) (release func()) {
	t.Helper()
	item := filepath.Join(dir, st.tokenItem("p", DefaultBucket))
	if err := os.Remove(item); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(item, 0o600); err != nil {
		t.Fatal(err)
	}
	return func() {
		// Opening the write end lets every blocked open of the read end
		// return; closing it gives those readers EOF.
		for range 50 {
			f, err := os.OpenFile(item, os.O_WRONLY|syscall.O_NONBLOCK, 0)
			if err == nil {
				f.Close()
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// Store contract (KeyringStore doc: "reads return early with ctx.Err()
// when ctx ends"): a read of the file store returns at its deadline even
// when reading the item file blocks (a FIFO, a hung network or FUSE file
// system). Before the read cache the file was read by ring.Get inside
// read(), which honours ctx; cachedGet reads it on the caller's goroutine.
func TestKeyringFileReadHonoursCtxWhenItemFileBlocks(t *testing.T) {
	dir, st := counterStore(t)
	if _, err := st.GetToken(context.Background(), "p", ""); err != nil { // cache it
		t.Fatal(err)
	}
	release := fifoItem(t, dir, st)
	defer release()

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := st.GetToken(ctx, "p", "")
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("GetToken of a FIFO item succeeded")
		}
	case <-time.After(3 * time.Second):
		t.Fatal("GetToken with a 200ms deadline still blocked after 3s: the item file's read ignores ctx")
	}
}

// Server.Close documents that it returns once store calls honour their
// cancelled context; the file store's read of a blocking item file never
// does, so Close (and Shutdown past its ctx) hangs.
func TestServerCloseReturnsWhenFileStoreItemBlocks(t *testing.T) {
	dir, st := counterStore(t)
	srv, path, served := launchServer(t, Options{Store: st})
	c := newTestClient(t, path, ClientOptions{})
	if _, err := c.GetToken(context.Background(), "p", ""); err != nil {
		t.Fatal(err)
	}
	release := fifoItem(t, dir, st)
	defer release()

	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		defer cancel()
		c.GetToken(ctx, "p", "")
	}()
	time.Sleep(300 * time.Millisecond) // the request is in the store

	closed := make(chan struct{})
	go func() { srv.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(3 * time.Second):
		t.Error("Server.Close still waiting after 3s for a get_token blocked reading the item file")
		release()
		<-closed
	}
	<-served
}

// keyringcache.go: "The decrypted secrets stay in memory until the item
// changes, is removed or is dropped". A read that was decrypting the item
// when RemoveToken dropped it puts the secret back afterwards, and it then
// stays in the cache of a removed item until someone reads that item
// again, which may be never.
func TestKeyringRemoveTokenLeavesNoDecryptedSecretCached(t *testing.T) {
	ctx := context.Background()
	_, st := counterStore(t)
	item := st.tokenItem("p", DefaultBucket)
	for i := range 200 {
		if err := st.SaveToken(ctx, "p", "", counterToken(i+1)); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for range 2 {
			wg.Go(func() { st.GetToken(ctx, "p", "") }) // decrypts: the item changed
		}
		time.Sleep(500 * time.Microsecond) // the readers have read the file and are decrypting
		if err := st.RemoveToken(ctx, "p", ""); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		if cached, _ := st.cache.get(item); cached.value != nil {
			v := cached.value
			tok, _ := v.(Token)
			t.Fatalf("round %d: after RemoveToken returned and every read ended, the cache still holds the removed token (access token %q)",
				i, tok.AccessToken())
		}
	}
}

// An item file copied over another item's (by someone who can write the
// store's directory) is not served as that item: the decrypted item names
// itself, and a name that is not the one asked for fails the read.
func TestKeyringFileStoreRefusesAnotherItemsFile(t *testing.T) {
	ctx := context.Background()
	_, st := counterStore(t)
	if err := st.SaveToken(ctx, "q", "", mustToken(t, `{"access_token":"fake-access-q"}`)); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(st.itemPath(st.tokenItem("q", DefaultBucket)))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(st.itemPath(st.tokenItem("p", DefaultBucket)), data, 0o600); err != nil {
		t.Fatal(err)
	}
	if tok, err := st.GetToken(ctx, "p", ""); err == nil {
		t.Fatalf("p's token read from q's item file: %q", string(tok.AccessToken()))
	}
}
