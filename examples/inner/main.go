// Command inner is what a sandboxed process does with credproxy: it finds
// the proxy through LLXPRT_CREDENTIAL_SOCKET, takes its session's
// capability token from file descriptor 3 (LLXPRT_CAPABILITY_FD=3), and
// reads a token. It also reports what the handoff left behind, which is
// nothing: the variable is unset and descriptor 3 closed before anything
// else runs, so programs it starts inherit neither.
//
//	inner [-repeat N] [-interval D] PROVIDER
//
// Each attempt prints "token: <access token>" or "error: <error>". Run it
// as the command of credproxy run, in a sandbox or not; README.md has the
// recipes.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/credproxy/credproxy"
)

func main() {
	repeat := flag.Int("repeat", 1, "read the token this many `times`, on one connection")
	interval := flag.Duration("interval", time.Second, "wait this long between reads")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: inner [-repeat N] [-interval D] PROVIDER")
		os.Exit(2)
	}
	client, err := credproxy.NewClientFromEnv(credproxy.ClientOptions{})
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	defer client.Close()
	fmt.Printf("%s after the handoff: %q\n", credproxy.CapabilityFDEnv, os.Getenv(credproxy.CapabilityFDEnv))
	_, err = os.Stat("/proc/self/fd/3")
	fmt.Println("descriptor 3 open:", err == nil)
	if out, err := exec.Command("sh", "-c", "echo ${"+credproxy.CapabilityFDEnv+"-unset}").Output(); err == nil {
		fmt.Printf("%s in a child: %s\n", credproxy.CapabilityFDEnv, strings.TrimSpace(string(out)))
	}
	failed := false
	for i := range *repeat {
		if i > 0 {
			time.Sleep(*interval)
		}
		tok, err := client.GetToken(context.Background(), flag.Arg(0), "")
		if err != nil {
			fmt.Println("error:", err)
			failed = true
			continue
		}
		fmt.Println("token:", string(tok.AccessToken()))
	}
	if failed {
		os.Exit(1)
	}
}
