package credproxy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
)

// laggingStore is a store whose reads may lag its writes, as a store that
// reads from a cache kept by a watch (etcdstore's) does: after freeze,
// GetToken answers from a snapshot while another host's writes reach the
// store underneath. Its UpdateToken works on the current tokens, under a
// mutex, as a compare-and-swap on the item's revision would.
type laggingStore struct {
	*MemoryStore
	mu     sync.Mutex
	frozen map[string]Token // nil: reads are current
}

func (l *laggingStore) freeze(ctx context.Context, provider, bucket string) {
	tok, _ := l.MemoryStore.GetToken(ctx, provider, bucket)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.frozen = map[string]Token{tokenKey(provider, normalBucket(bucket)): tok}
}

func (l *laggingStore) GetToken(ctx context.Context, provider, bucket string) (Token, error) {
	l.mu.Lock()
	tok, ok := l.frozen[tokenKey(provider, normalBucket(bucket))]
	l.mu.Unlock()
	if ok {
		return tok, nil
	}
	return l.MemoryStore.GetToken(ctx, provider, bucket)
}

func (l *laggingStore) UpdateToken(ctx context.Context, provider, bucket string, update func(Token, bool) (Token, error)) (Token, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	cur, err := l.MemoryStore.GetToken(ctx, provider, bucket)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return Token{}, err
	}
	tok, err := update(cur, err == nil)
	if err != nil {
		return Token{}, err
	}
	return tok, l.MemoryStore.SaveToken(ctx, provider, bucket, tok)
}

var _ TokenUpdater = (*laggingStore)(nil)

// A store whose reads lag (a watch cache) and that offers TokenUpdater
// gets save_token's merge done on its current token: the refresh token
// another host rotated in meanwhile is kept, not overwritten with the one
// of the stale read.
func TestSaveTokenMergesWithTheStoresCurrentTokenThroughTokenUpdater(t *testing.T) {
	ctx := t.Context()
	st := &laggingStore{MemoryStore: NewMemoryStore()}
	st.MemoryStore.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"fake-access-0","refresh_token":"fake-refresh-0"}`))
	st.freeze(ctx, "anthropic", "")
	// Another host refreshes: its write reaches the store, not yet the reads.
	st.MemoryStore.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"fake-access-1","refresh_token":"fake-refresh-1"}`))

	_, path := startServer(t, Options{Store: st, Policy: &Grant{Providers: []string{"*"}, Write: true}})
	c := NewClient(path, ClientOptions{})
	defer c.Close()
	if err := c.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"fake-access-2","account_id":"acct-9"}`)); err != nil {
		t.Fatal(err)
	}
	got, _ := st.MemoryStore.GetToken(ctx, "anthropic", "")
	if string(got.RefreshToken()) != "fake-refresh-1" || string(got.AccessToken()) != "fake-access-2" {
		t.Errorf("stored after save_token: %s; want fake-access-2 with the other host's fake-refresh-1", got.Reveal())
	}
}

// A provider's refusal of the refresh token clears only that refresh
// token: if another host stored a new one while the provider answered
// (it took over a lock this host lost), the new one is kept.
func TestRefusedRefreshTokenClearsOnlyItself(t *testing.T) {
	ctx := t.Context()
	st := NewMemoryStore()
	st.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"fake-access-0","refresh_token":"fake-refresh-0","expiry":1}`))
	rotated := mustToken(t, `{"access_token":"fake-access-1","refresh_token":"fake-refresh-1"}`)
	refresher := RefresherFunc(func(ctx context.Context, tok Token) (Token, error) {
		// Meanwhile, another host refreshed and stored its rotated token.
		st.SaveToken(ctx, "anthropic", "", rotated)
		return Token{}, ErrReauthRequired
	})
	_, path := startServer(t, Options{Store: st, Policy: &Grant{Providers: []string{"*"}}, DisableRenewal: true,
		Refreshers: map[string]Refresher{"anthropic": refresher}})
	c := NewClient(path, ClientOptions{})
	defer c.Close()
	if _, err := c.RefreshToken(ctx, "anthropic", ""); !errors.Is(err, ErrReauthRequired) {
		t.Fatalf("RefreshToken = %v, want ErrReauthRequired", err)
	}
	got, _ := st.GetToken(ctx, "anthropic", "")
	if string(got.RefreshToken()) != "fake-refresh-1" {
		t.Errorf("stored after the refusal: %s; want the other host's fake-refresh-1 kept", got.Reveal())
	}
}

// A refreshed token is merged into the token stored when the provider
// answers, not the one read before the call: a member another host wrote
// meanwhile stays.
func TestRefreshedTokenMergesWithTheTokenStoredWhenTheProviderAnswers(t *testing.T) {
	ctx := t.Context()
	st := NewMemoryStore()
	st.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"fake-access-0","refresh_token":"fake-refresh-0","expiry":1}`))
	meanwhile := mustToken(t, `{"access_token":"fake-access-0","refresh_token":"fake-refresh-0","expiry":1,"account_id":"acct-written-meanwhile"}`)
	fresh := mustToken(t, `{"access_token":"fake-access-2","refresh_token":"fake-refresh-2","expires_in":3600}`)
	refresher := RefresherFunc(func(ctx context.Context, tok Token) (Token, error) {
		st.SaveToken(ctx, "anthropic", "", meanwhile)
		return fresh, nil
	})
	_, path := startServer(t, Options{Store: st, Policy: &Grant{Providers: []string{"*"}}, DisableRenewal: true,
		Refreshers: map[string]Refresher{"anthropic": refresher}})
	c := NewClient(path, ClientOptions{})
	defer c.Close()
	if _, err := c.RefreshToken(ctx, "anthropic", ""); err != nil {
		t.Fatal(err)
	}
	got, _ := st.GetToken(ctx, "anthropic", "")
	if string(got.RefreshToken()) != "fake-refresh-2" || !got.Equal(got.Merge(meanwhile.only("account_id"))) {
		t.Errorf("stored after the refresh: %s; want fake-refresh-2 and the account_id written meanwhile", got.Reveal())
	}
}

// A refresh whose lock was taken over while the provider answered (the
// host's lease expired: it was paused or cut off) does not overwrite the
// token the new holder refreshed and stored meanwhile: that one, with its
// rotated refresh token, stays, as README's "Running a fleet" promises
// ("a host that lost its lock while waiting for the provider cannot
// overwrite what another host stored since"), and the stale answer is
// dropped.
func TestStaleRefreshDoesNotOverwriteAnotherHostsRefresh(t *testing.T) {
	ctx := t.Context()
	st := NewMemoryStore()
	st.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"fake-access-0","refresh_token":"fake-refresh-0","expiry":1}`))
	other := mustToken(t, `{"access_token":"fake-access-b","refresh_token":"fake-refresh-b","expiry":4102444800}`)
	refresher := RefresherFunc(func(ctx context.Context, tok Token) (Token, error) {
		// Meanwhile, another host took over the lock, refreshed and stored.
		st.SaveToken(ctx, "anthropic", "", other)
		return mustToken(t, `{"access_token":"fake-access-a","refresh_token":"fake-refresh-a","expires_in":3600}`), nil
	})
	_, path := startServer(t, Options{Store: st, Policy: &Grant{Providers: []string{"*"}}, DisableRenewal: true,
		Refreshers: map[string]Refresher{"anthropic": refresher}})
	c := NewClient(path, ClientOptions{})
	defer c.Close()
	got, err := c.RefreshToken(ctx, "anthropic", "")
	if err != nil {
		t.Fatal(err)
	}
	if string(got.AccessToken()) != "fake-access-b" {
		t.Errorf("refresh_token served %s; want the other host's fake-access-b", string(got.AccessToken()))
	}
	stored, _ := st.GetToken(ctx, "anthropic", "")
	if !stored.Equal(other) {
		t.Errorf("stored after the stale refresh: %s; want the other host's token kept", stored.Reveal())
	}
}

// A refresh that failed for a transient reason is not retried with a
// refresh token that is no longer the stored one: another host refreshed
// meanwhile (this one may have lost its lock while the provider did not
// answer), and sending the used refresh token again would look like
// reuse to a provider that rotates them, which then revokes the login.
// The refresh returns the other host's token instead, after one call.
func TestRefreshIsNotRetriedWithARefreshTokenAnotherHostReplaced(t *testing.T) {
	ctx := t.Context()
	st := NewMemoryStore()
	st.SaveToken(ctx, "anthropic", "", mustToken(t, `{"access_token":"fake-access-0","refresh_token":"fake-refresh-0","expiry":1}`))
	other := mustToken(t, `{"access_token":"fake-access-1","refresh_token":"fake-refresh-1","expires_in":3600}`)
	var calls atomic.Int32
	refresher := RefresherFunc(func(ctx context.Context, tok Token) (Token, error) {
		calls.Add(1)
		// Meanwhile, another host refreshed with fake-refresh-0.
		st.SaveToken(ctx, "anthropic", "", other)
		return Token{}, fmt.Errorf("provider answered 503: %w", ErrTransient)
	})
	_, path := startServer(t, Options{Store: st, Policy: &Grant{Providers: []string{"*"}}, DisableRenewal: true,
		Refreshers: map[string]Refresher{"anthropic": refresher}})
	c := NewClient(path, ClientOptions{})
	defer c.Close()
	got, err := c.RefreshToken(ctx, "anthropic", "")
	if err != nil || string(got.AccessToken()) != "fake-access-1" {
		t.Errorf("RefreshToken = %v, %v; want the other host's fake-access-1", got.AccessToken(), err)
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("provider calls = %d, want 1: a retry sent the replaced refresh token", n)
	}
}
