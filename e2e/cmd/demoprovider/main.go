// Command demoprovider runs a real OpenID provider on this machine, for
// trying credproxy login and logout without an account anywhere, and
// plays the user's part in its pages, for a machine without a browser.
//
//	demoprovider [-addr 127.0.0.1:9998] [-v] > providers.json   # serve until Ctrl-C
//	demoprovider browse URL                                # log in at URL as the demo user
//	demoprovider approve URI CODE                          # approve a device code as the demo user
//
// The provider is package oidcprovider: zitadel/oidc's example OpenID
// provider, with a public client named in the providers.json it prints
// (the provider "demo": browser and device login, revocation, refresh
// tokens). Its user is test-user@localhost, password verysecure.
//
// browse is a $BROWSER for credproxy login:
//
//	BROWSER="demoprovider browse" credproxy login demo
//
// It logs in as the demo user and follows the provider back to credproxy's
// redirect URI, as a browser would.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/credproxy/credproxy/e2e/oidcprovider"
)

const usage = `Usage:
  demoprovider [-addr 127.0.0.1:9998] [-token-lifetime D] [-v]
                                  serve the provider until SIGINT or SIGTERM; print a providers.json for it
  demoprovider browse URL         open URL as a browser would, and log in as the demo user
  demoprovider approve URI CODE   approve the device code CODE at URI as the demo user
`

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	var err error
	switch {
	case len(args) > 0 && args[0] == "browse":
		if len(args) != 2 {
			return usageError("browse takes URL")
		}
		err = withTimeout(func(ctx context.Context) error {
			return oidcprovider.Login(ctx, args[1], oidcprovider.DemoUser, oidcprovider.DemoPassword)
		})
	case len(args) > 0 && args[0] == "approve":
		if len(args) != 3 {
			return usageError("approve takes URI CODE")
		}
		err = withTimeout(func(ctx context.Context) error {
			return oidcprovider.ApproveDevice(ctx, args[1], args[2], oidcprovider.DemoUser, oidcprovider.DemoPassword)
		})
		if err == nil {
			fmt.Fprintf(os.Stderr, "demoprovider: approved code %s as %s\n", args[2], oidcprovider.DemoUser)
		}
	default:
		fs := flag.NewFlagSet("demoprovider", flag.ContinueOnError)
		fs.Usage = func() { fmt.Fprint(os.Stderr, usage) }
		addr := fs.String("addr", "127.0.0.1:9998", "the loopback `address` to serve on")
		verbose := fs.Bool("v", false, "log every request the provider serves, on stderr")
		lifetime := fs.Duration("token-lifetime", 0, "the access tokens' lifetime (expires_in), such as 20s, to watch credproxy refresh them (default 5m)")
		if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
			return 0
		} else if err != nil {
			return 2
		}
		if fs.NArg() > 0 {
			return usageError("unknown command %q", fs.Arg(0))
		}
		if !*verbose {
			// The example provider logs every request through slog's
			// default logger, which would bury credproxy's prompts when
			// both share a terminal.
			slog.SetDefault(slog.New(slog.DiscardHandler))
		}
		err = serve(oidcprovider.Options{Addr: *addr, AccessTokenLifetime: *lifetime})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "demoprovider:", err)
		return 1
	}
	return 0
}

func usageError(format string, args ...any) int {
	fmt.Fprintf(os.Stderr, "demoprovider: "+format+"\n%s", append(args, usage)...)
	return 2
}

// withTimeout runs f with a minute to do its work: a login that is not
// done by then is not coming.
func withTimeout(f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return f(ctx)
}

// serve runs the provider opts describe until SIGINT or SIGTERM, after printing
// a providers file for it on stdout.
func serve(opts oidcprovider.Options) error {
	p, err := oidcprovider.Start(opts)
	if err != nil {
		return err
	}
	defer p.Close()
	out, err := json.MarshalIndent(providersFile(p), "", "  ")
	if err != nil {
		return err
	}
	fmt.Printf("%s\n", out)
	fmt.Fprintf(os.Stderr, "demoprovider: serving %s as the provider \"demo\" (user %s, password %s); Ctrl-C stops it\n",
		p.Issuer, oidcprovider.DemoUser, oidcprovider.DemoPassword)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	return nil
}

// providersFile is credproxy's providers file for p's public client, under
// the name "demo".
func providersFile(p *oidcprovider.Provider) any {
	type entry struct {
		ClientID      string   `json:"client_id"`
		AuthURL       string   `json:"auth_url"`
		TokenURL      string   `json:"token_url"`
		DeviceAuthURL string   `json:"device_auth_url"`
		RevocationURL string   `json:"revocation_url"`
		Scopes        []string `json:"scopes"`
	}
	return map[string]map[string]entry{"providers": {"demo": {ClientID: p.PublicClientID, AuthURL: p.AuthURL,
		TokenURL: p.TokenURL, DeviceAuthURL: p.DeviceAuthURL, RevocationURL: p.RevocationURL, Scopes: p.Scopes}}}
}
