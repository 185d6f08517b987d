// Package fleet tests a fleet of credproxy hosts on one etcd cluster, as
// processes: each host is a real `credproxy serve -store etcd`, the
// cluster is a real three-member etcd (etcdtest, in the test process),
// and the provider is a token endpoint in the test process that rotates
// refresh tokens and revokes a login on reuse (rotatingProvider).
//
// It is a package of its own, not part of package e2e, because it
// imports credproxy (its client, and etcdstore, which imports it): the
// keyring library credproxy depends on dials D-Bus when it is
// initialised, which e2e's other tests keep out of their binary.
//
//	go -C e2e test -race ./fleet
package fleet

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
	"github.com/credproxy/credproxy/etcdstore"
	"github.com/credproxy/credproxy/etcdstore/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// credproxyBin is the binary under test, built from its own module.
var credproxyBin string

func TestMain(m *testing.M) {
	if store := os.Getenv(perfServerEnv); store != "" {
		os.Exit(perfServer(store)) // this binary, started by a performance test as a server
	}
	dir, err := os.MkdirTemp("", "credproxy-fleet")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	credproxyBin = filepath.Join(dir, "credproxy")
	build := []string{"go", "-C", "../../cmd/credproxy", "build", "-o", credproxyBin, "."}
	if out, err := exec.Command(build[0], build[1:]...).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n%s", strings.Join(build, " "), err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const (
	fleetProvider = "demo"
	fleetClientID = "fleet-fake-client"
	socketEnv     = "LLXPRT_CREDENTIAL_SOCKET"
	capabilityEnv = "LLXPRT_CAPABILITY_TOKEN"
)

// fleet is one etcd cluster, one provider, and the hosts a test starts
// on them, sharing a prefix.
type fleet struct {
	t       *testing.T
	c       *etcdtest.Cluster
	p       *rotatingProvider
	prefix  string
	lockTTL string // -etcd-lock-ttl of the hosts, "" for the default
	dir     string
	raw     *clientv3.Client // a plain etcd client, as etcdctl is
}

// newFleet starts a three-member cluster and a provider whose tokens
// live an hour.
func newFleet(t *testing.T) *fleet {
	t.Helper()
	c := etcdtest.Start(t, 3)
	return &fleet{t: t, c: c, p: newRotatingProvider(t, 3600), prefix: "/fleet/", dir: t.TempDir(), raw: c.Client(t)}
}

// store opens the fleet's store in the test process, as another host
// would (same endpoints, prefix and data key).
func (f *fleet) store(prefix string) *etcdstore.EtcdStore {
	f.t.Helper()
	s, err := etcdstore.Open(f.t.Context(), etcdstore.Options{Endpoints: f.c.Endpoints(), Prefix: prefix, DataKey: f.c.DataKey})
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { s.Close() })
	return s
}

// login gives the fleet a login at the provider and saves its tokens
// under prefix, as `credproxy login` on one host would; it returns them.
func (f *fleet) login(prefix string) (access, refresh string) {
	f.t.Helper()
	access, refresh = f.p.login()
	f.save(prefix, access, refresh)
	return access, refresh
}

func (f *fleet) save(prefix, access, refresh string) {
	f.t.Helper()
	tok := mustToken(f.t, access, refresh, time.Now().Add(time.Hour))
	if err := f.store(prefix).SaveToken(f.t.Context(), fleetProvider, "", tok); err != nil {
		f.t.Fatal(err)
	}
}

func mustToken(t *testing.T, access, refresh string, exp time.Time) credproxy.Token {
	t.Helper()
	m := map[string]any{"access_token": access, "token_type": "Bearer", "expiry": exp.Unix()}
	if refresh != "" {
		m["refresh_token"] = refresh
	}
	data, _ := json.Marshal(m)
	tok, err := credproxy.ParseToken(data)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// stored returns the token the fleet's store holds under prefix, read
// from the cluster by a store opened for the purpose.
func (f *fleet) stored(prefix string) credproxy.Token {
	f.t.Helper()
	tok, err := f.store(prefix).GetToken(f.t.Context(), fleetProvider, "")
	if err != nil {
		f.t.Fatal(err)
	}
	return tok
}

// host is one `credproxy serve -store etcd` process of the fleet.
type host struct {
	t      *testing.T
	name   string
	cmd    *exec.Cmd
	socket string
	cap    credproxy.Secret
	mu     sync.Mutex
	stderr strings.Builder
	ended  chan struct{} // closed when stderr has ended
	once   sync.Once
	poll   *credproxy.Client // getToken's, made once: tests poll with it
}

// start starts a host on the fleet's cluster and prefix, with extra
// flags, and waits until it serves.
func (f *fleet) start(name string, extra ...string) *host {
	f.t.Helper()
	return f.startOn(name, f.prefix, extra...)
}

func (f *fleet) startOn(name, prefix string, extra ...string) *host {
	f.t.Helper()
	providers := filepath.Join(f.dir, name+"-providers.json")
	data, _ := json.Marshal(map[string]any{"providers": map[string]any{
		fleetProvider: map[string]any{"client_id": fleetClientID, "token_url": f.p.URL}}})
	if err := os.WriteFile(providers, data, 0o600); err != nil {
		f.t.Fatal(err)
	}
	args := []string{"serve", "-store", "etcd", "-etcd-endpoints", strings.Join(f.c.Endpoints(), ","),
		"-etcd-prefix", prefix, "-providers", providers, "-allow-provider", fleetProvider}
	if f.lockTTL != "" {
		args = append(args, "-etcd-lock-ttl", f.lockTTL)
	}
	args = append(args, extra...)
	home := filepath.Join(f.dir, name)
	env := append(os.Environ(), "HOME="+home, "XDG_CONFIG_HOME="+filepath.Join(home, "config"),
		"CREDPROXY_ETCD_DATA_KEY="+hex.EncodeToString(f.c.DataKey), socketEnv+"=", "DBUS_SESSION_BUS_ADDRESS=disabled:")
	return startHost(f.t, name, env, args...)
}

// startHost starts credproxy serve with args and env, and waits (30 s at
// most) for the socket and capability lines on its stdout.
func startHost(t *testing.T, name string, env []string, args ...string) *host {
	t.Helper()
	h := &host{t: t, name: name, cmd: exec.Command(credproxyBin, args...), ended: make(chan struct{})}
	h.cmd.Env = env
	out, err := h.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	errPipe, err := h.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		h.cmd.Process.Signal(syscall.SIGCONT) // a stopped host cannot die
		h.cmd.Process.Kill()
		<-h.ended
		h.cmd.Wait()
	})
	go func() {
		defer close(h.ended)
		r := bufio.NewReader(errPipe)
		for {
			line, err := r.ReadString('\n')
			h.mu.Lock()
			h.stderr.WriteString(line)
			h.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	deadline := time.After(30 * time.Second)
	for h.socket == "" || h.cap == "" {
		select {
		case line, ok := <-lines:
			if !ok {
				<-h.ended
				t.Fatalf("host %s ended before it served:\n%s", name, h.errText())
			}
			if v, ok := strings.CutPrefix(line, socketEnv+"="); ok {
				h.socket = v
			}
			if v, ok := strings.CutPrefix(line, capabilityEnv+"="); ok {
				h.cap = credproxy.Secret(v)
			}
		case <-deadline:
			t.Fatalf("host %s did not serve in 30 s:\n%s", name, h.errText())
		}
	}
	go func() { // keep the pipe drained
		for range lines {
		}
	}()
	return h
}

func (h *host) errText() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.stderr.String()
}

// client returns a new client of the host's session, with a connection
// of its own; it is closed when the test ends.
func (h *host) client() *credproxy.Client {
	c := credproxy.NewClient(h.socket, credproxy.ClientOptions{CapabilityToken: h.cap, RequestTimeout: 30 * time.Second})
	h.t.Cleanup(func() { c.Close() })
	return c
}

// signal sends sig to the host.
func (h *host) signal(sig syscall.Signal) {
	h.t.Helper()
	if err := h.cmd.Process.Signal(sig); err != nil {
		h.t.Fatalf("%v to host %s: %v", sig, h.name, err)
	}
}

// getToken returns the host's token, failing the test on an error.
func (h *host) getToken(ctx context.Context) credproxy.Token {
	h.t.Helper()
	h.once.Do(func() { h.poll = h.client() })
	tok, err := h.poll.GetToken(ctx, fleetProvider, "")
	if err != nil {
		h.t.Fatalf("get_token on host %s: %v\n%s", h.name, err, h.errText())
	}
	return tok
}

// eventually polls cond every 10 ms until it holds, for at most d; it
// reports whether it did.
func eventually(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// lockKeys returns how many lock keys (holders and waiters) etcd holds
// for the fleet's token under prefix.
func (f *fleet) lockKeys(prefix string) int {
	f.t.Helper()
	resp, err := f.raw.Get(f.t.Context(), prefix+"locks/tokens/"+fleetProvider+"/default/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		f.t.Fatal(err)
	}
	return int(resp.Count)
}
