package credproxytest

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"

	"github.com/credproxy/credproxy"
)

// TestServer checks that a [credproxy.Server] on the stores newStore
// returns serves its [credproxy.Client]s as the protocol says, over real
// Unix sockets: get_token serves every member but the refresh token,
// exactly; save_token merges and keeps the stored refresh token, and
// stores a new token without one; remove_token, the lists and the API-key
// operations; absent and denied items come back as errors matching
// [credproxy.ErrNotFound] and [credproxy.ErrDenied]; a sandbox's
// [credproxy.Grant] scopes reads and lists; concurrent saves lose no
// member; refreshes through a [credproxy.Refresher] call it once for any
// number of concurrent requests, store the rotated refresh token and never
// send it; and two servers on one store refresh once between them when
// the store is a [credproxy.TokenLocker].
//
// Each subtest calls newStore with its own t and wants an empty store,
// except the one for two servers ("hosts"), which calls it twice with the
// same t and wants two handles on the same data, as two hosts sharing the
// store would open (a store that has no such thing may return the same
// value twice). The store's resources are newStore's to release (with
// t.Cleanup).
func TestServer(t *testing.T, newStore func(t *testing.T) credproxy.Store) {
	t.Run("get_token omits the refresh token and keeps every other member exactly", func(t *testing.T) {
		testGetToken(t, newStore)
	})
	t.Run("absent items are ErrNotFound", func(t *testing.T) { testAbsent(t, newStore) })
	t.Run("save_token merges and keeps the stored refresh token", func(t *testing.T) { testSaveMerges(t, newStore) })
	t.Run("save_token of a new token stores it without a refresh token", func(t *testing.T) {
		testSaveNew(t, newStore)
	})
	t.Run("remove_token", func(t *testing.T) { testRemove(t, newStore) })
	t.Run("lists and API keys", func(t *testing.T) { testListsAndKeys(t, newStore) })
	t.Run("a grant scopes reads and lists", func(t *testing.T) { testGrant(t, newStore) })
	t.Run("concurrent saves to one token lose no member", func(t *testing.T) { testConcurrentSaves(t, newStore) })
	testRefresh(t, newStore)
}

func testGetToken(t *testing.T, newStore func(t *testing.T) credproxy.Store) {
	_, path := serve(t, credproxy.Options{Store: filled(t, newStore)})
	r := dialRaw(t, path)
	r.send(`{"v":1,"id":"g","op":"get_token","payload":{"provider":"anthropic"}}`)
	want := `{"id":"g","ok":true,"data":` + anthropicTokenSanitised + `}`
	if got := r.recv(); got != want {
		t.Errorf("get_token response\n got %s\nwant %s", got, want)
	}

	c := client(t, path, credproxy.ClientOptions{})
	tok, err := c.GetToken(t.Context(), "anthropic", "")
	if err != nil {
		t.Fatal(err)
	}
	if string(tok.Reveal()) != anthropicTokenSanitised {
		t.Errorf("client token\n got %s\nwant %s", tok.Reveal(), anthropicTokenSanitised)
	}
	if exp, ok := tok.Expiry(); !ok || exp.Unix() != 9999999999 {
		t.Errorf("Expiry() = %v, %v", exp, ok)
	}
	r.send(`{"v":1,"id":"w","op":"get_token","payload":{"provider":"anthropic","bucket":"work"}}`)
	if got, want := r.recv(), `{"id":"w","ok":true,"data":{"access_token":"fake-work-access"}}`; got != want {
		t.Errorf("get_token of bucket work\n got %s\nwant %s", got, want)
	}
}

func testAbsent(t *testing.T, newStore func(t *testing.T) credproxy.Store) {
	_, path := serve(t, credproxy.Options{Store: filled(t, newStore)})
	c := client(t, path, credproxy.ClientOptions{})
	ctx := t.Context()
	_, err := c.GetToken(ctx, "nobody", "")
	var re *credproxy.RemoteError
	if !errors.Is(err, credproxy.ErrNotFound) || !errors.As(err, &re) || re.Code != credproxy.CodeNotFound || re.Op != credproxy.OpGetToken {
		t.Errorf("GetToken(nobody) = %v, want ErrNotFound as a RemoteError", err)
	}
	if _, err := c.GetToken(ctx, "anthropic", "nobucket"); !errors.Is(err, credproxy.ErrNotFound) {
		t.Errorf("GetToken(anthropic, nobucket) = %v, want ErrNotFound", err)
	}
	if _, err := c.GetAPIKey(ctx, "nokey"); !errors.Is(err, credproxy.ErrNotFound) {
		t.Errorf("GetAPIKey(nokey) = %v, want ErrNotFound", err)
	}
	if _, err := c.GetBucketStats(ctx, "nobody", ""); !errors.Is(err, credproxy.ErrNotFound) {
		t.Errorf("GetBucketStats(nobody) = %v, want ErrNotFound", err)
	}
	if ok, err := c.HasAPIKey(ctx, "nokey"); ok || err != nil {
		t.Errorf("HasAPIKey(nokey) = %v, %v; want false", ok, err)
	}
}

func testSaveMerges(t *testing.T, newStore func(t *testing.T) credproxy.Store) {
	st := filled(t, newStore)
	_, path := serve(t, credproxy.Options{Store: st})
	r := dialRaw(t, path)
	r.send(`{"v":1,"id":"s","op":"save_token","payload":{"provider":"anthropic","token":` +
		`{"access_token":"fake-new-access","refresh_token":"fake-refresh-attacker","expiry":10000000000,"scope":"a b","extra":{"n":1.0}}}}`)
	if got := r.recv(); got != `{"id":"s","ok":true,"data":{}}` {
		t.Fatalf("save_token: %s", got)
	}
	stored, err := st.GetToken(t.Context(), "anthropic", "")
	if err != nil {
		t.Fatal(err)
	}
	want := mustToken(t, `{"access_token":"fake-new-access","refresh_token":"`+fakeRefresh+`","expiry":10000000000,`+
		`"token_type":"Bearer","scope":"a b","account_id":"acct-42","big":12345678901234567890,"ratio":1.50,`+
		`"nested":{"a":[1,2.0,"x"]},"name":"Zoë","extra":{"n":1.0}}`)
	if !stored.Equal(want) {
		t.Errorf("stored token\n got %s\nwant %s", stored.Reveal(), want.Reveal())
	}
}

func testSaveNew(t *testing.T, newStore func(t *testing.T) credproxy.Store) {
	st := filled(t, newStore)
	_, path := serve(t, credproxy.Options{Store: st})
	// Even a client that sends a refresh token (the Client drops it, so
	// go by hand) cannot plant one.
	r := dialRaw(t, path)
	r.send(`{"v":1,"id":"n","op":"save_token","payload":{"provider":"newco","bucket":"b1","token":` +
		`{"access_token":"fake-nc","refresh_token":"fake-refresh-planted","id_token":"j.w.t"}}}`)
	if got := r.recv(); got != `{"id":"n","ok":true,"data":{}}` {
		t.Fatalf("save_token: %s", got)
	}
	stored, err := st.GetToken(t.Context(), "newco", "b1")
	if err != nil {
		t.Fatal(err)
	}
	if !stored.Equal(mustToken(t, `{"access_token":"fake-nc","id_token":"j.w.t"}`)) {
		t.Errorf("stored %s", stored.Reveal())
	}
	c := client(t, path, credproxy.ClientOptions{})
	if err := c.SaveToken(t.Context(), "newco", "", mustToken(t, `{"access_token":"fake-via-client","refresh_token":"fake-refresh-x"}`)); err != nil {
		t.Fatal(err)
	}
	if stored, err := st.GetToken(t.Context(), "newco", credproxy.DefaultBucket); err != nil || stored.RefreshToken() != "" || stored.AccessToken() != "fake-via-client" {
		t.Errorf("client save stored access %q refresh %q (%v)", string(stored.AccessToken()), string(stored.RefreshToken()), err)
	}
}

func testRemove(t *testing.T, newStore func(t *testing.T) credproxy.Store) {
	st := filled(t, newStore)
	_, path := serve(t, credproxy.Options{Store: st})
	c := client(t, path, credproxy.ClientOptions{})
	ctx := t.Context()
	if err := c.RemoveToken(ctx, "anthropic", "work"); err != nil {
		t.Fatal(err)
	}
	if _, err := st.GetToken(ctx, "anthropic", "work"); !errors.Is(err, credproxy.ErrNotFound) {
		t.Errorf("token still stored: %v", err)
	}
	if _, err := c.GetToken(ctx, "anthropic", "work"); !errors.Is(err, credproxy.ErrNotFound) {
		t.Errorf("GetToken after remove = %v, want ErrNotFound", err)
	}
	if err := c.RemoveToken(ctx, "anthropic", "work"); err != nil {
		t.Errorf("second remove: %v", err)
	}
	if buckets, _ := c.ListBuckets(ctx, "anthropic"); !slices.Equal(buckets, []string{"default"}) {
		t.Errorf("buckets after remove: %v", buckets)
	}
}

func testListsAndKeys(t *testing.T, newStore func(t *testing.T) credproxy.Store) {
	_, path := serve(t, credproxy.Options{Store: filled(t, newStore)})
	c := client(t, path, credproxy.ClientOptions{})
	ctx := t.Context()
	if got, err := c.ListProviders(ctx); err != nil || !slices.Equal(got, []string{"anthropic", "gemini", "openai"}) {
		t.Errorf("ListProviders = %v, %v", got, err)
	}
	if got, err := c.ListBuckets(ctx, "anthropic"); err != nil || !slices.Equal(got, []string{"default", "work"}) {
		t.Errorf("ListBuckets(anthropic) = %v, %v", got, err)
	}
	if got, err := c.ListBuckets(ctx, "nobody"); err != nil || got == nil || len(got) != 0 {
		t.Errorf("ListBuckets(nobody) = %#v, %v; want []", got, err)
	}
	if got, err := c.ListAPIKeys(ctx); err != nil || !slices.Equal(got, []string{"anthropic", "openai", "zeta"}) {
		t.Errorf("ListAPIKeys = %v, %v", got, err)
	}
	if got, err := c.GetAPIKey(ctx, "openai"); err != nil || got != fakeAPIKey {
		t.Errorf("GetAPIKey(openai): %v", err) // never print the key
	}
	if ok, err := c.HasAPIKey(ctx, "openai"); !ok || err != nil {
		t.Errorf("HasAPIKey(openai) = %v, %v", ok, err)
	}
	want := credproxy.BucketStats{Bucket: "work"}
	if got, err := c.GetBucketStats(ctx, "anthropic", "work"); err != nil || got != want {
		t.Errorf("GetBucketStats = %+v, %v", got, err)
	}
	if got, err := c.GetBucketStats(ctx, "anthropic", ""); err != nil || got.Bucket != "default" {
		t.Errorf("GetBucketStats(default) = %+v, %v", got, err)
	}
	r := dialRaw(t, path)
	r.send(`{"v":1,"id":"k","op":"get_api_key","payload":{"name":"openai"}}`)
	if got := r.recv(); got != `{"id":"k","ok":true,"data":{"key":"`+fakeAPIKey+`"}}` {
		t.Errorf("get_api_key: %s", got)
	}
	r.send(`{"v":1,"id":"st","op":"get_bucket_stats","payload":{"provider":"openai"}}`)
	if got := r.recv(); got != `{"id":"st","ok":true,"data":{"bucket":"default","requestCount":0,"percentage":0}}` {
		t.Errorf("get_bucket_stats: %s", got)
	}
}

// testGrant runs sessions, each with its own socket and capability token,
// as a sandbox launcher does.
func testGrant(t *testing.T, newStore func(t *testing.T) credproxy.Store) {
	st := newStore(t)
	fill(t, st, map[string]string{
		"anthropic/default": anthropicToken,
		"anthropic/work":    `{"access_token":"fake-work-access","refresh_token":"fake-refresh-work"}`,
		"openai/default":    `{"access_token":"fake-openai-access"}`,
	}, map[string]string{"openai": fakeAPIKey, "zeta": "sk-fake-zeta"})
	srv, err := credproxy.NewServer(credproxy.Options{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	session := func(g *credproxy.Grant) *credproxy.Client {
		sess, err := srv.NewSession(credproxy.SessionOptions{Policy: g, Dir: filepath.Join(socketDir(t), "s")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sess.Close() })
		return client(t, sess.SocketPath(), credproxy.ClientOptions{CapabilityToken: sess.CapabilityToken()})
	}
	ctx := t.Context()
	c := session(&credproxy.Grant{Providers: []string{"anthropic"}})
	if _, err := c.GetToken(ctx, "anthropic", ""); err != nil {
		t.Errorf("the granted token: %v", err)
	}
	second := func(_ any, err error) error { return err }
	for what, err := range map[string]error{
		"another bucket":   second(c.GetToken(ctx, "anthropic", "work")),
		"another provider": second(c.GetToken(ctx, "openai", "")),
		"an API key":       second(c.GetAPIKey(ctx, "openai")),
		"has_api_key":      second(c.HasAPIKey(ctx, "openai")),
		"list_buckets":     second(c.ListBuckets(ctx, "openai")),
		"save_token":       c.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"fake-x"}`)),
		"remove_token":     c.RemoveToken(ctx, "anthropic", ""),
	} {
		if !errors.Is(err, credproxy.ErrDenied) {
			t.Errorf("%s: %v, want a denial", what, err)
		}
	}
	if tok, err := st.GetToken(ctx, "anthropic", ""); err != nil || tok.AccessToken() != fakeAccess {
		t.Errorf("a denied write changed the store: %q, %v", string(tok.AccessToken()), err)
	}
	all := []string{credproxy.GrantAll}
	for _, tc := range []struct {
		grant                    *credproxy.Grant
		providers, buckets, keys []string
	}{
		{&credproxy.Grant{Providers: []string{"anthropic"}}, []string{"anthropic"}, []string{"default"}, []string{}},
		{&credproxy.Grant{}, []string{}, nil, []string{}},
		{&credproxy.Grant{Providers: all, Buckets: []string{"work"}}, []string{"anthropic"}, []string{"work"}, []string{}},
		{&credproxy.Grant{Keys: []string{"zeta"}}, []string{}, nil, []string{"zeta"}},
		{&credproxy.Grant{Providers: all, Buckets: all, Keys: all}, []string{"anthropic", "openai"}, []string{"default", "work"}, []string{"openai", "zeta"}},
	} {
		c := session(tc.grant)
		p, _ := c.ListProviders(ctx)
		b, _ := c.ListBuckets(ctx, "anthropic")
		k, _ := c.ListAPIKeys(ctx)
		if !slices.Equal(p, tc.providers) || !slices.Equal(b, tc.buckets) || !slices.Equal(k, tc.keys) {
			t.Errorf("grant %v: lists %v %v %v, want %v %v %v", tc.grant, p, b, k, tc.providers, tc.buckets, tc.keys)
		}
	}
}

// testConcurrentSaves: each save_token is a read-merge-write of the stored
// token; serialised, each sees the one before, so no member is lost.
func testConcurrentSaves(t *testing.T, newStore func(t *testing.T) credproxy.Store) {
	st := newStore(t)
	fill(t, st, map[string]string{"p/default": `{"access_token":"fake-a0","refresh_token":"` + fakeRefresh + `"}`}, nil)
	_, path := serve(t, credproxy.Options{Store: st, RateLimit: -1})
	const writers = 16
	var wg sync.WaitGroup
	for i := range writers {
		c := client(t, path, credproxy.ClientOptions{})
		wg.Go(func() {
			tok := mustToken(t, fmt.Sprintf(`{"access_token":"fake-a%d","member%d":%d}`, i, i, i))
			if err := c.SaveToken(context.Background(), "p", "", tok); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	stored, err := st.GetToken(t.Context(), "p", "")
	if err != nil {
		t.Fatal(err)
	}
	for i := range writers {
		if v, ok := stored.Field(fmt.Sprintf("member%d", i)); !ok || string(v) != strconv.Itoa(i) {
			t.Errorf("member%d lost: names %v", i, stored.Names())
		}
	}
	if stored.RefreshToken() != fakeRefresh {
		t.Error("stored refresh token lost")
	}
}
