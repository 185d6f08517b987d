package credproxy

import (
	"errors"
	"strings"
	"testing"
)

// Issue 15, item 3: the credential files of the agent CLIs people run in
// sandboxes convert to the token format: the wrapper is taken off,
// camelCase members renamed, millisecond expiries turned into seconds,
// and the conversion is said in words; other members pass through.
func TestImportTokenConvertsAgentCLIFiles(t *testing.T) {
	for _, tc := range []struct {
		name, in, want, notes string
	}{
		{"Claude Code .credentials.json",
			`{"claudeAiOauth":{"accessToken":"fake-at","refreshToken":"fake-rt","expiresAt":1893456000123,"scopes":["user:inference"],"subscriptionType":"max"}}`,
			`{"access_token":"fake-at","refresh_token":"fake-rt","expiry":1893456000,"scopes":["user:inference"],"subscriptionType":"max"}`,
			`took the token inside "claudeAiOauth"; renamed accessToken to access_token; renamed refreshToken to refresh_token; converted expiresAt from milliseconds to expiry in Unix seconds`},
		{"Codex CLI auth.json",
			`{"OPENAI_API_KEY":null,"tokens":{"id_token":"fake-id","access_token":"fake-at","refresh_token":"fake-rt","account_id":"acct-1"},"last_refresh":"2026-12-01T10:00:00Z"}`,
			`{"id_token":"fake-id","access_token":"fake-at","refresh_token":"fake-rt","account_id":"acct-1"}`,
			`took the token inside "tokens"`},
		{"Gemini CLI oauth_creds.json",
			`{"access_token":"fake-at","refresh_token":"fake-rt","scope":"openid","token_type":"Bearer","expiry_date":1893456000999}`,
			`{"access_token":"fake-at","refresh_token":"fake-rt","scope":"openid","token_type":"Bearer","expiry":1893456000}`,
			`converted expiry_date from milliseconds to expiry in Unix seconds`},
		{"the token format", `{"access_token":"fake-at","expiry":1893456000}`, `{"access_token":"fake-at","expiry":1893456000}`, ``},
		{"camelCase, expiry in seconds", `{"accessToken":"fake-at","expiresAt":1893456000}`, `{"access_token":"fake-at","expiry":1893456000}`,
			`renamed accessToken to access_token; took expiresAt as expiry in Unix seconds`},
	} {
		tok, notes, err := ImportToken([]byte(tc.in))
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if got := string(tok.Reveal()); got != tc.want || notes != tc.notes {
			t.Errorf("%s:\n got %s\n     %q\nwant %s\n     %q", tc.name, got, notes, tc.want, tc.notes)
		}
	}
}

// Issue 15, item 3: what is ambiguous is refused, naming the members and
// the unit expected, never quoting a value.
func TestImportTokenRefusesWhatIsAmbiguous(t *testing.T) {
	for in, want := range map[string]string{
		`{"access_token":"fake-a","accessToken":"fake-b"}`:                    `members "access_token" and "accessToken" both give access_token`,
		`{"a":{"access_token":"fake-a"},"b":{"accessToken":"fake-b"}}`:        `members "a" and "b" both hold a token`,
		`{"accessToken":"fake-a","expiresAt":"tomorrow"}`:                     `expiresAt must be a number: milliseconds (or seconds) since the epoch`,
		`{"accessToken":"fake-a","expiresAt":-5}`:                             `expiresAt must be a positive number of milliseconds`,
		`{"accessToken":"fake-a","expiry":1893456000,"expiresAt":1893456000}`: `members "expiry" and "expiresAt" both give expiry`,
		`{"accessToken":"fake-a","expiresAt":1e300}`:                          `expiresAt is too far in the future even as milliseconds`,
		`{"accessToken":"fake-a","expiresAt":9.3e21}`:                         `expiresAt is too far in the future even as milliseconds`,
		`{"nothing":"here"}`: `access_token is required`,
		``:                   `must be a JSON object`,
	} {
		_, _, err := ImportToken([]byte(in))
		var te *TokenError
		if !errors.As(err, &te) || !strings.Contains(err.Error(), want) {
			t.Errorf("ImportToken(%s) = %v, want a TokenError saying %q", in, err, want)
		}
		if err != nil && strings.Contains(err.Error(), "fake-") {
			t.Errorf("ImportToken(%s): the error quotes a value: %v", in, err)
		}
	}
}
