package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/credproxy/credproxy"
	"github.com/credproxy/credproxy/etcdstore/etcdtest"
)

// Fake etcd passwords, long and unique so that a search of stderr for one
// cannot match by accident.
const (
	fakeEtcdPassword  = "fake-etcd-password-PPPP7777"
	wrongEtcdPassword = "wrong-etcd-password-WWWW3333"
)

// wantServes starts serve -store etcd with env and args, and checks that a
// sandbox gets the token set before, without its refresh token.
func wantServes(t *testing.T, env []string, args ...string) {
	t.Helper()
	socket, token := startServeWith(t, env, append([]string{"-store", "etcd", "-allow-provider", "anthropic"}, args...)...)
	sandbox := append(hostEnv(t), credproxy.SocketEnv+"="+socket, credproxy.CapabilityFDEnv+"=3")
	credproxyCmdFD3(t, sandbox, "", token+"\n", "token", "get", "anthropic").want(t, 0, sanitised+"\n")
}

// wantRefused runs serve -store etcd with env and args, and checks that it
// fails before serving (no socket printed), saying want, with none of
// secrets in what it printed.
func wantRefused(t *testing.T, env []string, want string, secrets []string, args ...string) {
	t.Helper()
	r := credproxyCmd(t, env, "", append([]string{"serve", "-store", "etcd", "-allow-provider", "anthropic"}, args...)...)
	t.Logf("serve: exit %d: %s", r.code, r.stderr)
	if r.code == 0 || r.stdout != "" || !strings.Contains(r.stderr, want) {
		t.Errorf("exit %d, stdout %q, stderr %q; want a failure before serving, saying %q", r.code, r.stdout, r.stderr, want)
	}
	for _, s := range secrets {
		if strings.Contains(r.stdout+r.stderr, s) {
			t.Errorf("serve printed the secret %q: %q", s, r.stderr)
		}
	}
}

// tlsMembers are the providers file's etcd members for c's TLS files.
func tlsMembers(c *etcdtest.Cluster) map[string]any {
	return map[string]any{"ca_file": c.TLS.CAFile, "cert_file": c.TLS.CertFile, "key_file": c.TLS.KeyFile}
}

// A cluster that serves clients over TLS only and requires client
// certificates: a token set with CREDPROXY_STORE=etcd and the TLS files in
// the providers file is served by serve -store etcd given them as
// -etcd-ca, -etcd-cert and -etcd-key, or through the providers file. A CA
// that did not sign the cluster's certificate, or a client key others may
// read, is refused before serving.
func TestServeOnEtcdOverTLS(t *testing.T) {
	c := etcdtest.StartTLS(t, 3)
	credproxyCmd(t, fleetEnvWith(t, c, "/tls/", tlsMembers(c)), tokenJSON, "token", "set", "anthropic").want(t, 0, "")
	noTLS := fleetEnv(t, c, "/tls/")
	flags := func(ca, key string) []string {
		return []string{"-etcd-endpoints", strings.Join(c.Endpoints(), ","),
			"-etcd-ca", ca, "-etcd-cert", c.TLS.CertFile, "-etcd-key", key}
	}

	t.Run("flags", func(t *testing.T) {
		wantServes(t, noTLS, flags(c.TLS.CAFile, c.TLS.KeyFile)...)
	})
	t.Run("providers file", func(t *testing.T) {
		wantServes(t, fleetEnvWith(t, c, "/tls/", tlsMembers(c)))
	})
	t.Run("CA that did not sign the cluster", func(t *testing.T) {
		wantRefused(t, noTLS, "certificate signed by unknown authority", nil, flags(c.TLS.OtherCAFile, c.TLS.KeyFile)...)
	})
	t.Run("client key others may read", func(t *testing.T) {
		loose := filepath.Join(t.TempDir(), "client-key.pem")
		key, err := os.ReadFile(c.TLS.KeyFile)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(loose, key, 0o644); err != nil {
			t.Fatal(err)
		}
		wantRefused(t, noTLS, "chmod 600", []string{string(key)}, flags(c.TLS.CAFile, loose)...)
	})
}

// A TLS cluster with authentication on, and a "credproxy" user whose role
// covers the fleet's prefix: the token set with the user in the providers
// file and CREDPROXY_ETCD_PASSWORD is served by serve -etcd-user credproxy
// with the password from CREDPROXY_ETCD_PASSWORD or from a 0600
// -etcd-password-file. A wrong password, no password, or a password file
// others may read is refused before serving, and no password is printed.
func TestServeOnEtcdWithAPassword(t *testing.T) {
	c := etcdtest.StartTLS(t, 1)
	c.EnableAuth(t, "credproxy", fakeEtcdPassword, "/auth/")
	withUser := tlsMembers(c)
	withUser["username"] = "credproxy"
	setter := append(fleetEnvWith(t, c, "/auth/", withUser), etcdPasswordEnv+"="+fakeEtcdPassword)
	credproxyCmd(t, setter, tokenJSON, "token", "set", "anthropic").want(t, 0, "")

	host := fleetEnvWith(t, c, "/auth/", tlsMembers(c)) // no user: the flags give it
	dir := t.TempDir()
	private, loose := filepath.Join(dir, "etcd-password"), filepath.Join(dir, "loose-password")
	if err := os.WriteFile(private, []byte(fakeEtcdPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(loose, []byte(fakeEtcdPassword+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	secrets := []string{fakeEtcdPassword, wrongEtcdPassword}

	t.Run("password from the environment", func(t *testing.T) {
		wantServes(t, append(host, etcdPasswordEnv+"="+fakeEtcdPassword), "-etcd-user", "credproxy")
	})
	t.Run("password file", func(t *testing.T) {
		wantServes(t, host, "-etcd-user", "credproxy", "-etcd-password-file", private)
	})
	t.Run("wrong password", func(t *testing.T) {
		wantRefused(t, append(host, etcdPasswordEnv+"="+wrongEtcdPassword), "authentication failed", secrets, "-etcd-user", "credproxy")
	})
	t.Run("no password", func(t *testing.T) {
		wantRefused(t, host, "without a password", secrets, "-etcd-user", "credproxy")
	})
	t.Run("password file others may read", func(t *testing.T) {
		wantRefused(t, host, "chmod 600", secrets, "-etcd-user", "credproxy", "-etcd-password-file", loose)
	})
}
