package main

import (
	"strings"
	"testing"
)

// Issue 13, finding 7: token set takes the expiry forms other tools write
// and stores Unix seconds: an RFC 3339 time (Go's oauth2.Token JSON) and a
// token endpoint's expires_in; an expiry in milliseconds is refused with a
// message that names the member and the unit, not the value.
func TestTokenSetStoresUnixSeconds(t *testing.T) {
	env := hostEnv(t)
	credproxyCmd(t, env, `{"access_token":"`+fakeAccess+`","expiry":"2030-01-02T03:04:05Z","token_type":"Bearer"}`, "token", "set", "p").want(t, 0, "")
	credproxyCmd(t, env, "", "token", "get", "p").want(t, 0, `{"access_token":"`+fakeAccess+`","expiry":1893553445,"token_type":"Bearer"}`+"\n")

	credproxyCmd(t, env, `{"access_token":"`+fakeAccess+`","expires_in":3600}`, "token", "set", "p").want(t, 0, "")
	r := credproxyCmd(t, env, "", "token", "get", "p")
	if r.code != 0 || !strings.Contains(r.stdout, `"expiry":`) || strings.Contains(r.stdout, "expires_in") {
		t.Errorf("token set with expires_in stored %q (%s), want an expiry instead", r.stdout, r.stderr)
	}

	r = credproxyCmd(t, env, `{"access_token":"`+fakeAccess+`","expiry":1893553445000}`, "token", "set", "p")
	r.want(t, 1, "")
	if !strings.Contains(r.stderr, "expiry looks like milliseconds since the epoch; give Unix seconds") || strings.Contains(r.stderr, "1893553445000") {
		t.Errorf("a millisecond expiry: stderr %q", r.stderr)
	}
}

// Issue 13, finding 7: the help says what a token looks like and where
// the format is written down: PROTOCOL.md, "Token format".
func TestHelpPointsToTheTokenFormat(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"token", "-help"}} {
		r := credproxyCmd(t, hostEnv(t), "", args...)
		if help := r.stdout + r.stderr; r.code != 0 || !strings.Contains(help, `PROTOCOL.md, "Token format"`) {
			t.Errorf("credproxy %v: exit %d, output:\n%s", args, r.code, help)
		}
	}
	r := credproxyCmd(t, hostEnv(t), "", "token", "-help")
	for _, want := range []string{"access_token", "Unix seconds", "RFC 3339", "expires_in", "milliseconds"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("token -help does not mention %s:\n%s", want, r.stdout)
		}
	}
}
