//go:build unix

package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
)

// unixServer listens on a Unix socket at a short path (sun_path is 108
// bytes, and t.TempDir's names are long) and serves each connection with
// handle, in a goroutine; it is closed at cleanup.
func unixServer(t *testing.T, handle func(net.Conn)) (path string, accepted *atomic.Int64) {
	t.Helper()
	dir, err := os.MkdirTemp("", "cpf")
	if err != nil {
		t.Fatal(err)
	}
	path = filepath.Join(dir, "inject.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	accepted = new(atomic.Int64)
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			wg.Go(func() { defer c.Close(); handle(c) })
		}
	})
	t.Cleanup(func() { ln.Close(); wg.Wait(); os.RemoveAll(dir) })
	return path, accepted
}

// startForwarder relays 127.0.0.1:<free port> to socket, with at most max
// relays at once, and returns the address; it is closed at cleanup, which
// checks that serve returned nil.
func startForwarder(t *testing.T, socket string, max int) (*forwarder, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := newForwarder(socket, max, stdio{out: io.Discard, err: testWriter{t}})
	served := make(chan error, 1)
	go func() { served <- f.serve(ln) }()
	t.Cleanup(func() {
		f.close()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return f, ln.Addr().String()
}

// testWriter logs what forward writes on stderr.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) { w.t.Logf("%s", p); return len(p), nil }

// readFull reads len(want) bytes from c, with a deadline, and fails unless
// they are want.
func readFull(t *testing.T, c net.Conn, want string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, len(want))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != want {
		t.Fatalf("read %q, %v; want %q", buf, err, want)
	}
}

// Bytes cross the relay as they are written, not batched: the front
// writes its second chunk only after the client has answered the first,
// so a relay that held the first back would stall. Each side's end of
// writing (a half-close) reaches the other, which can still answer: the
// front reads to EOF and then replies, and the client reads that reply to
// EOF.
func TestForwardRelaysBytesAsSentAndHalfCloses(t *testing.T) {
	socket, _ := unixServer(t, func(c net.Conn) {
		io.WriteString(c, "first")
		ack := make([]byte, 3)
		if _, err := io.ReadFull(c, ack); err != nil {
			return
		}
		io.WriteString(c, "second:"+string(ack))
		rest, _ := io.ReadAll(c) // until the client's half-close
		io.WriteString(c, "got "+string(rest))
		c.(*net.UnixConn).CloseWrite()
		io.ReadAll(c)
	})
	_, addr := startForwarder(t, socket, 4)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	readFull(t, c, "first")
	io.WriteString(c, "ack")
	readFull(t, c, "second:ack")
	io.WriteString(c, "the end")
	c.(*net.TCPConn).CloseWrite()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if rest, err := io.ReadAll(c); err != nil || string(rest) != "got the end" {
		t.Fatalf("after the half-close: %q, %v; want %q and EOF", rest, err, "got the end")
	}
}

// HTTP through the relay: server-sent events arrive one by one (the
// front sends the next only once the client has read the last), and a
// second request reuses the kept-alive connection.
func TestForwardCarriesStreamedHTTPOverOneConnection(t *testing.T) {
	next := make(chan struct{})
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 3 {
			fmt.Fprintf(w, "data: event %d\n\n", i)
			w.(http.Flusher).Flush()
			if i < 2 {
				select {
				case <-next:
				case <-r.Context().Done():
					return
				}
			}
		}
	})}
	var conns atomic.Int64
	srv.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	dir, err := os.MkdirTemp("", "cpf")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	ln, err := net.Listen("unix", filepath.Join(dir, "inject.sock"))
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	_, addr := startForwarder(t, ln.Addr().String(), 4)
	client := &http.Client{Transport: &http.Transport{}, Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	for round := range 2 {
		resp, err := client.Get("http://" + addr + "/stream")
		if err != nil {
			t.Fatal(err)
		}
		events := bufio.NewReader(resp.Body)
		for i := range 3 {
			line, err := events.ReadString('\n')
			if want := fmt.Sprintf("data: event %d\n", i); err != nil || line != want {
				t.Fatalf("round %d, event %d: %q, %v; want %q", round, i, line, err, want)
			}
			events.ReadString('\n') // the blank line ending the event
			if i < 2 {
				next <- struct{}{}
			}
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("the front saw %d connections for two requests; want 1 (keep-alive)", n)
	}
}

// At most max connections are relayed at once; the next waits, unserved,
// until one ends, and is then relayed.
func TestForwardCapsConcurrentRelays(t *testing.T) {
	socket, accepted := unixServer(t, func(c net.Conn) {
		io.WriteString(c, "hi")
		io.Copy(io.Discard, c) // until the client's end
	})
	_, addr := startForwarder(t, socket, 2)
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		readFull(t, c, "hi")
		held = append(held, c)
	}
	third, err := net.Dial("tcp", addr) // the kernel completes the handshake; forward does not accept it
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	// A negative can only be seen over some time: the third must not be
	// relayed while two are (a short wait, the one sleep here).
	third.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := third.Read(make([]byte, 1)); n != 0 || !os.IsTimeout(err) {
		t.Fatalf("the third connection was served while two were relayed: %d bytes, %v", n, err)
	}
	if n := accepted.Load(); n != 2 {
		t.Fatalf("the front accepted %d connections; want 2", n)
	}
	held[0].Close() // its relay ends, and frees a slot
	readFull(t, third, "hi")
}

// Many connections, ended every way (a half-close after the answer, a
// full close mid-stream, a reset), leave no goroutine or descriptor of
// the relay behind.
func TestForwardLeaksNothingAfterManyConnections(t *testing.T) {
	socket, _ := unixServer(t, func(c net.Conn) {
		io.Copy(c, c) // echo until the client's half-close, then close
	})
	f, addr := startForwarder(t, socket, 16)
	// Settle what the listeners and the first dial start.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "warm")
	readFull(t, c, "warm")
	c.Close()
	waitFor(t, "the warm-up relay to end", func() bool { return relays(f) == 0 })
	goroutines, sockets := runtime.NumGoroutine(), openSockets()

	var wg sync.WaitGroup
	for i := range 300 {
		wg.Go(func() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			msg := fmt.Sprintf("message %d", i)
			io.WriteString(c, msg)
			readFull(t, c, msg)
			switch i % 3 {
			case 0:
				c.(*net.TCPConn).CloseWrite()
				io.ReadAll(c)
			case 1:
				io.WriteString(c, "more, then gone")
			case 2:
				c.(*net.TCPConn).SetLinger(0) // a reset
			}
		})
	}
	wg.Wait()
	waitFor(t, "every relay to end", func() bool { return relays(f) == 0 })
	waitFor(t, "the goroutines to end", func() bool { return runtime.NumGoroutine() <= goroutines })

	if runtime.GOOS == "linux" {
		waitFor(t, "the sockets to close", func() bool { return openSockets() <= sockets })
	}
}

// relays is the number of connections the forwarder holds open.
func relays(f *forwarder) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.conns)
}

// openSockets counts this process's open socket descriptors (Linux). Not
// every descriptor: io.Copy between a Unix and a TCP socket splices
// through pipes that the runtime pools, and frees at some later GC.
func openSockets() int {
	entries, _ := os.ReadDir("/proc/self/fd")
	n := 0
	for _, e := range entries {
		if link, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(link, "socket:") {
			n++
		}
	}
	return n
}

// waitFor polls cond for up to 10 s, failing with what was awaited.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// forward listens only on a loopback address written as an IP, whether
// from -listen or LLXPRT_INJECT_ADDR: a relay on another address would
// hand the session's front to whoever reaches it.
func TestForwardRefusesANonLoopbackAddress(t *testing.T) {
	socket, _ := unixServer(t, func(net.Conn) {})
	env := append(os.Environ(), credproxy.InjectSocketEnv+"="+socket)
	for _, addr := range []string{"0.0.0.0:8787", "[::]:8787", "192.0.2.1:8787", "localhost:8787", "127.0.0.1", ":8787"} {
		r := credproxyCmd(t, env, "", "forward", "-listen", addr)
		if r.code != exitUsage || !strings.Contains(r.stderr, "loopback") {
			t.Errorf("-listen %s: %+v; want exit 2, refused", addr, r)
		}
		r = credproxyCmd(t, append(env, injectAddrEnv+"="+addr), "", "forward", "--", "true")
		if r.code != exitNoProxy || !strings.Contains(r.stderr, "loopback") {
			t.Errorf("%s=%s with a command: %+v; want exit 125, refused", injectAddrEnv, addr, r)
		}
	}
	r := credproxyCmd(t, os.Environ(), "", "forward", "-listen", "127.0.0.1:0")
	if r.code != 1 || !strings.Contains(r.stderr, credproxy.InjectSocketEnv+" is not set") {
		t.Errorf("with no socket: %+v", r)
	}
}

// With a command, forward listens first, then starts it with
// LLXPRT_INJECT_ADDR set to the address it listens on (so the command can
// connect at once), and exits with its status: its code, 128 + a signal
// that killed it, 127 for a command not found.
func TestForwardRunsTheCommandAndExitsWithItsStatus(t *testing.T) {
	needTool(t, "bash", "bash")
	socket, _ := unixServer(t, func(c net.Conn) { io.Copy(c, c) })
	env := append(pathEnv(t), credproxy.InjectSocketEnv+"="+socket)
	r := credproxyCmd(t, env, "", "forward", "-listen", "127.0.0.1:0", "--", "bash", "-c",
		`exec 3<>"/dev/tcp/${LLXPRT_INJECT_ADDR%:*}/${LLXPRT_INJECT_ADDR##*:}" && printf ping >&3 && head -c 4 <&3 && exit 3`)
	r.want(t, 3, "ping")
	credproxyCmd(t, env, "", "forward", "-listen", "127.0.0.1:0", "--", "sh", "-c", "kill -KILL $$").want(t, 128+9, "")
	credproxyCmd(t, env, "", "forward", "-listen", "127.0.0.1:0", "--", "no-such-command-here").want(t, exitNotFound, "")
}

// SIGTERM to forward reaches its command, and forward exits with the
// command's status.
func TestForwardPassesSIGTERMToTheCommand(t *testing.T) {
	socket, _ := unixServer(t, func(net.Conn) {})
	cmd := exec.Command(binary, "forward", "-listen", "127.0.0.1:0", "--", "sh", "-c",
		`trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 1 & wait; done`)
	cmd.Env = append(pathEnv(t), credproxy.InjectSocketEnv+"="+socket)
	lines := startFirstLine(t, cmd)
	cmd.Process.Signal(syscall.SIGTERM)
	if !lines.Scan() || lines.Text() != "got-term" {
		t.Fatalf("the command did not get SIGTERM: %q", lines.Text())
	}
	cmd.Wait()
	if code := cmd.ProcessState.ExitCode(); code != 7 {
		t.Errorf("forward exited %d, want the command's 7", code)
	}
}

// Without a command, forward prints the address it listens on, relays,
// and stops on SIGTERM with status 0.
func TestForwardServesUntilSIGTERM(t *testing.T) {
	socket, _ := unixServer(t, func(c net.Conn) { io.Copy(c, c) })
	cmd := exec.Command(binary, "forward", "-listen", "127.0.0.1:0")
	cmd.Env = append(os.Environ(), credproxy.InjectSocketEnv+"="+socket)
	lines := startFirstLine(t, cmd)
	addr, ok := strings.CutPrefix(lines.Text(), injectAddrEnv+"=")
	if !ok {
		t.Fatalf("first line %q", lines.Text())
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "echo")
	readFull(t, c, "echo")
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Errorf("forward after SIGTERM: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || os.IsTimeout(err) {
		t.Errorf("the relayed connection outlived forward: %d, %v", n, err)
	}
}

// Inside run, forward passes the capability token's descriptor 3 on to
// its command, which can then use the credential socket as if forward
// were not there.
func TestForwardPassesTheCapabilityDescriptorOn(t *testing.T) {
	socket, _ := unixServer(t, func(net.Conn) {})
	env := append(pathEnv(t), credproxy.InjectSocketEnv+"="+socket)
	credproxyCmd(t, env, "", "run", "-store", "memory", "-import", writeCreds(t), "-allow-provider", "anthropic", "--",
		binary, "forward", "-listen", "127.0.0.1:0", "--", binary, "token", "get", "anthropic").want(t, 0, sanitised+"\n")
}
