package credproxy

import (
	"bytes"
	"errors"
	"io"

	"github.com/go-json-experiment/json/jsontext"
)

// ParseToken parses a token from its JSON object form. The object must have
// a non-empty string access_token; refresh_token, when present, must be a
// string or null (null is dropped, as absent); expiry, when present, must be
// a number or null. Duplicate member names and invalid UTF-8 are rejected.
// Error messages name the member at fault, never a value.
func ParseToken(data []byte) (Token, error) {
	dec := jsontext.NewDecoder(bytes.NewReader(data))
	t, err := readToken(dec)
	if err != nil {
		return Token{}, err
	}
	if _, err := dec.ReadToken(); err != io.EOF {
		return Token{}, tokenError("trailing data after the token object")
	}
	return t, nil
}

// readToken reads one token object from dec and checks it.
func readToken(dec *jsontext.Decoder) (Token, error) {
	if dec.PeekKind() != '{' {
		return Token{}, tokenError("must be a JSON object")
	}
	if _, err := dec.ReadToken(); err != nil {
		return Token{}, jsonTokenError(err)
	}
	var members []member
	for dec.PeekKind() != '}' {
		name, err := dec.ReadToken()
		if err != nil {
			return Token{}, jsonTokenError(err)
		}
		n := name.String() // before the next read voids name
		value, err := dec.ReadValue()
		if err != nil {
			return Token{}, jsonTokenError(err)
		}
		value = value.Clone()
		if err := value.Compact(); err != nil {
			return Token{}, jsonTokenError(err)
		}
		switch n {
		case fieldAccessToken:
			if value.Kind() != '"' || len(value) <= 2 {
				return Token{}, tokenError("access_token must be a non-empty string")
			}
		case fieldRefreshToken:
			if value.Kind() == 'n' {
				continue
			}
			if value.Kind() != '"' {
				return Token{}, tokenError("refresh_token must be a string")
			}
		case fieldExpiry:
			if k := value.Kind(); k != '0' && k != 'n' {
				return Token{}, tokenError("expiry must be a number")
			}
		}
		members = append(members, member{name: n, value: value})
	}
	if _, err := dec.ReadToken(); err != nil {
		return Token{}, jsonTokenError(err)
	}
	t := newToken(members)
	if _, ok := t.lookup(fieldAccessToken); !ok {
		return Token{}, tokenError("access_token is required")
	}
	return t, nil
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
