package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/credproxy/credproxy"
)

// get requests u with c and returns the status and body.
func get(t *testing.T, c *http.Client, u string) (int, string) {
	t.Helper()
	resp, err := c.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// The redirect listener takes the first request on its path as the
// answer, whatever it says: a code with the right state, or an error
// (the wrong state, none, a provider's error quoted so that it cannot
// drive the terminal, no code). It closes before the browser has the
// page, which never shows the code; other paths get 404 and do not count.
func TestCallbackTakesOneAnswerThenCloses(t *testing.T) {
	for _, tc := range []struct {
		name, query string
		status      int
		code, err   string
	}{
		{"code", "state=S1&code=the-code", 200, "the-code", ""},
		{"wrong state", "state=S2&code=the-code", 400, "", "wrong state"},
		{"no state", "code=the-code", 400, "", "wrong state"},
		{"provider error", "state=S1&error=access_denied&error_description=no+thanks", 400, "",
			`the provider refused the login: "access_denied" ("no thanks")`},
		{"terminal escapes", "state=S1&error=%1B%5B2J", 400, "", `"\x1b[2J"`},
		{"no code", "state=S1", 400, "", "neither a code nor an error"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cb, err := listenCallback("", "S1")
			if err != nil {
				t.Fatal(err)
			}
			defer cb.close()
			u, _ := url.Parse(cb.redirect)
			if u.Hostname() != "127.0.0.1" || u.Path != "/callback" || u.Port() == "0" {
				t.Errorf("redirect URI %s", cb.redirect)
			}
			if status, _ := get(t, http.DefaultClient, "http://"+u.Host+"/favicon.ico"); status != 404 {
				t.Errorf("another path: %d, want 404", status)
			}
			status, body := get(t, http.DefaultClient, cb.redirect+"?"+tc.query)
			if status != tc.status || !strings.Contains(body, "You can close this window.") || strings.Contains(body, "the-code") {
				t.Errorf("the page: %d %q", status, body)
			}
			if c, err := net.DialTimeout("tcp", u.Host, time.Second); err == nil {
				c.Close()
				t.Error("the listener accepts a connection after the answer")
			}
			code, err := cb.wait(t.Context())
			if code != tc.code || tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Errorf("wait: %q, %v; want %q and an error with %q", code, err, tc.code, tc.err)
			}
		})
	}
}

// A second request on a connection the browser kept open is told the
// login is over, and does not replace the answer.
func TestCallbackAnswersOnceOnAKeptConnection(t *testing.T) {
	cb, err := listenCallback("", "S")
	if err != nil {
		t.Fatal(err)
	}
	defer cb.close()
	c := &http.Client{Transport: &http.Transport{}}
	get(t, c, cb.redirect+"?state=S&code=first")
	if status, _ := get(t, c, cb.redirect+"?state=S&code=second"); status != http.StatusGone {
		t.Errorf("a second request: %d, want 410", status)
	}
	if code, err := cb.wait(t.Context()); code != "first" || err != nil {
		t.Errorf("wait: %q, %v", code, err)
	}
}

// A redirect_url names the address and path, and the provider is given
// the URL as written.
func TestCallbackListensWhereTheRedirectURLSays(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	redirect := "http://127.0.0.1:" + port + "/oauth/cb"
	cb, err := listenCallback(redirect, "S")
	if err != nil {
		t.Fatal(err)
	}
	defer cb.close()
	if cb.redirect != redirect {
		t.Errorf("redirect URI %s, want %s", cb.redirect, redirect)
	}
	if status, _ := get(t, http.DefaultClient, "http://127.0.0.1:"+port+"/callback"); status != 404 {
		t.Errorf("the default path: %d, want 404", status)
	}
	get(t, http.DefaultClient, "http://127.0.0.1:"+port+"/oauth/cb?state=S&code=c")
	if code, err := cb.wait(t.Context()); code != "c" || err != nil {
		t.Errorf("wait: %q, %v", code, err)
	}
}

// Waiting ends with the context, with its error.
func TestCallbackWaitEndsWithTheContext(t *testing.T) {
	cb, err := listenCallback("", "S")
	if err != nil {
		t.Fatal(err)
	}
	defer cb.close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Millisecond)
	defer cancel()
	if _, err := cb.wait(ctx); err != context.DeadlineExceeded {
		t.Errorf("wait: %v", err)
	}
}

// $BROWSER is a program and its arguments, split at spaces, and the URL
// comes last, whole; without it each platform has its opener, and Linux
// and the BSDs have one only with a display.
func TestBrowserIsBROWSERWithItsArgumentsElseThePlatformsOpener(t *testing.T) {
	const u = "http://127.0.0.1:9998/auth?a=1&b=2 3"
	t.Setenv("BROWSER", "demoprovider  browse ")
	if got := browserCommand(u); !slices.Equal(got, []string{"demoprovider", "browse", u}) {
		t.Errorf("with $BROWSER: %q", got)
	}
	t.Setenv("BROWSER", "")
	t.Setenv("DISPLAY", "")
	t.Setenv("WAYLAND_DISPLAY", "")
	var want []string
	switch runtime.GOOS {
	case "darwin":
		want = []string{"open", u}
	case "windows":
		want = []string{"rundll32", "url.dll,FileProtocolHandler", u}
	}
	if got := browserCommand(u); !slices.Equal(got, want) {
		t.Errorf("without $BROWSER or a display: %q, want %q", got, want)
	}
	t.Setenv("WAYLAND_DISPLAY", "wayland-0")
	if got := browserCommand(u); runtime.GOOS != "darwin" && runtime.GOOS != "windows" && !slices.Equal(got, []string{"xdg-open", u}) {
		t.Errorf("with a display: %q", got)
	}
}

// A browser that cannot be started is not an error: openBrowser says so
// and returns false, and the user opens the printed URL.
func TestOpenBrowserThatCannotStartIsNotAnError(t *testing.T) {
	t.Setenv("BROWSER", "/nonexistent/browser --new-window")
	var stderr bytes.Buffer
	if openBrowser("http://127.0.0.1/", stdio{err: &stderr}) {
		t.Error("openBrowser says it opened a browser that does not exist")
	}
	if !strings.Contains(stderr.String(), "could not start a browser (/nonexistent/browser)") {
		t.Errorf("stderr: %q", stderr.String())
	}
}

// The browser gets neither the store's password nor a session's socket:
// it is another program, not ours to trust with them. Found by an
// attacking review, whose BROWSER script printed the password.
func TestBrowserDoesNotInheritTheStorePassword(t *testing.T) {
	out := filepath.Join(t.TempDir(), "env")
	t.Setenv(credproxy.KeyringPasswordEnv, fakePassword)
	t.Setenv("BROWSER", "sh -c env>"+out)
	if !openBrowser("http://127.0.0.1/", stdio{err: io.Discard}) {
		t.Fatal("the browser did not start")
	}
	var env []byte
	for i := 0; i < 500 && len(env) == 0; i++ { // a bounded wait for the browser to write
		time.Sleep(10 * time.Millisecond)
		env, _ = os.ReadFile(out)
	}
	if len(env) == 0 {
		t.Fatal("the browser wrote no environment")
	}
	if strings.Contains(string(env), fakePassword) || strings.Contains(string(env), credproxy.KeyringPasswordEnv) {
		t.Errorf("the browser's environment holds the store's password")
	}
}

// login and logout have help with the providers file and an example, on
// stdout; wrong arguments are usage errors (exit 2), found before any
// store or provider is touched.
func TestLoginAndLogoutHelpGoesToStdoutAndBadArgumentsAreUsageErrors(t *testing.T) {
	for _, args := range [][]string{{"login", "-help"}, {"logout", "-help"}, {"help", "login"}} {
		var stdout, stderr bytes.Buffer
		code := mainWith(args, stdio{strings.NewReader(""), &stdout, &stderr})
		if code != 0 || !strings.Contains(stdout.String(), "Usage:") || !strings.Contains(stdout.String(), "Example:") || stderr.Len() != 0 {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, stdout.String(), stderr.String())
		}
	}
	var stdout bytes.Buffer
	mainWith([]string{"login", "-help"}, stdio{strings.NewReader(""), &stdout, io.Discard})
	if !strings.Contains(stdout.String(), "client_secret_key") {
		t.Error("login -help does not describe the providers file")
	}
	for _, args := range [][]string{{"login"}, {"login", "a", "b", "c"}, {"login", "-timeout", "0", "demo"},
		{"login", "-bogus", "demo"}, {"logout"}, {"logout", "a", "b", "c"}} {
		var stderr bytes.Buffer
		if code := mainWith(args, stdio{strings.NewReader(""), io.Discard, &stderr}); code != exitUsage {
			t.Errorf("%v: exit %d, stderr %q; want 2", args, code, stderr.String())
		}
	}
}
