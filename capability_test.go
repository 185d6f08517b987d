package credproxy

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// S4: what a launcher hands over on descriptor 3 is exactly 64 lowercase
// hex characters and a newline; anything else is refused with a message
// that says what was expected, and never quotes what it got.
func TestParseCapabilityToken(t *testing.T) {
	tok := strings.Repeat("0123456789abcdef", 4)
	if got, err := parseCapabilityToken([]byte(tok + "\n")); err != nil || string(got) != tok {
		t.Errorf("a good token: %v", err)
	}
	for name, data := range map[string]string{
		"empty":          "",
		"no newline":     tok,
		"trailing bytes": tok + "\nmore",
		"two newlines":   tok + "\n\n",
		"short":          tok[:63] + "\n",
		"long":           tok + "0\n",
		"upper case":     strings.ToUpper(tok) + "\n",
		"not hex":        strings.Repeat("g", 64) + "\n",
		"CRLF":           tok[:63] + "\r\n",
	} {
		_, err := parseCapabilityToken([]byte(data))
		if err == nil || !strings.Contains(err.Error(), "descriptor 3") {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if len(data) > 8 && strings.Contains(err.Error(), data[:8]) {
			t.Errorf("%s: the error quotes the input: %v", name, err)
		}
	}
}

// runFD3Client is the body of a helper process: a sandboxed program that
// takes its token from descriptor 3 through NewClientFromEnv and reads a
// token, then reports what the handoff left behind.
func runFD3Client() int {
	c, err := NewClientFromEnv(ClientOptions{})
	if err != nil {
		fmt.Println("error:", err)
		return 0
	}
	defer c.Close()
	_, fdErr := os.Stat("/proc/self/fd/3")
	fmt.Printf("env after: %q; fd 3 open: %v\n", os.Getenv(CapabilityFDEnv), fdErr == nil)
	tok, err := c.GetToken(context.Background(), "anthropic", "")
	if err != nil {
		fmt.Println("error:", err)
		return 0
	}
	fmt.Println("token:", string(tok.AccessToken()))
	return 0
}

// runFD3Helper runs the test binary as runFD3Client with fd3 (if not nil)
// as its descriptor 3 and the environment variable set to fdEnv, and
// returns what it printed.
func runFD3Helper(t *testing.T, sess *Session, fd3 *os.File, fdEnv string) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "CREDPROXY_TEST_FD3_CLIENT=1", SocketEnv+"="+sess.SocketPath(), CapabilityFDEnv+"="+fdEnv)
	if fd3 != nil {
		cmd.ExtraFiles = []*os.File{fd3}
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	return strings.TrimSpace(string(out))
}

// pipeHolding returns the read end of a pipe holding data.
func pipeHolding(t *testing.T, data string) *os.File {
	t.Helper()
	f, err := pipeFile(data)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// S4 end to end, in separate processes as a launcher runs them: the
// client reads the token from descriptor 3 (a pipe, or the sealed memory
// file HandoffFile makes, which a second process can read too), closes the
// descriptor, unsets the variable, and is served. Descriptor 3 holding
// anything but the token, or missing, or the variable naming another
// descriptor, is an error that says so; the session stays closed to it.
func TestNewClientFromEnvTakesTheTokenFromDescriptor3(t *testing.T) {
	srv := sessionServer(t, Options{Store: defaultStore(t)})
	sess := startSession(t, srv, SessionOptions{Policy: grantAll})
	served := `env after: ""; fd 3 open: false` + "\ntoken: " + fakeAccess
	tok := string(sess.CapabilityToken())

	if got := runFD3Helper(t, sess, pipeHolding(t, tok+"\n"), "3"); got != served {
		t.Errorf("a pipe holding the token: %s", got)
	}
	handoff, err := sess.HandoffFile()
	if err != nil {
		t.Fatal(err)
	}
	defer handoff.Close()
	for i := range 2 {
		if got := runFD3Helper(t, sess, handoff, "3"); got != served {
			t.Errorf("HandoffFile, reader %d: %s", i+1, got)
		}
	}
	for _, tc := range []struct {
		name, want string
		fd3        *os.File
		env        string
	}{
		{"no newline", "holds 64 bytes, not a capability token", pipeHolding(t, tok), "3"},
		{"trailing bytes", "holds 66 bytes, not a capability token", pipeHolding(t, tok+"\nx"), "3"},
		{"empty", "holds no capability token", pipeHolding(t, ""), "3"},
		{"not hex", "does not hold a capability token", pipeHolding(t, strings.Repeat("x", 64)+"\n"), "3"},
		{"another descriptor named", `LLXPRT_CAPABILITY_FD is "4", but a capability token is handed over on file descriptor 3 only`, pipeHolding(t, tok+"\n"), "4"},
		{"nothing passed", "file descriptor 3", nil, "3"},
	} {
		if got := runFD3Helper(t, sess, tc.fd3, tc.env); !strings.HasPrefix(got, "error: ") || !strings.Contains(got, tc.want) || strings.Contains(got, tok) {
			t.Errorf("%s: %s, want an error saying %q", tc.name, got, tc.want)
		}
	}
	// Without the variable, no token is read, and the session refuses.
	if got := runFD3Helper(t, sess, pipeHolding(t, tok+"\n"), ""); !strings.Contains(got, "invalid or missing capability token") {
		t.Errorf("descriptor 3 without the variable: %s", got)
	}
}
