package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/credproxy/credproxy"
)

// A revocation endpoint that redirects (307/308 replay the POST body)
// must not make logout send the client secret and the refresh token to
// another host, nor over plain http to a non-loopback one: the providers
// file's "https, or http on loopback" rule holds for the URL written, and
// must hold for where the request ends up. Nor may the other host's 200
// count as the provider's revocation.
// Revocation does not follow a redirect: it would re-post the token and
// the client secret to another host, and report the other host's 200 as a
// revocation. Found by an attacking review.
func TestRevokeDoesNotFollowARedirectToAnotherHost(t *testing.T) {
	var stolen atomic.Int32
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		stolen.Add(1)
	}))
	defer other.Close()
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.URL+"/steal", http.StatusPermanentRedirect)
	}))
	defer redirector.Close()
	pv := &provider{name: "evil", ClientID: "cli", ClientSecret: "fake-client-secret-1234567890", AuthStyle: "params",
		TokenURL: redirector.URL + "/token", RevocationURL: redirector.URL + "/revoke"}
	tok := testToken(t, `{"access_token":"fake-access-1234567890","refresh_token":"fake-refresh-1234567890"}`)
	_, err := revoke(context.Background(), pv, credproxy.Secret(pv.ClientSecret), tok)
	if n := stolen.Load(); n != 0 {
		t.Errorf("the redirect target got %d requests carrying the client secret and a token", n)
	}
	if err == nil {
		t.Error("revoke succeeded on a redirect target's answer; want an error (the provider did not revoke)")
	}
}

// login does not follow a provider's redirect either: with the client
// secret in the form (auth style "params"), a followed 308 from the device
// endpoint would post it to the other host.
func TestLoginDoesNotFollowARedirectFromTheProvider(t *testing.T) {
	var stolen atomic.Int32
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { stolen.Add(1) }))
	defer other.Close()
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.URL+"/steal", http.StatusPermanentRedirect)
	}))
	defer redirector.Close()
	file := writeProviders(t, 0o600, `{"providers":{"evil":{"client_id":"cli","client_secret":"`+fakeClientSecret+
		`","auth_style":"params","token_url":"`+redirector.URL+`/token","device_auth_url":"`+redirector.URL+`/device"}}}`)
	r := credproxyCmd(t, append(hostEnv(t), providersEnv+"="+file), "", "login", "-device", "-timeout", "5s", "evil")
	if r.code != 1 || stolen.Load() != 0 {
		t.Errorf("login against a redirecting provider: exit %d, the other host got %d requests; stderr %q", r.code, stolen.Load(), r.stderr)
	}
	if strings.Contains(r.stderr, fakeClientSecret) {
		t.Errorf("login printed the client secret: %q", r.stderr)
	}
}
