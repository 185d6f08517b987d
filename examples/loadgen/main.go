// Command loadgen puts load on any server that speaks the credproxy
// protocol (this package's, memserver, or another implementation) and
// reports throughput and latency.
//
//	loadgen -socket $LLXPRT_CREDENTIAL_SOCKET -c 16 -d 10s -op get_token -provider anthropic
//	loadgen -socket ... -c 64 -d 10s -pid $(pgrep memserver)   # also the server's RSS and CPU
//	loadgen -socket ... -idle 1000 -pid ...                       # memory per idle connection
//	loadgen -compare -d 5s     # floor, memserver and credproxy serve, 1 pinned and 16 connections
//
// Each connection completes the handshake, then sends one request at a
// time and waits for its answer. It prints req/s, p50, p99 and max latency
// and the error count (answers with "ok":false, or broken connections);
// with -pid, the server's RSS at the start, peak and end, and its CPU use.
// With -idle N it opens N connections, completes their handshakes, and
// reports the server's RSS before and after, per connection.
//
// A session's socket needs its capability token: as the library's clients
// do, loadgen reads it from the file descriptor named by
// LLXPRT_CAPABILITY_FD (3), e.g. LLXPRT_CAPABILITY_FD=3 loadgen ... 3<<<"$token".
//
// With -compare it measures, from outside, three servers that it starts
// itself: examples/floorserver (the floor), examples/memserver -rate 0
// (MemoryStore) and credproxy serve on a file keyring store in a
// temporary directory; see compare.go.
package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		socket   = flag.String("socket", os.Getenv("LLXPRT_CREDENTIAL_SOCKET"), "server socket `path` (default $LLXPRT_CREDENTIAL_SOCKET)")
		conns    = flag.Int("c", 16, "`connections`")
		duration = flag.Duration("d", 10*time.Second, "how long to run")
		op       = flag.String("op", "get_token", "operation: get_token, get_api_key, has_api_key, list_providers")
		provider = flag.String("provider", "anthropic", "provider for get_token")
		key      = flag.String("key", "openai", "API key name for get_api_key and has_api_key")
		pid      = flag.Int("pid", 0, "also sample this process's RSS and CPU (Linux)")
		idle     = flag.Int("idle", 0, "instead of load, hold this many idle connections and report the server's RSS per connection (needs -pid)")
		raw      = flag.String("raw", "", "also write the run's figures and every latency to this `file`, for -compare")
		compare  = flag.Bool("compare", false, "start the floor, memserver and credproxy serve and measure them from outside, -d each, at 1 pinned connection and 16 connections")
		turns    = flag.Int("slices", 10, "with -compare, how many alternating slices -d is measured in")
		pin      = flag.String("pin", "0,1", "with -compare, the `CPUs` of server and client at one connection (taskset -c); none: unpinned")
		bin      = flag.String("bin", "", "with -compare, the `directory` holding loadgen, floorserver, memserver and credproxy (default: go build them into a temporary one)")
	)
	flag.Parse()
	if *compare {
		return runCompare(compareConfig{Duration: *duration, Slices: *turns, Conns: []int{1, 16}, Pin: *pin, Bin: *bin, Out: os.Stdout})
	}
	if *socket == "" {
		return errors.New("no socket: set -socket or LLXPRT_CREDENTIAL_SOCKET")
	}
	capability, err := capabilityFromEnv()
	if err != nil {
		return err
	}
	if *idle > 0 {
		return idleConnections(*socket, capability, *idle, *pid)
	}
	var payload string
	switch *op {
	case "get_token":
		payload = fmt.Sprintf(`{"provider":%q}`, *provider)
	case "get_api_key", "has_api_key":
		payload = fmt.Sprintf(`{"name":%q}`, *key)
	case "list_providers":
		payload = `{}`
	default:
		return fmt.Errorf("unknown -op %q", *op)
	}
	request := frame(fmt.Sprintf(`{"v":1,"id":"1","op":%q,"payload":%s}`, *op, payload))

	clients := make([]net.Conn, *conns)
	for i := range clients {
		c, err := dialHandshaken(*socket, capability)
		if err != nil {
			return err
		}
		defer c.Close()
		clients[i] = c
	}
	var sampler *procSampler
	if *pid > 0 {
		sampler = startSampling(*pid)
	}
	var errCount atomic.Int64
	latencies := make([][]time.Duration, len(clients))
	deadline := time.Now().Add(*duration)
	start := time.Now()
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Go(func() {
			lat := make([]time.Duration, 0, 1<<16)
			buf := make([]byte, 0, 4096)
			for time.Now().Before(deadline) {
				t0 := time.Now()
				answer, err := roundTrip(c, request, buf)
				if err != nil {
					errCount.Add(1)
					return
				}
				lat = append(lat, time.Since(t0))
				if !bytes.Contains(answer, []byte(`"ok":true`)) {
					errCount.Add(1)
				}
				buf = answer[:0]
			}
			latencies[i] = lat
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	all := slices.Concat(latencies...)
	slices.Sort(all)
	if len(all) == 0 {
		return fmt.Errorf("no request completed (%d errors)", errCount.Load())
	}
	if *raw != "" {
		if err := writeRaw(*raw, runFigures{Elapsed: elapsed, Errors: errCount.Load(), Latencies: all}); err != nil {
			return err
		}
	}
	fmt.Printf("%s x %d connections for %v: %.0f req/s, p50 %v, p99 %v, max %v, errors %d\n",
		*op, len(clients), duration.Round(time.Millisecond), float64(len(all))/elapsed.Seconds(),
		all[len(all)/2], all[len(all)*99/100], all[len(all)-1], errCount.Load())
	if sampler != nil {
		fmt.Println(sampler.stop())
	}
	return nil
}

// frame seals payload into a frame: a 4-byte big-endian length, then it.
func frame(payload string) []byte {
	f := binary.BigEndian.AppendUint32(nil, uint32(len(payload)))
	return append(f, payload...)
}

// capabilityFromEnv reads a session's capability token from the
// descriptor LLXPRT_CAPABILITY_FD names, if it is set.
func capabilityFromEnv() (string, error) {
	v := os.Getenv("LLXPRT_CAPABILITY_FD")
	if v == "" {
		return "", nil
	}
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 0 {
		return "", fmt.Errorf("LLXPRT_CAPABILITY_FD=%q is not a descriptor", v)
	}
	f := os.NewFile(uintptr(fd), "capability")
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, 256))
	if err != nil {
		return "", fmt.Errorf("reading the capability token: %w", err)
	}
	return strings.TrimSpace(string(data)), nil
}

// dialHandshaken connects to socket and completes the handshake,
// presenting capability if it is not "".
func dialHandshaken(socket, capability string) (net.Conn, error) {
	c, err := net.Dial("unix", socket)
	if err != nil {
		return nil, err
	}
	hello := `{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`
	if capability != "" {
		hello = fmt.Sprintf(`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1,"capabilityToken":%q}}`, capability)
	}
	answer, err := roundTrip(c, frame(hello), nil)
	if err != nil || !bytes.Contains(answer, []byte(`"ok":true`)) {
		c.Close()
		return nil, fmt.Errorf("handshake: %q, %v", answer, err)
	}
	return c, nil
}

// roundTrip writes request and reads one answer into buf.
func roundTrip(c net.Conn, request, buf []byte) ([]byte, error) {
	if _, err := c.Write(request); err != nil {
		return nil, err
	}
	var header [4]byte
	if _, err := io.ReadFull(c, header[:]); err != nil {
		return nil, err
	}
	size := int(binary.BigEndian.Uint32(header[:]))
	buf = slices.Grow(buf[:0], size)[:size]
	_, err := io.ReadFull(c, buf)
	return buf, err
}

// idleConnections holds n handshaken connections and reports what they
// cost the server in RSS.
func idleConnections(socket, capability string, n, pid int) error {
	if pid == 0 {
		return errors.New("-idle needs -pid")
	}
	before := rssKB(pid)
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		c, err := dialHandshaken(socket, capability)
		if err != nil {
			return fmt.Errorf("after %d connections: %w", len(conns), err)
		}
		conns = append(conns, c)
	}
	time.Sleep(500 * time.Millisecond) // let the server settle before measuring
	after := rssKB(pid)
	fmt.Printf("%d idle connections: server RSS %d KB before, %d KB after: %.1f KB per connection\n",
		n, before, after, float64(after-before)/float64(n))
	return nil
}

// procSampler samples a process's RSS every 100 ms.
type procSampler struct {
	pid            int
	start          time.Time
	startCPU       int64
	startRSS, peak int
	done           chan struct{}
	wg             sync.WaitGroup
	peakMu         sync.Mutex
}

func startSampling(pid int) *procSampler {
	s := &procSampler{pid: pid, start: time.Now(), startCPU: cpuTicks(pid), startRSS: rssKB(pid), done: make(chan struct{})}
	s.peak = s.startRSS
	s.wg.Go(func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-s.done:
				return
			case <-t.C:
				if r := rssKB(pid); r > s.peak {
					s.peakMu.Lock()
					s.peak = r
					s.peakMu.Unlock()
				}
			}
		}
	})
	return s
}

func (s *procSampler) stop() string {
	close(s.done)
	s.wg.Wait()
	const ticksPerSecond = 100 // USER_HZ on Linux
	cpu := float64(cpuTicks(s.pid)-s.startCPU) / ticksPerSecond / time.Since(s.start).Seconds() * 100
	return fmt.Sprintf("server pid %d: RSS %d KB at start, %d KB peak, %d KB at end; CPU %.0f%% (of one core)",
		s.pid, s.startRSS, s.peak, rssKB(s.pid), cpu)
}

// rssKB reads VmRSS from /proc/PID/status.
func rssKB(pid int) int { return statusKB(pid, "VmRSS:") }

// statusKB reads a field in kB, such as "VmHWM:", from /proc/PID/status.
func statusKB(pid int, field string) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, field); ok {
			kb, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
			return kb
		}
	}
	return 0
}

// cpuTicks reads utime + stime from /proc/PID/stat.
func cpuTicks(pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name may hold spaces; fields are counted after its ')'.
	fields := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
	if len(fields) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	return utime + stime
}
