package credproxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain runs the tests, then fails the run if any goroutine of this
// package outlives them: every server and client must clean up after
// itself. Test binaries re-executed as helper processes (see
// runPeerHelper) do their job and exit instead.
func TestMain(m *testing.M) {
	if path := os.Getenv("CREDPROXY_TEST_PEER_SOCKET"); path != "" {
		os.Exit(runPeerHelper(path))
	}
	if job := os.Getenv("CREDPROXY_TEST_STORE_HELPER"); job != "" {
		os.Exit(runStoreHelper(job, os.Getenv("CREDPROXY_TEST_STORE_DIR")))
	}
	if os.Getenv("CREDPROXY_TEST_FD3_CLIENT") != "" {
		os.Exit(runFD3Client())
	}
	if path := os.Getenv("CREDPROXY_TEST_SERVE_AT"); path != "" {
		os.Exit(runServerHelper(path))
	}
	code := m.Run()
	if code == 0 {
		if leaked := leakedGoroutines(5 * time.Second); leaked != "" {
			fmt.Fprintf(os.Stderr, "goroutines left running after the tests:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

// leakedGoroutines waits up to wait for goroutines running this package's
// code to exit, and returns the stacks of those that remain. Goroutines end
// asynchronously after Close returns (the runtime's own bookkeeping), so
// the check polls, as goleak does.
func leakedGoroutines(wait time.Duration) string {
	deadline := time.Now().Add(wait)
	for {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var leaked []string
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "credproxy.") && !strings.Contains(g, "credproxy.TestMain") &&
				!strings.Contains(g, "credproxy.leakedGoroutines") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 || time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runPeerHelper is the body of a helper process started by the peer
// credential tests under another uid. It connects to the socket, sends a
// handshake (or, with CREDPROXY_TEST_PEER_HTTP set, an HTTP request) and
// prints what came back: "closed after 0 bytes" when the server hung up
// without answering, or the reply frame (the HTTP status line).
func runPeerHelper(path string) int {
	c, err := net.Dial("unix", path)
	if err != nil {
		fmt.Println("dial failed:", err)
		return 2
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	// The write may fail if the server has already closed the connection.
	var frame []byte
	if os.Getenv("CREDPROXY_TEST_PEER_HTTP") != "" {
		_, _ = io.WriteString(c, "GET / HTTP/1.1\r\nHost: s\r\n\r\n")
		var line string
		line, err = bufio.NewReader(c).ReadString('\n')
		frame = []byte(strings.TrimSpace(line))
		if err == io.EOF && line != "" {
			err = nil
		}
	} else {
		_ = writeFrame(c, []byte(`{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}`))
		frame, err = readFrame(c, nil)
	}
	switch {
	case err == io.EOF || errors.Is(err, syscall.ECONNRESET):
		fmt.Println("closed after 0 bytes")
	case err != nil:
		fmt.Println("read failed:", err)
	default:
		fmt.Printf("reply %s\n", frame)
	}
	return 0
}
