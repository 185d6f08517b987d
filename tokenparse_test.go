package credproxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/99designs/keyring"
	"github.com/go-json-experiment/json/jsontext"
	"golang.org/x/oauth2"
)

// wantTokenError checks that err is the TokenError with message msg, that
// it matches ErrInvalidRequest, and that it quotes nothing of the input.
func wantTokenError(t *testing.T, what string, err error, msg string) {
	t.Helper()
	var terr *TokenError
	if !errors.As(err, &terr) || err.Error() != "credproxy: invalid token: "+msg || !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("%s: error %v, want %q", what, err, msg)
	}
}

// wantTokenJSON checks that err is nil and that tok reveals as want, and
// reports whether both hold.
func wantTokenJSON(t *testing.T, what string, tok Token, err error, want string) bool {
	t.Helper()
	if err != nil {
		t.Errorf("%s: %v", what, err)
		return false
	}
	if got := string(tok.Reveal()); got != want {
		t.Errorf("%s = %s, want %s", what, got, want)
		return false
	}
	return true
}

// Issue 13, finding 7: the JSON that Go's oauth2.Token marshals to, with
// encoding/json, is a token: its RFC 3339 expiry becomes Unix seconds
// (whole ones, rounded down), its "no expiry" zero time means no expiry,
// and the expires_in it may carry beside expiry is dropped.
func TestParseTokenReadsGoOAuth2JSON(t *testing.T) {
	when := time.Date(2030, 1, 2, 3, 4, 5, 900_000_000, time.UTC)
	for _, tc := range []struct {
		name string
		in   *oauth2.Token
		want string
	}{
		{"expiry", &oauth2.Token{AccessToken: "fake-a", TokenType: "Bearer", RefreshToken: "fake-r", Expiry: when},
			`{"access_token":"fake-a","token_type":"Bearer","refresh_token":"fake-r","expiry":` + strconv.FormatInt(when.Unix(), 10) + `}`},
		{"no expiry", &oauth2.Token{AccessToken: "fake-a"}, `{"access_token":"fake-a"}`},
		{"expires_in too", &oauth2.Token{AccessToken: "fake-a", Expiry: when, ExpiresIn: 60},
			`{"access_token":"fake-a","expiry":` + strconv.FormatInt(when.Unix(), 10) + `}`},
	} {
		js, err := json.Marshal(tc.in)
		if err != nil {
			t.Fatal(err)
		}
		tok, err := ParseToken(js)
		wantTokenJSON(t, tc.name+": ParseToken("+string(js)+")", tok, err, tc.want)
	}
}

// Issue 13, finding 7: an expiry is Unix seconds. A number passes as
// written; an RFC 3339 time is converted; a number too large for seconds
// (milliseconds, say) and any other string are refused with a message that
// names the member and the unit.
func TestParseTokenExpiryUnits(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`1893553445`, `1893553445`},
		{`1893456000.5`, `1893456000.5`},
		{`1.8934560E+9`, `1.8934560E+9`},
		{`-1`, `-1`},
		{`99999999999`, `99999999999`},
		{`"2030-01-02T03:04:05Z"`, `1893553445`},
		{`"2030-01-02T05:04:05+02:00"`, `1893553445`},
		{`"2030-01-02T03:04:05.999999999Z"`, `1893553445`},
		{`"1969-12-31T23:59:59Z"`, `-1`},
	} {
		js := `{"access_token":"fake-a","expiry":` + tc.in + `,"x":1}`
		tok, err := ParseToken([]byte(js))
		wantTokenJSON(t, "ParseToken("+js+")", tok, err, `{"access_token":"fake-a","expiry":`+tc.want+`,"x":1}`)
	}
	for _, absent := range []string{`"0001-01-01T00:00:00Z"`, `"0001-01-01T00:00:00+00:00"`} {
		tok, err := ParseToken([]byte(`{"access_token":"fake-a","expiry":` + absent + `}`))
		if _, ok := tok.Expiry(); err != nil || ok || tok.Names()[len(tok.Names())-1] == fieldExpiry {
			t.Errorf("expiry %s: %s, %v; want the token without expiry", absent, tok.Reveal(), err)
		}
	}
	const ms = "expiry looks like milliseconds since the epoch; give Unix seconds"
	const notTime = "expiry must be Unix seconds (a number) or an RFC 3339 time"
	for _, tc := range []struct{ in, msg string }{
		{`1893553445000`, ms},
		{`100000000000`, ms},
		{`1e400`, ms},
		{`"SECRET-1893553445"`, notTime},
		{`"SECRET-2030-01-02"`, notTime},
		{`"2030-01-02 03:04:05Z"`, notTime},
		{`"9999-12-31T23:59:59Z"`, "expiry is too far in the future"},
		{`true`, notTime},
		{`{"t":1}`, notTime},
	} {
		_, err := ParseToken([]byte(`{"access_token":"fake-a","expiry":` + tc.in + `}`))
		wantTokenError(t, "expiry "+tc.in, err, tc.msg)
		if msg := fmt.Sprint(err); strings.Contains(msg, "SECRET") || strings.Contains(msg, "1893") {
			t.Errorf("expiry %s: the error quotes the value: %v", tc.in, err)
		}
	}
}

// Issue 13, finding 7: expires_in, which means nothing once stored, is
// converted at input to expiry = now + expires_in and dropped; an expiry
// given too wins. A non-positive, non-numeric or absurd expires_in is
// refused, naming the member and the unit.
func TestParseTokenConvertsExpiresIn(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		now := time.Now().Unix() // the bubble's clock stands still
		at := func(d int64) string { return strconv.FormatInt(now+d, 10) }
		for _, tc := range []struct{ in, want string }{
			{`{"access_token":"fake-a","expires_in":3600}`, `{"access_token":"fake-a","expiry":` + at(3600) + `}`},
			{`{"access_token":"fake-a","expires_in":3600,"x":1}`, `{"access_token":"fake-a","expiry":` + at(3600) + `,"x":1}`},
			{`{"access_token":"fake-a","expires_in":1.9}`, `{"access_token":"fake-a","expiry":` + at(1) + `}`},
			{`{"access_token":"fake-a","expires_in":315576000}`, `{"access_token":"fake-a","expiry":` + at(315576000) + `}`},
			{`{"access_token":"fake-a","expiry":null,"expires_in":60}`, `{"access_token":"fake-a","expiry":` + at(60) + `}`},
			{`{"access_token":"fake-a","expiry":"0001-01-01T00:00:00Z","expires_in":60}`, `{"access_token":"fake-a","expiry":` + at(60) + `}`},
			{`{"access_token":"fake-a","expiry":1893456000,"expires_in":60}`, `{"access_token":"fake-a","expiry":1893456000}`},
			{`{"access_token":"fake-a","expires_in":60,"expiry":1893456000}`, `{"access_token":"fake-a","expiry":1893456000}`},
			{`{"access_token":"fake-a","expires_in":null}`, `{"access_token":"fake-a"}`},
		} {
			tok, err := ParseToken([]byte(tc.in))
			wantTokenJSON(t, "ParseToken("+tc.in+")", tok, err, tc.want)
		}
		const msg = "expires_in must be a positive number of seconds, at most 10 years"
		for _, bad := range []string{`0`, `-3600`, `-0.5`, `"3600"`, `true`, `315576001`, `1e400`, `[3600]`} {
			_, err := ParseToken([]byte(`{"access_token":"fake-a","expires_in":` + bad + `}`))
			wantTokenError(t, "expires_in "+bad, err, msg)
		}
	})
}

// Issue 13, finding 7: save_token over the wire applies the input rules:
// expires_in becomes an expiry, an RFC 3339 expiry becomes Unix seconds,
// and a millisecond expiry is refused with a message naming the unit.
func TestSaveTokenConvertsExpiryOnTheWire(t *testing.T) {
	st := NewMemoryStore()
	_, path := startServer(t, Options{Store: st})
	raw := dialRaw(t, path)
	raw.handshake()

	before := time.Now()
	raw.send(`{"v":1,"id":"1","op":"save_token","payload":{"provider":"p","token":{"access_token":"fake-a","expires_in":3600,"account_id":"acct-1"}}}`)
	if got := raw.recv(); got != `{"id":"1","ok":true,"data":{}}` {
		t.Fatalf("save_token: %s", got)
	}
	tok, err := st.GetToken(context.Background(), "p", "")
	if err != nil {
		t.Fatal(err)
	}
	exp, ok := tok.Expiry()
	if lo, hi := before.Add(time.Hour).Truncate(time.Second), time.Now().Add(time.Hour); !ok || exp.Before(lo) || exp.After(hi) {
		t.Errorf("stored %s: expiry %v, %v; want between %v and %v", tok.Reveal(), exp, ok, lo, hi)
	}
	if got, want := strings.Join(tok.Names(), ","), "access_token,expiry,account_id"; got != want {
		t.Errorf("stored members %s, want %s", got, want)
	}

	raw.send(`{"v":1,"id":"2","op":"save_token","payload":{"provider":"p","token":{"access_token":"fake-b","expiry":"2030-01-02T03:04:05Z"}}}`)
	if got := raw.recv(); got != `{"id":"2","ok":true,"data":{}}` {
		t.Fatalf("save_token: %s", got)
	}
	if tok, _ := st.GetToken(context.Background(), "p", ""); !strings.Contains(string(tok.Reveal()), `"expiry":1893553445`) {
		t.Errorf("stored %s, want the RFC 3339 expiry as Unix seconds", tok.Reveal())
	}

	raw.send(`{"v":1,"id":"3","op":"save_token","payload":{"provider":"p","token":{"access_token":"fake-c","expiry":1893553445000}}}`)
	wantFailure(t, raw.recvMap(), "3", CodeInvalidRequest, "token: expiry looks like milliseconds since the epoch; give Unix seconds")
}

// oldStoreToken is a token as a store written by an earlier version may
// hold it: an expiry in milliseconds, which input now refuses, and an
// expires_in that input now converts.
const oldStoreToken = `{"access_token":"fake-a","refresh_token":"fake-r","expiry":1893553445000,"expires_in":3600,"x":1}`

// Issue 13, finding 7: the input rules apply to input only. A token that
// an earlier version stored, with a millisecond expiry, still reads from a
// KeyringStore, byte for byte, and still reaches a client over the socket.
func TestStoredTokenReadsUnderTheOldRules(t *testing.T) {
	ks := openFileStore(t, storeDir(t))
	ctx := context.Background()
	if err := ks.set(ctx, keyring.Item{Key: ks.tokenItem("p", DefaultBucket), Data: []byte(oldStoreToken)}); err != nil {
		t.Fatal(err)
	}
	tok, err := ks.GetToken(ctx, "p", "")
	if err != nil || string(tok.Reveal()) != oldStoreToken {
		t.Fatalf("GetToken of an old item: %s, %v; want it as stored", tok.Reveal(), err)
	}

	_, path := startServer(t, Options{Store: ks})
	c := newTestClient(t, path, ClientOptions{})
	got, err := c.GetToken(ctx, "p", "")
	if want := `{"access_token":"fake-a","expiry":1893553445000,"expires_in":3600,"x":1}`; err != nil || string(got.Reveal()) != want {
		t.Errorf("client GetToken of an old item: %s, %v; want %s", got.Reveal(), err, want)
	}
}

// The rules refuse nothing that the stored form of a token they accepted
// holds: a parsed token reads back the same, and without a clock.
func TestParsedTokenReparsesUnchanged(t *testing.T) {
	for _, in := range []string{
		`{"access_token":"fake-a","expires_in":3600}`,
		`{"access_token":"fake-a","expiry":"2030-01-02T03:04:05.5Z"}`,
		`{"access_token":"fake-a","expiry":99999999999.9}`,
	} {
		tok := mustToken(t, in)
		back, err := ParseToken(tok.Reveal())
		if err != nil || !back.Equal(tok) {
			t.Errorf("%s: parsed %s, reparsed %s, %v", in, tok.Reveal(), back.Reveal(), err)
		}
		if v, _ := tok.Field(fieldExpiry); jsontext.Value(v).Kind() != '0' || !jsontext.Value(v).IsValid() {
			t.Errorf("%s: expiry %s, want a number", in, v)
		}
	}
}
