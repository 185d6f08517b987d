package credproxy

import (
	"bytes"
	"errors"
	"io"
	"slices"
	"strconv"
	"time"

	"github.com/go-json-experiment/json/jsontext"
)

// ParseToken parses a token from its JSON object form, as it comes from
// outside: from a person, a file, a provider or a sandbox. PROTOCOL.md,
// "Token format", describes the form.
//
// The object must have a non-empty string access_token; refresh_token,
// when present, must be a string or null (null is dropped, as absent).
// expiry is Unix seconds: a number, kept as written, of less than 1e11 (a
// larger one is taken for milliseconds and refused), or null; an RFC 3339
// time is converted to whole Unix seconds, rounded down, and the zero time
// "0001-01-01T00:00:00Z", which Go's oauth2.Token writes for no expiry,
// means absent. expires_in, a lifetime in seconds (more than 0, at most 10
// years), is dropped, as it is relative to a moment that is gone once the
// token is stored: a token without an expiry gets expiry = now +
// expires_in instead. That is the one thing ParseToken reads the clock
// for; given the same input at the same second, it returns the same token.
// Every other member is kept as it is.
//
// Duplicate member names and invalid UTF-8 are rejected. Errors are
// [*TokenError] values; their messages name the member at fault and the
// unit expected, never a value.
func ParseToken(data []byte) (Token, error) { return parseToken(data, true) }

// parseTokenAsIs parses a token that was accepted before: read back from
// a store, or sent by a server. Only the rules of the object's shape
// apply (the access_token, a string refresh_token, a number or null
// expiry), not ParseToken's rules for input, so that a token that an
// earlier version stored (with an expiry in milliseconds, say) still
// reads, and every member stays as written. It never reads the clock.
func parseTokenAsIs(data []byte) (Token, error) { return parseToken(data, false) }

func parseToken(data []byte, input bool) (Token, error) {
	dec := jsontext.NewDecoder(bytes.NewReader(data))
	t, err := readToken(dec, input)
	if err != nil {
		return Token{}, err
	}
	if _, err := dec.ReadToken(); err != io.EOF {
		return Token{}, tokenError("trailing data after the token object")
	}
	return t, nil
}

// readToken reads one token object from dec and checks it, under the
// rules for input (see ParseToken) if input is set.
func readToken(dec *jsontext.Decoder, input bool) (Token, error) {
	if dec.PeekKind() != '{' {
		return Token{}, tokenError("must be a JSON object")
	}
	if _, err := dec.ReadToken(); err != nil {
		return Token{}, jsonTokenError(err)
	}
	var members []member
	var lifetime expiresIn
	for dec.PeekKind() != '}' {
		m, err := readMember(dec)
		if err != nil {
			return Token{}, err
		}
		n, value := m.name, m.value
		switch {
		case n == fieldAccessToken:
			if value.Kind() != '"' || len(value) <= 2 {
				return Token{}, tokenError("access_token must be a non-empty string")
			}
		case n == fieldRefreshToken:
			if value.Kind() == 'n' {
				continue
			}
			if value.Kind() != '"' {
				return Token{}, tokenError("refresh_token must be a string")
			}
		case n == fieldExpiry && input:
			if value, err = inputExpiry(value); err != nil {
				return Token{}, err
			}
			if value == nil { // the zero time: no expiry
				continue
			}
		case n == fieldExpiry:
			if k := value.Kind(); k != '0' && k != 'n' {
				return Token{}, tokenError("expiry must be a number")
			}
		case n == fieldExpiresIn && input:
			if err := lifetime.read(value, len(members)); err != nil {
				return Token{}, err
			}
			continue
		}
		members = append(members, member{name: n, value: value})
	}
	if _, err := dec.ReadToken(); err != nil {
		return Token{}, jsonTokenError(err)
	}
	if lifetime.set {
		members = lifetime.apply(members, time.Now())
	}
	t := newToken(members)
	if _, ok := t.lookup(fieldAccessToken); !ok {
		return Token{}, tokenError("access_token is required")
	}
	return t, nil
}

// readMember reads the next member of the object dec is in, its value
// copied and compact.
func readMember(dec *jsontext.Decoder) (member, error) {
	name, err := dec.ReadToken()
	if err != nil {
		return member{}, jsonTokenError(err)
	}
	n := name.String() // before the next read voids name
	value, err := dec.ReadValue()
	if err != nil {
		return member{}, jsonTokenError(err)
	}
	value = value.Clone()
	if err := value.Compact(); err != nil {
		return member{}, jsonTokenError(err)
	}
	return member{name: n, value: value}, nil
}

const (
	fieldExpiresIn = "expires_in"

	// maxExpirySeconds bounds an expiry in Unix seconds: 1e11 s is in the
	// year 5138, and 1e11 ms was in 1973, so a larger expiry is in
	// milliseconds (or finer) by mistake.
	maxExpirySeconds = 1e11

	// maxExpiresIn bounds expires_in: ten years, in seconds.
	maxExpiresIn = 10 * 365.25 * 24 * 60 * 60
)

// inputExpiry checks the expiry member of a token given as input and
// returns its value as it is stored: a number of Unix seconds or null as
// written, an RFC 3339 time as whole Unix seconds, rounded down, and nil
// for the zero time, which Go's oauth2.Token writes for "no expiry".
func inputExpiry(v jsontext.Value) (jsontext.Value, error) {
	switch v.Kind() {
	case 'n':
		return v, nil
	case '0':
		if secs, _ := strconv.ParseFloat(string(v), 64); secs >= maxExpirySeconds { // +Inf when out of range
			return nil, tokenError("expiry looks like milliseconds since the epoch; give Unix seconds")
		}
		return v, nil
	case '"':
		s, err := jsontext.AppendUnquote(nil, v)
		if err != nil {
			break
		}
		at, err := time.Parse(time.RFC3339, string(s))
		switch {
		case err != nil:
		case at.IsZero():
			return nil, nil
		case at.Unix() >= maxExpirySeconds:
			return nil, tokenError("expiry is too far in the future")
		default:
			return strconv.AppendInt(nil, at.Unix(), 10), nil
		}
	}
	return nil, tokenError("expiry must be Unix seconds (a number) or an RFC 3339 time")
}

// expiresIn is the expires_in member of a token given as input. It is a
// lifetime in seconds from the moment the provider answered, which means
// nothing once the token is stored, so it becomes an expiry.
type expiresIn struct {
	set  bool
	secs float64
	at   int // how many members came before it
}

// read checks the member's value, v; a null one is dropped as absent.
func (e *expiresIn) read(v jsontext.Value, at int) error {
	if v.Kind() == 'n' {
		return nil
	}
	secs, err := strconv.ParseFloat(string(v), 64)
	if v.Kind() != '0' || err != nil || secs <= 0 || secs > maxExpiresIn {
		return tokenError("expires_in must be a positive number of seconds, at most 10 years")
	}
	*e = expiresIn{set: true, secs: secs, at: at}
	return nil
}

// apply returns members with the expiry now + e, in whole seconds rounded
// down, unless they have a numeric expiry already: in place of a null
// expiry, or else where expires_in was.
func (e expiresIn) apply(members []member, now time.Time) []member {
	i := slices.IndexFunc(members, func(m member) bool { return m.name == fieldExpiry })
	if i >= 0 && members[i].value.Kind() == '0' {
		return members
	}
	exp := now.Add(time.Duration(e.secs * float64(time.Second))).Unix()
	m := member{name: fieldExpiry, value: strconv.AppendInt(nil, exp, 10)}
	if i >= 0 {
		members[i] = m
		return members
	}
	return slices.Insert(members, e.at, m)
}

// TokenError reports why a token was rejected. Its message names the
// member at fault and never contains a value.
type TokenError struct {
	reason string
}

// Error returns "credproxy: invalid token: <reason>".
func (e *TokenError) Error() string { return "credproxy: invalid token: " + e.reason }

// Is reports whether target is [ErrInvalidRequest]: a token the server
// rejects is an invalid request.
func (e *TokenError) Is(target error) bool { return target == ErrInvalidRequest }

func tokenError(reason string) error { return &TokenError{reason: reason} }

// jsonTokenError turns a parser error into a TokenError without the
// parser's text, which can quote bytes of the input.
func jsonTokenError(err error) error {
	if errors.Is(err, jsontext.ErrDuplicateName) {
		return tokenError("duplicate member name")
	}
	return tokenError("malformed JSON")
}

// UnmarshalJSON parses data as [ParseToken] does.
func (t *Token) UnmarshalJSON(data []byte) error {
	parsed, err := ParseToken(data)
	if err != nil {
		return err
	}
	*t = parsed
	return nil
}
