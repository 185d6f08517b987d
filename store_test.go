package credproxy

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
)

// testStoreConformance checks the Store contract (see Store) on a fresh
// store from newStore. Every Store implementation runs it.
func testStoreConformance(t *testing.T, newStore func(t *testing.T) Store) {
	ctx := context.Background()
	t.Run("absent items are ErrNotFound", func(t *testing.T) {
		st := newStore(t)
		if _, err := st.GetToken(ctx, "p", "b"); !errors.Is(err, ErrNotFound) {
			t.Errorf("GetToken = %v", err)
		}
		if _, err := st.GetAPIKey(ctx, "k"); !errors.Is(err, ErrNotFound) {
			t.Errorf("GetAPIKey = %v", err)
		}
		if err := st.RemoveToken(ctx, "p", "b"); err != nil {
			t.Errorf("RemoveToken of an absent token = %v", err)
		}
		if err := st.RemoveAPIKey(ctx, "k"); err != nil {
			t.Errorf("RemoveAPIKey of an absent key = %v", err)
		}
	})
	t.Run("tokens round trip exactly, refresh token included", func(t *testing.T) {
		st := newStore(t)
		tok := mustToken(t, anthropicToken)
		if err := st.SaveToken(ctx, "anthropic", "b1", tok); err != nil {
			t.Fatal(err)
		}
		got, err := st.GetToken(ctx, "anthropic", "b1")
		if err != nil || !got.Equal(tok) || string(got.Reveal()) != string(tok.Reveal()) {
			t.Errorf("GetToken = %s, %v; want %s", got.Reveal(), err, tok.Reveal())
		}
	})
	t.Run("overwrite and remove", func(t *testing.T) {
		st := newStore(t)
		st.SaveToken(ctx, "p", "", mustToken(t, `{"access_token":"one","x":1}`))
		st.SaveToken(ctx, "p", "", mustToken(t, `{"access_token":"two"}`))
		if got, _ := st.GetToken(ctx, "p", DefaultBucket); !got.Equal(mustToken(t, `{"access_token":"two"}`)) {
			t.Errorf("after overwrite: %s", got.Reveal())
		}
		st.SaveAPIKey(ctx, "k", "v1")
		st.SaveAPIKey(ctx, "k", "v2")
		if got, _ := st.GetAPIKey(ctx, "k"); got != "v2" {
			t.Error("API key not overwritten")
		}
		if err := st.RemoveToken(ctx, "p", ""); err != nil {
			t.Fatal(err)
		}
		if _, err := st.GetToken(ctx, "p", ""); !errors.Is(err, ErrNotFound) {
			t.Errorf("after remove: %v", err)
		}
		st.RemoveAPIKey(ctx, "k")
		if _, err := st.GetAPIKey(ctx, "k"); !errors.Is(err, ErrNotFound) {
			t.Errorf("key after remove: %v", err)
		}
	})
	t.Run("listing", func(t *testing.T) {
		st := newStore(t)
		for _, pb := range [][2]string{{"b", "x"}, {"a", "y"}, {"b", "w"}, {"a", ""}} {
			st.SaveToken(ctx, pb[0], pb[1], mustToken(t, `{"access_token":"t"}`))
		}
		st.SaveAPIKey(ctx, "k2", "v")
		st.SaveAPIKey(ctx, "k1", "v")
		sorted := func(names []string, err error) []string { slices.Sort(names); return names }
		if got := sorted(st.ListProviders(ctx)); !slices.Equal(got, []string{"a", "b"}) {
			t.Errorf("ListProviders = %v", got)
		}
		if got := sorted(st.ListBuckets(ctx, "b")); !slices.Equal(got, []string{"w", "x"}) {
			t.Errorf("ListBuckets(b) = %v", got)
		}
		if got := sorted(st.ListBuckets(ctx, "a")); !slices.Equal(got, []string{"default", "y"}) {
			t.Errorf("ListBuckets(a) = %v", got)
		}
		if got := sorted(st.ListAPIKeys(ctx)); !slices.Equal(got, []string{"k1", "k2"}) {
			t.Errorf("ListAPIKeys = %v", got)
		}
		st.RemoveToken(ctx, "a", "y")
		st.RemoveToken(ctx, "a", "default")
		if got := sorted(st.ListProviders(ctx)); !slices.Equal(got, []string{"b"}) {
			t.Errorf("ListProviders after removing a's tokens = %v", got)
		}
	})
	t.Run("invalid names are refused", func(t *testing.T) {
		st := newStore(t)
		for _, bad := range []string{"../x", "a/b", "a:b", ""} {
			if err := st.SaveToken(ctx, bad, "b", mustToken(t, `{"access_token":"t"}`)); !errors.Is(err, ErrInvalidRequest) {
				t.Errorf("SaveToken(%q) = %v", bad, err)
			}
			if err := st.SaveAPIKey(ctx, bad, "v"); !errors.Is(err, ErrInvalidRequest) {
				t.Errorf("SaveAPIKey(%q) = %v", bad, err)
			}
		}
		if err := st.SaveToken(ctx, "p", "b:c", mustToken(t, `{"access_token":"t"}`)); !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("SaveToken with bucket b:c = %v", err)
		}
	})
	t.Run("names cannot collide or escape", func(t *testing.T) {
		st := newStore(t)
		long := strings.Repeat("n", 64)
		items := [][2]string{{"a.b", "c"}, {"a", "b.c"}, {"..", "."}, {".", ".."}, {long, long}, {"x@y-z_", "default"}}
		for i, pb := range items {
			if err := st.SaveToken(ctx, pb[0], pb[1], mustToken(t, fmt.Sprintf(`{"access_token":"t%d"}`, i))); err != nil {
				t.Fatalf("SaveToken(%q, %q) = %v", pb[0], pb[1], err)
			}
		}
		if err := st.SaveAPIKey(ctx, "a", "key-a"); err != nil {
			t.Fatal(err)
		}
		for i, pb := range items {
			if got, err := st.GetToken(ctx, pb[0], pb[1]); err != nil || string(got.AccessToken()) != fmt.Sprintf("t%d", i) {
				t.Errorf("GetToken(%q, %q) = %q, %v; want t%d", pb[0], pb[1], string(got.AccessToken()), err, i)
			}
		}
		sorted := func(names []string, err error) []string {
			if err != nil {
				t.Fatal(err)
			}
			slices.Sort(names)
			return names
		}
		if got, want := sorted(st.ListProviders(ctx)), []string{".", "..", "a", "a.b", long, "x@y-z_"}; !slices.Equal(got, want) {
			t.Errorf("ListProviders = %q, want %q", got, want)
		}
		if got := sorted(st.ListBuckets(ctx, "a")); !slices.Equal(got, []string{"b.c"}) {
			t.Errorf("ListBuckets(a) = %q", got)
		}
		if got := sorted(st.ListAPIKeys(ctx)); !slices.Equal(got, []string{"a"}) {
			t.Errorf("ListAPIKeys = %q: a token showed up as a key", got)
		}
		if got, err := st.GetAPIKey(ctx, "a"); err != nil || got != "key-a" {
			t.Errorf("GetAPIKey(a) = %v", err)
		}
		if err := st.SaveAPIKey(ctx, strings.Repeat("n", 65), "v"); !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("SaveAPIKey with a 65-character name = %v", err)
		}
	})
	t.Run("concurrent writers", func(t *testing.T) {
		st := newStore(t)
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Go(func() {
				for j := range 10 {
					st.SaveToken(ctx, fmt.Sprintf("p%d", i), "", mustToken(t, fmt.Sprintf(`{"access_token":"%d-%d"}`, i, j)))
					st.SaveToken(ctx, "shared", "", mustToken(t, fmt.Sprintf(`{"access_token":"%d-%d"}`, i, j)))
					st.GetToken(ctx, "shared", "")
					st.ListProviders(ctx)
				}
			})
		}
		wg.Wait()
		for i := range 8 {
			if got, err := st.GetToken(ctx, fmt.Sprintf("p%d", i), ""); err != nil || string(got.AccessToken()) != fmt.Sprintf("%d-9", i) {
				t.Errorf("p%d = %q, %v", i, string(got.AccessToken()), err)
			}
		}
		if got, err := st.GetToken(ctx, "shared", ""); err != nil || !slices.Contains([]string{"0-9", "1-9", "2-9", "3-9", "4-9", "5-9", "6-9", "7-9"}, string(got.AccessToken())) {
			t.Errorf("shared = %q, %v: not one writer's last token", string(got.AccessToken()), err)
		}
	})
	t.Run("cancelled context", func(t *testing.T) {
		st := newStore(t)
		cancelled, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := st.GetToken(cancelled, "p", ""); !errors.Is(err, context.Canceled) {
			t.Errorf("GetToken = %v", err)
		}
		if err := st.SaveToken(cancelled, "p", "", mustToken(t, `{"access_token":"t"}`)); !errors.Is(err, context.Canceled) {
			t.Errorf("SaveToken = %v", err)
		}
		if _, err := st.GetToken(ctx, "p", ""); !errors.Is(err, ErrNotFound) {
			t.Errorf("a cancelled save stored the token: %v", err)
		}
	})
}

func TestMemoryStoreConformance(t *testing.T) {
	testStoreConformance(t, func(*testing.T) Store { return NewMemoryStore() })
}

// The per-key lock serialises holders of one key, not of different keys,
// and a waiter gives up when its context ends.
func TestKeyedMutex(t *testing.T) {
	var k keyedMutex
	ctx := context.Background()
	unlockA, err := k.lock(ctx, "p:a")
	if err != nil {
		t.Fatal(err)
	}
	unlockB, err := k.lock(ctx, "p:b")
	if err != nil {
		t.Fatalf("another key is blocked: %v", err)
	}
	unlockB()

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := k.lock(cancelled, "p:a"); !errors.Is(err, context.Canceled) {
		t.Errorf("waiting on a held lock with a cancelled context = %v", err)
	}

	got := make(chan struct{})
	go func() {
		unlock, err := k.lock(ctx, "p:a")
		if err == nil {
			close(got)
			unlock()
		}
	}()
	select {
	case <-got:
		t.Fatal("second holder got the lock while the first held it")
	default:
	}
	unlockA()
	<-got
	waitUntil(t, func() bool { k.mu.Lock(); defer k.mu.Unlock(); return len(k.locks) == 0 })
}

// ImportCredentials loads the credentials-file format whole, passthrough
// members included, and its errors locate the fault without quoting any
// value.
func TestImportCredentials(t *testing.T) {
	ctx := context.Background()
	st := NewMemoryStore()
	data := `{"tokens":{"anthropic":{"default":` + anthropicToken + `,"work":{"access_token":"w"}}},"keys":{"openai":"` + fakeAPIKey + `"}}`
	if err := ImportCredentials(ctx, st, []byte(data)); err != nil {
		t.Fatal(err)
	}
	if tok, err := st.GetToken(ctx, "anthropic", ""); err != nil || string(tok.Reveal()) != anthropicToken {
		t.Errorf("imported token %s, %v", tok.Reveal(), err)
	}
	if key, err := st.GetAPIKey(ctx, "openai"); err != nil || key != fakeAPIKey {
		t.Errorf("imported key: %v", err)
	}
	for _, bad := range []struct{ data, want string }{
		{`{"tokens":{"p":{"b":{"refresh_token":"` + fakeRefresh + `"}}}}`, "/tokens/p/b"},
		{`{"tokenz":{"x":"` + fakeRefresh + `"}}`, "unknown member at /tokenz"},
		{`{"keys":{"k":"` + fakeAPIKey + `","k":"` + fakeRefresh + `"}}`, "credproxy: credentials:"},
		{`{"keys":{"bad name":"` + fakeAPIKey + `"}}`, "must match"},
		{`{"keys":{"k":` + fakeAPIKey, "malformed JSON"},
	} {
		err := ImportCredentials(ctx, NewMemoryStore(), []byte(bad.data))
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("ImportCredentials(%.40s...) = %v, want an error containing %q", bad.data, err, bad.want)
			continue
		}
		if strings.Contains(err.Error(), fakeRefresh) || strings.Contains(err.Error(), fakeAPIKey) {
			t.Errorf("error quotes a secret: %v", err)
		}
	}
}
