package e2e

import (
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/credproxy/credproxy/e2e/oidcprovider"
)

// secretForms returns the forms in which output might quote secret, the
// client secret of clientID: as it is, URL-encoded, and in an HTTP Basic
// header with and without URL-encoding first.
func secretForms(clientID, secret string) []string {
	b64 := base64.StdEncoding.EncodeToString
	return []string{secret, url.QueryEscape(secret), b64([]byte(url.QueryEscape(clientID) + ":" + url.QueryEscape(secret))),
		b64([]byte(clientID + ":" + secret))}
}

// noneIn fails the test if any of secrets appears in any of outputs.
func noneIn(t *testing.T, outputs []string, secrets ...string) {
	t.Helper()
	for _, out := range outputs {
		for _, s := range secrets {
			if s != "" && strings.Contains(out, s) {
				t.Errorf("%q appears in the output:\n%s", s, out)
			}
		}
	}
}

// Logging in with a confidential client, whose secret is in the store
// (client_secret_key), in the browser and with -device, and logging out,
// print neither the client secret nor the tokens, on stdout or stderr.
func TestLoginAndLogoutPrintNoSecret(t *testing.T) {
	t.Parallel() // the device flow's poll interval is 5 s
	redirect := "http://" + closedPort(t) + "/callback"
	p := startProvider(t, oidcprovider.Options{ConfidentialRedirectURIs: []string{redirect}})
	h := newHost(t, entry{ClientID: p.ConfidentialClientID, ClientSecretKey: "demo-secret", AuthURL: p.AuthURL,
		TokenURL: p.TokenURL, DeviceAuthURL: p.DeviceAuthURL, RevocationURL: p.RevocationURL, RedirectURL: redirect, Scopes: p.Scopes})
	h.start(credproxyBin, nil, p.ConfidentialClientSecret, "key", "set", "demo-secret").wait().want(t, 0)

	var outputs []string
	pr, authURL, _ := startLogin(h, "demo")
	if err := oidcprovider.Login(t.Context(), authURL, oidcprovider.DemoUser, oidcprovider.DemoPassword); err != nil {
		t.Fatal(err)
	}
	r := pr.wait()
	r.want(t, 0, "stored demo/default", "refreshable")
	outputs = append(outputs, r.stdout, r.stderr)
	browserToken := h.token("demo")

	pr = h.start(credproxyBin, nil, "", "login", "-device", "demo", "work")
	m := pr.await(`open\n\n  (http://\S+)\n\non any device and enter the code\n\n  (\S+)\n`)
	if err := oidcprovider.ApproveDevice(t.Context(), m[1], m[2], oidcprovider.DemoUser, oidcprovider.DemoPassword); err != nil {
		t.Fatal(err)
	}
	r = pr.wait()
	r.want(t, 0, "stored demo/work", "refreshable")
	outputs = append(outputs, r.stdout, r.stderr)
	deviceToken := h.token("demo", "work")

	for _, bucket := range []string{"default", "work"} {
		r = h.run("logout", "demo", bucket)
		r.want(t, 0, "demo revoked the refresh token and the access token")
		outputs = append(outputs, r.stdout, r.stderr)
	}
	noneIn(t, outputs, secretForms(p.ConfidentialClientID, p.ConfidentialClientSecret)...)
	noneIn(t, outputs, browserToken.AccessToken, browserToken.RefreshToken, deviceToken.AccessToken, deviceToken.RefreshToken)
}

// echoProvider is a provider that refuses every token and revocation
// request quoting it whole, form and Authorization header, in its error,
// as careless providers do; it keeps the last form it was sent.
type echoProvider struct {
	*httptest.Server
	mu   sync.Mutex
	form url.Values
}

func newEchoProvider(t *testing.T) *echoProvider {
	e := &echoProvider{}
	e.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		form, _ := url.ParseQuery(string(body))
		e.mu.Lock()
		e.form = form
		e.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprintf(w, `{"error":"invalid_request","error_description":"you sent %s with %s"}`, body, r.Header.Get("Authorization"))
	}))
	t.Cleanup(e.Close)
	return e
}

func (e *echoProvider) lastForm() url.Values {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.form
}

// A provider's error that quotes the request (the client secret in the
// form or the Basic header, the code and PKCE verifier, the tokens being
// revoked) reaches the terminal with all of them redacted, in either auth
// style; the provider's error code is still shown.
func TestProviderErrorsThatQuoteTheRequestAreRedacted(t *testing.T) {
	// Short runs between separators: only the exact redaction of the
	// secret, not the heuristic for token-like runs, can catch it.
	const secret = "fake8Q~aB3.cD4_eF5~gH6"
	for _, style := range []string{"header", "params"} {
		t.Run(style, func(t *testing.T) {
			e := newEchoProvider(t)
			h := newHost(t, entry{ClientID: "echo client", ClientSecret: secret, AuthURL: e.URL + "/authorize",
				TokenURL: e.URL + "/token", RevocationURL: e.URL + "/revoke", AuthStyle: style})

			pr, authURL, redirect := startLogin(h, "demo")
			u, _ := url.Parse(authURL)
			const code = "c0de.e2e~1"
			resp, err := http.Get(redirect.String() + "?" + url.Values{"code": {code}, "state": {u.Query().Get("state")}}.Encode())
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			login := pr.wait()
			login.want(t, 1, "exchanging the code for a token", "invalid_request", "nothing was stored")
			verifier := e.lastForm().Get("code_verifier")
			if verifier == "" || e.lastForm().Get("code") != code {
				t.Fatalf("the token endpoint got %v", e.lastForm())
			}

			const at, rt = "at.e2e~1", "rt.e2e~1"
			h.start(credproxyBin, nil, `{"access_token":"`+at+`","refresh_token":"`+rt+`"}`, "token", "set", "demo").wait().want(t, 0)
			logout := h.run("logout", "demo")
			logout.want(t, 1, "revoking the refresh token", "invalid_request", "the token is still in the store")
			if e.lastForm().Get("token") != rt {
				t.Fatalf("the revocation endpoint got %v", e.lastForm())
			}
			outputs := []string{login.stdout, login.stderr, logout.stdout, logout.stderr}
			noneIn(t, outputs, secretForms("echo client", secret)...)
			noneIn(t, outputs, code, url.QueryEscape(code), verifier, at, rt, url.QueryEscape(rt))
		})
	}
}
