package etcdstore

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"testing"

	"github.com/credproxy/credproxy"
)

// counterToken is a token whose member n counts updates.
func counterToken(t testing.TB, n int) credproxy.Token {
	return mustToken(t, fmt.Sprintf(`{"access_token":"a%d","refresh_token":"r","n":%d}`, n, n))
}

func counter(t testing.TB, tok credproxy.Token) int {
	t.Helper()
	raw, ok := tok.Field("n")
	if !ok {
		return 0
	}
	n, err := strconv.Atoi(string(raw))
	if err != nil {
		t.Fatalf("n = %s: %v", raw, err)
	}
	return n
}

// Two hosts (two stores on one prefix), eight writers each, every one
// incrementing one token: no increment is lost.
func TestUpdateTokenLosesNoUpdate(t *testing.T) {
	c := newCluster(t)
	hosts := []*EtcdStore{c.openStore(t, "/fleet/"), c.openStore(t, "/fleet/")}
	ctx := t.Context()
	const writers, each = 8, 5
	var wg sync.WaitGroup
	for i := range 2 * writers {
		st := hosts[i%2]
		wg.Go(func() {
			for range each {
				_, err := st.UpdateToken(ctx, "p", "", func(stored credproxy.Token, ok bool) (credproxy.Token, error) {
					return counterToken(t, counter(t, stored)+1), nil
				})
				if err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	// Host 0 sees host 1's last writes once its watch brings them.
	n := 0
	waitFor(t, "every update on host 0", func() bool {
		got, err := hosts[0].GetToken(ctx, "p", "")
		if err != nil {
			t.Fatal(err)
		}
		n = counter(t, got)
		return n == 2*writers*each
	})
	if n != 2*writers*each {
		t.Errorf("n = %d, want %d: updates were lost", n, 2*writers*each)
	}
}

// When another host writes between UpdateToken's read and its write, the
// write is refused and update runs again on the other host's token, so a
// merge keeps what the other host wrote. (Step by step, without timing.)
func TestUpdateTokenRetriesOnConflict(t *testing.T) {
	c := newCluster(t)
	a, b := c.openStore(t, "/fleet/"), c.openStore(t, "/fleet/")
	ctx := t.Context()
	if err := a.SaveToken(ctx, "p", "b", mustToken(t, `{"access_token":"a0","refresh_token":"r0"}`)); err != nil {
		t.Fatal(err)
	}
	var seen []string
	got, err := a.UpdateToken(ctx, "p", "b", func(stored credproxy.Token, ok bool) (credproxy.Token, error) {
		seen = append(seen, string(stored.RefreshToken()))
		if len(seen) == 1 {
			// Host b rotates the refresh token in between.
			if err := b.SaveToken(ctx, "p", "b", mustToken(t, `{"access_token":"b1","refresh_token":"r1"}`)); err != nil {
				t.Fatal(err)
			}
		}
		return stored.Merge(mustToken(t, `{"access_token":"a2"}`)), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"r0", "r1"}; fmt.Sprint(seen) != fmt.Sprint(want) {
		t.Errorf("update saw refresh tokens %v, want %v", seen, want)
	}
	var stored credproxy.Token
	waitFor(t, "a's write to reach b", func() bool {
		stored, err = b.GetToken(ctx, "p", "b")
		if err != nil {
			t.Fatal(err)
		}
		return string(stored.AccessToken()) != "b1"
	})
	if string(stored.AccessToken()) != "a2" || string(stored.RefreshToken()) != "r1" || !stored.Equal(got) {
		t.Errorf("stored %s, returned %s; want access a2 with b's refresh token r1", stored.Reveal(), got.Reveal())
	}
}

// UpdateToken on an absent token sees ok false and creates it, but only if
// it is still absent when written.
func TestUpdateTokenCreates(t *testing.T) {
	c := newCluster(t)
	a, b := c.openStore(t, "/fleet/"), c.openStore(t, "/fleet/")
	ctx := t.Context()
	var oks []bool
	_, err := a.UpdateToken(ctx, "p", "", func(stored credproxy.Token, ok bool) (credproxy.Token, error) {
		oks = append(oks, ok)
		if len(oks) == 1 {
			if err := b.SaveToken(ctx, "p", "", counterToken(t, 10)); err != nil {
				t.Fatal(err)
			}
		}
		return counterToken(t, counter(t, stored)+1), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(oks) != "[false true]" {
		t.Errorf("update saw ok = %v, want [false true]", oks)
	}
	if got, _ := a.GetToken(ctx, "p", ""); counter(t, got) != 11 {
		t.Errorf("n = %d, want 11", counter(t, got))
	}
}

// An error from update is returned as is and nothing is written; a token
// without an access token is refused; endless contention ends in
// ErrConflict.
func TestUpdateTokenFailures(t *testing.T) {
	c := newCluster(t)
	a, b := c.openStore(t, "/fleet/"), c.openStore(t, "/fleet/")
	ctx := t.Context()
	errMine := errors.New("mine")
	if _, err := a.UpdateToken(ctx, "p", "", func(credproxy.Token, bool) (credproxy.Token, error) {
		return counterToken(t, 1), errMine
	}); !errors.Is(err, errMine) {
		t.Errorf("UpdateToken = %v, want update's error", err)
	}
	if _, err := a.GetToken(ctx, "p", ""); !errors.Is(err, credproxy.ErrNotFound) {
		t.Errorf("a failed update wrote: %v", err)
	}
	if _, err := a.UpdateToken(ctx, "p", "", func(credproxy.Token, bool) (credproxy.Token, error) {
		return credproxy.Token{}, nil
	}); !errors.Is(err, credproxy.ErrInvalidRequest) {
		t.Errorf("UpdateToken to the zero token = %v, want ErrInvalidRequest", err)
	}
	calls := 0
	if _, err := a.UpdateToken(ctx, "p", "", func(credproxy.Token, bool) (credproxy.Token, error) {
		calls++
		if err := b.SaveToken(ctx, "p", "", counterToken(t, calls)); err != nil {
			t.Fatal(err)
		}
		return counterToken(t, 0), nil
	}); !errors.Is(err, ErrConflict) || calls != maxUpdateAttempts {
		t.Errorf("UpdateToken under endless contention = %v after %d calls, want ErrConflict after %d", err, calls, maxUpdateAttempts)
	}
	if _, err := a.UpdateToken(ctx, "../x", "", nil); !errors.Is(err, credproxy.ErrInvalidRequest) {
		t.Errorf("UpdateToken with a bad name = %v", err)
	}
}

// Close may be called twice; after it, every method fails with
// net.ErrClosed.
func TestClose(t *testing.T) {
	c := newCluster(t)
	st, err := Open(t.Context(), Options{Endpoints: c.endpoints, DataKey: c.key})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	if _, err := st.GetToken(t.Context(), "p", ""); !errors.Is(err, net.ErrClosed) {
		t.Errorf("GetToken after Close = %v", err)
	}
	if err := st.SaveAPIKey(t.Context(), "k", "v"); !errors.Is(err, net.ErrClosed) {
		t.Errorf("SaveAPIKey after Close = %v", err)
	}
}
