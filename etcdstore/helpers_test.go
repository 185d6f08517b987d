package etcdstore

import (
	"testing"

	"github.com/credproxy/credproxy"
)

// Obviously fake credentials, as the core's tests have them. Each is long
// and unique, so that a scan of etcd's contents for it cannot match by
// accident.
const (
	fakeAccess  = "fake-access-token-AAAA1111"
	fakeRefresh = "fake-refresh-token-RRRR9999-must-never-leave-the-host"
	fakeAPIKey  = "sk-fake-api-key-KKKK5555"
)

// anthropicToken is a token with a refresh token and members whose exact
// form must survive sealing.
const anthropicToken = `{"access_token":"` + fakeAccess + `","refresh_token":"` + fakeRefresh + `",` +
	`"expiry":9999999999,"token_type":"Bearer","scope":null,"account_id":"acct-42",` +
	`"big":12345678901234567890,"ratio":1.50,"nested":{"a":[1,2.0,"x"]},"name":"Zoë"}`

// mustToken parses a token or fails the test.
func mustToken(t testing.TB, js string) credproxy.Token {
	t.Helper()
	tok, err := credproxy.ParseToken([]byte(js))
	if err != nil {
		t.Fatalf("ParseToken(%s): %v", js, err)
	}
	return tok
}
