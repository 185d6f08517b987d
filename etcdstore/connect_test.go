package etcdstore

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
	"github.com/credproxy/credproxy/etcdstore/etcdtest"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Fake etcd passwords, long and unique so that a search of an error's text
// for one cannot match by accident.
const (
	fakeEtcdPassword  = "fake-etcd-password-PPPP7777"
	wrongEtcdPassword = "wrong-etcd-password-WWWW3333"
	otherEtcdPassword = "other-etcd-password-OOOO2222"
)

// connectDialTimeout is the DialTimeout of the stores these tests expect
// to fail: short, so that the tests can check Open does not outlast it.
const connectDialTimeout = time.Second

// openConn opens a store with opts (DataKey and DialTimeout filled in),
// and says how long Open took. A store it opens is closed when t ends.
func openConn(t *testing.T, key []byte, opts Options) (*EtcdStore, time.Duration, error) {
	t.Helper()
	opts.DataKey, opts.DialTimeout = key, connectDialTimeout
	start := time.Now()
	st, err := Open(t.Context(), opts)
	took := time.Since(start)
	if err == nil {
		t.Cleanup(func() { st.Close() })
	}
	return st, took, err
}

// roundTrip saves a token and an API key through a store opened with
// opts, locks and updates the token, and reads both back through a second
// store opened with opts (a second host, which loads them from the
// cluster): every request a host makes works with these options.
func roundTrip(t *testing.T, key []byte, opts Options) {
	t.Helper()
	ctx := t.Context()
	st, _, err := openConn(t, key, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if err := st.SaveToken(ctx, "anthropic", "", mustToken(t, anthropicToken)); err != nil {
		t.Fatalf("SaveToken: %v", err)
	}
	if err := st.SaveAPIKey(ctx, "openai", fakeAPIKey); err != nil {
		t.Fatalf("SaveAPIKey: %v", err)
	}
	unlock, err := st.LockToken(ctx, "anthropic", "")
	if err != nil {
		t.Fatalf("LockToken: %v", err)
	}
	_, err = st.UpdateToken(ctx, "anthropic", "", func(stored credproxy.Token, ok bool) (credproxy.Token, error) {
		return stored, nil
	})
	unlock()
	if err != nil {
		t.Fatalf("UpdateToken: %v", err)
	}
	other, _, err := openConn(t, key, opts)
	if err != nil {
		t.Fatalf("Open, second host: %v", err)
	}
	tok, err := other.GetToken(ctx, "anthropic", "")
	if err != nil || tok.AccessToken() != fakeAccess {
		t.Errorf("GetToken on a second host = %v, %v; want the saved token", tok.AccessToken() == fakeAccess, err)
	}
	if k, err := other.GetAPIKey(ctx, "openai"); err != nil || k != fakeAPIKey {
		t.Errorf("GetAPIKey on a second host: %v; want the saved key", err)
	}
}

// wantOpenFails checks that Open failed, within its DialTimeout and a
// margin, with an error saying want and holding none of secrets.
func wantOpenFails(t *testing.T, took time.Duration, err error, want string, secrets ...string) {
	t.Helper()
	t.Logf("Open took %v: %v", took.Round(time.Millisecond), err)
	if err == nil {
		t.Fatal("Open succeeded; want it to fail")
	}
	if took > connectDialTimeout+2*time.Second {
		t.Errorf("Open took %v to fail, want about its DialTimeout, %v", took, connectDialTimeout)
	}
	if !strings.Contains(err.Error(), want) {
		t.Errorf("Open's error does not say %q: %v", want, err)
	}
	for _, s := range secrets {
		if strings.Contains(err.Error(), s) {
			t.Errorf("Open's error holds the secret %q: %v", s, err)
		}
	}
}

// A cluster that requires client certificates: a store with the test CA
// and a client certificate works; one without a client certificate, or
// trusting only a CA that did not sign the cluster's certificate, fails
// at Open, within its DialTimeout, saying why. Then, with authentication
// turned on as well, the right password works over TLS.
func TestOpenOverTLS(t *testing.T) {
	c := etcdtest.StartTLS(t, 3)
	base := Options{Endpoints: c.Endpoints(), TLS: c.TLS.Config}

	t.Run("client certificate", func(t *testing.T) {
		for _, ep := range c.Endpoints() {
			if !strings.HasPrefix(ep, "https://") {
				t.Fatalf("endpoint %s is not https", ep)
			}
		}
		opts := base
		opts.Prefix = "/tls/cert/"
		roundTrip(t, c.DataKey, opts)
	})
	t.Run("no client certificate", func(t *testing.T) {
		opts := base
		opts.TLS = &tls.Config{RootCAs: c.TLS.Config.RootCAs, MinVersion: tls.VersionTLS12}
		_, took, err := openConn(t, c.DataKey, opts)
		wantOpenFails(t, took, err, "certificate required")
	})
	t.Run("CA that did not sign the cluster", func(t *testing.T) {
		pem, err := os.ReadFile(c.TLS.OtherCAFile)
		if err != nil {
			t.Fatal(err)
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		opts := base
		opts.TLS = c.TLS.Config.Clone()
		opts.TLS.RootCAs = pool
		_, took, err := openConn(t, c.DataKey, opts)
		wantOpenFails(t, took, err, "certificate signed by unknown authority")
	})
	t.Run("plain http to the TLS port", func(t *testing.T) {
		opts := base
		opts.TLS = nil
		opts.Endpoints = []string{strings.Replace(c.Endpoint(0), "https://", "http://", 1)}
		_, took, err := openConn(t, c.DataKey, opts)
		wantOpenFails(t, took, err, "server preface")
	})
	t.Run("and a password", func(t *testing.T) {
		c.EnableAuth(t, "credproxy", fakeEtcdPassword, "/tls/auth/")
		opts := base
		opts.Prefix, opts.Username, opts.Password = "/tls/auth/", "credproxy", fakeEtcdPassword
		roundTrip(t, c.DataKey, opts)
		// The client certificate alone is no user, now that authentication is on.
		opts.Username, opts.Password = "", ""
		_, took, err := openConn(t, c.DataKey, opts)
		wantOpenFails(t, took, err, "permission denied")
	})
}

// A cluster with authentication on: the user whose role covers the
// store's prefix works; a wrong password fails at Open, saying so; a user
// whose role covers another prefix can neither read nor write the store.
// No error holds a password.
func TestOpenWithAuth(t *testing.T) {
	c := etcdtest.Start(t, 3)
	c.EnableAuth(t, "credproxy", fakeEtcdPassword, "/auth/")
	c.EnableAuth(t, "other", otherEtcdPassword, "/other/")
	base := Options{Endpoints: c.Endpoints(), Prefix: "/auth/"}
	secrets := []string{fakeEtcdPassword, wrongEtcdPassword, otherEtcdPassword}

	t.Run("right password", func(t *testing.T) {
		opts := base
		opts.Username, opts.Password = "credproxy", fakeEtcdPassword
		roundTrip(t, c.DataKey, opts)
	})
	t.Run("wrong password", func(t *testing.T) {
		opts := base
		opts.Username, opts.Password = "credproxy", wrongEtcdPassword
		_, took, err := openConn(t, c.DataKey, opts)
		wantOpenFails(t, took, err, "authentication failed", secrets...)
	})
	t.Run("no password", func(t *testing.T) {
		_, took, err := openConn(t, c.DataKey, base)
		wantOpenFails(t, took, err, "user name is empty", secrets...)
	})
	t.Run("role for another prefix", func(t *testing.T) {
		opts := base
		opts.Username, opts.Password = "other", otherEtcdPassword
		_, took, err := openConn(t, c.DataKey, opts)
		wantOpenFails(t, took, err, "permission denied", secrets...)
		// Nor can it write there, even past the store: etcd refuses a raw
		// put of that user under the store's prefix.
		cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), Username: "other", Password: otherEtcdPassword, Logger: zap.NewNop()})
		if err != nil {
			t.Fatal(err)
		}
		defer cli.Close()
		if _, err := cli.Put(t.Context(), "/auth/tokens/anthropic/default", "x"); !errors.Is(err, rpctypes.ErrPermissionDenied) {
			t.Errorf("a put under /auth/ as other = %v, want %v", err, rpctypes.ErrPermissionDenied)
		}
		// Its own prefix it may use: the refusal above is the role's, not
		// the password's.
		opts.Prefix = "/other/"
		if _, _, err := openConn(t, c.DataKey, opts); err != nil {
			t.Errorf("Open of its own prefix: %v", err)
		}
	})
}
