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

// F6: a refusal carries the kind of what was refused across the socket,
// in the failure's "denied" member, so that errors.Is matches the same
// sentinel at a client as on the host (and ErrDenied still). The message
// stays the fixed text; a refusal of the host's own policy carries no
// kind and matches ErrDenied only.
func TestDenialKindsSurviveTheSocket(t *testing.T) {
	ctx := t.Context()
	st := defaultStore(t)
	_, path := startServer(t, Options{Store: st, Policy: &AllowList{Providers: []string{"anthropic"}, Buckets: []string{"default"}, Keys: []string{"openai"}}})
	listed := newTestClient(t, path, ClientOptions{})
	srv := sessionServer(t, Options{Store: st})
	readOnly := sessionClient(t, startSession(t, srv, SessionOptions{Policy: &Grant{Providers: []string{"anthropic"}}}))
	writer := sessionClient(t, startSession(t, srv, SessionOptions{MaxNewTokens: 1,
		Policy: &Grant{Providers: []string{GrantAll}, Write: true}}))
	custom := sessionClient(t, startSession(t, srv, SessionOptions{Policy: PolicyFunc(func(context.Context, *Request) error {
		return errors.New("fake-policy: not on Tuesdays")
	})}))
	tok := mustToken(t, `{"access_token":"fake-access-new"}`)
	if err := writer.SaveToken(ctx, "fake-provider-1", "", tok); err != nil {
		t.Fatal(err) // the session's one new token
	}
	kinds := []error{ErrProviderDenied, ErrBucketDenied, ErrKeyDenied, ErrReadOnly, ErrNewTokenLimit}
	for _, tc := range []struct {
		name string
		err  error
		want error  // nil: ErrDenied alone
		kind string // RemoteError.Denied
		msg  string
	}{
		{"AllowList, provider", second(listed.GetToken(ctx, "openai", "")), ErrProviderDenied, "provider", "provider not allowed"},
		{"AllowList, bucket", second(listed.GetToken(ctx, "anthropic", "work")), ErrBucketDenied, "bucket", "bucket not allowed"},
		{"AllowList, key", second(listed.GetAPIKey(ctx, "zeta")), ErrKeyDenied, "api_key", "API key not allowed"},
		{"Grant, provider", second(readOnly.ListBuckets(ctx, "openai")), ErrProviderDenied, "provider", "provider not allowed"},
		{"Grant, read-only", readOnly.RemoveToken(ctx, "anthropic", ""), ErrReadOnly, "read_only", "sandbox connections cannot modify tokens"},
		{"Grant, new tokens", writer.SaveToken(ctx, "fake-provider-2", "", tok), ErrNewTokenLimit, "new_token_limit",
			"this session may create no more tokens"},
		{"host's own policy", second(custom.HasAPIKey(ctx, "openai")), nil, "", "request not allowed"},
	} {
		var re *RemoteError
		if !errors.As(tc.err, &re) || re.Code != CodeUnauthorized || re.Message != tc.msg || re.Denied != tc.kind ||
			!errors.Is(tc.err, ErrDenied) {
			t.Errorf("%s: %v (%+v), want UNAUTHORIZED %q, denied %q, matching ErrDenied", tc.name, tc.err, re, tc.msg, tc.kind)
			continue
		}
		for _, kind := range kinds {
			if errors.Is(tc.err, kind) != (kind == tc.want) {
				t.Errorf("%s: errors.Is(err, %v) = %v, want %v", tc.name, kind, !(kind == tc.want), kind == tc.want)
			}
		}
	}
	// On the wire, an extra member a client that does not know it ignores.
	r := dialRaw(t, path)
	r.handshake()
	r.send(`{"v":1,"id":"1","op":"get_token","payload":{"provider":"openai"}}`)
	if got, want := r.recv(), `{"id":"1","ok":false,"code":"UNAUTHORIZED","error":"provider not allowed","denied":"provider"}`; got != want {
		t.Errorf("denial frame %s, want %s", got, want)
	}
}

// A Policy can be tested without a socket: NewPeer makes the Peer the
// kernel would report, and an impossible one is the unknown Peer.
func TestNewPeerBuildsThePeerAPolicySees(t *testing.T) {
	p := NewPeer(1000, 100, 4242)
	uid, ok := p.UID()
	if !ok || uid != 1000 || p.String() != "uid=1000 gid=100 pid=4242" {
		t.Errorf("NewPeer(1000, 100, 4242) = %v (uid %d, %v)", p, uid, ok)
	}
	if _, ok := NewPeer(1000, 100, 0).PID(); ok {
		t.Error("a pid of 0 is reported as known")
	}
	big := int64(1) << 40 // past uint32 where int has 64 bits
	if NewPeer(-1, 0, 1) != (Peer{}) || (int64(int(big)) == big && NewPeer(int(big), 0, 1) != (Peer{})) {
		t.Error("an impossible uid does not give the unknown Peer")
	}
	grant := &Grant{Providers: []string{"anthropic"}}
	if err := grant.Authorize(context.Background(), &Request{Peer: p, Op: OpGetToken, Provider: "openai", Bucket: DefaultBucket}); !errors.Is(err, ErrProviderDenied) {
		t.Errorf("the grant allowed a provider it does not name: %v", err)
	}
}
