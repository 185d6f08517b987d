package credproxy

import (
	"crypto/subtle"
	"encoding/json"
	"math"
	"strconv"
	"time"

	"github.com/go-json-experiment/json/jsontext"
	"slices"
)

// Token is an OAuth token as the host stores it: a JSON object with a
// string access_token and any other members, in the form PROTOCOL.md,
// "Token format", describes. The members the library reads are
// refresh_token (string), expiry (number, Unix seconds), token_type and
// scope; every other member, such as account_id or id_token, is kept exactly
// as it arrived (numbers are never rounded through float64), and a member is
// present in the output if and only if it was present in the input.
// [ParseToken] makes a Token of JSON, with an expiry in Unix seconds: it
// converts an RFC 3339 expiry or an expires_in, and refuses an expiry in
// milliseconds. [NewToken] makes one of values, and [TokenFromOAuth2] of
// an oauth2.Token; [Token.OAuth2] converts the other way, and
// [Client.TokenSource] serves a client's tokens as an oauth2.TokenSource.
//
// A Token is immutable: its methods return new tokens and never change the
// receiver, so it is safe to share between goroutines and stores need not
// copy it. The zero Token has no members and no access token.
//
// A Token keeps its secrets out of logs: it formats and logs as a redaction
// marker (see [Token.String]), and json.Marshal refuses it (see
// [Token.MarshalJSON]). [Token.Reveal] gives its JSON, secrets included, to
// code that stores or sends it on purpose.
type Token struct {
	members []member
	// sanitised is the token as a peer may get it (see appendSanitised),
	// rendered once when the token is made: a get_token then copies it
	// instead of quoting every member again.
	sanitised []byte
	// stripped says that sanitised left something out: a member, at any
	// depth, with a refresh token's name.
	stripped bool
}

// newToken makes the token of members, which it owns from then on.
func newToken(members []member) Token {
	t := Token{members: members}
	t.sanitised, t.stripped = t.appendJSON(nil, false)
	return t
}

type member struct {
	name  string
	value jsontext.Value // compact, valid JSON
}

// Names of the token members the library interprets.
const (
	fieldAccessToken  = "access_token"
	fieldRefreshToken = "refresh_token"
	fieldExpiry       = "expiry"
)

// Reveal returns the whole token as a JSON object, secrets included, for
// code that stores or sends it on purpose. Never log what it returns. The
// zero Token reveals as {}.
func (t Token) Reveal() []byte {
	whole, _ := t.appendJSON(nil, true)
	return whole
}

// appendSanitised appends the token as it may be sent to a peer: without
// refresh_token, and without any member, at any depth, whose name is a
// refresh token's under another spelling (see isRefreshTokenName). Every
// path that sends a token calls it; it allocates nothing, where
// WithoutRefreshToken copies.
func (t Token) appendSanitised(dst []byte) []byte {
	if t.sanitised == nil { // the zero Token
		dst, _ = t.appendJSON(dst, false)
		return dst
	}
	return append(dst, t.sanitised...)
}

// appendJSON appends the token object to dst: whole, or sanitised (see
// appendSanitised), reporting whether sanitising left anything out.
// Member names were valid UTF-8 when parsed, so quoting cannot fail.
func (t Token) appendJSON(dst []byte, withRefreshToken bool) (_ []byte, stripped bool) {
	dst = append(dst, '{')
	first := true
	for _, m := range t.members {
		if !withRefreshToken && isRefreshTokenName(m.name) {
			stripped = true
			continue
		}
		if !first {
			dst = append(dst, ',')
		}
		first = false
		dst, _ = jsontext.AppendQuote(dst, m.name)
		dst = append(dst, ':')
		if withRefreshToken {
			dst = append(dst, m.value...)
			continue
		}
		// Only removals change a value, so a shorter copy lost a member.
		before := len(dst)
		dst = appendWithoutRefreshTokens(dst, m.value)
		stripped = stripped || len(dst)-before < len(m.value)
	}
	return append(dst, '}'), stripped
}

func (t Token) lookup(name string) (jsontext.Value, bool) {
	for _, m := range t.members {
		if m.name == name {
			return m.value, true
		}
	}
	return nil, false
}

func (t Token) stringField(name string) string {
	v, ok := t.lookup(name)
	if !ok || v.Kind() != '"' {
		return ""
	}
	s, err := jsontext.AppendUnquote(nil, v)
	if err != nil {
		return ""
	}
	return string(s)
}

// IsZero reports whether t has no members.
func (t Token) IsZero() bool { return len(t.members) == 0 }

// AccessToken returns the access token.
func (t Token) AccessToken() Secret { return Secret(t.stringField(fieldAccessToken)) }

// RefreshToken returns the refresh token, or "" if there is none. Tokens a
// [Client] receives never have one.
func (t Token) RefreshToken() Secret { return Secret(t.stringField(fieldRefreshToken)) }

// TokenType returns the token_type member, or "" if it is absent or not a
// string.
func (t Token) TokenType() string { return t.stringField("token_type") }

// Expiry returns the expiry member as a time, and false if it is absent,
// null or out of range.
func (t Token) Expiry() (time.Time, bool) {
	v, ok := t.lookup(fieldExpiry)
	if !ok || v.Kind() != '0' {
		return time.Time{}, false
	}
	secs, err := strconv.ParseFloat(string(v), 64)
	if err != nil || math.IsInf(secs, 0) || math.Abs(secs) >= 1<<62 {
		return time.Time{}, false
	}
	whole, frac := math.Modf(secs)
	return time.Unix(int64(whole), int64(frac*1e9)), true
}

// Field returns a copy of the raw JSON value of the named member, in its
// compact form, and false if it is absent. Use it for provider-specific
// members; json.Unmarshal decodes it.
func (t Token) Field(name string) (json.RawMessage, bool) {
	v, ok := t.lookup(name)
	return json.RawMessage(v.Clone()), ok
}

// Names returns the names of the token's members in the order they arrived.
func (t Token) Names() []string {
	names := make([]string, len(t.members))
	for i, m := range t.members {
		names[i] = m.name
	}
	return names
}

// Equal reports whether t and u have the same members with the same JSON
// values, compared byte for byte in their compact form, in any order. Values
// are compared in constant time, so the time taken does not reveal how much
// of a secret matched.
func (t Token) Equal(u Token) bool {
	if len(t.members) != len(u.members) {
		return false
	}
	equal := true
	for _, m := range t.members {
		v, ok := u.lookup(m.name)
		equal = ok && subtle.ConstantTimeCompare(v, m.value) == 1 && equal
	}
	return equal
}

// Merge returns t overlaid with newer, member by member: each member of
// newer replaces the member of t with the same name or is added after t's
// members. If newer has no refresh_token, or an empty one, t's refresh token
// is kept. The server merges this way on save_token, so a sandbox can
// update an access token but never drop or replace the host's refresh token.
func (t Token) Merge(newer Token) Token {
	members := make([]member, len(t.members), len(t.members)+len(newer.members))
	copy(members, t.members)
	merged := Token{members: members}
	for _, m := range newer.members {
		if m.name == fieldRefreshToken && string(m.value) == `""` {
			continue
		}
		if i := merged.index(m.name); i >= 0 {
			merged.members[i] = m
		} else {
			merged.members = append(merged.members, m)
		}
	}
	return newToken(merged.members)
}

// fitMerged is stored.Merge(fresh), for a refresh, held to limit bytes of
// JSON: when the merge is larger, it keeps every member of fresh and the
// stored refresh token, then the stored token's other members, smallest
// first, while they fit. It returns the names of the members it left out,
// and ok false if fresh alone does not fit. A peer may pad the stored
// token up to the save_token cap; the provider's next answer must not
// push it past what a frame can carry.
func fitMerged(stored, fresh Token, limit int) (_ Token, dropped []string, ok bool) {
	merged := stored.Merge(fresh)
	if len(merged.Reveal()) <= limit {
		return merged, nil, true
	}
	base := stored.only(fieldRefreshToken).Merge(fresh)
	size := len(base.Reveal())
	if size > limit {
		return Token{}, nil, false
	}
	var rest []member
	for _, m := range stored.members {
		if base.index(m.name) < 0 {
			rest = append(rest, m)
		}
	}
	slices.SortStableFunc(rest, func(a, b member) int { return (len(a.name) + len(a.value)) - (len(b.name) + len(b.value)) })
	members := slices.Clone(base.members)
	for _, m := range rest {
		quoted, _ := jsontext.AppendQuote(nil, m.name)
		n := len(quoted) + len(m.value) + 2 // colon and comma
		if size+n > limit {
			dropped = append(dropped, m.name)
			continue
		}
		members = append(members, m)
		size += n
	}
	return newToken(members), dropped, true
}

// without returns t without its member called name.
func (t Token) without(name string) Token {
	i := t.index(name)
	if i < 0 {
		return t
	}
	return newToken(append(t.members[:i:i], t.members[i+1:]...))
}

// only returns a token of t's member called name, if it has one.
func (t Token) only(name string) Token {
	if i := t.index(name); i >= 0 {
		return newToken([]member{t.members[i]})
	}
	return Token{}
}

func (t Token) index(name string) int {
	for i, m := range t.members {
		if m.name == name {
			return i
		}
	}
	return -1
}
