package credproxy

import (
	"testing"
	"time"

	"github.com/go-json-experiment/json/jsontext"
)

// Issue 13, finding 7: a token can be built in Go from values. Members come
// in a fixed order (the named fields, then Extra by name), the expiry in
// whole Unix seconds, and the result reads back the same through
// ParseToken.
func TestNewToken(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   TokenFields
		want string
	}{
		{"access token only", TokenFields{AccessToken: "fake-a"}, `{"access_token":"fake-a"}`},
		{"every field", TokenFields{
			AccessToken: "fake-a", RefreshToken: "fake-r", TokenType: "Bearer", Scope: "chat",
			Expiry: time.Unix(1893553445, 900_000_000).In(time.FixedZone("x", 3600)),
			Extra: map[string]any{
				"account_id": "acct-1",
				"big":        jsontext.Value(`12345678901234567890`),
				"nested":     map[string]any{"b": 1, "a": []int{1}, "html": "<&>"},
				"none":       nil,
				"ok":         true,
			},
		}, `{"access_token":"fake-a","token_type":"Bearer","expiry":1893553445,"refresh_token":"fake-r","scope":"chat",` +
			`"account_id":"acct-1","big":12345678901234567890,"nested":{"a":[1],"b":1,"html":"<&>"},"none":null,"ok":true}`},
		{"expiry in the past", TokenFields{AccessToken: "fake-a", Expiry: time.Unix(1000, 0)}, `{"access_token":"fake-a","expiry":1000}`},
		{"compacted raw value", TokenFields{AccessToken: "fake-a", Extra: map[string]any{"x": jsontext.Value("{ \"k\" : [ 1 , 2 ] }")}},
			`{"access_token":"fake-a","x":{"k":[1,2]}}`},
	} {
		tok, err := NewToken(tc.in)
		if !wantTokenJSON(t, tc.name+": NewToken", tok, err, tc.want) {
			continue
		}
		if back, err := ParseToken(tok.Reveal()); err != nil || !back.Equal(tok) {
			t.Errorf("%s: ParseToken of the result: %s, %v", tc.name, back.Reveal(), err)
		}
	}
	for _, tc := range []struct {
		name string
		in   TokenFields
		msg  string
	}{
		{"zero", TokenFields{}, "access_token must be a non-empty string"},
		{"invalid UTF-8", TokenFields{AccessToken: "fake-\xff"}, "access_token must be valid UTF-8"},
		{"far expiry", TokenFields{AccessToken: "fake-a", Expiry: time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)}, "expiry is too far in the future"},
		{"named field in Extra", TokenFields{AccessToken: "fake-a", Extra: map[string]any{"expiry": 1}}, `member "expiry" belongs in its TokenFields field, not in Extra`},
		{"access token in Extra", TokenFields{AccessToken: "fake-a", Extra: map[string]any{"access_token": "x"}}, `member "access_token" belongs in its TokenFields field, not in Extra`},
		{"expires_in in Extra", TokenFields{AccessToken: "fake-a", Extra: map[string]any{"expires_in": 60}}, `member "expires_in" counts from an unknown moment; set Expiry instead`},
		{"refresh token in Extra", TokenFields{AccessToken: "fake-a", Extra: map[string]any{"refreshToken": "SECRET"}}, `member "refreshToken" holds a refresh token; set RefreshToken instead`},
		{"nested refresh token", TokenFields{AccessToken: "fake-a", Extra: map[string]any{"x": map[string]any{"refresh_token": "SECRET"}}},
			`member "x" holds a refresh token at /x/refresh_token; store it as the top-level member refresh_token`},
		{"unmarshallable", TokenFields{AccessToken: "fake-a", Extra: map[string]any{"c": make(chan int)}}, `member "c": a chan int does not marshal as JSON`},
		{"a secret", TokenFields{AccessToken: "fake-a", Extra: map[string]any{"k": Secret("SECRET")}}, `member "k": a credproxy.Secret does not marshal as JSON`},
		{"bad raw value", TokenFields{AccessToken: "fake-a", Extra: map[string]any{"k": jsontext.Value(`{"SECRET"`)}}, `member "k": a jsontext.Value does not marshal as JSON`},
		{"invalid UTF-8 name", TokenFields{AccessToken: "fake-a", Extra: map[string]any{"\xff": 1}}, "Extra has a member name that is not valid UTF-8"},
	} {
		_, err := NewToken(tc.in)
		wantTokenError(t, tc.name, err, tc.msg)
	}
}
