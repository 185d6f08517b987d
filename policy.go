package credproxy

import (
	"context"
	"slices"
)

// Policy decides which requests a server serves.
//
// The server calls Authorize once per request, after the request passed
// its schema and before any store call, and for list operations once more
// per listed item (see [Request]). Calls may be concurrent, from many
// connections, so implementations must be safe for concurrent use. Authorize
// runs on the request path and must not block for long; ctx ends when the
// request's store deadline does.
//
// A nil error allows the request. Any other error denies it with code
// UNAUTHORIZED; the error's text is logged on the host and never sent. The
// peer learns what kind of name was refused when the error wraps
// [ErrProviderDenied], [ErrBucketDenied] or [ErrKeyDenied] (or, from a
// [Grant], [ErrReadOnly]): the response says so in its message and in
// its "denied" member (PROTOCOL.md, "Responses"), and at a [Client],
// errors.Is(err, ErrProviderDenied) holds as it does on the host. Other
// errors reach the peer as "request not allowed", matching [ErrDenied]
// only.
type Policy interface {
	Authorize(ctx context.Context, req *Request) error
}

// PolicyFunc adapts a function to a [Policy].
type PolicyFunc func(ctx context.Context, req *Request) error

// Authorize returns f(ctx, req).
func (f PolicyFunc) Authorize(ctx context.Context, req *Request) error { return f(ctx, req) }

// Request is what a [Policy] decides on. Names have been validated, and the
// bucket is normalised: a request that names none carries [DefaultBucket].
//
// For get_token, save_token, remove_token, get_bucket_stats and
// refresh_token, Provider and Bucket are set. For get_api_key and
// has_api_key, Key is set. For list_buckets, the server first asks with
// Provider set (a denial refuses the whole request), then once per stored
// bucket with Bucket set too, keeping the buckets allowed. For
// list_providers and list_api_keys, the server first asks with no names set,
// then once per stored provider or key name with that name set.
//
// The Policy must not keep req after Authorize returns.
type Request struct {
	Peer     Peer
	Op       Op
	Provider string
	Bucket   string
	Key      string

	// Route is the name of the injection route ([Route]) a request came
	// by: the session's injection front asks for the credential it puts
	// into each request it forwards, as a get_token or get_api_key. It is
	// "" for every request on the credential socket, so that a Policy can
	// let the front use a credential that the sandbox may not read.
	Route string
}

// Errors a [Policy] wraps to tell the peer what was refused. Each matches
// [ErrDenied] with errors.Is, and a [Client]'s error for a request refused
// with it matches it too.
var (
	ErrProviderDenied error = &denial{"provider not allowed", "provider"}
	ErrBucketDenied   error = &denial{"bucket not allowed", "bucket"}
	ErrKeyDenied      error = &denial{"API key not allowed", "api_key"}
)

// denial is a refusal whose kind the peer learns: msg is the response's
// fixed message, and kind the value of its "denied" member.
type denial struct{ msg, kind string }

func (d *denial) Error() string        { return "credproxy: " + d.msg }
func (d *denial) Is(target error) bool { return target == ErrDenied }

// AllowAll returns a Policy that allows every request. It is what a server
// uses when [Options.Policy] is nil.
func AllowAll() Policy { return allowAll{} }

type allowAll struct{}

func (allowAll) Authorize(context.Context, *Request) error { return nil }

// AllowList is a Policy that allows only the listed providers, buckets and
// API key names (PROTOCOL.md, "Requests"). Each set is checked only
// against names of its own kind, and an empty set places no restriction on
// its kind: the zero
// AllowList allows everything. Do not modify an AllowList while a server
// uses it; build a new one and swap it behind your own Policy to change
// scope at run time.
type AllowList struct {
	Providers []string
	Buckets   []string
	Keys      []string
}

// Authorize allows req if each name it carries is in the set of its kind.
func (a *AllowList) Authorize(_ context.Context, req *Request) error {
	switch {
	case req.Provider != "" && !allowed(a.Providers, req.Provider):
		return ErrProviderDenied
	case req.Bucket != "" && !allowed(a.Buckets, req.Bucket):
		return ErrBucketDenied
	case req.Key != "" && !allowed(a.Keys, req.Key):
		return ErrKeyDenied
	}
	return nil
}

func allowed(set []string, name string) bool {
	return len(set) == 0 || slices.Contains(set, name)
}
