package credproxy

import (
	"strconv"
	"testing"
	"testing/synctest"
	"time"

	"golang.org/x/oauth2"
)

// Issue 13, finding 7: an oauth2.Token converts to a Token: access token,
// refresh token, type and expiry (in the past too), and scope and id_token
// from its extra fields; with no Expiry, an ExpiresIn counts from now.
func TestTokenFromOAuth2(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		now := time.Now()
		for _, tc := range []struct {
			name string
			in   *oauth2.Token
			want string
		}{
			{"full", (&oauth2.Token{AccessToken: "fake-a", TokenType: "Bearer", RefreshToken: "fake-r", Expiry: time.Unix(1893553445, 5)}).
				WithExtra(map[string]any{"scope": "chat", "id_token": "fake-id", "other": "not carried"}),
				`{"access_token":"fake-a","token_type":"Bearer","expiry":1893553445,"refresh_token":"fake-r","scope":"chat","id_token":"fake-id"}`},
			{"expired", &oauth2.Token{AccessToken: "fake-a", Expiry: time.Unix(1000, 0)}, `{"access_token":"fake-a","expiry":1000}`},
			{"expires_in", &oauth2.Token{AccessToken: "fake-a", ExpiresIn: 3600},
				`{"access_token":"fake-a","expiry":` + strconv.FormatInt(now.Unix()+3600, 10) + `}`},
			{"expiry and expires_in", &oauth2.Token{AccessToken: "fake-a", Expiry: time.Unix(1000, 0), ExpiresIn: -5}, `{"access_token":"fake-a","expiry":1000}`},
			{"scope not a string", (&oauth2.Token{AccessToken: "fake-a"}).WithExtra(map[string]any{"scope": []any{"a"}}), `{"access_token":"fake-a"}`},
		} {
			tok, err := TokenFromOAuth2(tc.in)
			wantTokenJSON(t, tc.name+": TokenFromOAuth2", tok, err, tc.want)
		}
		for _, tc := range []struct {
			name string
			in   *oauth2.Token
			msg  string
		}{
			{"nil", nil, "the oauth2.Token is nil"},
			{"no access token", &oauth2.Token{RefreshToken: "fake-r"}, "access_token must be a non-empty string"},
			{"negative expires_in", &oauth2.Token{AccessToken: "fake-a", ExpiresIn: -1}, "expires_in must be a positive number of seconds, at most 10 years"},
			{"absurd expires_in", &oauth2.Token{AccessToken: "fake-a", ExpiresIn: 1e12}, "expires_in must be a positive number of seconds, at most 10 years"},
		} {
			_, err := TokenFromOAuth2(tc.in)
			wantTokenError(t, tc.name, err, tc.msg)
		}
	})
}

// Issue 13, finding 7: Token.OAuth2 gives Go code an oauth2.Token with the
// token's members (the provider-specific ones in Extra), and
// TokenFromOAuth2 turns it back into the same token, byte for byte, with
// whatever the caller changed of its four fields.
func TestTokenOAuth2RoundTrip(t *testing.T) {
	tok := mustToken(t, anthropicToken)
	o := tok.OAuth2()
	exp, _ := tok.Expiry()
	if o.AccessToken != fakeAccess || o.RefreshToken != fakeRefresh || o.TokenType != "Bearer" || !o.Expiry.Equal(exp) {
		t.Errorf("OAuth2: %q %q %q %v", o.AccessToken, o.RefreshToken, o.TokenType, o.Expiry)
	}
	if o.Extra("account_id") != "acct-42" || o.Extra("big") != 12345678901234567890.0 || o.Extra("scope") != nil || o.Extra("ratio") != 1.5 {
		t.Errorf("OAuth2 extras: account_id %v, big %v, scope %v, ratio %v", o.Extra("account_id"), o.Extra("big"), o.Extra("scope"), o.Extra("ratio"))
	}
	if nested, ok := o.Extra("nested").(map[string]any); !ok || len(nested["a"].([]any)) != 3 {
		t.Errorf("OAuth2 extra nested = %#v", o.Extra("nested"))
	}
	back, err := TokenFromOAuth2(o)
	if err != nil || string(back.Reveal()) != anthropicToken {
		t.Fatalf("round trip: %s, %v; want %s", back.Reveal(), err, anthropicToken)
	}

	o.AccessToken, o.Expiry, o.RefreshToken, o.TokenType = "fake-new", time.Unix(1893553445, 0), "", "bearer"
	changed, err := TokenFromOAuth2(o)
	want := `{"access_token":"fake-new","expiry":1893553445,"token_type":"bearer","scope":null,"account_id":"acct-42",` +
		`"big":12345678901234567890,"ratio":1.50,"nested":{"a":[1,2.0,"x"]},"name":"Zoë"}`
	if err != nil || string(changed.Reveal()) != want {
		t.Errorf("changed fields: %s, %v; want %s", changed.Reveal(), err, want)
	}

	// A client's token has no refresh token; a stored one an earlier
	// version wrote may hold what input now refuses.
	for _, js := range []string{`{"access_token":"fake-a","expiry":1893456000.5}`, oldStoreToken, `{"access_token":"fake-a","token_type":7,"n":1e400}`} {
		tok, err := parseTokenAsIs([]byte(js))
		if err != nil {
			t.Fatal(err)
		}
		o := tok.OAuth2()
		if o.RefreshToken != string(tok.RefreshToken()) {
			t.Errorf("%s: OAuth2 refresh token %q", js, o.RefreshToken)
		}
		if back, err := TokenFromOAuth2(o); err != nil || string(back.Reveal()) != js {
			t.Errorf("round trip of %s: %s, %v", js, back.Reveal(), err)
		}
	}
}
