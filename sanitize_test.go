package credproxy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

func tokenJSON(t *testing.T, tok Token) string {
	t.Helper()
	return string(tok.Reveal())
}

// R8.1, R10: sanitising removes the refresh_token key and keeps every
// other member, in order, exactly; the input token is unchanged.
func TestWithoutRefreshToken(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`{"access_token":"a","refresh_token":"r","expiry":1}`, `{"access_token":"a","expiry":1}`},
		{`{"refresh_token":"r","access_token":"a"}`, `{"access_token":"a"}`},
		{`{"access_token":"a"}`, `{"access_token":"a"}`},
		{`{"access_token":"a","refresh_token":null}`, `{"access_token":"a"}`},
		{`{"access_token":"a","refresh_token":""}`, `{"access_token":"a"}`},
		// S8: refresh tokens under other names, at any depth, go too.
		{`{"access_token":"a","nested":{"refresh_token":"r","keep":1}}`, `{"access_token":"a","nested":{"keep":1}}`},
		{`{"access_token":"a","refreshToken":"r","Refresh-Token":"r","REFRESH.TOKEN":"r","refresh_tokens":"kept"}`,
			`{"access_token":"a","refresh_tokens":"kept"}`},
		{`{"access_token":"a","list":[{"refresh\u005ftoken":"r"},1,{"x":{"refreshToken":"r"}}]}`,
			`{"access_token":"a","list":[{},1,{"x":{}}]}`},
		{"{\"access_token\":\"a\",\"refresh_to\u212Aen\":\"r\"}", `{"access_token":"a"}`}, // KELVIN SIGN folds to k
		{`{"access_token":"a", "n" : 1.50e+3 ,"s":"\u00e9"}`, `{"access_token":"a","n":1.50e+3,"s":"\u00e9"}`},
	} {
		in := mustToken(t, tc.in)
		before := tokenJSON(t, in)
		if got := tokenJSON(t, in.WithoutRefreshToken()); got != tc.want {
			t.Errorf("WithoutRefreshToken(%s) = %s, want %s", tc.in, got, tc.want)
		}
		if after := tokenJSON(t, in); after != before {
			t.Errorf("input changed from %s to %s", before, after)
		}
	}
}

// R12: merge starts from the stored token and overwrites member by member;
// a new refresh_token that is absent or "" keeps the stored one.
func TestMerge(t *testing.T) {
	for _, tc := range []struct{ name, stored, newer, want string }{
		{"overwrite and keep refresh",
			`{"access_token":"old","refresh_token":"r","expiry":1}`, `{"access_token":"new","expiry":2}`,
			`{"access_token":"new","refresh_token":"r","expiry":2}`},
		{"new members appended, stored ones kept",
			`{"access_token":"old","account_id":"acct"}`, `{"access_token":"new","id_token":"j"}`,
			`{"access_token":"new","account_id":"acct","id_token":"j"}`},
		{"empty refresh keeps stored",
			`{"access_token":"old","refresh_token":"r"}`, `{"access_token":"new","refresh_token":""}`,
			`{"access_token":"new","refresh_token":"r"}`},
		{"null refresh keeps stored",
			`{"access_token":"old","refresh_token":"r"}`, `{"access_token":"new","refresh_token":null}`,
			`{"access_token":"new","refresh_token":"r"}`},
		{"rotated refresh replaces stored",
			`{"access_token":"old","refresh_token":"r1"}`, `{"access_token":"new","refresh_token":"r2"}`,
			`{"access_token":"new","refresh_token":"r2"}`},
		{"null overwrites a value",
			`{"access_token":"old","scope":"a"}`, `{"access_token":"new","scope":null}`,
			`{"access_token":"new","scope":null}`},
		{"nothing stored to keep",
			`{"access_token":"old"}`, `{"access_token":"new","refresh_token":""}`,
			`{"access_token":"new"}`},
		{"numbers kept as written",
			`{"access_token":"old","big":12345678901234567890}`, `{"access_token":"new","f":1.0}`,
			`{"access_token":"new","big":12345678901234567890,"f":1.0}`},
	} {
		stored := mustToken(t, tc.stored)
		before := tokenJSON(t, stored)
		if got := tokenJSON(t, stored.Merge(mustToken(t, tc.newer))); got != tc.want {
			t.Errorf("%s: Merge = %s, want %s", tc.name, got, tc.want)
		}
		if after := tokenJSON(t, stored); after != before {
			t.Errorf("%s: stored token changed to %s", tc.name, after)
		}
	}
}

// ParseToken accepts any object with a non-empty string access_token and
// rejects the rest with messages that name the member, never a value.
func TestParseToken(t *testing.T) {
	for _, ok := range []string{
		`{"access_token":"a"}`,
		`{"access_token":"a","refresh_token":"r","expiry":1.5,"token_type":"Bearer","scope":null,"resource_url":"u"}`,
		`{"access_token":"a","expiry":null,"x":[{"y":{}}]}`,
		` {"access_token":"a"} `,
	} {
		if _, err := ParseToken([]byte(ok)); err != nil {
			t.Errorf("ParseToken(%s): %v", ok, err)
		}
	}
	secret := "SECRET-" + fakeRefresh
	for _, tc := range []struct{ in, msg string }{
		{`[]`, "must be a JSON object"},
		{`"` + secret + `"`, "must be a JSON object"},
		{`{}`, "access_token is required"},
		{`{"access_token":""}`, "access_token must be a non-empty string"},
		{`{"access_token":["` + secret + `"]}`, "access_token must be a non-empty string"},
		{`{"access_token":"a","refresh_token":{"x":"` + secret + `"}}`, "refresh_token must be a string"},
		{`{"access_token":"a","expiry":"` + secret + `"}`, "expiry must be Unix seconds (a number) or an RFC 3339 time"},
		{`{"access_token":"a","access_token":"b"}`, "duplicate member name"},
		{`{"access_token":"a","x":{"y":1,"y":2}}`, "duplicate member name"},
		{`{"access_token":"` + secret + `"`, "malformed JSON"},
		{"{\"access_token\":\"\xff" + secret + "\"}", "malformed JSON"},
		{`{"access_token":"a"}{}`, "trailing data after the token object"},
	} {
		_, err := ParseToken([]byte(tc.in))
		var terr *TokenError
		if !errors.As(err, &terr) || err.Error() != "credproxy: invalid token: "+tc.msg || !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("ParseToken(%.40s) = %v, want %q", tc.in, err, tc.msg)
		}
		if strings.Contains(fmt.Sprint(err), "SECRET") {
			t.Errorf("error quotes the input: %v", err)
		}
	}
}

// Token accessors read the members the library interprets.
func TestTokenAccessors(t *testing.T) {
	tok := mustToken(t, `{"access_token":"a\"b","refresh_token":"r","expiry":1700000000.25,"token_type":"Bearer","x":{"k":1}}`)
	if tok.AccessToken() != `a"b` || tok.RefreshToken() != "r" || tok.TokenType() != "Bearer" {
		t.Errorf("accessors: %q %q %q", string(tok.AccessToken()), string(tok.RefreshToken()), tok.TokenType())
	}
	if exp, ok := tok.Expiry(); !ok || exp.Unix() != 1700000000 || exp.Nanosecond() != 250000000 {
		t.Errorf("Expiry = %v, %v", exp, ok)
	}
	if v, ok := tok.Field("x"); !ok || string(v) != `{"k":1}` {
		t.Errorf("Field(x) = %s, %v", v, ok)
	}
	v, _ := tok.Field("x")
	v[1] = 'X' // the copy is the caller's
	if v2, _ := tok.Field("x"); string(v2) != `{"k":1}` {
		t.Errorf("Field returned the token's own bytes")
	}
	for _, huge := range []string{"-1e400", "1e400"} { // 1e400 as an earlier version may have stored it
		if tok, err := parseTokenAsIs([]byte(`{"access_token":"a","expiry":` + huge + `}`)); err != nil {
			t.Error(err)
		} else if _, ok := tok.Expiry(); ok {
			t.Errorf("Expiry of %s reported ok", huge)
		}
	}
	var zero Token
	if !zero.IsZero() || zero.AccessToken() != "" || tokenJSON(t, zero) != "{}" {
		t.Error("zero Token is not empty")
	}
	if !tok.Equal(mustToken(t, `{"x":{"k":1},"expiry":1700000000.25,"refresh_token":"r","token_type":"Bearer","access_token":"a\"b"}`)) {
		t.Error("Equal depends on member order")
	}
	if tok.Equal(tok.WithoutRefreshToken()) {
		t.Error("Equal ignores a missing member")
	}
}

// R28: secret-carrying values print and log as a redaction marker with
// every fmt verb and through slog, alone or inside exported fields; a
// Session and a Client never print their capability token.
func TestSecretsRedactThemselves(t *testing.T) {
	tok := mustToken(t, `{"access_token":"`+fakeAccess+`","refresh_token":"`+fakeRefresh+`"}`)
	key := Secret(fakeAPIKey)
	type holder struct {
		Tok Token
		Key Secret
		Ptr *Token
	}
	h := holder{tok, key, &tok}
	refresher := &OAuth2Refresher{TokenURL: "https://provider.invalid/token", ClientID: "cli", ClientSecret: Secret(fakeAPIKey)}
	opts := Options{Refreshers: map[string]Refresher{"p": refresher}}
	store, err := OpenKeyringStore(KeyringOptions{Backend: "file", Dir: storeDir(t), Password: fixedPassword(fakeAPIKey)})
	if err != nil {
		t.Fatal(err)
	}
	srv := sessionServer(t, Options{Store: NewMemoryStore()})
	sess := startSession(t, srv, SessionOptions{Policy: grantAll})
	capability := string(sess.CapabilityToken())
	copts := ClientOptions{CapabilityToken: sess.CapabilityToken()}
	client := newTestClient(t, sess.SocketPath(), copts)
	var out bytes.Buffer
	for _, v := range []any{tok, &tok, key, &key, h, &h, []Token{tok}, map[string]Secret{"k": key}, refresher, *refresher, opts, &opts, store,
		sess, client, copts, &copts, struct{ S *Session }{sess}} {
		for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d", "%T"} {
			fmt.Fprintf(&out, verb+"\n", v)
		}
		fmt.Fprintln(&out, v)
	}
	logger := slog.New(slog.NewTextHandler(&out, nil))
	logger.Info("text", "tok", tok, "key", key, "any", slog.AnyValue(tok), "holder", h)
	slog.New(slog.NewJSONHandler(&out, nil)).Info("json", "tok", tok, "key", key, "ptr", &tok, "holder", h)
	if _, err := json.Marshal(h); err == nil {
		t.Error("json.Marshal of a struct holding a Token succeeded")
	}
	if _, err := json.Marshal(key); err == nil {
		t.Error("json.Marshal of a Secret succeeded")
	}
	got := out.String()
	for _, secret := range []string{fakeAccess, fakeRefresh, fakeAPIKey, fmt.Sprintf("%x", fakeAccess), fmt.Sprintf("%x", fakeAPIKey), capability} {
		if strings.Contains(got, secret) {
			t.Errorf("output contains %q:\n%s", secret, got)
		}
	}
	if !strings.Contains(got, redacted) {
		t.Errorf("no redaction marker in:\n%s", got)
	}
}

// Names are 1 to 64 characters from [A-Za-z0-9._@-].
func TestValidName(t *testing.T) {
	for _, ok := range []string{"a", "anthropic", "user@example.com", "A-b_c.9", strings.Repeat("x", 64)} {
		if !validName(ok) {
			t.Errorf("validName(%q) = false", ok)
		}
	}
	for _, bad := range []string{"", strings.Repeat("x", 65), "a/b", "a:b", "a b", "é", "a\x00", "a\n", "a*"} {
		if validName(bad) {
			t.Errorf("validName(%q) = true", bad)
		}
	}
}
