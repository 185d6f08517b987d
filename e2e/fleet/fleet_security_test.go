package fleet

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
)

// needEtcdctl returns the path of etcdctl, or skips the test without it,
// or fails it when CREDPROXY_REQUIRE_BACKENDS is set, as CI sets it.
func needEtcdctl(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("etcdctl")
	if err != nil {
		if os.Getenv("CREDPROXY_REQUIRE_BACKENDS") != "" {
			t.Fatal("etcdctl not found (Debian: apt-get install etcd-client) and CREDPROXY_REQUIRE_BACKENDS is set")
		}
		t.Skip("etcdctl not found; install etcd-client to run this test")
	}
	return path
}

// etcdctl runs the real etcdctl on the fleet's cluster with stdin.
func (f *fleet) etcdctl(bin string, stdin []byte, args ...string) []byte {
	f.t.Helper()
	cmd := exec.Command(bin, append([]string{"--endpoints", strings.Join(f.c.Endpoints(), ",")}, args...)...)
	cmd.Env = append(os.Environ(), "ETCDCTL_API=3")
	cmd.Stdin = bytes.NewReader(stdin)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		f.t.Fatalf("etcdctl %v: %v\n%s", args, err, stderr.Bytes())
	}
	return out
}

// kvs is etcdctl's JSON output of a get.
type kvs struct {
	Kvs []struct {
		Key, Value string // base64
	}
}

// After a fleet has run (a login saved, refreshed by a storm over two
// hosts, a token saved through a host, an API key stored), the real
// etcdctl's dump of the whole cluster, plain and as JSON with the values
// decoded, holds none of the access tokens and refresh tokens the
// provider ever issued, nor the API key, nor token member names; an item
// copied with etcdctl to another bucket's name fails to open: the host's
// get_token of that bucket fails, and does not serve the other token.
func TestFleetEtcdctlSeesNoSecret(t *testing.T) {
	bin := needEtcdctl(t)
	f := newFleet(t)
	at0, rt0 := f.login(f.prefix)
	a, b := f.start("a", "-allow-write", "-allow-bucket", "*"), f.start("b", "-allow-write", "-allow-bucket", "*")
	g := f.p.hold()
	out := storm(t.Context(), t, clientsOf([]*host{a, b}), releaseWhenAllWait(t, f, g, 2))
	checkOneRefresh(t, f.p, rt0, out, f.stored(f.prefix))
	saved := mustToken(t, fakeSecret("AT"), "", time.Now().Add(time.Hour))
	if err := a.client().SaveToken(t.Context(), fleetProvider, "work", saved); err != nil {
		t.Fatal(err)
	}
	apiKey := credproxy.Secret(fakeSecret("APIKEY"))
	if err := f.store(f.prefix).SaveAPIKey(t.Context(), "fleet-key", apiKey); err != nil {
		t.Fatal(err)
	}
	newRT, newAT := f.p.current(rt0)
	secrets := []string{at0, rt0, newRT, newAT, string(saved.AccessToken()), string(apiKey), "FAKE-",
		"access_token", "refresh_token", "token_type", "expiry"}

	plain := f.etcdctl(bin, nil, "get", "--prefix", "/")
	var dump kvs
	if err := json.Unmarshal(f.etcdctl(bin, nil, "get", "--prefix", "/", "-w", "json"), &dump); err != nil {
		t.Fatal(err)
	}
	var decoded []byte
	for _, kv := range dump.Kvs {
		k, _ := base64.StdEncoding.DecodeString(kv.Key)
		v, _ := base64.StdEncoding.DecodeString(kv.Value)
		decoded = append(append(append(decoded, k...), '\n'), v...)
	}
	if len(dump.Kvs) < 3 || !bytes.Contains(plain, []byte(f.prefix+"tokens/"+fleetProvider+"/default")) {
		t.Fatalf("the dump has %d items, without the token: not the fleet's cluster?\n%s", len(dump.Kvs), plain)
	}
	for _, s := range secrets {
		if bytes.Contains(plain, []byte(s)) || bytes.Contains(decoded, []byte(s)) {
			t.Errorf("etcdctl's dump holds %q", s)
		}
	}

	// Copy the default token's sealed value to bucket "copied".
	var one kvs
	if err := json.Unmarshal(f.etcdctl(bin, nil, "get", f.prefix+"tokens/"+fleetProvider+"/default", "-w", "json"), &one); err != nil || len(one.Kvs) != 1 {
		t.Fatalf("etcdctl get of the token: %v", err)
	}
	sealed, _ := base64.StdEncoding.DecodeString(one.Kvs[0].Value)
	copied := f.prefix + "tokens/" + fleetProvider + "/copied"
	f.etcdctl(bin, sealed, "put", copied)
	if err := json.Unmarshal(f.etcdctl(bin, nil, "get", copied, "-w", "json"), &one); err != nil || len(one.Kvs) != 1 || one.Kvs[0].Value != base64.StdEncoding.EncodeToString(sealed) {
		t.Fatalf("etcdctl put from stdin did not copy the value byte for byte")
	}
	var err error
	if !eventually(10*time.Second, func() bool {
		_, err = b.client().GetToken(t.Context(), fleetProvider, "copied")
		return err != nil && !errors.Is(err, credproxy.ErrNotFound)
	}) {
		t.Fatalf("get_token of the copied item: %v, want a failure other than not found", err)
	}
	t.Logf("get_token of the copied item: %v", err)
	if !eventually(5*time.Second, func() bool { return strings.Contains(b.errText(), "does not open with the data key") }) {
		t.Errorf("host b's log does not say why the copied item failed:\n%s", b.errText())
	}
}
