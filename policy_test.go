package credproxy

import (
	"context"
	"errors"
	"testing"
)

// R21: the allow-list checks each kind of name against its own set only;
// an empty set places no restriction; denials match ErrDenied and name
// the kind refused.
func TestAllowList(t *testing.T) {
	a := &AllowList{Providers: []string{"anthropic"}, Buckets: []string{"default", "work"}, Keys: []string{"openai"}}
	for _, tc := range []struct {
		name string
		req  Request
		want error
	}{
		{"allowed provider and bucket", Request{Op: OpGetToken, Provider: "anthropic", Bucket: "work"}, nil},
		{"other provider", Request{Op: OpGetToken, Provider: "openai", Bucket: "default"}, ErrProviderDenied},
		{"other bucket", Request{Op: OpGetToken, Provider: "anthropic", Bucket: "personal"}, ErrBucketDenied},
		{"allowed key", Request{Op: OpGetAPIKey, Key: "openai"}, nil},
		{"key named like an allowed provider", Request{Op: OpGetAPIKey, Key: "anthropic"}, ErrKeyDenied},
		{"provider named like an allowed key", Request{Op: OpGetToken, Provider: "openai", Bucket: "default"}, ErrProviderDenied},
		{"list with no names", Request{Op: OpListProviders}, nil},
	} {
		err := a.Authorize(context.Background(), &tc.req)
		if err != tc.want || (err != nil && !errors.Is(err, ErrDenied)) {
			t.Errorf("%s: Authorize = %v, want %v", tc.name, err, tc.want)
		}
	}
	for _, req := range []Request{{Provider: "x", Bucket: "y"}, {Key: "z"}} {
		if err := (&AllowList{}).Authorize(context.Background(), &req); err != nil {
			t.Errorf("zero AllowList denied %+v: %v", req, err)
		}
		if err := AllowAll().Authorize(context.Background(), &req); err != nil {
			t.Errorf("AllowAll denied %+v: %v", req, err)
		}
	}
	onlyKeys := &AllowList{Keys: []string{"k"}}
	if err := onlyKeys.Authorize(context.Background(), &Request{Provider: "any", Bucket: "any"}); err != nil {
		t.Errorf("a key-only list restricted providers: %v", err)
	}
}
