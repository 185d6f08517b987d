package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
)

// A providers file's inject member that is wrong is refused, naming what
// is wrong: an upstream a credential could leak from, a key and a bucket
// both, a variable that is not one or is credproxy's own, one variable
// for two things.
func TestInjectMemberRefusesWhatIsWrongNamingIt(t *testing.T) {
	for _, tc := range []struct{ name, inject, want string }{
		{"no upstream", `{"key":"k"}`, "upstream is missing"},
		{"plain http", `{"upstream":"http://api.example/v1","key":"k"}`, "must be https"},
		{"query in upstream", `{"upstream":"https://api.example/v1?x=1","key":"k"}`, "not a base URL"},
		{"user in upstream", `{"upstream":"https://u:p@api.example","key":"k"}`, "not a base URL"},
		{"key and bucket", `{"upstream":"https://api.example","key":"k","bucket":"work"}`, "not both"},
		{"bad key name", `{"upstream":"https://api.example","key":"a/b"}`, "key must be an API key name"},
		{"bad variable", `{"upstream":"https://api.example","key":"k","key_env":"A-B"}`, `"A-B" is not a variable name`},
		{"credproxy's variable", `{"upstream":"https://api.example","key":"k","key_env":"LLXPRT_CAPABILITY_FD"}`, "credproxy's own variable"},
		{"one variable twice", `{"upstream":"https://api.example","key":"k","key_env":"V","base_url_env":"V"}`, "the same variable"},
		{"unclean base_path", `{"upstream":"https://api.example","key":"k","base_path":"/v1/../x"}`, "not a clean absolute path"},
		{"misspelt member", `{"upstream":"https://api.example","key":"k","keyenv":"V"}`, `unknown field "keyenv"`},
		{"token route without OAuth", `{"upstream":"https://api.example"},"client_id":"cli"`, "token_url is missing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := loadProviders(writeProviders(t, 0o600, `{"providers":{"p":{"inject":`+tc.inject+`}}}`), true)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("loadProviders: %v; want an error containing %q", err, tc.want)
			}
		})
	}
}

// -inject NAME takes NAME's inject member from the providers file (an
// entry with only that member needs no OAuth client), else the built-in
// one for anthropic and openai, and says how to add one for any other
// name. A member without key injects the provider's own token. The routes
// a session gets are what the members say.
func TestInjectRoutesComeFromTheProvidersFileOrTheBuiltIns(t *testing.T) {
	file := writeProviders(t, 0o600, `{"providers":{
		"mistral":{"inject":{"upstream":"https://api.mistral.ai/v1","key":"mistral-key","methods":["POST"],
			"paths":["/chat/completions"],"base_url_env":"MISTRAL_BASE_URL","key_env":"MISTRAL_API_KEY","max_request_body":1024}},
		"acme":{"client_id":"cli","token_url":"https://auth.example/token",
			"inject":{"upstream":"https://api.acme.example","bucket":"work","key_env":"ACME_TOKEN"}},
		"github":{"client_id":"cli","token_url":"https://auth.example/token"}}}`)
	provs, err := loadProviders(file, true)
	if err != nil {
		t.Fatal(err)
	}
	in, err := provs.injection([]string{"mistral", "acme", "anthropic", "openai"})
	if err != nil {
		t.Fatal(err)
	}
	want := []credproxy.Route{
		{Name: "mistral", Upstream: "https://api.mistral.ai/v1", Key: "mistral-key", Methods: []string{"POST"},
			PathPrefixes: []string{"/chat/completions"}, MaxRequestBody: 1024},
		{Name: "acme", Upstream: "https://api.acme.example", Provider: "acme", Bucket: "work"},
		{Name: "anthropic", Upstream: "https://api.anthropic.com", Key: "anthropic", Header: "Authorization",
			Methods: []string{"GET", "POST"}, PathPrefixes: []string{"/v1/messages", "/v1/models"}},
		{Name: "openai", Upstream: "https://api.openai.com/v1", Key: "openai", Header: "Authorization",
			Methods: []string{"GET", "POST"}, PathPrefixes: []string{"/chat/completions", "/responses", "/completions", "/embeddings", "/models"}},
	}
	for i := range want {
		if got := in.routes[i]; !routeEqual(got, want[i]) {
			t.Errorf("route %d: %+v\nwant %+v", i, got, want[i])
		}
	}
	refs, err := provs.refreshers(t.Context(), credproxy.NewMemoryStore())
	if err != nil || len(refs) != 2 || refs["mistral"] != nil {
		t.Errorf("refreshers: %v, %v; want acme's and github's only", refs, err)
	}
	for names, msg := range map[string]string{
		"github":              "provider github in " + file + " has no inject member",
		"gemini":              "no provider gemini in " + file + ", and no built-in one",
		"anthropic,anthropic": "-inject anthropic is given twice",
	} {
		if _, err := provs.injection(strings.Split(names, ",")); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("-inject %s: %v; want %q", names, err, msg)
		}
	}
}

func routeEqual(a, b credproxy.Route) bool {
	return a.Name == b.Name && a.Upstream == b.Upstream && a.Provider == b.Provider && a.Bucket == b.Bucket &&
		a.Key == b.Key && a.Header == b.Header && slices.Equal(a.Methods, b.Methods) &&
		slices.Equal(a.PathPrefixes, b.PathPrefixes) && a.MaxRequestBody == b.MaxRequestBody
}

// Two routes may not set one variable, and no route may inject the API
// key that holds a provider's client secret.
func TestInjectRefusesClashingVariablesAndClientSecrets(t *testing.T) {
	file := writeProviders(t, 0o600, `{"providers":{
		"a":{"inject":{"upstream":"https://a.example","key":"ka","key_env":"API_KEY"}},
		"b":{"inject":{"upstream":"https://b.example","key":"kb","key_env":"API_KEY"}},
		"c":{"client_id":"cli","token_url":"https://auth.example/token","client_secret_key":"c-secret",
			"inject":{"upstream":"https://c.example","key":"c-secret"}}}}`)
	provs, err := loadProviders(file, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := provs.injection([]string{"a", "b"}); err == nil || !strings.Contains(err.Error(), "-inject a and -inject b both set API_KEY") {
		t.Errorf("two routes, one variable: %v", err)
	}
	if _, err := provs.injection([]string{"c"}); err == nil || !strings.Contains(err.Error(), "holds provider c's client secret") {
		t.Errorf("a client secret injected: %v", err)
	}
}

// -inject grants the route's credential to the injecting front's
// requests only, and each route's to its own: over the credential socket
// (no Request.Route), get_token and get_api_key stay as the -allow flags
// say.
func TestInjectGrantsTheRouteToTheFrontOnly(t *testing.T) {
	pol := &injectPolicy{grant: &credproxy.Grant{Providers: []string{"github"}}, routes: []credproxy.Route{
		{Name: "anthropic", Key: "anthropic", Upstream: "https://a.example"},
		{Name: "acme", Provider: "acme", Bucket: "work", Upstream: "https://b.example"}}}
	for i, tc := range []struct {
		req  credproxy.Request
		want bool
	}{
		{credproxy.Request{Op: credproxy.OpGetAPIKey, Key: "anthropic", Route: "anthropic"}, true},
		{credproxy.Request{Op: credproxy.OpGetAPIKey, Key: "anthropic"}, false},
		{credproxy.Request{Op: credproxy.OpGetAPIKey, Key: "anthropic", Route: "acme"}, false},
		{credproxy.Request{Op: credproxy.OpGetToken, Provider: "acme", Bucket: "work", Route: "acme"}, true},
		{credproxy.Request{Op: credproxy.OpGetToken, Provider: "acme", Bucket: "work"}, false},
		{credproxy.Request{Op: credproxy.OpGetToken, Provider: "acme", Bucket: "default", Route: "acme"}, false},
		{credproxy.Request{Op: credproxy.OpGetAPIKey, Key: "openai", Route: "anthropic"}, false},
		{credproxy.Request{Op: credproxy.OpSaveToken, Provider: "acme", Bucket: "work", Route: "acme"}, false},
		{credproxy.Request{Op: credproxy.OpGetToken, Provider: "github", Bucket: "default"}, true},
	} {
		if err := pol.Authorize(t.Context(), &tc.req); (err == nil) != tc.want {
			t.Errorf("step %d: %+v: %v; want allowed %v", i, tc.req, err, tc.want)
		}
	}
	if s := pol.String(); !strings.Contains(s, "; injected: anthropic (API key anthropic to https://a.example), acme (token acme/work to https://b.example)") {
		t.Errorf("String() = %q", s)
	}
}

// CMD's environment names the front's socket, where forward listens, the
// phantom, and for each route its base URL (with base_path) and key
// variable set to the phantom; never a real credential.
func TestInjectEnvironmentHoldsThePhantomAndTheBaseURLs(t *testing.T) {
	in := &injection{env: []routeEnv{
		{name: "anthropic", baseURLEnv: "ANTHROPIC_BASE_URL", keyEnv: "ANTHROPIC_API_KEY"},
		{name: "acme", basePath: "/v1", baseURLEnv: "ACME_URL"},
	}}
	got := in.environ("/tmp/s/inject.sock", "cp-phantom-fake", "127.0.0.1:8787")
	want := []string{"LLXPRT_INJECT_SOCKET=/tmp/s/inject.sock", "LLXPRT_INJECT_ADDR=127.0.0.1:8787", "LLXPRT_INJECT_PHANTOM=cp-phantom-fake",
		"ANTHROPIC_BASE_URL=http://127.0.0.1:8787/anthropic", "ANTHROPIC_API_KEY=cp-phantom-fake", "ACME_URL=http://127.0.0.1:8787/acme/v1"}
	if !slices.Equal(got, want) {
		t.Errorf("environ:\n%q\nwant\n%q", got, want)
	}
}

// A ca_file's roots are trusted for its upstream's host and port alone:
// a server with a certificate from that CA is reached there, and refused
// at another port, while the transport still uses the system's roots.
func TestInjectCAFileIsTrustedForItsUpstreamOnly(t *testing.T) {
	caPEM, cert := testCA(t)
	serve := func() *httptest.Server {
		s := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok")) }))
		s.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
		s.StartTLS()
		t.Cleanup(s.Close)
		return s
	}
	trusted, other := serve(), serve()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "ca.pem"), caPEM, 0o600)
	file := writeProviders(t, 0o600, `{"providers":{"t":{"inject":{"upstream":"`+trusted.URL+`/api","key":"k","ca_file":"`+filepath.Join(dir, "ca.pem")+`"}}}}`)
	provs, err := loadProviders(file, true)
	if err != nil {
		t.Fatal(err)
	}
	in, err := provs.injection([]string{"t"})
	if err != nil {
		t.Fatal(err)
	}
	rt, err := in.transport()
	if err != nil || rt == nil {
		t.Fatalf("transport: %v, %v", rt, err)
	}
	client := &http.Client{Transport: rt}
	if resp, err := client.Get(trusted.URL); err != nil {
		t.Errorf("the ca_file's upstream: %v", err)
	} else {
		resp.Body.Close()
	}
	if resp, err := client.Get(other.URL); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("another host:port with a certificate of that CA: %v, %v; want a certificate error", resp, err)
	}
	if in, _ := provs.injection(nil); in != nil {
		if rt, err := in.transport(); rt != nil || err != nil {
			t.Errorf("no ca_file: %v, %v; want nil, the front's own", rt, err)
		}
	}
}

// testCA makes a CA and a certificate it signed for 127.0.0.1 and ::1,
// and returns the CA's PEM and the certificate.
func testCA(t *testing.T) ([]byte, tls.Certificate) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "credproxy test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ = x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "upstream"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: key}
}
