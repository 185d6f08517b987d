package credproxy

import (
	"slices"
	"time"

	"github.com/go-json-experiment/json"
	"golang.org/x/oauth2"
)

// oauth2OriginKey is the key under which [Token.OAuth2] keeps the token it
// converted in the oauth2.Token's extra fields, so that [TokenFromOAuth2]
// can give back every member of it: an oauth2.Token cannot list its extra
// fields. The key is not valid UTF-8, so no member of any token, nor of a
// provider's response, can have it as a name.
const oauth2OriginKey = "\xffcredproxy.Token"

// OAuth2 returns t as an *oauth2.Token, for Go code that uses
// golang.org/x/oauth2: AccessToken, TokenType, RefreshToken (empty if t has
// none, as a [Client]'s tokens never do) and Expiry (zero if t has no
// expiry) come from their members, and every other member is in Extra as
// JSON decodes into an any (a number as a float64, an object as a
// map[string]any). [TokenFromOAuth2] turns the result back into t.
func (t Token) OAuth2() *oauth2.Token {
	o := &oauth2.Token{
		AccessToken:  string(t.AccessToken()),
		TokenType:    t.TokenType(),
		RefreshToken: string(t.RefreshToken()),
	}
	if exp, ok := t.Expiry(); ok {
		o.Expiry = exp
	}
	extra := map[string]any{oauth2OriginKey: t}
	for _, m := range t.members {
		switch m.name {
		case fieldAccessToken, fieldTokenType, fieldRefreshToken, fieldExpiry:
			continue
		}
		var v any
		if err := json.Unmarshal(m.value, &v); err != nil { // a number beyond float64
			v = m.value.Clone()
		}
		extra[m.name] = v
	}
	return o.WithExtra(extra)
}

// TokenFromOAuth2 converts an oauth2.Token, as golang.org/x/oauth2 returns
// it from a token endpoint, to a Token. The token has access_token,
// token_type, expiry, refresh_token, and scope and id_token when they are
// strings among o's extra fields; o's other extra fields cannot be listed,
// so name them in [TokenFields.Extra] and use [NewToken] to keep them.
// An Expiry in the past is converted as it is; a zero Expiry with a
// non-zero ExpiresIn (a lifetime in seconds, at most ten years) gives
// expiry = now + ExpiresIn.
//
// If o came from [Token.OAuth2], the result is that token, every member
// as it was, with o's AccessToken, TokenType, Expiry and RefreshToken in
// place of the originals where they differ.
func TokenFromOAuth2(o *oauth2.Token) (Token, error) {
	if o == nil {
		return Token{}, tokenError("the oauth2.Token is nil")
	}
	if o.AccessToken == "" {
		return Token{}, tokenError("access_token must be a non-empty string")
	}
	f := TokenFields{
		AccessToken:  Secret(o.AccessToken),
		RefreshToken: Secret(o.RefreshToken),
		TokenType:    o.TokenType,
		Expiry:       o.Expiry,
	}
	if f.Expiry.IsZero() && o.ExpiresIn != 0 {
		if o.ExpiresIn < 0 || o.ExpiresIn > maxExpiresIn {
			return Token{}, tokenError("expires_in must be a positive number of seconds, at most 10 years")
		}
		f.Expiry = time.Now().Add(time.Duration(o.ExpiresIn) * time.Second)
	}
	if origin, ok := o.Extra(oauth2OriginKey).(Token); ok {
		return origin.withFields(f)
	}
	if scope, ok := o.Extra(fieldScope).(string); ok {
		f.Scope = scope
	}
	if id, ok := o.Extra("id_token").(string); ok {
		f.Extra = map[string]any{"id_token": id}
	}
	return NewToken(f)
}

// withFields returns t with the access token, token type, expiry and
// refresh token of f where they differ from t's: a member is replaced,
// added, or removed when f's is empty. Other members, and these when they
// do not differ, keep their bytes.
func (t Token) withFields(f TokenFields) (Token, error) {
	exp, _ := t.Expiry()
	differ := map[string]bool{
		fieldAccessToken:  t.AccessToken() != f.AccessToken,
		fieldTokenType:    t.TokenType() != f.TokenType,
		fieldExpiry:       !exp.Equal(f.Expiry),
		fieldRefreshToken: t.RefreshToken() != f.RefreshToken,
	}
	members := slices.Clone(t.members)
	for _, name := range tokenFieldNames {
		if !differ[name] {
			continue
		}
		v, ok, err := f.value(name)
		if err != nil {
			return Token{}, err
		}
		switch i := slices.IndexFunc(members, func(m member) bool { return m.name == name }); {
		case ok && i >= 0:
			members[i].value = v
		case ok:
			members = append(members, member{name: name, value: v})
		case i >= 0:
			members = slices.Delete(members, i, i+1)
		}
	}
	return newToken(members), nil
}
