package credproxy

import (
	"context"
	"slices"
	"strings"
)

// GrantAll is the name that, in a [Grant]'s lists, stands for every name of
// its kind. No valid provider, bucket or key name contains it.
const GrantAll = "*"

// Grant is the [Policy] of one sandbox: the tokens and API keys it may
// read, and whether it may change tokens. It grants nothing it does not
// name, and nothing on one axis because another axis was named:
//
//   - Providers lists the providers whose tokens the sandbox may use.
//   - Buckets lists the buckets of those providers it may use. Empty
//     means [DefaultBucket] only, the bucket of a request that names none.
//   - Keys lists the API keys it may read. Empty means none.
//   - ExceptKeys lists API keys it may never read, not even through
//     [GrantAll]: keys that hold the host's own secrets, such as an OAuth
//     client secret. Naming one in Keys as well is an error.
//
// [GrantAll] ("*") in a list grants every name of that kind, and is the
// only way to: an empty list never means "all".
//
// A Grant is read-only unless Write is set: get_token, refresh_token,
// get_bucket_stats, get_api_key and has_api_key are allowed for the names
// granted, and save_token and remove_token are refused with "sandbox
// connections cannot modify tokens". Write allows both on the tokens
// granted; how many new tokens a session may create is bounded separately
// ([SessionOptions].MaxNewTokens). Lists answer only granted names.
//
// The zero Grant grants nothing. A Grant is safe for concurrent use as
// long as nobody modifies it while a server uses it.
type Grant struct {
	Providers  []string
	Buckets    []string
	Keys       []string
	ExceptKeys []string
	Write      bool
}

// ErrReadOnly is the denial of save_token and remove_token by a read-only
// [Grant]. It matches [ErrDenied] with errors.Is, on the host and at a
// [Client].
var ErrReadOnly error = &denial{"sandbox connections cannot modify tokens", "read_only"}

// ErrNewTokenLimit is the denial of a save_token that would create a token
// beyond the session's [SessionOptions].MaxNewTokens. It matches
// [ErrDenied] with errors.Is, on the host and at a [Client].
var ErrNewTokenLimit error = &denial{"this session may create no more tokens", "new_token_limit"}

// Authorize allows req if the grant covers the operation and every name
// req carries.
func (g *Grant) Authorize(_ context.Context, req *Request) error {
	switch {
	case (req.Op == OpSaveToken || req.Op == OpRemoveToken) && !g.Write:
		return ErrReadOnly
	case req.Provider != "" && !granted(g.Providers, req.Provider):
		return ErrProviderDenied
	case req.Bucket != "" && !g.grantsBucket(req.Bucket):
		return ErrBucketDenied
	case req.Key != "" && (!granted(g.Keys, req.Key) || slices.Contains(g.ExceptKeys, req.Key)):
		return ErrKeyDenied
	}
	return nil
}

func (g *Grant) grantsBucket(bucket string) bool {
	if len(g.Buckets) == 0 {
		return bucket == DefaultBucket
	}
	return granted(g.Buckets, bucket)
}

func granted(set []string, name string) bool {
	return slices.Contains(set, GrantAll) || slices.Contains(set, name)
}

// String describes the grant in one line, for a launcher to show, such as
// "read-only; providers: anthropic; buckets: default; API keys: none".
func (g *Grant) String() string {
	mode := "read-only"
	if g.Write {
		mode = "read-write"
	}
	buckets := g.Buckets
	if len(buckets) == 0 {
		buckets = []string{DefaultBucket}
	}
	keys := listOrNone(g.Keys)
	if keys != "none" && len(g.ExceptKeys) > 0 {
		keys += " but " + strings.Join(g.ExceptKeys, ", ")
	}
	return mode + "; providers: " + listOrNone(g.Providers) + "; buckets: " + listOrNone(buckets) +
		"; API keys: " + keys
}

func listOrNone(names []string) string {
	switch {
	case len(names) == 0:
		return "none"
	case slices.Contains(names, GrantAll):
		return "all"
	}
	return strings.Join(names, ", ")
}

// check reports a name in the grant that no request could ever carry, a
// typo most likely, which would otherwise grant nothing without a word.
func (g *Grant) check() error {
	for _, list := range []struct {
		field string
		names []string
	}{{"Providers", g.Providers}, {"Buckets", g.Buckets}, {"Keys", g.Keys}, {"ExceptKeys", g.ExceptKeys}} {
		for _, n := range list.names {
			if n != GrantAll && !validName(n) {
				return errorf("Grant.%s: %q is not a name (1 to 64 characters from A-Z a-z 0-9 . _ @ -) nor %q", list.field, n, GrantAll)
			}
		}
	}
	for _, n := range g.ExceptKeys {
		if n == GrantAll {
			return errorf("Grant.ExceptKeys: %q excepts every key; leave Keys empty instead", n)
		}
		if slices.Contains(g.Keys, n) {
			return errorf("Grant: API key %q is both in Keys and in ExceptKeys", n)
		}
	}
	return nil
}
