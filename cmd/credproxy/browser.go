package main

import (
	"fmt"
	"os"
	"os/exec"
	"strings"

	"github.com/credproxy/credproxy"
)

// browserEnv names the user's browser, as xdg-open and Python's
// webbrowser read it: a program, optionally followed by arguments,
// separated by spaces (no quoting), to which the URL is added as the last
// argument.
const browserEnv = "BROWSER"

// browserCommand returns the command that opens u in the user's browser:
// $BROWSER if set, else the platform's opener (see platformBrowser), or
// nil if there is none.
func browserCommand(u string) []string {
	if b := strings.Fields(os.Getenv(browserEnv)); len(b) > 0 {
		return append(b, u)
	}
	return platformBrowser(u)
}

// openBrowser starts the user's browser on u and does not wait for it:
// openers such as xdg-open may run as long as the browser does. Failing
// to start one is not an error, since u is printed for the user to open:
// it says so and returns false. The browser's stderr is the command's, so
// that its complaints are seen; its stdout is discarded.
func openBrowser(u string, std stdio) bool {
	argv := browserCommand(u)
	if len(argv) == 0 {
		return false
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	// The browser is not ours to trust with the store's password, nor a
	// session's socket.
	cmd.Env = withoutEnv(os.Environ(), append(hostSecretEnv(), credproxy.SocketEnv, credproxy.CapabilityFDEnv)...)
	cmd.Stderr = std.err
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(std.err, "credproxy: could not start a browser (%s): %v; open the URL yourself\n", argv[0], err)
		return false
	}
	go cmd.Wait() // reap it whenever it ends
	return true
}
