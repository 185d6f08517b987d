package main

import (
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/credproxy/credproxy"
	"github.com/credproxy/credproxy/etcdstore/etcdtest"
)

// fleetEnv returns a host environment (a private keyring store, unused)
// with CREDPROXY_STORE=etcd and a providers file whose "etcd" member
// names the cluster, under prefix, with the cluster's data key in a 0600
// file: the README's "Running a fleet" set-up, one host's share of it.
func fleetEnv(t *testing.T, c *etcdtest.Cluster, prefix string) []string {
	t.Helper()
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "data-key")
	if err := os.WriteFile(keyFile, []byte(hex.EncodeToString(c.DataKey)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, _ := json.Marshal(map[string]any{"providers": map[string]any{}, "etcd": map[string]any{
		"endpoints": c.Endpoints(), "prefix": prefix, "data_key": "file:" + keyFile, "lock_ttl": "2s",
	}})
	providers := filepath.Join(dir, "providers.json")
	if err := os.WriteFile(providers, cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	return append(hostEnv(t), storeEnv+"=etcd", "CREDPROXY_PROVIDERS="+providers)
}

// startServeWith starts credproxy serve with env and args and returns its
// socket and capability token.
func startServeWith(t *testing.T, env []string, args ...string) (socket, token string) {
	t.Helper()
	cmd := exec.Command(binary, append([]string{"serve"}, args...)...)
	cmd.Env = env
	var stderr strings.Builder
	cmd.Stderr = &stderr
	lines := startFirstLine(t, cmd)
	socket, ok := strings.CutPrefix(lines.Text(), credproxy.SocketEnv+"=")
	if !ok || !lines.Scan() {
		t.Fatalf("serve printed %q; stderr:\n%s", lines.Text(), stderr.String())
	}
	token, _ = strings.CutPrefix(lines.Text(), "LLXPRT_CAPABILITY_TOKEN=")
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM) })
	return socket, token
}

// A token set on one host with CREDPROXY_STORE=etcd is served by serve
// -store etcd on two hosts (two processes, each with its own copy of the
// settings), and a sandbox's read through either gets it without the
// refresh token; a token removed on one host is gone on the other.
func TestServeOnEtcdServesWhatAnotherHostSet(t *testing.T) {
	c := etcdtest.Start(t, 3)
	hostA, hostB := fleetEnv(t, c, "/fleet-a/"), fleetEnv(t, c, "/fleet-a/")
	credproxyCmd(t, hostA, tokenJSON, "token", "set", "anthropic").want(t, 0, "")
	credproxyCmd(t, hostB, "", "token", "ls").want(t, 0, "anthropic/default\n")

	for _, env := range [][]string{hostA, hostB} {
		socket, token := startServeWith(t, env, "-store", "etcd", "-allow-provider", "anthropic")
		sandbox := append(hostEnv(t), credproxy.SocketEnv+"="+socket, credproxy.CapabilityFDEnv+"=3")
		credproxyCmdFD3(t, sandbox, "", token+"\n", "token", "get", "anthropic").want(t, 0, sanitised+"\n")
	}
	credproxyCmd(t, hostB, "", "token", "rm", "anthropic").want(t, 0, "")
	if r := credproxyCmd(t, hostA, "", "token", "get", "anthropic"); r.code != 1 || !strings.Contains(r.stderr, "not found") {
		t.Errorf("token get on host A after host B removed it: %+v", r)
	}
}

// What -store etcd cannot work with is refused before anything is served,
// with a message that says what to do and holds no secret.
func TestServeOnEtcdRefusesWhatItCannotUse(t *testing.T) {
	c := etcdtest.Start(t, 1)
	good := fleetEnv(t, c, "/fleet-b/")
	dir := t.TempDir()
	loose := filepath.Join(dir, "loose-key")
	os.WriteFile(loose, []byte(hex.EncodeToString(c.DataKey)), 0o644)
	short := filepath.Join(dir, "short-key")
	os.WriteFile(short, []byte("00ff-not-a-key-SECRETLIKE"), 0o600)
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"no endpoints", hostEnv(t), nil, "no endpoints"},
		{"no data key", hostEnv(t), []string{"-etcd-endpoints", c.Endpoint(0)}, "CREDPROXY_ETCD_DATA_KEY is not set"},
		{"key file others may read", good, []string{"-etcd-data-key", "file:" + loose}, "chmod 600"},
		{"key not 64 hex characters", good, []string{"-etcd-data-key", "file:" + short}, "not 64 hex characters"},
		{"unknown key source", good, []string{"-etcd-data-key", "vault:x"}, "file:PATH, env:NAME or keyring:NAME"},
		{"password in clear beyond loopback", append(good, etcdPasswordEnv+"=fake-etcd-password"),
			[]string{"-etcd-endpoints", "http://192.0.2.1:2379", "-etcd-user", "u"}, "use https"},
		{"certificate without key", good, []string{"-etcd-cert", loose}, "both its certificate and key"},
		{"bad lock ttl", good, []string{"-etcd-lock-ttl", "soon"}, "not a positive duration"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"serve", "-store", "etcd", "-allow-provider", "anthropic"}, tc.args...)
			r := credproxyCmd(t, tc.env, "", args...)
			if r.code == 0 || !strings.Contains(r.stderr, tc.want) {
				t.Errorf("exit %d, stderr %q; want an error saying %q", r.code, r.stderr, tc.want)
			}
			for _, secret := range []string{hex.EncodeToString(c.DataKey), "SECRETLIKE", "fake-etcd-password"} {
				if strings.Contains(r.stderr, secret) {
					t.Errorf("stderr holds a secret: %q", r.stderr)
				}
			}
		})
	}
}
