package e2e

import (
	"os"
	"syscall"
	"testing"
)

// The README's newcomer path works: demoprovider serves a provider and
// prints its providers file; BROWSER="demoprovider browse" (a program
// with an argument, to which login adds the URL) completes credproxy login
// with no browser on the machine; token get shows the token; demoprovider
// approve completes login -device; logout revokes and removes both; and
// demoprovider stops on SIGINT.
func TestDemoproviderWalkthroughLogsInAndOut(t *testing.T) {
	t.Parallel() // the device flow's poll interval is 5 s
	h := newHost(t, entry{})
	dp := h.start(demoproviderBin, nil, "", "-addr", "127.0.0.1:0")
	dp.await(`serving \S+ as the provider "demo"`)
	if err := os.WriteFile(h.providers, []byte(dp.out()), 0o600); err != nil {
		t.Fatal(err)
	}

	h.start(credproxyBin, []string{"BROWSER=" + demoproviderBin + " browse"}, "", "login", "demo").wait().
		want(t, 0, "opened it in the browser", "stored demo/default", "refreshable")
	h.run("token", "get", "demo").want(t, 0)

	pr := h.start(credproxyBin, nil, "", "login", "-device", "demo", "work")
	m := pr.await(`open\n\n  (http://\S+)\n\non any device and enter the code\n\n  (\S+)\n`)
	h.start(demoproviderBin, nil, "", "approve", m[1], m[2]).wait().want(t, 0)
	pr.wait().want(t, 0, "stored demo/work", "refreshable")

	h.run("logout", "demo").want(t, 0, "demo revoked the refresh token", "removed demo/default")
	h.run("logout", "demo", "work").want(t, 0, "demo revoked the refresh token", "removed demo/work")
	h.noTokens()

	if err := dp.cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	dp.wait().want(t, 0)
}
