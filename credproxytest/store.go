package credproxytest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/credproxy/credproxy"
)

// TestStore checks that the stores newStore returns keep the contract of
// [credproxy.Store]: absent items, exact round trips (refresh token and
// every member as given), overwrite and removal, listing, the name rule,
// names that must not collide, concurrent writers and cancelled contexts.
//
// Each subtest calls newStore once, with its own t, and wants an empty
// store; the store's resources are newStore's to release (with t.Cleanup).
// Calls with one t may return handles on the same data (see [TestServer]).
func TestStore(t *testing.T, newStore func(t *testing.T) credproxy.Store) {
	ctx := context.Background()
	t.Run("absent items are ErrNotFound", func(t *testing.T) {
		st := newStore(t)
		if _, err := st.GetToken(ctx, "p", "b"); !errors.Is(err, credproxy.ErrNotFound) {
			t.Errorf("GetToken = %v", err)
		}
		if _, err := st.GetAPIKey(ctx, "k"); !errors.Is(err, credproxy.ErrNotFound) {
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
		if got, _ := st.GetToken(ctx, "p", credproxy.DefaultBucket); !got.Equal(mustToken(t, `{"access_token":"two"}`)) {
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
		if _, err := st.GetToken(ctx, "p", ""); !errors.Is(err, credproxy.ErrNotFound) {
			t.Errorf("after remove: %v", err)
		}
		st.RemoveAPIKey(ctx, "k")
		if _, err := st.GetAPIKey(ctx, "k"); !errors.Is(err, credproxy.ErrNotFound) {
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
			if err := st.SaveToken(ctx, bad, "b", mustToken(t, `{"access_token":"t"}`)); !errors.Is(err, credproxy.ErrInvalidRequest) {
				t.Errorf("SaveToken(%q) = %v", bad, err)
			}
			if err := st.SaveAPIKey(ctx, bad, "v"); !errors.Is(err, credproxy.ErrInvalidRequest) {
				t.Errorf("SaveAPIKey(%q) = %v", bad, err)
			}
		}
		if err := st.SaveToken(ctx, "p", "b:c", mustToken(t, `{"access_token":"t"}`)); !errors.Is(err, credproxy.ErrInvalidRequest) {
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
		if err := st.SaveAPIKey(ctx, strings.Repeat("n", 65), "v"); !errors.Is(err, credproxy.ErrInvalidRequest) {
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
		if _, err := st.GetToken(ctx, "p", ""); !errors.Is(err, credproxy.ErrNotFound) {
			t.Errorf("a cancelled save stored the token: %v", err)
		}
	})
}
