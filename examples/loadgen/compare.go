package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// compareConfig says what loadgen -compare measures.
type compareConfig struct {
	Duration time.Duration // per server at each connection count
	Slices   int           // the servers take turns, in this many slices of Duration
	Conns    []int         // connection counts; 1 is measured pinned, as Pin says
	Pin      string        // "SERVER,CLIENT": the CPUs for one connection; "" or "none": unpinned
	Bin      string        // directory of loadgen, floorserver, memserver and credproxy; "" builds them
	Out      io.Writer     // the table
}

// benchToken is the token every server serves: BenchmarkGetToken's, so
// that the answers are the size the in-process benchmark's are.
const benchToken = `{"access_token":"fake-access-token-AAAA1111","refresh_token":"fake-refresh-token-RRRR9999-must-never-leave-the-host",` +
	`"expiry":9999999999,"token_type":"Bearer","scope":null,"account_id":"acct-42",` +
	`"big":12345678901234567890,"ratio":1.50,"nested":{"a":[1,2.0,"x"]},"name":"Zoë"}`

const getToken = `{"v":1,"id":"1","op":"get_token","payload":{"provider":"anthropic"}}`

// runCompare measures, from outside and in one run, the floor
// (floorserver), memserver -rate 0 (MemoryStore) and credproxy serve on a
// file keyring store, each a process of its own, with a loadgen process
// per slice as the client. At one connection the servers run on CPU 0 and
// the clients on CPU 1 (cfg.Pin; with taskset, where there is one), each
// process then having GOMAXPROCS=1, as BenchmarkGetToken's one-connection
// case does; at more, all share the machine. The servers take turns in
// slices, so that all three meet the same moments of a noisy machine.
func runCompare(cfg compareConfig) error {
	if cfg.Slices < 1 {
		return errors.New("-slices must be at least 1")
	}
	dir, err := os.MkdirTemp("", "lgc")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin := cfg.Bin
	if bin == "" {
		bin = filepath.Join(dir, "bin")
		const mod = "github.com/credproxy/credproxy/"
		build := exec.Command("go", "build", "-o", bin+string(filepath.Separator),
			mod+"examples/loadgen", mod+"examples/floorserver", mod+"examples/memserver")
		if out, err := build.CombinedOutput(); err != nil {
			return fmt.Errorf("go build: %w\n%s", err, out)
		}
		// The CLI is a module of its own, in the root module's cmd/credproxy.
		gomod, err := exec.Command("go", "env", "GOMOD").Output()
		if err != nil {
			return fmt.Errorf("go env GOMOD: %w", err)
		}
		cli := filepath.Join(filepath.Dir(strings.TrimSpace(string(gomod))), "cmd", "credproxy")
		build = exec.Command("go", "-C", cli, "build", "-o", filepath.Join(bin, "credproxy"), ".")
		if out, err := build.CombinedOutput(); err != nil {
			return fmt.Errorf("go build (cmd/credproxy): %w\n%s", err, out)
		}
	}
	tokens := filepath.Join(dir, "creds.json")
	if err := os.WriteFile(tokens, []byte(`{"tokens":{"anthropic":{"default":`+benchToken+`}}}`), 0o600); err != nil {
		return err
	}
	// The keyring store lives in dir, and nothing of the caller's
	// environment points the children elsewhere.
	env := append(os.Environ(), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"), "HOME="+dir,
		"CREDPROXY_KEYRING_BACKEND=file", "CREDPROXY_KEYRING_PASSWORD=loadgen-compare",
		"LLXPRT_CREDENTIAL_SOCKET=", "LLXPRT_CAPABILITY_FD=")
	set := exec.Command(filepath.Join(bin, "credproxy"), "token", "set", "anthropic")
	set.Env, set.Stdin = env, strings.NewReader(benchToken)
	if out, err := set.CombinedOutput(); err != nil {
		return fmt.Errorf("credproxy token set: %w\n%s", err, out)
	}

	var pinServer, pinClient string
	if cfg.Pin != "" && cfg.Pin != "none" {
		var ok bool
		if pinServer, pinClient, ok = strings.Cut(cfg.Pin, ","); !ok {
			return fmt.Errorf("-pin %q: want SERVER,CLIENT, such as 0,1", cfg.Pin)
		}
	}
	taskset, _ := exec.LookPath("taskset")
	fmt.Fprintf(cfg.Out, "get_token from outside, %v per server and connection count in %d alternating slices\n\n", cfg.Duration, cfg.Slices)
	fmt.Fprintln(cfg.Out, "| server | conns | req/s | ratio | p50 | p50 ratio | p99 | ok/s | server CPU/req | server RSS peak |")
	fmt.Fprintln(cfg.Out, "|---|---|---|---|---|---|---|---|---|---|")
	for _, conns := range cfg.Conns {
		var serverPin, clientPin []string
		label := fmt.Sprint(conns)
		if conns == 1 && taskset != "" && pinServer != "" {
			serverPin, clientPin = []string{taskset, "-c", pinServer}, []string{taskset, "-c", pinClient}
			label += " pinned " + cfg.Pin
		}
		targets, err := startTargets(bin, dir, tokens, env, serverPin)
		if err != nil {
			return err
		}
		err = measure(targets, bin, dir, env, clientPin, conns, cfg)
		for _, t := range targets {
			t.stop()
		}
		if err != nil {
			return err
		}
		floor := targets[0]
		for _, t := range targets {
			f := t.figures
			fmt.Fprintf(cfg.Out, "| %s | %s | %.0f | %.2f | %v | %.2f | %v | %.0f | %.1f µs | %.1f MB |\n",
				t.name, label, f.perSecond(), f.perSecond()/floor.figures.perSecond(),
				roundLatency(f.quantile(0.5)), float64(f.quantile(0.5))/float64(floor.figures.quantile(0.5)), roundLatency(f.quantile(0.99)),
				float64(int64(len(f.Latencies))-f.Errors)/f.Elapsed.Seconds(),
				float64(t.cpu)/float64(time.Microsecond)/float64(len(f.Latencies)), float64(t.rssPeakKB)/1000)
		}
	}
	fmt.Fprint(cfg.Out, `
floor: examples/floorserver, answering what memserver answers; MemoryStore: examples/memserver -rate 0;
keyring: examples/memserver -keyring -rate 0 on a file keyring store; serve: credproxy serve on the same
store, with its default rate limits (60 requests/s per connection, 120 per session), so most of its
answers are RATE_LIMITED. req/s counts every answer, ok/s the successful ones; server CPU is the
server process's (utime+stime) over its requests; RSS peak is its VmHWM.
`)
	return nil
}

// roundLatency rounds d to three significant figures or so.
func roundLatency(d time.Duration) time.Duration {
	switch {
	case d >= 10*time.Millisecond:
		return d.Round(100 * time.Microsecond)
	case d >= 100*time.Microsecond:
		return d.Round(time.Microsecond)
	}
	return d.Round(100 * time.Nanosecond)
}

// target is a server under measurement, in a process of its own.
type target struct {
	name    string
	cmd     *exec.Cmd
	socket  string
	token   string // a session's capability token
	figures runFigures
	cpu     time.Duration // while measured (and idle between its turns)
	// rssPeakKB is the process's peak RSS (VmHWM), start-up included.
	rssPeakKB int
}

// startTargets starts memserver, then the floor (answering what memserver
// answers, byte for byte), then memserver -keyring and credproxy serve,
// each behind pin, and returns them floor first.
func startTargets(bin, dir, tokens string, env, pin []string) (targets []*target, err error) {
	defer func() {
		if err != nil {
			for _, t := range targets {
				t.stop()
			}
		}
	}()
	start := func(name string, argv ...string) error {
		t, err := startTarget(name, env, slices.Concat(pin, argv), dir)
		if err == nil {
			targets = append(targets, t)
		}
		return err
	}
	if err := start("MemoryStore", filepath.Join(bin, "memserver"), "-tokens", tokens, "-rate", "0"); err != nil {
		return targets, err
	}
	c, err := dialHandshaken(targets[0].socket, "")
	if err != nil {
		return targets, err
	}
	answer, err := roundTrip(c, frame(getToken), nil)
	c.Close()
	if err != nil {
		return targets, fmt.Errorf("get_token from memserver: %w", err)
	}
	response := filepath.Join(dir, "response.json")
	if err := os.WriteFile(response, answer, 0o600); err != nil {
		return targets, err
	}
	if err := start("floor", filepath.Join(bin, "floorserver"), "-response", response); err != nil {
		return targets, err
	}
	targets[0], targets[1] = targets[1], targets[0]
	if err := start("keyring", filepath.Join(bin, "memserver"), "-keyring", "-rate", "0"); err != nil {
		return targets, err
	}
	return targets, start("serve", filepath.Join(bin, "credproxy"), "serve", "-allow-provider", "anthropic")
}

// startTarget starts argv and reads the socket (and, from a session, the
// capability token) from the lines it prints. Its stderr goes to a file
// in dir, quoted if it fails to start.
func startTarget(name string, env, argv []string, dir string) (*target, error) {
	logPath := filepath.Join(dir, name+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env, cmd.Stderr = env, logFile
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	t := &target{name: name, cmd: cmd}
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	timeout := time.After(30 * time.Second)
	for t.socket == "" || name == "serve" && t.token == "" {
		select {
		case line, ok := <-lines:
			if !ok {
				cmd.Wait()
				log, _ := os.ReadFile(logPath)
				return nil, fmt.Errorf("%s exited before it listened: %s", argv, log)
			}
			if v, ok := strings.CutPrefix(line, "LLXPRT_CREDENTIAL_SOCKET="); ok {
				t.socket = v
			} else if v, ok := strings.CutPrefix(line, "LLXPRT_CAPABILITY_TOKEN="); ok {
				t.token = v
			}
		case <-timeout:
			t.stop()
			return nil, fmt.Errorf("%s printed no socket in 30 s", argv)
		}
	}
	go func() {
		for range lines { // drain, so the server never blocks on stdout
		}
	}()
	return t, nil
}

// stop asks the server to shut down, and kills it if it has not in 5 s.
func (t *target) stop() {
	if t.cmd.ProcessState != nil {
		return
	}
	t.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { t.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.cmd.Process.Kill()
		<-done
	}
}

// measure runs cfg.Slices turns of a loadgen process with conns
// connections against each target, for cfg.Duration/cfg.Slices each, and
// records what they measured and the servers' CPU and peak RSS.
func measure(targets []*target, bin, dir string, env, pin []string, conns int, cfg compareConfig) error {
	cpu0 := make([]int64, len(targets))
	for i, t := range targets {
		cpu0[i] = cpuTicks(t.cmd.Process.Pid)
	}
	raw := filepath.Join(dir, "raw")
	slice := cfg.Duration / time.Duration(cfg.Slices)
	for range cfg.Slices {
		for _, t := range targets {
			argv := slices.Concat(pin, []string{filepath.Join(bin, "loadgen"), "-socket", t.socket,
				"-c", fmt.Sprint(conns), "-d", slice.String(), "-raw", raw})
			if err := runClient(argv, env, t.token); err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
			f, err := readRaw(raw)
			if err != nil {
				return err
			}
			t.figures.Elapsed += f.Elapsed
			t.figures.Errors += f.Errors
			t.figures.Latencies = append(t.figures.Latencies, f.Latencies...)
		}
	}
	const ticksPerSecond = 100 // USER_HZ on Linux
	for i, t := range targets {
		t.cpu = time.Duration(cpuTicks(t.cmd.Process.Pid)-cpu0[i]) * time.Second / ticksPerSecond
		t.rssPeakKB = statusKB(t.cmd.Process.Pid, "VmHWM:")
		slices.Sort(t.figures.Latencies)
	}
	return nil
}

// runClient runs a loadgen process, handing it token, if not "", on
// descriptor 3 as LLXPRT_CAPABILITY_FD says.
func runClient(argv, env []string, token string) error {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	if token != "" {
		r, w, err := os.Pipe()
		if err != nil {
			return err
		}
		defer r.Close()
		_, err = io.WriteString(w, token+"\n")
		w.Close()
		if err != nil {
			return err
		}
		cmd.ExtraFiles = []*os.File{r}
		cmd.Env = append(env, "LLXPRT_CAPABILITY_FD=3")
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w\n%s", argv, err, out)
	}
	return nil
}

// runFigures is what one loadgen run measured.
type runFigures struct {
	Elapsed   time.Duration
	Errors    int64
	Latencies []time.Duration // sorted
}

func (f *runFigures) perSecond() float64 { return float64(len(f.Latencies)) / f.Elapsed.Seconds() }

func (f *runFigures) quantile(q float64) time.Duration {
	if len(f.Latencies) == 0 {
		return 0
	}
	return f.Latencies[int(float64(len(f.Latencies)-1)*q)]
}

// writeRaw writes f to path: elapsed nanoseconds, errors, then each
// latency in nanoseconds, all little-endian uint64.
func writeRaw(path string, f runFigures) error {
	buf := make([]byte, 0, 8*(2+len(f.Latencies)))
	buf = binary.LittleEndian.AppendUint64(buf, uint64(f.Elapsed))
	buf = binary.LittleEndian.AppendUint64(buf, uint64(f.Errors))
	for _, l := range f.Latencies {
		buf = binary.LittleEndian.AppendUint64(buf, uint64(l))
	}
	return os.WriteFile(path, buf, 0o600)
}

func readRaw(path string) (runFigures, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return runFigures{}, err
	}
	if len(data) < 16 || len(data)%8 != 0 {
		return runFigures{}, fmt.Errorf("%s: %d bytes, not loadgen -raw output", path, len(data))
	}
	f := runFigures{
		Elapsed:   time.Duration(binary.LittleEndian.Uint64(data)),
		Errors:    int64(binary.LittleEndian.Uint64(data[8:])),
		Latencies: make([]time.Duration, 0, len(data)/8-2),
	}
	for b := data[16:]; len(b) > 0; b = b[8:] {
		f.Latencies = append(f.Latencies, time.Duration(binary.LittleEndian.Uint64(b)))
	}
	return f, nil
}
