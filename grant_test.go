package credproxy

import (
	"errors"
	"strings"
	"testing"
)

// S6: a Grant allows reads of what it names and nothing else, refuses
// writes unless Write is set, reads an empty bucket list as the default
// bucket only and an empty list of anything else as nothing, and takes
// "*" as the one way to say "every". Providers, buckets and keys are
// separate spaces: naming "openai" as a provider grants no key "openai".
func TestGrant(t *testing.T) {
	anthropic := &Grant{Providers: []string{"anthropic"}}
	for _, tc := range []struct {
		name  string
		grant *Grant
		req   Request
		want  error
	}{
		{"named provider, default bucket", anthropic, Request{Op: OpGetToken, Provider: "anthropic", Bucket: "default"}, nil},
		{"refresh is a read", anthropic, Request{Op: OpRefreshToken, Provider: "anthropic", Bucket: "default"}, nil},
		{"stats are a read", anthropic, Request{Op: OpGetBucketStats, Provider: "anthropic", Bucket: "default"}, nil},
		{"unnamed provider", anthropic, Request{Op: OpGetToken, Provider: "openai", Bucket: "default"}, ErrProviderDenied},
		{"unnamed bucket", anthropic, Request{Op: OpGetToken, Provider: "anthropic", Bucket: "work"}, ErrBucketDenied},
		{"no key named", anthropic, Request{Op: OpGetAPIKey, Key: "anthropic"}, ErrKeyDenied},
		{"has_api_key alike", anthropic, Request{Op: OpHasAPIKey, Key: "openai"}, ErrKeyDenied},
		{"save, read-only", anthropic, Request{Op: OpSaveToken, Provider: "anthropic", Bucket: "default"}, ErrReadOnly},
		{"remove, read-only", anthropic, Request{Op: OpRemoveToken, Provider: "anthropic", Bucket: "default"}, ErrReadOnly},
		{"save, granted", &Grant{Providers: []string{"anthropic"}, Write: true}, Request{Op: OpSaveToken, Provider: "anthropic", Bucket: "default"}, nil},
		{"save outside, granted", &Grant{Providers: []string{"anthropic"}, Write: true}, Request{Op: OpSaveToken, Provider: "openai", Bucket: "default"}, ErrProviderDenied},
		{"zero grant", &Grant{}, Request{Op: OpGetToken, Provider: "anthropic", Bucket: "default"}, ErrProviderDenied},
		{"zero grant, key", &Grant{}, Request{Op: OpGetAPIKey, Key: "openai"}, ErrKeyDenied},
		{"zero grant lists, item by item", &Grant{}, Request{Op: OpListProviders}, nil},
		{"all providers", &Grant{Providers: []string{GrantAll}}, Request{Op: OpGetToken, Provider: "gemini", Bucket: "default"}, nil},
		{"all providers, still the default bucket", &Grant{Providers: []string{GrantAll}}, Request{Op: OpGetToken, Provider: "gemini", Bucket: "work"}, ErrBucketDenied},
		{"all buckets", &Grant{Providers: []string{"gemini"}, Buckets: []string{GrantAll}}, Request{Op: OpGetToken, Provider: "gemini", Bucket: "work"}, nil},
		{"named buckets only", &Grant{Providers: []string{"gemini"}, Buckets: []string{"work"}}, Request{Op: OpGetToken, Provider: "gemini", Bucket: "default"}, ErrBucketDenied},
		{"all keys", &Grant{Keys: []string{GrantAll}}, Request{Op: OpGetAPIKey, Key: "zeta"}, nil},
		{"a key is not a provider", &Grant{Keys: []string{"openai"}}, Request{Op: OpGetToken, Provider: "openai", Bucket: "default"}, ErrProviderDenied},
		{"an excepted key, all keys granted", &Grant{Keys: []string{GrantAll}, ExceptKeys: []string{"client-secret"}}, Request{Op: OpGetAPIKey, Key: "client-secret"}, ErrKeyDenied},
		{"an excepted key, has_api_key", &Grant{Keys: []string{GrantAll}, ExceptKeys: []string{"client-secret"}}, Request{Op: OpHasAPIKey, Key: "client-secret"}, ErrKeyDenied},
		{"an excepted key, listing", &Grant{Keys: []string{GrantAll}, ExceptKeys: []string{"client-secret"}}, Request{Op: OpListAPIKeys, Key: "client-secret"}, ErrKeyDenied},
		{"other keys, all keys granted", &Grant{Keys: []string{GrantAll}, ExceptKeys: []string{"client-secret"}}, Request{Op: OpGetAPIKey, Key: "openai"}, nil},
	} {
		if got := tc.grant.Authorize(t.Context(), &tc.req); got != tc.want {
			t.Errorf("%s: Authorize(%+v) = %v, want %v", tc.name, tc.req, got, tc.want)
		}
	}
	if !errors.Is(ErrReadOnly, ErrDenied) {
		t.Error("ErrReadOnly does not match ErrDenied")
	}
}

// A launcher shows a grant in one line.
func TestGrantStringIsOneLine(t *testing.T) {
	for g, want := range map[*Grant]string{
		{}: "read-only; providers: none; buckets: default; API keys: none",
		{Providers: []string{"anthropic", "gemini"}, Keys: []string{"openai"}}:                              "read-only; providers: anthropic, gemini; buckets: default; API keys: openai",
		{Providers: []string{GrantAll}, Buckets: []string{GrantAll}, Keys: []string{GrantAll}, Write: true}: "read-write; providers: all; buckets: all; API keys: all",
		{Keys: []string{GrantAll}, ExceptKeys: []string{"gh-client-secret"}}:                                "read-only; providers: none; buckets: default; API keys: all but gh-client-secret",
	} {
		if got := g.String(); got != want || strings.Contains(got, "\n") {
			t.Errorf("String() = %q, want %q", got, want)
		}
	}
}

// A Grant given to NewServer as the policy of Serve is checked as
// NewSession checks one: a name no request could carry, a typo most
// likely, is refused rather than granting nothing without a word.
func TestNewServerRefusesAGrantNamingNoPossibleName(t *testing.T) {
	_, err := NewServer(Options{Store: NewMemoryStore(), Policy: &Grant{Keys: []string{"open ai"}}})
	if err == nil || !strings.Contains(err.Error(), `Grant.Keys: "open ai" is not a name`) {
		t.Errorf("NewServer with Grant.Keys \"open ai\": %v", err)
	}
	_, err = NewServer(Options{Store: NewMemoryStore(), Policy: &Grant{Keys: []string{"cs"}, ExceptKeys: []string{"cs"}}})
	if err == nil || !strings.Contains(err.Error(), `API key "cs" is both in Keys and in ExceptKeys`) {
		t.Errorf("NewServer with a key both granted and excepted: %v", err)
	}
	srv, err := NewServer(Options{Store: NewMemoryStore(), Policy: &Grant{Providers: []string{"anthropic"}}})
	if err != nil {
		t.Fatalf("NewServer with a valid grant: %v", err)
	}
	srv.Close()
}
