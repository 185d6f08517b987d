package credproxy

import (
	"context"
	"errors"
	"strings"
	"testing"
)

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
