package credproxy

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"unicode"

	"github.com/go-json-experiment/json/jsontext"
)

// redacted is what secret-carrying values print and log as.
const redacted = "[REDACTED]"

// WithoutRefreshToken returns t as a sandbox may see it: without its
// refresh_token member, and without any member, at any depth, whose name
// spells "refresh token" another way (refreshToken, Refresh-Token, a
// refresh_token nested in another object, ...). Members are removed, not
// emptied, and every other member is kept as it is. A server sends tokens
// only in this form.
func (t Token) WithoutRefreshToken() Token {
	if !t.stripped {
		return t
	}
	members := make([]member, 0, len(t.members))
	for _, m := range t.members {
		if isRefreshTokenName(m.name) {
			continue
		}
		if k := m.value.Kind(); k == '{' || k == '[' {
			m.value = appendWithoutRefreshTokens(nil, m.value)
		}
		members = append(members, m)
	}
	return newToken(members)
}

// isRefreshTokenName reports whether a member name spells "refresh token":
// refresh_token, or any name that is "refreshtoken" once every character
// but letters and digits is dropped and case is folded (refreshToken,
// Refresh-Token, REFRESH.TOKEN, ...). Providers and tools use all of them,
// and a sandbox must get none.
func isRefreshTokenName(name string) bool {
	if name == fieldRefreshToken {
		return true
	}
	if len(name) < len("refreshtoken") {
		return false
	}
	var b strings.Builder
	for _, r := range name {
		if unicode.IsLetter(r) || unicode.IsDigit(r) {
			b.WriteRune(r)
		}
	}
	return strings.EqualFold(b.String(), "refreshtoken")
}

// appendWithoutRefreshTokens appends the JSON value v without the members,
// at any depth, whose names are refresh tokens' (isRefreshTokenName).
// Everything else is copied byte for byte.
func appendWithoutRefreshTokens(dst []byte, v jsontext.Value) []byte {
	if k := v.Kind(); k != '{' && k != '[' {
		return append(dst, v...)
	}
	out, err := appendStripped(dst, jsontext.NewDecoder(bytes.NewReader(v)))
	if err != nil { // cannot happen: v was checked when the token was parsed
		return append(dst, `null`...)
	}
	return out
}

func appendStripped(dst []byte, dec *jsontext.Decoder) ([]byte, error) {
	kind := dec.PeekKind()
	if kind != '{' && kind != '[' {
		v, err := dec.ReadValue()
		return append(dst, v...), err
	}
	if _, err := dec.ReadToken(); err != nil {
		return nil, err
	}
	dst = append(dst, byte(kind))
	first := true
	for dec.PeekKind() != kind+2 { // '}' is '{'+2, ']' is '['+2
		var name jsontext.Value
		if kind == '{' {
			raw, err := dec.ReadValue()
			if err != nil {
				return nil, err
			}
			if n, err := jsontext.AppendUnquote(nil, raw); err == nil && isRefreshTokenName(string(n)) {
				if err := dec.SkipValue(); err != nil {
					return nil, err
				}
				continue
			}
			name = raw
		}
		if !first {
			dst = append(dst, ',')
		}
		first = false
		if name != nil {
			dst = append(append(dst, name...), ':')
		}
		var err error
		if dst, err = appendStripped(dst, dec); err != nil {
			return nil, err
		}
	}
	if _, err := dec.ReadToken(); err != nil {
		return nil, err
	}
	return append(dst, byte(kind+2)), nil
}

// NormalizeRefreshToken prepares a token handed to the host by a person or
// a file (credproxy token set) for storing: a refresh token stored at the
// top level under another spelling, such as refreshToken, is moved to
// refresh_token, the one member a refresher reads, and its old name is
// returned so that the caller can say so. It fails, naming the members,
// when the token holds two refresh tokens, or one nested inside another
// member, where nothing would find it. Refresh tokens under other names
// are never served to a sandbox either way.
func (t Token) NormalizeRefreshToken() (Token, string, error) {
	var found []int
	for i, m := range t.members {
		if isRefreshTokenName(m.name) {
			found = append(found, i)
		} else if path, ok := refreshTokenPath(m.value, m.name); ok {
			return Token{}, "", tokenError(fmt.Sprintf("member %q holds a refresh token at %s; store it as the top-level member refresh_token", m.name, path))
		}
	}
	switch {
	case len(found) > 1:
		return Token{}, "", tokenError(fmt.Sprintf("members %q and %q both hold a refresh token; keep one, named refresh_token",
			t.members[found[0]].name, t.members[found[1]].name))
	case len(found) == 0 || t.members[found[0]].name == fieldRefreshToken:
		return t, "", nil
	}
	i := found[0]
	old := t.members[i].name
	if k := t.members[i].value.Kind(); k != '"' {
		return Token{}, "", tokenError(fmt.Sprintf("member %q holds a refresh token, which must be a string", old))
	}
	members := slices.Clone(t.members)
	members[i].name = fieldRefreshToken
	return newToken(members), old, nil
}

// refreshTokenPath returns the JSON pointer, below the member name, of the
// first member inside v with a refresh token's name.
func refreshTokenPath(v jsontext.Value, name string) (string, bool) {
	if k := v.Kind(); k != '{' && k != '[' {
		return "", false
	}
	dec := jsontext.NewDecoder(bytes.NewReader(v))
	for {
		tok, err := dec.ReadToken()
		if err != nil {
			return "", false
		}
		// After an object's name, the object has read an odd number of
		// names and values.
		if kind, n := dec.StackIndex(dec.StackDepth()); tok.Kind() == '"' && kind == '{' && n%2 == 1 &&
			isRefreshTokenName(tok.String()) {
			return "/" + strings.NewReplacer("~", "~0", "/", "~1").Replace(name) + string(dec.StackPointer()), true
		}
	}
}

// String returns a redaction marker, never the token.
func (t Token) String() string { return redacted }

// GoString returns a redaction marker, so %#v does not print the token.
func (t Token) GoString() string { return "credproxy.Token{" + redacted + "}" }

// Format prints a redaction marker for every verb, so no verb (%v, %+v,
// %#v, %s, %x, %d ...) can reach the token's fields through reflection.
func (t Token) Format(f fmt.State, verb rune) { formatRedacted(f, verb, t.GoString()) }

// LogValue logs a redaction marker, so slog.Any("token", t) is safe.
func (t Token) LogValue() slog.Value { return slog.StringValue(redacted) }

// MarshalJSON fails, so that a token cannot reach a log or a file through
// encoding/json, or slog's JSON handler, by accident: a struct holding a
// Token does not marshal. Use [Token.Reveal] to store a token. (slog's
// JSON handler writes the error text in place of the value.)
func (t Token) MarshalJSON() ([]byte, error) { return nil, errImplicitMarshal }

var errImplicitMarshal = errors.New("credproxy: secrets are not marshalled implicitly, to keep them out of logs; use Token.Reveal or string(secret)")

// String returns a redaction marker, never the secret.
func (s Secret) String() string { return redacted }

// MarshalJSON fails, as [Token.MarshalJSON] does; use string(s) to put the
// secret into JSON on purpose.
func (s Secret) MarshalJSON() ([]byte, error) { return nil, errImplicitMarshal }

// GoString returns a redaction marker, so %#v does not print the secret.
func (s Secret) GoString() string { return "credproxy.Secret(" + redacted + ")" }

// Format prints a redaction marker for every verb.
func (s Secret) Format(f fmt.State, verb rune) { formatRedacted(f, verb, s.GoString()) }

// LogValue logs a redaction marker.
func (s Secret) LogValue() slog.Value { return slog.StringValue(redacted) }

func formatRedacted(f fmt.State, verb rune, goSyntax string) {
	if verb == 'v' && f.Flag('#') {
		fmt.Fprint(f, goSyntax)
		return
	}
	fmt.Fprint(f, redacted)
}

// maxNameLen is the longest provider, bucket or API-key name.
const maxNameLen = 64

// validName reports whether s is a valid provider, bucket or API-key name:
// 1 to 64 characters from [A-Za-z0-9._@-]. Names become store item names,
// lock keys and log fields, so nothing else (no '/', ':', space or control
// character) can pass.
func validName(s string) bool {
	if len(s) == 0 || len(s) > maxNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			c == '.' || c == '_' || c == '@' || c == '-') {
			return false
		}
	}
	return true
}
