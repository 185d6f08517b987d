package credproxy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// runStoreJob runs a helper process (see runStoreHelper) that does job
// once on the store in dir, and waits for it to finish.
func runStoreJob(t *testing.T, job, dir string, n int) {
	t.Helper()
	cmd, lines := storeHelper(t, job, dir, fmt.Sprint("CREDPROXY_TEST_COUNT=", n))
	if !lines.Scan() || lines.Text() != "done" {
		t.Fatalf("%s helper: %q, %v", job, lines.Text(), cmd.Wait())
	}
}

// The file store serves reads from memory, yet a write by anyone is seen
// by the next read: by another store in this process, by another process
// (as the CLI writes beside a running server), a removal, and a file
// damaged behind the store's back (an error, never the old token).
func TestKeyringFileStoreSeesOtherWritersAtOnce(t *testing.T) {
	ctx := context.Background()
	dir, st := counterStore(t)
	_, path := startServer(t, Options{Store: st})
	c := newTestClient(t, path, ClientOptions{})
	other := openFileStore(t, dir)
	step := 0
	expect := func(want string) {
		t.Helper()
		step++
		for _, via := range []Store{c, st} {
			tok, err := via.GetToken(ctx, "p", "")
			got := string(tok.AccessToken())
			if errors.Is(err, ErrNotFound) {
				got = "not found"
			} else if err != nil {
				t.Fatalf("step %d: GetToken via %T: %v", step, via, err)
			}
			if got != want {
				t.Fatalf("step %d: GetToken via %T = %s, want %s", step, via, got, want)
			}
		}
	}
	expect("fake-access-0")
	expect("fake-access-0") // now from memory
	if err := other.SaveToken(ctx, "p", "", counterToken(1)); err != nil {
		t.Fatal(err)
	}
	expect("fake-access-1")
	runStoreJob(t, "save", dir, 2)
	expect("fake-access-2")
	runStoreJob(t, "remove", dir, 0)
	expect("not found")
	if err := other.SaveToken(ctx, "p", "", counterToken(3)); err != nil {
		t.Fatal(err)
	}
	expect("fake-access-3")
	if err := st.SaveToken(ctx, "p", "", counterToken(4)); err != nil {
		t.Fatal(err)
	}
	expect("fake-access-4")

	item := filepath.Join(dir, st.tokenItem("p", DefaultBucket))
	if err := os.WriteFile(item, []byte("damaged"), 0o600); err != nil {
		t.Fatal(err)
	}
	if tok, err := st.GetToken(ctx, "p", ""); err == nil || errors.Is(err, ErrNotFound) {
		t.Fatalf("GetToken of a damaged item = %s, %v; want an error", tok.AccessToken(), err)
	}

	for i, key := range []Secret{"sk-fake-1", "sk-fake-2"} {
		if err := other.SaveAPIKey(ctx, "k", key); err != nil {
			t.Fatal(err)
		}
		if got, err := st.GetAPIKey(ctx, "k"); err != nil || got != key {
			t.Fatalf("API key write %d: GetAPIKey = %v; want the new key", i, err)
		}
	}
	if err := other.RemoveAPIKey(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	if _, err := st.GetAPIKey(ctx, "k"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetAPIKey after another store removed it = %v", err)
	}
}

// A writer that rewrites the item file in place, as the keyring library's
// own file backend does, and leaves the same size and modification time
// (same inode, same size, mtime set back) is still seen: what is cached is
// checked against the file's content, not its metadata.
func TestKeyringFileStoreSeesInPlaceWriteWithSameSizeAndTime(t *testing.T) {
	ctx := context.Background()
	dir := storeDir(t)
	st := openFileStore(t, dir)
	if err := st.SaveToken(ctx, "p", "", counterToken(1)); err != nil {
		t.Fatal(err)
	}
	if _, err := st.GetToken(ctx, "p", ""); err != nil {
		t.Fatal(err)
	}
	name := st.tokenItem("p", DefaultBucket)
	item := filepath.Join(dir, name)
	before, err := os.Stat(item)
	if err != nil {
		t.Fatal(err)
	}

	// Another token sealed with the same password, of exactly the same
	// size: the sealed header holds the time of the write, so sizes vary
	// by a few bytes; write until one matches.
	elsewhere := storeDir(t)
	sealer := openFileStore(t, elsewhere)
	var sealed []byte
	for range 500 {
		if err := sealer.SaveToken(ctx, "p", "", counterToken(2)); err != nil {
			t.Fatal(err)
		}
		if sealed, err = os.ReadFile(filepath.Join(elsewhere, name)); err != nil {
			t.Fatal(err)
		}
		if int64(len(sealed)) == before.Size() {
			break
		}
	}
	if int64(len(sealed)) != before.Size() {
		t.Fatalf("found no sealed token of %d bytes", before.Size())
	}

	f, err := os.OpenFile(item, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(sealed, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(item, before.ModTime(), before.ModTime()); err != nil {
		t.Fatal(err)
	}
	after, err := os.Stat(item)
	if err != nil || !os.SameFile(before, after) || after.Size() != before.Size() || !after.ModTime().Equal(before.ModTime()) {
		t.Fatalf("the rewrite changed the file's identity, size or time: %v", err)
	}

	tok, err := st.GetToken(ctx, "p", "")
	if n, cerr := counterOf(tok); err != nil || cerr != nil || n != 2 {
		t.Fatalf("GetToken after an in-place rewrite = token %d (%v, %v); want 2", n, err, cerr)
	}
}

// A read of an unchanged item decrypts nothing (no key derivation, which
// is what costs milliseconds) and allocates little.
func TestKeyringFileStoreHitDoesNoKeyDerivation(t *testing.T) {
	ctx := context.Background()
	st := openFileStore(t, storeDir(t))
	if err := st.SaveToken(ctx, "p", "", counterToken(1)); err != nil {
		t.Fatal(err)
	}
	if err := st.SaveAPIKey(ctx, "k", fakeAPIKey); err != nil {
		t.Fatal(err)
	}
	read := func() {
		if _, err := st.GetToken(ctx, "p", ""); err != nil {
			t.Fatal(err)
		}
		if _, err := st.GetAPIKey(ctx, "k"); err != nil {
			t.Fatal(err)
		}
	}
	read()
	unseals := st.unseals.Load()
	allocs := testing.AllocsPerRun(100, read)
	if got := st.unseals.Load() - unseals; got != 0 {
		t.Fatalf("101 reads of unchanged items decrypted %d times; want 0", got)
	}
	// A decryption alone allocates hundreds of times.
	if allocs > 2*12 {
		t.Fatalf("a GetToken and a GetAPIKey of unchanged items allocate %v times", allocs)
	}
	t.Logf("GetToken + GetAPIKey from memory: %v allocations", allocs)
}

// Readers in many goroutines beside a writer never see a torn or an older
// token, and see the last one once the writer stops.
func TestKeyringFileStoreConcurrentReadersBesideWriter(t *testing.T) {
	ctx := context.Background()
	dir, st := counterStore(t)
	other := openFileStore(t, dir)
	writes := scaled(50)
	done := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			prev := 0
			for {
				select {
				case <-done:
					return
				default:
				}
				tok, err := st.GetToken(ctx, "p", "")
				if err != nil {
					t.Error(err)
					return
				}
				n, err := counterOf(tok)
				if err != nil || n < prev {
					t.Errorf("read %d after %d: %v", n, prev, err)
					return
				}
				prev = n
			}
		})
	}
	for n := 1; n <= writes; n++ {
		if err := other.SaveToken(ctx, "p", "", counterToken(n)); err != nil {
			t.Fatal(err)
		}
	}
	close(done)
	wg.Wait()
	tok, err := st.GetToken(ctx, "p", "")
	if n, cerr := counterOf(tok); err != nil || cerr != nil || n != writes {
		t.Fatalf("after the writer stopped: token %d, %v, %v; want %d", n, err, cerr, writes)
	}
}

// The cache holds at most maxCachedItems items.
func TestKeyringCacheIsBounded(t *testing.T) {
	var c itemCache
	for i := range maxCachedItems + 10 {
		c.put(fmt.Sprint("item", i), 0, []byte("sealed"), Secret("value"))
	}
	if n := c.len(); n != maxCachedItems {
		t.Fatalf("the cache holds %d items; want %d", n, maxCachedItems)
	}
}

// Issue 15, item 4: a tool that only looks opens the store with
// MustExist: with no store, it fails with ErrNoStore, creates nothing and
// asks for no password; once a store exists, it opens it.
func TestOpenKeyringStoreMustExistCreatesNothing(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "store")
	asked := false
	opts := KeyringOptions{Backend: "file", Dir: dir, MustExist: true,
		Password: func() (string, error) { asked = true; return "fake-password", nil }}
	if _, err := OpenKeyringStore(opts); !errors.Is(err, ErrNoStore) {
		t.Fatalf("MustExist with no store: %v, want ErrNoStore", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) || asked {
		t.Fatalf("MustExist with no store created %s (%v) or asked for the password (%v)", dir, err, asked)
	}
	opts.MustExist = false
	st, err := OpenKeyringStore(opts)
	if err != nil {
		t.Fatal(err)
	}
	st.Close()
	opts.MustExist = true
	st, err = OpenKeyringStore(opts)
	if err != nil {
		t.Fatalf("MustExist with a store: %v", err)
	}
	st.Close()
}

// Issue 15, item 4: a store whose check item is missing (removed by hand,
// or lost) does not adopt a mistyped password: the password must open the
// items already there, and the right one still opens the store after.
func TestKeyringFileStoreWithoutCheckItemRefusesAWrongPassword(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "store")
	open := func(pw string) (*KeyringStore, error) {
		return OpenKeyringStore(KeyringOptions{Backend: "file", Dir: dir,
			Password: func() (string, error) { return pw, nil }})
	}
	st, err := open("fake-right-password")
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SaveToken(ctx, "p", "", mustToken(t, `{"access_token":"fake-at"}`)); err != nil {
		t.Fatal(err)
	}
	check := st.itemPath(st.itemName(checkItemName))
	st.Close()
	if err := os.Remove(check); err != nil {
		t.Fatal(err)
	}
	if st, err := open("fake-mistyped"); err == nil {
		st.Close()
		t.Fatal("a mistyped password opened a store whose check item is missing")
	}
	st, err = open("fake-right-password")
	if err != nil {
		t.Fatalf("the right password, after a mistyped one: %v", err)
	}
	defer st.Close()
	if tok, err := st.GetToken(ctx, "p", ""); err != nil || string(tok.AccessToken()) != "fake-at" {
		t.Fatalf("GetToken: %q, %v", string(tok.AccessToken()), err)
	}
}

// Issue 15, item 4: two openers creating one new store at the same moment
// with different passwords cannot both succeed (before, 12 in 30 trials
// left a store whose items needed two passwords): the check item is
// created only if absent, and each reads it back with its own password.
func TestKeyringFileStoreCreatedTwiceAtOnceHasOnePassword(t *testing.T) {
	for trial := range 30 {
		dir := filepath.Join(t.TempDir(), "store")
		var wg sync.WaitGroup
		errs := make([]error, 2)
		start := make(chan struct{})
		for i, pw := range []string{"fake-password-A", "fake-password-B"} {
			wg.Go(func() {
				<-start
				st, err := OpenKeyringStore(KeyringOptions{Backend: "file", Dir: dir,
					Password: func() (string, error) { return pw, nil }})
				if err == nil {
					st.Close()
				}
				errs[i] = err
			})
		}
		close(start)
		wg.Wait()
		if errs[0] == nil && errs[1] == nil {
			t.Fatalf("trial %d: both passwords created the store", trial)
		}
	}
}
