package credproxy

import (
	"fmt"
	"maps"
	"slices"
	"strconv"
	"time"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
)

// TokenFields are the values [NewToken] makes a token of. Empty fields
// are left out of the token; AccessToken is required.
type TokenFields struct {
	// AccessToken is the access token; it is required.
	AccessToken Secret

	// RefreshToken is the refresh token; empty means none. Only the host
	// keeps one: a [Client] never sends it, and the server ignores it.
	RefreshToken Secret

	// TokenType is the token type, usually "Bearer"; empty leaves it out.
	TokenType string

	// Expiry is when the access token expires; it is stored in whole Unix
	// seconds, rounded down. The zero time means no expiry.
	Expiry time.Time

	// Scope is the token's scope; empty leaves it out.
	Scope string

	// Extra holds provider-specific members, such as account_id or
	// id_token, by name. Each value is marshalled as JSON (by
	// github.com/go-json-experiment/json, with map keys sorted); a
	// jsontext.Value is taken as it is. The names of the fields above, and
	// expires_in, belong in the fields, and a refresh token under any
	// name, at any depth, belongs in RefreshToken: Extra refuses them.
	Extra map[string]any
}

// Names of the members TokenFields sets, in the order NewToken writes
// them; Extra's members follow, by name.
const (
	fieldTokenType = "token_type"
	fieldScope     = "scope"
)

var tokenFieldNames = [...]string{fieldAccessToken, fieldTokenType, fieldExpiry, fieldRefreshToken, fieldScope}

// NewToken makes a token of f, for Go code that has the values at hand
// rather than JSON. The token has access_token, token_type, expiry,
// refresh_token and scope, each unless empty, and then the members of
// f.Extra sorted by name; it reads back the same through [ParseToken].
// Errors are [*TokenError] values, which name the member at fault and
// never a value.
func NewToken(f TokenFields) (Token, error) {
	members := make([]member, 0, len(tokenFieldNames)+len(f.Extra))
	for _, name := range tokenFieldNames {
		v, ok, err := f.value(name)
		if err != nil {
			return Token{}, err
		}
		if ok {
			members = append(members, member{name: name, value: v})
		}
	}
	for _, name := range slices.Sorted(maps.Keys(f.Extra)) {
		v, err := extraValue(name, f.Extra[name])
		if err != nil {
			return Token{}, err
		}
		members = append(members, member{name: name, value: v})
	}
	t := newToken(members)
	if _, renamed, err := t.NormalizeRefreshToken(); err != nil {
		return Token{}, err
	} else if renamed != "" {
		return Token{}, tokenError(fmt.Sprintf("member %q holds a refresh token; set RefreshToken instead", renamed))
	}
	return t, nil
}

// value returns the JSON value of the member name (one of
// tokenFieldNames) that f sets, and false if f leaves it out.
func (f TokenFields) value(name string) (jsontext.Value, bool, error) {
	switch name {
	case fieldAccessToken:
		if f.AccessToken == "" {
			return nil, false, tokenError("access_token must be a non-empty string")
		}
		return quoteField(name, string(f.AccessToken))
	case fieldTokenType:
		return quoteField(name, f.TokenType)
	case fieldRefreshToken:
		return quoteField(name, string(f.RefreshToken))
	case fieldScope:
		return quoteField(name, f.Scope)
	}
	if f.Expiry.IsZero() {
		return nil, false, nil
	}
	secs := f.Expiry.Unix()
	if secs >= maxExpirySeconds {
		return nil, false, tokenError("expiry is too far in the future")
	}
	return strconv.AppendInt(nil, secs, 10), true, nil
}

// quoteField returns s as a JSON string, and false if it is empty.
func quoteField(name, s string) (jsontext.Value, bool, error) {
	if s == "" {
		return nil, false, nil
	}
	v, err := jsontext.AppendQuote(nil, s)
	if err != nil {
		return nil, false, tokenError(name + " must be valid UTF-8")
	}
	return v, true, nil
}

// extraValue returns the JSON value of the Extra member name.
func extraValue(name string, v any) (jsontext.Value, error) {
	if slices.Contains(tokenFieldNames[:], name) {
		return nil, tokenError(fmt.Sprintf("member %q belongs in its TokenFields field, not in Extra", name))
	}
	if name == fieldExpiresIn {
		return nil, tokenError(fmt.Sprintf("member %q counts from an unknown moment; set Expiry instead", name))
	}
	if _, err := jsontext.AppendQuote(nil, name); err != nil {
		return nil, tokenError("Extra has a member name that is not valid UTF-8")
	}
	// The marshaller's error text can quote the value; it is not used.
	js, err := json.Marshal(v, json.Deterministic(true))
	value := jsontext.Value(js)
	if err != nil || value.Compact() != nil {
		return nil, tokenError(fmt.Sprintf("member %q: a %T does not marshal as JSON", name, v))
	}
	return value, nil
}
