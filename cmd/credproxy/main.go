// Command credproxy runs a program, typically a sandbox launcher, with a
// credential proxy session beside it: the program reaches the access
// tokens and API keys its grant names through the socket named by
// LLXPRT_CREDENTIAL_SOCKET, with the session's capability token on file
// descriptor 3, and never sees a refresh token. It also manages the host's
// store.
//
//	credproxy run -allow-provider anthropic -- bwrap ... -- agent
//	credproxy serve -allow-provider anthropic
//	credproxy token set anthropic < token.json
//	credproxy token get anthropic            # on the host or in the sandbox
//	credproxy key set openai < key.txt
//	credproxy version
//
// Run "credproxy COMMAND -help" for each command's flags and an example.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"

	"github.com/credproxy/credproxy"
)

const usage = `credproxy hands credentials to a sandboxed program, without the refresh tokens.

Usage:
  credproxy run [flags] -- CMD [ARGS...]   run CMD with a credential proxy session beside it
  credproxy serve [flags]                  serve one session until SIGINT, SIGTERM or SIGHUP
  credproxy forward [-listen ADDR] [-- CMD] in a sandbox: relay its loopback port to the injecting front
  credproxy token get|set|rm|ls [ARGS]     manage OAuth tokens
  credproxy key get|set|rm|ls [ARGS]       manage API keys
  credproxy login PROVIDER [BUCKET]        log in to a provider on the host, store the token
  credproxy logout PROVIDER [BUCKET]       revoke the token at the provider, remove it
  credproxy providers                      list the providers configured and the tokens' states
  credproxy reseal                         seal a fleet's etcd store again with its current data key
  credproxy version                        print the version

Run 'credproxy COMMAND -help' for a command's flags and a worked example.
A session's sandbox may read what -allow-provider, -allow-bucket and -allow-key
name, and nothing else, and may change nothing unless -allow-write is given.
The store is the host's keyring store (see CREDPROXY_KEYRING_BACKEND and
CREDPROXY_KEYRING_PASSWORD); with LLXPRT_CREDENTIAL_SOCKET set, token and key
commands go through the proxy instead, presenting the capability token found
on file descriptor 3 (LLXPRT_CAPABILITY_FD=3). Tokens are JSON objects:
'credproxy token -help' says what they hold, and PROTOCOL.md, "Token format",
in the credproxy source, has the rules.
`

// Exit codes besides the command's own: 1 for an error, 2 for a usage
// error; and for run, as container runtimes use them, 125 for run's own
// errors (CMD never started), 126 when CMD cannot be executed and 127 when
// it is not found.
const (
	exitError      = 1
	exitUsage      = 2
	exitNoProxy    = 125
	exitCannotExec = 126
	exitNotFound   = 127
	exitSignalBase = 128
)

// stdio is where a command reads and writes; tests replace it.
type stdio struct {
	in       io.Reader
	out, err io.Writer
}

func main() {
	os.Exit(mainWith(os.Args[1:], stdio{os.Stdin, os.Stdout, os.Stderr}))
}

func mainWith(args []string, std stdio) int {
	if len(args) == 0 {
		fmt.Fprint(std.err, usage)
		return exitUsage
	}
	ctx := context.Background()
	cmd, args := args[0], args[1:]
	var err error
	switch cmd {
	case "run":
		return runCommand(ctx, args, std)
	case "serve":
		err = serveCommand(ctx, args, std)
	case "forward":
		return forwardCommand(args, std)
	case "token":
		err = tokenCommand(ctx, args, std)
	case "key":
		err = keyCommand(ctx, args, std)
	case "providers":
		err = providersCommand(ctx, args, std)
	case "reseal":
		err = resealCommand(ctx, args, std)
	case "login":
		err = loginCommand(ctx, args, std)
	case "logout":
		err = logoutCommand(ctx, args, std)
	case "version", "-version", "--version":
		err = versionCommand(args, std)
	case "help", "-h", "-help", "--help":
		switch {
		case len(args) > 0 && slices.Contains([]string{"run", "serve", "forward", "token", "key", "login", "logout", "providers", "reseal", "version"}, args[0]):
			return mainWith([]string{args[0], "-help"}, std)
		case len(args) > 0:
			return report(usageError("no command %q; run 'credproxy help'", args[0]), std)
		}
		fmt.Fprint(std.out, usage)
		return 0
	default:
		err = usageError("unknown command %q; run 'credproxy help'", cmd)
	}
	return report(err, std)
}

const versionSynopsis = `Usage: credproxy version

Prints credproxy's version, the protocol version it speaks, and the Go
version and platform it was built with. -version and --version do the same.`

func versionCommand(args []string, std stdio) error {
	fs := newFlags("version", versionSynopsis, "  credproxy version", std)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError("version takes no arguments")
	}
	fmt.Fprintf(std.out, "credproxy %s (protocol %d, %s %s/%s)\n", version(), credproxy.ProtocolVersion,
		runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return nil
}

// report prints err, if any, on stderr with one credproxy: prefix, and
// returns the exit code it calls for: 0 for the help that was asked for
// (already printed on stdout), 2 for a usage error, 1 for any other.
func report(err error, std stdio) int {
	var uerr *usageErr
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &uerr):
		fmt.Fprintln(std.err, "credproxy:", message(err))
		return exitUsage
	}
	fmt.Fprintln(std.err, "credproxy:", message(err))
	return exitError
}

// reportRun prints err, an error of run's own, as report does, and returns
// the exit code run ends with for it: 0 for the help that was asked for,
// and 125 for every other error, usage errors included, as container
// runtimes do, so that it cannot be taken for CMD's own status.
func reportRun(err error, std stdio) int {
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintln(std.err, "credproxy:", message(err))
	return exitNoProxy
}

// reportStart prints err, the error of starting CMD, and returns the exit
// code run ends with for it, as shells and container runtimes report
// them: 127 when CMD was not found, 126 when it could not be executed, and
// 125 otherwise.
func reportStart(err error, std stdio) int {
	fmt.Fprintln(std.err, "credproxy:", message(err))
	switch {
	case errors.Is(err, exec.ErrNotFound), errors.Is(err, fs.ErrNotExist):
		return exitNotFound
	case errors.Is(err, fs.ErrPermission), errors.Is(err, syscall.ENOEXEC):
		return exitCannotExec
	}
	return exitNoProxy
}

// message is err's text without the credproxy: prefixes that the
// library's errors carry (embedders print them as they are), so that the
// one the command adds is the only one. A prefix starts the text or
// follows ": " or "; ", where wrapping puts it; anywhere else
// "credproxy: " ends a path, such as the store's ~/.config/credproxy, and
// stays.
func message(err error) string {
	const prefix = "credproxy: "
	text := err.Error()
	var b strings.Builder
	for i := 0; i < len(text); {
		if strings.HasPrefix(text[i:], prefix) && (i == 0 || strings.HasSuffix(text[:i], ": ") || strings.HasSuffix(text[:i], "; ")) {
			i += len(prefix)
			continue
		}
		b.WriteByte(text[i])
		i++
	}
	return b.String()
}

type usageErr struct{ msg string }

func (e *usageErr) Error() string { return e.msg }

func usageError(format string, args ...any) error { return &usageErr{fmt.Sprintf(format, args...)} }

// version is the module version the binary was built from, or "devel".
func version() string {
	if info, ok := debug.ReadBuildInfo(); ok && info.Main.Version != "" && info.Main.Version != "(devel)" {
		return info.Main.Version
	}
	return "devel"
}

// newFlags returns a flag set for a command whose help prints synopsis,
// then the flags, then example. Parse it with [parseFlags]: help that was
// asked for (-h, -help, --help) goes to stdout, and the flag package
// itself prints nothing, so that a usage error is reported once.
func newFlags(name, synopsis, example string, std stdio) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	out := new(flagOutput)
	fs.SetOutput(out)
	fs.Usage = func() {
		if out.failed {
			return // a usage error, which parseFlags returns
		}
		fmt.Fprintf(std.out, "%s\n", strings.TrimSpace(synopsis))
		if hasFlags(fs) {
			fmt.Fprintln(std.out, "\nFlags:")
			fs.SetOutput(std.out)
			fs.PrintDefaults()
			fs.SetOutput(out)
		}
		fmt.Fprintf(std.out, "\nExample:\n%s\n", example)
	}
	return fs
}

// flagOutput is the output of a flag set from newFlags: it discards what
// the flag package writes there, which is the message of a usage error, and
// notes that there was one.
type flagOutput struct{ failed bool }

func (o *flagOutput) Write(p []byte) (int, error) {
	o.failed = true
	return len(p), nil
}

// parseFlags parses args with fs, a flag set from newFlags, and returns
// flag.ErrHelp when help was asked for (and printed), or a usage error
// that says where the help is.
func parseFlags(fs *flag.FlagSet, args []string) error {
	err := fs.Parse(args)
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return err
	}
	return usageError("%s: %v; run 'credproxy %s -help'", fs.Name(), err, fs.Name())
}

func hasFlags(fs *flag.FlagSet) bool {
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	return n > 0
}
