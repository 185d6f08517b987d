package credproxy

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"

	"github.com/go-json-experiment/json/jsontext"
)

// ImportToken reads a token in the shapes people have on disk and
// converts it to the token format (PROTOCOL.md, "Token format"):
//   - the token format itself, read as [ParseToken] reads it;
//   - the credential files of agent CLIs, which wrap the token in an object
//     of their own, such as {"claudeAiOauth": {...}} (Claude Code) or
//     {"tokens": {...}, ...} (the Codex CLI): the one member that holds an
//     access token is taken;
//   - camelCase members: accessToken, refreshToken, idToken and tokenType
//     are renamed; expiresAt, and expiry_date as Google's libraries write
//     it, become expiry, read as milliseconds since the epoch when they
//     are 1e11 or more (which Unix seconds will not reach until the year
//     5138) and as seconds otherwise.
//
// It returns what it converted, in words for the person who gave the
// token, or "" when the input was in the token format. It refuses,
// naming the members, a token that gives one member under two spellings
// or holds two tokens, and every input the token format refuses; errors
// are [*TokenError] values and never quote a value.
func ImportToken(data []byte) (Token, string, error) {
	members, err := readMembers(data)
	if err != nil {
		return Token{}, "", err
	}
	var notes []string
	if !hasAccessToken(members) {
		inner, name, err := innerToken(members)
		if err != nil {
			return Token{}, "", err
		}
		members = inner
		notes = append(notes, fmt.Sprintf("took the token inside %q", name))
	}
	members, renamed, err := renameMembers(members)
	if err != nil {
		return Token{}, "", err
	}
	notes = append(notes, renamed...)
	var b []byte
	b = append(b, '{')
	for i, m := range members {
		if i > 0 {
			b = append(b, ',')
		}
		b, _ = jsontext.AppendQuote(b, m.name)
		b = append(append(b, ':'), m.value...)
	}
	tok, err := ParseToken(append(b, '}'))
	if err != nil {
		return Token{}, "", err
	}
	return tok, strings.Join(notes, "; "), nil
}

// readMembers reads the members of a JSON object, in order, each value
// compact.
func readMembers(data []byte) ([]member, error) {
	dec := jsontext.NewDecoder(bytes.NewReader(data))
	if dec.PeekKind() != '{' {
		return nil, tokenError("must be a JSON object")
	}
	if _, err := dec.ReadToken(); err != nil {
		return nil, jsonTokenError(err)
	}
	var members []member
	for dec.PeekKind() == '"' {
		m, err := readMember(dec)
		if err != nil {
			return nil, err
		}
		members = append(members, m)
	}
	if tok, err := dec.ReadToken(); err != nil || tok.Kind() != '}' {
		return nil, tokenError("malformed JSON")
	}
	if _, err := dec.ReadToken(); err != io.EOF {
		return nil, tokenError("trailing data after the token object")
	}
	return members, nil
}

func hasAccessToken(members []member) bool {
	for _, m := range members {
		if m.name == fieldAccessToken || m.name == "accessToken" {
			return true
		}
	}
	return false
}

// innerToken returns the members of the one object member that holds an
// access token, and its name.
func innerToken(members []member) ([]member, string, error) {
	var found []member
	var inner []member
	for _, m := range members {
		if m.value.Kind() != '{' {
			continue
		}
		sub, err := readMembers(m.value)
		if err == nil && hasAccessToken(sub) {
			found, inner = append(found, m), sub
		}
	}
	switch len(found) {
	case 0:
		return nil, "", tokenError("access_token is required (or accessToken, or a member holding an object with one)")
	case 1:
		return inner, found[0].name, nil
	}
	return nil, "", tokenError(fmt.Sprintf("members %q and %q both hold a token; give one", found[0].name, found[1].name))
}

// camelNames are the camelCase spellings of the token format's members.
var camelNames = map[string]string{
	"accessToken":  fieldAccessToken,
	"refreshToken": fieldRefreshToken,
	"idToken":      "id_token",
	"tokenType":    "token_type",
	"expiresAt":    fieldExpiry,
	"expiry_date":  fieldExpiry,
}

// renameMembers renames camelCase members, converting expiries in
// milliseconds to seconds, and says what it did.
func renameMembers(members []member) ([]member, []string, error) {
	from := map[string]string{} // format name → the name it came from
	var out []member
	var notes []string
	for _, m := range members {
		name, ok := camelNames[m.name]
		if !ok {
			name = m.name
		}
		if prev, dup := from[name]; dup {
			return nil, nil, tokenError(fmt.Sprintf("members %q and %q both give %s; keep one", prev, m.name, name))
		}
		from[name] = m.name
		if !ok {
			out = append(out, m)
			continue
		}
		value := m.value
		if name == fieldExpiry {
			var note string
			var err error
			if value, note, err = expiryFrom(m.name, value); err != nil {
				return nil, nil, err
			}
			notes = append(notes, note)
		} else {
			notes = append(notes, fmt.Sprintf("renamed %s to %s", m.name, name))
		}
		out = append(out, member{name: name, value: value})
	}
	return out, notes, nil
}

// expiryFrom converts an expiry given as name (expiresAt, expiry_date) to
// Unix seconds.
func expiryFrom(name string, v jsontext.Value) (jsontext.Value, string, error) {
	if v.Kind() != '0' {
		return nil, "", tokenError(fmt.Sprintf("%s must be a number: milliseconds (or seconds) since the epoch", name))
	}
	n, err := strconv.ParseFloat(string(v), 64)
	if err != nil || n < 0 || math.IsInf(n, 0) {
		return nil, "", tokenError(fmt.Sprintf("%s must be a positive number of milliseconds (or seconds) since the epoch", name))
	}
	if n < maxExpirySeconds {
		return v, fmt.Sprintf("took %s as expiry in Unix seconds", name), nil
	}
	if n/1000 >= maxExpirySeconds {
		return nil, "", tokenError(fmt.Sprintf("%s is too far in the future even as milliseconds since the epoch", name))
	}
	secs := int64(n / 1000)
	return jsontext.Value(strconv.AppendInt(nil, secs, 10)), fmt.Sprintf("converted %s from milliseconds to expiry in Unix seconds", name), nil
}
