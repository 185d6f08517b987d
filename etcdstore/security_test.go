package etcdstore

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/credproxy/credproxy"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// What etcd holds, dumped as etcdctl get "" --prefix would, has no
// plaintext secret, and no token member either: only item names.
func TestEtcdHoldsNoPlaintext(t *testing.T) {
	c := newCluster(t)
	st := c.newStore(t)
	ctx := t.Context()
	if err := st.SaveToken(ctx, "anthropic", "b1", mustToken(t, anthropicToken)); err != nil {
		t.Fatal(err)
	}
	if err := st.SaveAPIKey(ctx, "openai", fakeAPIKey); err != nil {
		t.Fatal(err)
	}
	if _, err := st.UpdateToken(ctx, "anthropic", "b2", func(credproxy.Token, bool) (credproxy.Token, error) {
		return mustToken(t, anthropicToken), nil
	}); err != nil {
		t.Fatal(err)
	}
	resp, err := c.rawClient(t).Get(ctx, "\x00", clientv3.WithFromKey())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 4 {
		t.Fatalf("etcd holds %d keys, want 3 items and the data key check", len(resp.Kvs))
	}
	secrets := []string{fakeAccess, fakeRefresh, fakeAPIKey, "access_token", "refresh_token", "acct-42", "Bearer", "Zoë"}
	for _, kv := range resp.Kvs {
		for _, s := range secrets {
			if bytes.Contains(kv.Key, []byte(s)) || bytes.Contains(kv.Value, []byte(s)) {
				t.Errorf("etcd item %q holds %q in plaintext", kv.Key, s)
			}
		}
	}
}

// A value copied, by someone with write access to etcd, to another item's
// key fails to open with ErrUnseal, whatever the other name differs in,
// and the error names the key but holds no secret.
func TestCopiedItemFailsToOpen(t *testing.T) {
	c := newCluster(t)
	st := c.newStore(t)
	other := c.newStore(t) // same data key, another prefix
	raw := c.rawClient(t)
	ctx := t.Context()
	if err := st.SaveToken(ctx, "anthropic", "b1", mustToken(t, anthropicToken)); err != nil {
		t.Fatal(err)
	}
	if err := st.SaveAPIKey(ctx, "k1", fakeAPIKey); err != nil {
		t.Fatal(err)
	}
	value := func(key string) string {
		t.Helper()
		resp, err := raw.Get(ctx, key)
		if err != nil || len(resp.Kvs) != 1 {
			t.Fatalf("raw get %s = %v, %v", key, resp, err)
		}
		return string(resp.Kvs[0].Value)
	}
	tokenValue, keyValue := value(st.tokenKey("anthropic", "b1")), value(st.apiKeyKey("k1"))
	copies := []struct {
		name  string
		key   string
		value string
		read  func() error
	}{
		{"token to another bucket", st.tokenKey("anthropic", "b2"), tokenValue,
			func() error { _, err := st.GetToken(ctx, "anthropic", "b2"); return err }},
		{"token to another provider", st.tokenKey("openai", "b1"), tokenValue,
			func() error { _, err := st.GetToken(ctx, "openai", "b1"); return err }},
		{"token to the default bucket", st.tokenKey("anthropic", credproxy.DefaultBucket), tokenValue,
			func() error { _, err := st.GetToken(ctx, "anthropic", ""); return err }},
		{"API key to another name", st.apiKeyKey("k2"), keyValue,
			func() error { _, err := st.GetAPIKey(ctx, "k2"); return err }},
		{"token to an API key", st.apiKeyKey("k3"), tokenValue,
			func() error { _, err := st.GetAPIKey(ctx, "k3"); return err }},
		{"API key to a token", st.tokenKey("p", "b"), keyValue,
			func() error { _, err := st.GetToken(ctx, "p", "b"); return err }},
		{"token to another prefix", other.tokenKey("anthropic", "b1"), tokenValue,
			func() error { _, err := other.GetToken(ctx, "anthropic", "b1"); return err }},
		{"token over a token, in UpdateToken", st.tokenKey("anthropic", "b4"), tokenValue,
			func() error {
				_, err := st.UpdateToken(ctx, "anthropic", "b4", func(tok credproxy.Token, _ bool) (credproxy.Token, error) { return tok, nil })
				return err
			}},
	}
	for _, cp := range copies {
		t.Run(cp.name, func(t *testing.T) {
			if _, err := raw.Put(ctx, cp.key, cp.value); err != nil {
				t.Fatal(err)
			}
			// The copy is another writer's change: the store sees it
			// once its watch brings it.
			var err error
			waitFor(t, "the copy to reach the store", func() bool {
				err = cp.read()
				return !errors.Is(err, credproxy.ErrNotFound)
			})
			if !errors.Is(err, ErrUnseal) {
				t.Fatalf("read of a copied item = %v, want ErrUnseal", err)
			}
			if !strings.Contains(err.Error(), cp.key) {
				t.Errorf("error %q does not name the key %s", err, cp.key)
			}
			for _, s := range []string{fakeAccess, fakeRefresh, fakeAPIKey} {
				if strings.Contains(err.Error(), s) {
					t.Errorf("error %q holds a secret", err)
				}
			}
		})
	}
	// The originals still open.
	if got, err := st.GetToken(ctx, "anthropic", "b1"); err != nil || string(got.RefreshToken()) != fakeRefresh {
		t.Errorf("original token = %v", err)
	}
}

// A store opened with another data key fails at Open, naming its key's
// id and the one the store was sealed with, and never the keys: it cannot
// read the items, and must not write items the fleet cannot open. So does
// one opened on a store whose data key check is gone, when none of the
// items opens with its key.
func TestWrongDataKey(t *testing.T) {
	c := newCluster(t)
	st := c.openStore(t, "/shared/")
	ctx := t.Context()
	if err := st.SaveAPIKey(ctx, "k", fakeAPIKey); err != nil {
		t.Fatal(err)
	}
	wrongKey := bytes.Repeat([]byte{7}, DataKeySize)
	open := func() error {
		wrong, err := Open(ctx, Options{Endpoints: c.endpoints, Prefix: "/shared/", DataKey: wrongKey})
		if err == nil {
			wrong.Close()
		}
		return err
	}
	err := open()
	if !errors.Is(err, ErrUnseal) || !strings.Contains(err.Error(), DataKeyID(wrongKey)) || !strings.Contains(err.Error(), DataKeyID(c.key)) {
		t.Errorf("Open with the wrong data key = %v, want ErrUnseal naming both key ids", err)
	}
	if err != nil && (strings.Contains(err.Error(), fmt.Sprintf("%x", wrongKey)) || strings.Contains(err.Error(), fmt.Sprintf("%x", c.key))) {
		t.Errorf("Open's error holds a data key: %v", err)
	}
	if _, err := c.rawClient(t).Delete(ctx, st.keyCheckKey()); err != nil {
		t.Fatal(err)
	}
	if err := open(); !errors.Is(err, ErrUnseal) {
		t.Errorf("Open with the wrong data key of a store without its check = %v, want ErrUnseal", err)
	}
	// The right key recreates the check.
	c.openStore(t, "/shared/")
	if err := open(); !errors.Is(err, ErrUnseal) {
		t.Errorf("Open with the wrong data key once the check is back = %v, want ErrUnseal", err)
	}
}

// Sealing cannot tell an item's older value from its current one: someone
// with write access to etcd (or a backup restored) can put back a value
// the same item held before, and it opens, since it was sealed for that
// very key with the same data key. The package doc says so (rollback);
// this test pins the limit down so that a change to it is noticed.
func TestReplayedOldValueOfTheSameItemOpens(t *testing.T) {
	c := newCluster(t)
	st := c.newStore(t)
	raw := c.rawClient(t)
	ctx := t.Context()
	key := st.tokenKey("anthropic", "b1")
	if err := st.SaveToken(ctx, "anthropic", "b1", mustToken(t, anthropicToken)); err != nil {
		t.Fatal(err)
	}
	old, err := raw.Get(ctx, key)
	if err != nil || len(old.Kvs) != 1 {
		t.Fatalf("raw get: %v, %v", old, err)
	}
	rotated := mustToken(t, `{"access_token":"fake-access-rotated","refresh_token":"fake-refresh-rotated"}`)
	if err := st.SaveToken(ctx, "anthropic", "b1", rotated); err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Put(ctx, key, string(old.Kvs[0].Value)); err != nil {
		t.Fatal(err)
	}
	other := c.openStore(t, st.prefix) // another host
	got, err := other.GetToken(ctx, "anthropic", "b1")
	if err != nil || string(got.RefreshToken()) != fakeRefresh {
		t.Errorf("the replayed old value: %v, refresh token %q; want it opened as the old token (rollback is not detected)", err, string(got.RefreshToken()))
	}
}
