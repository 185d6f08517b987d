package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/credproxy/credproxy/e2e/oidcprovider"
)

// The binaries under test: credproxy, built from the root module with its
// own dependency versions (not this module's), and demoprovider.
var credproxyBin, demoproviderBin string

func TestMain(m *testing.M) {
	slog.SetDefault(slog.New(slog.DiscardHandler)) // the provider logs every request
	dir, err := os.MkdirTemp("", "credproxy-e2e")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	credproxyBin, demoproviderBin = filepath.Join(dir, "credproxy"), filepath.Join(dir, "demoprovider")
	for _, build := range [][]string{
		{"go", "-C", "../cmd/credproxy", "build", "-o", credproxyBin, "."},
		{"go", "build", "-o", demoproviderBin, "./cmd/demoprovider"},
	} {
		if out, err := exec.Command(build[0], build[1:]...).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n%s", strings.Join(build, " "), err, out)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// The environment's names, as the credproxy package exports them; this
// module does not import it, which would start its keyring library (and,
// on Linux, a D-Bus connection) in every test binary.
const (
	socketEnv    = "LLXPRT_CREDENTIAL_SOCKET"
	fakePassword = "fake-store-password-e2e"
)

// entry is a provider's entry in credproxy's providers file.
type entry struct {
	ClientID        string   `json:"client_id"`
	ClientSecret    string   `json:"client_secret,omitempty"`
	ClientSecretKey string   `json:"client_secret_key,omitempty"`
	AuthURL         string   `json:"auth_url,omitempty"`
	TokenURL        string   `json:"token_url"`
	DeviceAuthURL   string   `json:"device_auth_url,omitempty"`
	RevocationURL   string   `json:"revocation_url,omitempty"`
	RedirectURL     string   `json:"redirect_url,omitempty"`
	Scopes          []string `json:"scopes,omitempty"`
	AuthStyle       string   `json:"auth_style,omitempty"`
}

// publicEntry is p's public client, with every endpoint.
func publicEntry(p *oidcprovider.Provider) entry {
	return entry{ClientID: p.PublicClientID, AuthURL: p.AuthURL, TokenURL: p.TokenURL, DeviceAuthURL: p.DeviceAuthURL,
		RevocationURL: p.RevocationURL, Scopes: p.Scopes}
}

// host is a user's machine: a home and config directory of its own, with
// a file store and a providers file.
type host struct {
	t         *testing.T
	env       []string
	providers string
}

// newHost returns a host whose providers file has demo, the entry.
func newHost(t *testing.T, demo entry) *host {
	t.Helper()
	dir := t.TempDir()
	h := &host{t: t, providers: filepath.Join(dir, "providers.json")}
	h.env = append(os.Environ(), "HOME="+filepath.Join(dir, "home"), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"),
		"CREDPROXY_KEYRING_BACKEND=file", "CREDPROXY_KEYRING_PASSWORD="+fakePassword,
		"CREDPROXY_PROVIDERS="+h.providers, socketEnv+"=", "DBUS_SESSION_BUS_ADDRESS=disabled:", "BROWSER=true")
	h.setProviders(map[string]entry{"demo": demo})
	return h
}

// setProviders writes the providers file, readable by its owner only.
func (h *host) setProviders(entries map[string]entry) {
	h.t.Helper()
	data, err := json.Marshal(map[string]any{"providers": entries})
	if err != nil {
		h.t.Fatal(err)
	}
	if err := os.WriteFile(h.providers, data, 0o600); err != nil {
		h.t.Fatal(err)
	}
}

// proc is a running credproxy: its stderr is read as it comes, so that a
// test can act on what it says (the URL to open), and kept.
type proc struct {
	t      *testing.T
	cmd    *exec.Cmd
	stdout *os.File // a file, not a pipe, so that it can be read while the process runs
	mu     sync.Mutex
	stderr strings.Builder
	grew   chan struct{} // receives after stderr grew, or ended
	ended  chan struct{} // closed when stderr has ended
}

// start starts the binary with args, env added to the host's, and stdin.
func (h *host) start(bin string, env []string, stdin string, args ...string) *proc {
	h.t.Helper()
	p := &proc{t: h.t, cmd: exec.Command(bin, args...), grew: make(chan struct{}, 1), ended: make(chan struct{})}
	p.cmd.Env = append(h.env, env...)
	p.cmd.Stdin = strings.NewReader(stdin)
	out, err := os.CreateTemp(h.t.TempDir(), "stdout")
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { out.Close() })
	p.stdout, p.cmd.Stdout = out, out
	errPipe, err := p.cmd.StderrPipe()
	if err != nil {
		h.t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { p.cmd.Process.Kill() })
	go func() {
		defer close(p.ended)
		r := bufio.NewReader(errPipe)
		for {
			line, err := r.ReadString('\n')
			p.mu.Lock()
			p.stderr.WriteString(line)
			p.mu.Unlock()
			select {
			case p.grew <- struct{}{}:
			default:
			}
			if err != nil {
				return
			}
		}
	}()
	return p
}

// await waits (30 s at most) until stderr matches re, and returns the
// submatches.
func (p *proc) await(re string) []string {
	p.t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.After(30 * time.Second)
	for {
		if m := rx.FindStringSubmatch(p.errText()); m != nil {
			return m
		}
		select {
		case <-p.grew:
		case <-p.ended:
			if m := rx.FindStringSubmatch(p.errText()); m != nil {
				return m
			}
			p.t.Fatalf("credproxy %v ended its stderr without %q:\n%s", p.cmd.Args[1:], re, p.errText())
		case <-deadline:
			p.t.Fatalf("credproxy %v did not print %q in 30 s:\n%s", p.cmd.Args[1:], re, p.errText())
		}
	}
}

func (p *proc) errText() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

// result is how a run ended.
type result struct {
	code           int
	stdout, stderr string
}

// wait waits (a minute at most) for the process to exit.
func (p *proc) wait() result {
	p.t.Helper()
	select {
	case <-p.ended:
	case <-time.After(time.Minute):
		p.cmd.Process.Kill()
		p.t.Fatalf("credproxy %v did not exit in a minute:\n%s", p.cmd.Args[1:], p.errText())
	}
	err := p.cmd.Wait()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		p.t.Fatal(err)
	}
	return result{p.cmd.ProcessState.ExitCode(), p.out(), p.errText()}
}

// out returns what the process has written on stdout so far.
func (p *proc) out() string {
	p.t.Helper()
	data, err := os.ReadFile(p.stdout.Name())
	if err != nil {
		p.t.Fatal(err)
	}
	return string(data)
}

// run runs credproxy with args to its end.
func (h *host) run(args ...string) result {
	h.t.Helper()
	return h.start(credproxyBin, nil, "", args...).wait()
}

// want fails the test unless r exited with code and its stderr has each
// of texts.
func (r result) want(t *testing.T, code int, texts ...string) {
	t.Helper()
	if r.code != code {
		t.Fatalf("exit %d, want %d; stdout %q; stderr:\n%s", r.code, code, r.stdout, r.stderr)
	}
	for _, s := range texts {
		if !strings.Contains(r.stderr, s) {
			t.Errorf("stderr lacks %q:\n%s", s, r.stderr)
		}
	}
}

// refused reports whether login's redirect listener at addr is gone: a
// connection is refused, or, since other tests running meanwhile may be
// given the freed port, it reaches something that is not a credproxy
// login's page.
func refused(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return true
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "GET /callback?state=probe HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr)
	page, _ := io.ReadAll(io.LimitReader(c, 1<<16))
	return !bytes.Contains(page, []byte("<title>credproxy login</title>"))
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}
