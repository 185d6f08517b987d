package etcdstore

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/credproxy/credproxy"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// sealV1 seals as stores did before keys could rotate (format 1), so that
// tests can put such values in etcd.
func sealV1(t testing.TB, key []byte, name string, plaintext []byte) []byte {
	t.Helper()
	block, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	aead, err := cipher.NewGCMWithRandomNonce(block)
	if err != nil {
		t.Fatal(err)
	}
	return aead.Seal([]byte{formatV1}, nil, plaintext, aad(name))
}

// openWithKeys opens a store on c's cluster under prefix with data key key
// and old keys old, as a host is configured during a rotation, and closes
// it when t ends.
func (c *testCluster) openWithKeys(t *testing.T, prefix string, key []byte, old ...[]byte) *EtcdStore {
	t.Helper()
	st, err := Open(t.Context(), Options{Endpoints: c.endpoints, Prefix: prefix, DataKey: key, OldDataKeys: old})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func newKey(t testing.TB) []byte {
	k := make([]byte, DataKeySize)
	rand.Read(k)
	return k
}

// The sealer alone: format 2 names its key by id, old keys open what they
// sealed (format 1 or 2), only the current key seals, and a value whose
// key is missing says which key to add.
func TestSealerRotation(t *testing.T) {
	oldKey, curKey := newKey(t), newKey(t)
	const name = "/credproxy/apikeys/k"
	before, _ := newSealer(oldKey)
	rotated, err := newSealer(curKey, oldKey, curKey) // the current key among the old is ignored
	if err != nil {
		t.Fatal(err)
	}
	fresh, _ := newSealer(curKey)

	sealed := before.seal(name, []byte(fakeAPIKey))
	id := keyID(oldKey)
	if sealed[0] != formatV2 || !bytes.Equal(sealed[1:1+keyIDSize], id[:]) || DataKeyID(oldKey) != strings.ToLower(DataKeyID(oldKey)) {
		t.Fatalf("format 2 value starts %x, want 02 then the key id %s", sealed[:1+keyIDSize], DataKeyID(oldKey))
	}
	if bytes.Contains(sealed, oldKey[:keyIDSize]) {
		t.Error("the key id is the key's first bytes")
	}
	legacy := sealV1(t, oldKey, name, []byte(fakeAPIKey))
	for desc, v := range map[string][]byte{"format 2": sealed, "format 1": legacy} {
		if pt, current, err := rotated.openCurrent(name, v); err != nil || current || string(pt) != fakeAPIKey {
			t.Errorf("%s with an old key: opened %v, current %v, %v; want it opened, not current", desc, string(pt) == fakeAPIKey, current, err)
		}
	}
	if pt, current, err := rotated.openCurrent(name, rotated.seal(name, []byte(fakeAPIKey))); err != nil || !current || string(pt) != fakeAPIKey {
		t.Errorf("a new seal: current %v, %v", current, err)
	}
	if _, current, err := fresh.openCurrent(name, sealV1(t, curKey, name, []byte("x"))); err != nil || current {
		t.Errorf("format 1 with the current key: current %v, %v; want opened and not current (Reseal rewrites it)", current, err)
	}

	_, err = fresh.open(name, sealed)
	if !errors.Is(err, ErrUnseal) || !strings.Contains(err.Error(), DataKeyID(oldKey)) || !strings.Contains(err.Error(), "OldDataKeys") {
		t.Errorf("format 2 with its key absent = %v; want ErrUnseal naming key id %s and OldDataKeys", err, DataKeyID(oldKey))
	}
	swapped := bytes.Clone(sealed)
	curID := keyID(curKey)
	copy(swapped[1:], curID[:])
	for desc, tc := range map[string]struct {
		s     *sealer
		name  string
		value []byte
	}{
		"format 1 with its key absent":  {fresh, name, legacy},
		"key id swapped for another's":  {rotated, name, swapped},
		"format 2 under another name":   {rotated, name + "2", sealed},
		"format 1 under another name":   {rotated, name + "2", legacy},
		"format 2 relabelled format 1":  {rotated, name, append([]byte{formatV1}, sealed[1+keyIDSize:]...)},
		"format 1 relabelled format 2":  {rotated, name, append(append([]byte{formatV2}, id[:]...), legacy[1:]...)},
		"format 2 cut to its id":        {rotated, name, sealed[:1+keyIDSize]},
		"format 2 with no body, id ok":  {rotated, name, sealed[:1+keyIDSize+27]},
		"format 1 one byte short of ok": {rotated, name, legacy[:28]},
	} {
		if pt, err := tc.s.open(tc.name, tc.value); !errors.Is(err, ErrUnseal) || pt != nil {
			t.Errorf("%s: %d bytes, %v; want ErrUnseal", desc, len(pt), err)
		}
	}
	if _, err := newSealer(curKey, oldKey, make([]byte, 16)); err == nil || !strings.Contains(err.Error(), "OldDataKeys[1]") {
		t.Errorf("a 16-byte old key: %v, want an error naming OldDataKeys[1]", err)
	}
}

// A rotation on a real cluster, as the package doc says to run it: values
// sealed with the old key (format 2, and format 1 from before rotation)
// open on hosts given both keys; Reseal rewrites them, and only them, so a
// host with only the new key opens everything; the old key then opens
// nothing. Lock keys under the prefix are left alone.
func TestRotation(t *testing.T) {
	c := newCluster(t)
	ctx := t.Context()
	oldKey, curKey := c.key, newKey(t)
	const prefix = "/rot/"
	before := c.openStore(t, prefix)
	if err := before.SaveToken(ctx, "anthropic", "", mustToken(t, anthropicToken)); err != nil {
		t.Fatal(err)
	}
	if err := before.SaveAPIKey(ctx, "openai", fakeAPIKey); err != nil {
		t.Fatal(err)
	}
	raw := c.rawClient(t)
	legacyKey := before.apiKeyKey("legacy")
	if _, err := raw.Put(ctx, legacyKey, string(sealV1(t, oldKey, legacyKey, []byte("sk-fake-legacy")))); err != nil {
		t.Fatal(err)
	}
	unlock, err := before.LockToken(ctx, "anthropic", "")
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()

	rotated := c.openWithKeys(t, prefix, curKey, oldKey)
	readAll := func(st *EtcdStore) error {
		tok, err := st.GetToken(ctx, "anthropic", "")
		if err == nil && !tok.Equal(mustToken(t, anthropicToken)) {
			err = errors.New("token changed")
		}
		for name, want := range map[string]credproxy.Secret{"openai": fakeAPIKey, "legacy": "sk-fake-legacy"} {
			if err != nil {
				break
			}
			var got credproxy.Secret
			if got, err = st.GetAPIKey(ctx, name); err == nil && got != want {
				err = errors.New("API key " + name + " changed")
			}
		}
		return err
	}
	if err := readAll(rotated); err != nil {
		t.Fatalf("a host with the new and the old key, before Reseal: %v", err)
	}
	// A host with only the new key fails at Open: the store's data key
	// check does not open with it.
	if st, err := Open(ctx, Options{Endpoints: c.endpoints, Prefix: prefix, DataKey: curKey}); !errors.Is(err, ErrUnseal) ||
		!strings.Contains(err.Error(), DataKeyID(oldKey)) {
		if err == nil {
			st.Close()
		}
		t.Fatalf("Open with only the new key, before Reseal: %v, want ErrUnseal naming the old key's id", err)
	}

	if n, err := rotated.Reseal(ctx); err != nil || n != 3 {
		t.Fatalf("Reseal = %d, %v; want 3 items rewritten", n, err)
	}
	if n, err := rotated.Reseal(ctx); err != nil || n != 0 {
		t.Errorf("Reseal again = %d, %v; want 0", n, err)
	}
	newOnly := c.openWithKeys(t, prefix, curKey)
	if err := readAll(newOnly); err != nil {
		t.Errorf("a host with only the new key, after Reseal: %v", err)
	}
	if st, err := Open(ctx, Options{Endpoints: c.endpoints, Prefix: prefix, DataKey: oldKey}); !errors.Is(err, ErrUnseal) {
		if err == nil {
			st.Close()
		}
		t.Errorf("Open with only the old key, after Reseal: %v, want ErrUnseal (the key check is resealed too)", err)
	}
	// A host still running with only the old key fails on what it reads
	// once its watch brings the rewrites.
	waitFor(t, "a host with only the old key to fail with ErrUnseal naming the new key's id", func() bool {
		_, err := before.GetAPIKey(ctx, "openai")
		return errors.Is(err, ErrUnseal) && strings.Contains(err.Error(), DataKeyID(curKey))
	})
	resp, err := raw.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	items, id := 0, keyID(curKey)
	for _, kv := range resp.Kvs {
		if strings.HasPrefix(string(kv.Key), prefix+"locks/") {
			if len(kv.Value) != 0 {
				t.Errorf("lock key %s was given a value", kv.Key)
			}
			continue
		}
		items++
		if len(kv.Value) < 1+keyIDSize || kv.Value[0] != formatV2 || !bytes.Equal(kv.Value[1:1+keyIDSize], id[:]) {
			t.Errorf("%s is not sealed with the new key in format 2", kv.Key)
		}
	}
	if items != 4 || len(resp.Kvs) != 5 {
		t.Errorf("etcd holds %d sealed values and %d keys, want 3 items, the data key check and a lock key", items, len(resp.Kvs))
	}
	// A resealed item copied to another name still fails: the name is
	// bound as before.
	copied := newOnly.apiKeyKey("copy")
	if _, err := raw.Put(ctx, copied, string(resp.Kvs[0].Value)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a resealed value copied to another name to fail with ErrUnseal", func() bool {
		_, err := newOnly.GetAPIKey(ctx, "copy")
		return errors.Is(err, ErrUnseal)
	})
	if _, err := rotated.Reseal(ctx); !errors.Is(err, ErrUnseal) || !strings.Contains(err.Error(), copied) {
		t.Errorf("Reseal over a copied value = %v, want ErrUnseal naming %s", err, copied)
	}
}

// A write that lands between Reseal's read of an item and its rewrite
// wins: the rewrite's transaction compares the revision it read. Stepped
// by hand: the item is read raw (Reseal's read), written by another host,
// then resealed from the stale read.
func TestResealLosesNoConcurrentWrite(t *testing.T) {
	c := newCluster(t)
	ctx := t.Context()
	oldKey, curKey := c.key, newKey(t)
	const prefix = "/race/"
	before := c.openStore(t, prefix)
	rotated := c.openWithKeys(t, prefix, curKey, oldKey)
	raw := c.rawClient(t)
	for i, tc := range []struct {
		desc    string
		write   func(name string) error // the other host's write
		want    credproxy.Secret        // "" for absent
		rewrote bool
	}{
		{"a write by a host with the new key", func(name string) error { return rotated.SaveAPIKey(ctx, name, "sk-fake-after") },
			"sk-fake-after", false},
		{"a write by a host not yet given the new key", func(name string) error { return before.SaveAPIKey(ctx, name, "sk-fake-after") },
			"sk-fake-after", true},
		{"a removal", func(name string) error { return before.RemoveAPIKey(ctx, name) }, "", false},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			name := fmt.Sprintf("k%d", i)
			if err := before.SaveAPIKey(ctx, name, "sk-fake-before"); err != nil {
				t.Fatal(err)
			}
			key := rotated.apiKeyKey(name)
			read, err := raw.Get(ctx, key)
			if err != nil || len(read.Kvs) != 1 {
				t.Fatalf("raw get = %v", err)
			}
			if err := tc.write(name); err != nil {
				t.Fatal(err)
			}
			rewrote, err := rotated.resealItem(ctx, key, read.Kvs[0].Value, read.Kvs[0].ModRevision)
			if err != nil || rewrote != tc.rewrote {
				t.Errorf("resealItem = %v, %v; want %v", rewrote, err, tc.rewrote)
			}
			// etcd itself holds the write's outcome (a removal did not
			// come back), and this store reads it once its watch has
			// brought another host's write.
			after, err := raw.Get(ctx, key)
			if err != nil || (tc.want == "") != (len(after.Kvs) == 0) {
				t.Fatalf("etcd after the write and a reseal: %d keys, %v; want the write's outcome", len(after.Kvs), err)
			}
			waitFor(t, "the write's outcome to be read", func() bool {
				got, err := rotated.GetAPIKey(ctx, name)
				if tc.want == "" {
					return errors.Is(err, credproxy.ErrNotFound)
				}
				return err == nil && got == tc.want
			})
		})
	}
}

// Reseal while two hosts increment tokens sealed with the old key: no
// increment is lost, and every token ends sealed with the new key. The
// interleaving is up to the scheduler; the stepped test above is the
// exact one.
func TestResealDuringWrites(t *testing.T) {
	c := newCluster(t)
	ctx := t.Context()
	oldKey, curKey := c.key, newKey(t)
	const prefix = "/busy/"
	before := c.openStore(t, prefix)
	const items, rounds = 16, 4
	for i := range items {
		if err := before.SaveToken(ctx, "p", fmt.Sprintf("b%d", i), counterToken(t, 0)); err != nil {
			t.Fatal(err)
		}
	}
	hosts := []*EtcdStore{c.openWithKeys(t, prefix, curKey, oldKey), c.openWithKeys(t, prefix, curKey, oldKey)}
	var wg sync.WaitGroup
	for _, st := range hosts {
		wg.Go(func() {
			for range rounds {
				for i := range items {
					if _, err := st.UpdateToken(ctx, "p", fmt.Sprintf("b%d", i), func(tok credproxy.Token, _ bool) (credproxy.Token, error) {
						return counterToken(t, counter(t, tok)+1), nil
					}); err != nil {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	wg.Go(func() {
		if _, err := hosts[0].Reseal(ctx); err != nil {
			t.Errorf("Reseal = %v", err)
		}
	})
	wg.Wait()
	newOnly := c.openWithKeys(t, prefix, curKey)
	for i := range items {
		tok, err := newOnly.GetToken(ctx, "p", fmt.Sprintf("b%d", i))
		if err != nil || counter(t, tok) != 2*rounds {
			t.Errorf("token %d: %d increments, %v; want %d", i, counter(t, tok), err, 2*rounds)
		}
	}
}
