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
