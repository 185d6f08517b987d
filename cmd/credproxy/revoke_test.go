package main

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/credproxy/credproxy"
)

// revocation is one request a revocation endpoint got.
type revocation struct {
	form       url.Values
	user, pass string
	basic      bool
}

// revocationEndpoint answers each request with the next of answers
// (status and JSON body; the last repeats), and records the requests.
func revocationEndpoint(t *testing.T, answers ...[2]string) (*httptest.Server, func() []revocation) {
	t.Helper()
	var mu sync.Mutex
	var got []revocation
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		user, pass, basic := r.BasicAuth()
		mu.Lock()
		got = append(got, revocation{r.PostForm, user, pass, basic})
		a := answers[min(len(got), len(answers))-1]
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		if a[0] != "200" {
			w.WriteHeader(map[string]int{"400": 400, "401": 401, "503": 503}[a[0]])
		}
		w.Write([]byte(a[1]))
	}))
	t.Cleanup(srv.Close)
	return srv, func() []revocation { mu.Lock(); defer mu.Unlock(); return append([]revocation(nil), got...) }
}

func testToken(t *testing.T, json string) credproxy.Token {
	t.Helper()
	tok, err := credproxy.ParseToken([]byte(json))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// revoke sends the refresh token, then the access token, each with its
// hint (RFC 7009), and authenticates as the token endpoint would: HTTP
// Basic with the URL-encoded id and secret in the "header" style (the
// default with a secret), client_id and client_secret in the form in the
// "params" style, and client_id alone for a public client.
func TestRevokeSendsBothTokensAuthenticatedByAuthStyle(t *testing.T) {
	for _, tc := range []struct {
		name, style string
		secret      credproxy.Secret
		basic       bool
	}{{"public", "", "", false}, {"basic", "", "s3cret/+x y", true}, {"params", "params", "s3cret/+x y", false}} {
		t.Run(tc.name, func(t *testing.T) {
			srv, got := revocationEndpoint(t, [2]string{"200", ""})
			pv := &provider{name: "p", ClientID: "my client", RevocationURL: srv.URL, AuthStyle: tc.style}
			done, err := revoke(t.Context(), pv, tc.secret, testToken(t, `{"access_token":"at-1","refresh_token":"rt-1"}`))
			if err != nil || done != "the refresh token and the access token" {
				t.Fatalf("revoke: %q, %v", done, err)
			}
			reqs := got()
			if len(reqs) != 2 || reqs[0].form.Get("token") != "rt-1" || reqs[0].form.Get("token_type_hint") != "refresh_token" ||
				reqs[1].form.Get("token") != "at-1" || reqs[1].form.Get("token_type_hint") != "access_token" {
				t.Fatalf("requests: %+v", reqs)
			}
			for _, r := range reqs {
				switch {
				case tc.basic && (r.user != url.QueryEscape("my client") || r.pass != url.QueryEscape(string(tc.secret)) || r.form.Has("client_id") || r.form.Has("client_secret")):
					t.Errorf("Basic: %+v", r)
				case !tc.basic && (r.basic || r.form.Get("client_id") != "my client" || r.form.Get("client_secret") != string(tc.secret)):
					t.Errorf("in the form: %+v", r)
				}
			}
		})
	}
}

// Only 200 is a revocation. An error names the provider's answer with
// the tokens and the client secret redacted; a provider that does not
// revoke access tokens (unsupported_token_type) has still revoked the
// refresh token; a token without a refresh token sends one request.
func TestRevokeFailsUnlessTheProviderSays200(t *testing.T) {
	tok := testToken(t, `{"access_token":"at-2","refresh_token":"rt-2"}`)
	pv := &provider{name: "p", ClientID: "c"}
	for _, tc := range []struct {
		name    string
		answers [][2]string
		err     string
	}{
		{"unavailable", [][2]string{{"503", "down"}}, `revoking the refresh token: the provider answered 503 Service Unavailable: "down"`},
		{"refused", [][2]string{{"401", `{"error":"invalid_client","error_description":"who is c with s3cret-2?"}`}}, `"invalid_client" "who is c with [REDACTED]?"`},
		{"echo", [][2]string{{"200", ""}, {"400", `{"error":"invalid_request","error_description":"token at-2 and rt-2"}`}}, `revoking the access token: the provider answered 400 Bad Request: "invalid_request" "token [REDACTED] and [REDACTED]"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, _ := revocationEndpoint(t, tc.answers...)
			pv.RevocationURL = srv.URL
			_, err := revoke(t.Context(), pv, "s3cret-2", tok)
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("revoke: %v, want %q", err, tc.err)
			}
		})
	}
	srv, got := revocationEndpoint(t, [2]string{"200", ""}, [2]string{"400", `{"error":"unsupported_token_type"}`})
	pv.RevocationURL = srv.URL
	done, err := revoke(t.Context(), pv, "", tok)
	if err != nil || !strings.Contains(done, "the refresh token and not the access token") {
		t.Errorf("unsupported_token_type for the access token: %q, %v", done, err)
	}
	srv, got = revocationEndpoint(t, [2]string{"200", ""})
	pv.RevocationURL = srv.URL
	if done, err := revoke(t.Context(), pv, "", testToken(t, `{"access_token":"at-3"}`)); err != nil || done != "the access token" || len(got()) != 1 {
		t.Errorf("a token without a refresh token: %q, %v, %d requests", done, err, len(got()))
	}
}
