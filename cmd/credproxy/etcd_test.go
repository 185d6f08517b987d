package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
	"github.com/credproxy/credproxy/etcdstore/etcdtest"
)

// fleetEnv returns a host environment (a private keyring store, unused)
// with CREDPROXY_STORE=etcd and a providers file whose "etcd" member
// names the cluster, under prefix, with the cluster's data key in a 0600
// file: the README's "Running a fleet" set-up, one host's share of it.
func fleetEnv(t *testing.T, c *etcdtest.Cluster, prefix string) []string {
	t.Helper()
	return fleetEnvWith(t, c, prefix, nil)
}

// fleetEnvWith is fleetEnv with more members (such as ca_file or
// username) in the providers file's "etcd" member.
func fleetEnvWith(t *testing.T, c *etcdtest.Cluster, prefix string, more map[string]any) []string {
	t.Helper()
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "data-key")
	if err := os.WriteFile(keyFile, []byte(hex.EncodeToString(c.DataKey)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	etcd := map[string]any{"endpoints": c.Endpoints(), "prefix": prefix, "data_key": "file:" + keyFile, "lock_ttl": "2s"}
	for k, v := range more {
		etcd[k] = v
	}
	cfg, _ := json.Marshal(map[string]any{"providers": map[string]any{}, "etcd": etcd})
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
	foreign := filepath.Join(dir, "foreign-key")
	os.WriteFile(foreign, []byte(hex.EncodeToString(c.DataKey)), 0o600)
	if os.Geteuid() == 0 {
		os.Chown(foreign, 65534, 65534)
	}
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
		// The key itself where its source belongs: the error must not echo it into the log.
		{"the key as its own source", good, []string{"-etcd-data-key", hex.EncodeToString(c.DataKey)}, "file:PATH, env:NAME or keyring:NAME"},
		{"the key after a source's colon", good, []string{"-etcd-data-key", "hex:" + hex.EncodeToString(c.DataKey)}, "file:PATH, env:NAME or keyring:NAME"},
		{"password in clear beyond loopback", append(good, etcdPasswordEnv+"=fake-etcd-password"),
			[]string{"-etcd-endpoints", "http://192.0.2.1:2379", "-etcd-user", "u"}, "use https"},
		{"certificate without key", good, []string{"-etcd-cert", loose}, "both its certificate and key"},
		{"bad lock ttl", good, []string{"-etcd-lock-ttl", "soon"}, "not a positive duration"},
		{"key file of another user", good, []string{"-etcd-data-key", "file:" + foreign}, "not to you"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "key file of another user" {
				needRoot(t, "needs root to give the key file to another user")
			}
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

// The README's "Running a fleet" walk-through, run as written (a
// three-member cluster of Debian's etcd on loopback, two serve processes
// on it): each host serves the token without its refresh token, and
// etcdctl finds no token in etcd. It uses fixed ports 23791-23793 and
// 23801-23803, as the README does.
func TestREADMEFleetSectionRunsAsWritten(t *testing.T) {
	needTool(t, "etcd", "etcd-server")
	needTool(t, "etcdctl", "etcd-client")
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, _ := strings.Cut(string(readme), "\n## Running a fleet\n")
	_, block, _ := strings.Cut(section, "\n```sh\n")
	block, _, _ = strings.Cut(block, "\n```\n")
	if !strings.Contains(block, "etcd --name") {
		t.Fatalf("README's fleet section has no shell block starting a cluster:\n%s", block)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-c", block)
	cmd.Dir = "../.."
	cmd.Env = append(hostEnv(t), "DEBIAN_FRONTEND=noninteractive")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the README's fleet block: %v\n%s", err, out)
	}
	got := string(out)
	if n := strings.Count(got, `{"access_token":"fake-fleet-access","expiry":4102444800}`); n != 2 {
		t.Errorf("the two hosts served the token %d times, want 2:\n%s", n, got)
	}
	if strings.Contains(got, "fake-fleet-refresh") || !strings.Contains(got, "\n0\n") {
		t.Errorf("a refresh token reached a sandbox, or etcdctl found a token in etcd:\n%s", got)
	}
}

// run -store etcd holds the fleet's data key and etcd password in its
// environment (CREDPROXY_ETCD_DATA_KEY, CREDPROXY_ETCD_PASSWORD, or the
// variable -etcd-data-key env:NAME names); the command it starts, the
// sandbox, gets none of them: the data key opens every host's tokens.
func TestRunHidesTheFleetSecretsFromItsCommand(t *testing.T) {
	c := etcdtest.Start(t, 1)
	key := hex.EncodeToString(c.DataKey)
	show := `echo "[$CREDPROXY_ETCD_DATA_KEY][$CREDPROXY_ETCD_PASSWORD][$FLEET_KEY]"`
	for _, args := range [][]string{
		{"-etcd-endpoints", c.Endpoint(0)},
		{"-etcd-endpoints", c.Endpoint(0), "-etcd-data-key", "env:FLEET_KEY"},
	} {
		env := append(hostEnv(t), etcdPasswordEnv+"=fake-etcd-password")
		if args[len(args)-1] == "env:FLEET_KEY" {
			env = append(env, "FLEET_KEY="+key)
		} else {
			env = append(env, etcdDataKeyEnv+"="+key)
		}
		args = append(append([]string{"run", "-store", "etcd"}, args...), "--", "sh", "-c", show)
		credproxyCmd(t, env, "", args...).want(t, 0, "[][][]\n")
	}
}

// A data key rotation as 'credproxy reseal -help' describes it: the token
// sealed with the old key is read by hosts given the new key and the old
// one; reseal seals it again (once: a second run seals nothing); then a
// host with the new key alone reads it, and one with the old key alone
// cannot, and is told to add the key that sealed it.
func TestResealRotatesTheFleetsDataKey(t *testing.T) {
	c := etcdtest.Start(t, 1)
	oldKey, newKey := hex.EncodeToString(c.DataKey), strings.Repeat("5e", 32)
	base := fleetEnv(t, c, "/rotate/")
	credproxyCmd(t, base, tokenJSON, "token", "set", "anthropic").want(t, 0, "")

	both := append(base, "OLD_KEY="+oldKey, "NEW_KEY="+newKey)
	withFlags := func(env []string, data string, old ...string) []string {
		cfg, _ := json.Marshal(map[string]any{"providers": map[string]any{}, "etcd": map[string]any{
			"endpoints": c.Endpoints(), "prefix": "/rotate/", "data_key": data, "old_data_keys": old}})
		path := filepath.Join(t.TempDir(), "providers.json")
		os.WriteFile(path, cfg, 0o600)
		return append(env, "CREDPROXY_PROVIDERS="+path)
	}
	rotating := withFlags(both, "env:NEW_KEY", "env:OLD_KEY")
	credproxyCmd(t, rotating, "", "token", "get", "anthropic").want(t, 0, sanitised+"\n")
	credproxyCmd(t, rotating, "", "reseal").want(t, 0, "sealed 1 items again with the current data key\n")
	credproxyCmd(t, rotating, "", "reseal").want(t, 0, "sealed 0 items again with the current data key\n")

	credproxyCmd(t, withFlags(both, "env:NEW_KEY"), "", "token", "get", "anthropic").want(t, 0, sanitised+"\n")
	r := credproxyCmd(t, withFlags(both, "env:OLD_KEY"), "", "token", "get", "anthropic")
	t.Logf("a host with the old key alone: %s", r.stderr)
	if r.code != 1 || !strings.Contains(r.stderr, "OldDataKeys") && !strings.Contains(r.stderr, "old_data_keys") {
		t.Errorf("a host with the old key alone: %+v; want an error naming the key to add", r)
	}
	for _, secret := range []string{oldKey, newKey} {
		if strings.Contains(r.stderr, secret) {
			t.Errorf("stderr holds a data key: %s", r.stderr)
		}
	}
}
