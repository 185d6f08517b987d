package fleet

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
	"github.com/credproxy/credproxy/etcdstore"
)

// The performance measurements of issue 17, through server processes.
// They are figures, printed with t.Logf, not assertions: run
//
//	go -C e2e test -count=1 -v -run TestFleetPerformance ./fleet
//
// (without -race for figures worth quoting).
//
// `credproxy serve` limits each session to 120 requests a second and
// each connection to 60 (PROTOCOL.md, "Rate limiting"), with no flag to
// lift them, so 16 connections of get_token through it measure the rate
// limiter, whatever the store: its figures are printed, the answers it
// refuses counted as errors. The store comparison is made through server
// processes without the limit: this test binary started again as a
// server (perfServer: credproxy.NewServer on EtcdStore or MemoryStore,
// RateLimit -1, Serve on a Unix socket), the same server code as serve's
// but for the limits and the session. The load comes from
// examples/loadgen, a separate process built without -race.

// perfServerEnv names the store a perfServer serves: "etcd" or "memory".
// Its other settings come in perfEnv.
const perfServerEnv = "CREDPROXY_FLEET_PERF_SERVER"

// perfEnv is how a perfServer is configured.
const (
	perfEndpoints = "CREDPROXY_FLEET_PERF_ENDPOINTS"
	perfPrefix    = "CREDPROXY_FLEET_PERF_PREFIX"
	perfDataKey   = "CREDPROXY_FLEET_PERF_DATA_KEY"
	perfToken     = "CREDPROXY_FLEET_PERF_TOKEN" // JSON, for memory: saved as demo/default
	perfTokenURL  = "CREDPROXY_FLEET_PERF_TOKEN_URL"
	perfSocket    = "CREDPROXY_FLEET_PERF_SOCKET"
)

// perfServer serves the store named until SIGTERM; it returns the exit
// code.
func perfServer(kind string) int {
	ctx := context.Background()
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "perf server:", err); return 1 }
	var st credproxy.StoreCloser
	switch kind {
	case "etcd":
		key, err := hex.DecodeString(os.Getenv(perfDataKey))
		if err != nil {
			return fail(err)
		}
		es, err := etcdstore.Open(ctx, etcdstore.Options{Endpoints: strings.Split(os.Getenv(perfEndpoints), ","),
			Prefix: os.Getenv(perfPrefix), DataKey: key})
		if err != nil {
			return fail(err)
		}
		st = es
	case "memory":
		ms := credproxy.NewMemoryStore()
		tok, err := credproxy.ParseToken([]byte(os.Getenv(perfToken)))
		if err != nil {
			return fail(err)
		}
		if err := ms.SaveToken(ctx, fleetProvider, "", tok); err != nil {
			return fail(err)
		}
		st = ms
	default:
		return fail(fmt.Errorf("unknown store %q", kind))
	}
	defer st.Close()
	opts := credproxy.Options{Store: st, RateLimit: -1}
	if u := os.Getenv(perfTokenURL); u != "" {
		opts.Refreshers = map[string]credproxy.Refresher{fleetProvider: &credproxy.OAuth2Refresher{TokenURL: u, ClientID: fleetClientID}}
	}
	srv, err := credproxy.NewServer(opts)
	if err != nil {
		return fail(err)
	}
	l, err := credproxy.ListenPath(os.Getenv(perfSocket))
	if err != nil {
		return fail(err)
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	fmt.Println("serving") // the test waits for this line
	if err := srv.Serve(l); !errors.Is(err, credproxy.ErrServerClosed) {
		return fail(err)
	}
	return 0
}

// startPerfServer starts this binary as a perfServer of kind on the
// fleet's cluster and prefix, and returns its socket.
func (f *fleet) startPerfServer(kind, tokenJSON string) string {
	t := f.t
	t.Helper()
	dir, err := os.MkdirTemp("", "perf") // short: a socket path has 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, "s")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), perfServerEnv+"="+kind, perfEndpoints+"="+strings.Join(f.c.Endpoints(), ","),
		perfPrefix+"="+f.prefix, perfDataKey+"="+hex.EncodeToString(f.c.DataKey), perfToken+"="+tokenJSON,
		perfTokenURL+"="+f.p.URL, perfSocket+"="+socket)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line := make([]byte, len("serving\n"))
	if _, err := out.Read(line); err != nil || string(line) != "serving\n" {
		t.Fatalf("perf server %s did not start: %q %v", kind, line, err)
	}
	return socket
}

// loadgenBin builds examples/loadgen (without -race) once per test.
func loadgenBin(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "loadgen")
	if out, err := exec.Command("go", "-C", "../..", "build", "-o", bin, "./examples/loadgen").CombinedOutput(); err != nil {
		t.Fatalf("build loadgen: %v\n%s", err, out)
	}
	return bin
}

// loadFigures is one loadgen run's result.
type loadFigures struct {
	reqs     float64
	p50, p99 time.Duration
	errs     int
}

var loadgenLine = regexp.MustCompile(`([\d.]+) req/s, p50 (\S+), p99 (\S+), max \S+, errors (\d+)`)

// runLoadgen runs get_token at 16 connections for d on socket, with the
// capability (if any) on descriptor 3.
func runLoadgen(t *testing.T, bin, socket string, capability credproxy.Secret, d time.Duration) loadFigures {
	t.Helper()
	cmd := exec.Command(bin, "-socket", socket, "-c", "16", "-d", d.String(), "-op", "get_token", "-provider", fleetProvider)
	cmd.Env = os.Environ()
	if capability != "" {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		w.WriteString(string(capability) + "\n")
		w.Close()
		defer r.Close()
		cmd.ExtraFiles = []*os.File{r}
		cmd.Env = append(cmd.Env, "LLXPRT_CAPABILITY_FD=3")
	}
	out, err := cmd.CombinedOutput()
	m := loadgenLine.FindStringSubmatch(string(out))
	if err != nil || m == nil {
		t.Fatalf("loadgen: %v\n%s", err, out)
	}
	var fig loadFigures
	fmt.Sscan(m[1], &fig.reqs)
	fig.p50, _ = time.ParseDuration(m[2])
	fig.p99, _ = time.ParseDuration(m[3])
	fmt.Sscan(m[4], &fig.errs)
	return fig
}

func (l loadFigures) String() string {
	return fmt.Sprintf("%.0f req/s, p50 %v, p99 %v, %d errors", l.reqs, l.p50, l.p99, l.errs)
}

// percentiles returns the 50th and 99th percentiles of ds, which it sorts.
func percentiles(ds []time.Duration) (p50, p99 time.Duration) {
	slices.Sort(ds)
	return ds[len(ds)/2], ds[len(ds)*99/100]
}

// Figures of issue 17's "Performance": get_token at 16 connections on
// EtcdStore against MemoryStore, through credproxy serve and through
// servers without the rate limit; a write's visibility from one server
// process to another; the cost of the refresh lock, as refresh_token
// sees it and as LockToken costs directly.
func TestFleetPerformance(t *testing.T) {
	if testing.Short() {
		t.Skip("measurements; not in -short")
	}
	lg := loadgenBin(t)
	f := newFleet(t)
	at0, rt0 := f.login(f.prefix)
	tokenJSON := fmt.Sprintf(`{"access_token":%q,"token_type":"Bearer","expiry":%d,"refresh_token":%q}`, at0, time.Now().Add(time.Hour).Unix(), rt0)
	const d = 1500 * time.Millisecond

	// Through credproxy serve, as shipped: the rate limiter answers most.
	imp := filepath.Join(f.dir, "import.json")
	if err := os.WriteFile(imp, []byte(`{"tokens":{"demo":{"default":`+tokenJSON+`}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	he := f.start("etcd")
	hm := f.start("memory", "-store", "memory", "-import", imp)
	se, sm := runLoadgen(t, lg, he.socket, he.cap, d), runLoadgen(t, lg, hm.socket, hm.cap, d)
	t.Logf("credproxy serve, get_token x 16 connections, %v each (answers include RATE_LIMITED, counted as errors):", d)
	t.Logf("  -store etcd:   %v", se)
	t.Logf("  -store memory: %v", sm)

	// Without the limit: the stores' difference.
	pe, pm := f.startPerfServer("etcd", ""), f.startPerfServer("memory", tokenJSON)
	for round := range 2 {
		e, m := runLoadgen(t, lg, pe, "", d), runLoadgen(t, lg, pm, "", d)
		if e.errs != 0 || m.errs != 0 {
			// Without a limit, every get_token must be answered with the token.
			t.Errorf("round %d: errors under load: EtcdStore %d, MemoryStore %d", round+1, e.errs, m.errs)
		}
		t.Logf("server without rate limit, get_token x 16 connections, round %d: EtcdStore %v; MemoryStore %v; ratio %.2f", round+1, e, m, e.reqs/m.reqs)
	}

	// A write's visibility: save_token through one server process, get_token
	// polled through another, 200 times.
	pe2 := f.startPerfServer("etcd", "")
	ca := credproxy.NewClient(pe, credproxy.ClientOptions{})
	cb := credproxy.NewClient(pe2, credproxy.ClientOptions{})
	defer ca.Close()
	defer cb.Close()
	ctx := t.Context()
	var visible, writes []time.Duration
	for range 200 {
		tok := mustToken(t, fakeSecret("AT"), "", time.Now().Add(time.Hour))
		start := time.Now()
		if err := ca.SaveToken(ctx, fleetProvider, "vis", tok); err != nil {
			t.Fatal(err)
		}
		writes = append(writes, time.Since(start))
		for {
			got, err := cb.GetToken(ctx, fleetProvider, "vis")
			if err == nil && got.AccessToken() == tok.AccessToken() {
				break
			}
			if time.Since(start) > 10*time.Second {
				t.Fatalf("a write was not visible on the other server in 10 s (%v)", err)
			}
		}
		visible = append(visible, time.Since(start))
	}
	w50, w99 := percentiles(writes)
	v50, v99 := percentiles(visible)
	t.Logf("save_token on one server, seen by get_token on another (200 writes): write p50 %v p99 %v; visible (write included) p50 %v p99 %v", w50, w99, v50, v99)

	// The refresh lock as refresh_token sees it: one refresh per bucket
	// (a bucket refreshed once is in its 30 s cooldown), its provider
	// call timed at the provider and taken off.
	const refreshes = 40
	st := f.store(f.prefix)
	for i := range refreshes {
		at, rt := f.p.login()
		if err := st.SaveToken(ctx, fleetProvider, fmt.Sprintf("r%d", i), mustToken(t, at, rt, time.Now().Add(time.Hour))); err != nil {
			t.Fatal(err)
		}
	}
	var refresh, overhead []time.Duration
	for i := range refreshes {
		before := f.p.handlerTime()
		start := time.Now()
		if _, err := ca.RefreshToken(ctx, fleetProvider, fmt.Sprintf("r%d", i)); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		refresh = append(refresh, took)
		overhead = append(overhead, took-(f.p.handlerTime()-before))
	}
	r50, r99 := percentiles(refresh)
	o50, o99 := percentiles(overhead)
	t.Logf("refresh_token through a server on EtcdStore (%d refreshes): p50 %v p99 %v; without the provider's time (lock, reads, compare-and-swap write, unlock, HTTP): p50 %v p99 %v", refreshes, r50, r99, o50, o99)

	// LockToken and unlock directly, uncontended, in this process.
	var locks []time.Duration
	for range 200 {
		start := time.Now()
		unlock, err := st.LockToken(ctx, fleetProvider, "default")
		if err != nil {
			t.Fatal(err)
		}
		unlock()
		locks = append(locks, time.Since(start))
	}
	l50, l99 := percentiles(locks)
	t.Logf("LockToken + unlock on EtcdStore, uncontended, 200 rounds: p50 %v p99 %v", l50, l99)
}
