package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"

	"github.com/credproxy/credproxy"
	"github.com/go-json-experiment/json/jsontext"
)

const tokenSynopsis = `Usage:
  credproxy token get [-with-refresh-token] PROVIDER [BUCKET]   print the token as JSON
  credproxy token set PROVIDER [BUCKET] < token.json             store the token read from stdin
  credproxy token rm PROVIDER [BUCKET]                           remove the token
  credproxy token ls [PROVIDER]                                  list PROVIDER/BUCKET, one per line

On the host these work on the keyring store; with LLXPRT_CREDENTIAL_SOCKET set
(in a sandbox) they go through the proxy, which never returns a refresh token
and keeps its own when a token is set. The token is read from stdin, never
from the command line, where ps would show it.

A token is a JSON object: access_token (required), refresh_token, expiry,
token_type, scope, and any other member, which is kept as it is. expiry is
Unix seconds; set converts an RFC 3339 time (as Go's oauth2.Token writes it)
and an expires_in (seconds from now) to it, and refuses milliseconds. set
also takes an agent CLI's credential file as it is (Claude Code's
.credentials.json, the Codex CLI's auth.json, the Gemini CLI's
oauth_creds.json): camelCase names and millisecond expiries are converted,
and set says what it converted.
PROTOCOL.md, "Token format", in the credproxy source has the rules.`

const tokenExample = `  credproxy token set anthropic < token.json
  credproxy token get anthropic | jq -r .access_token`

const keySynopsis = `Usage:
  credproxy key get [-raw] NAME   print the API key as a JSON string (-raw: bare)
  credproxy key set NAME < key    store the key read from stdin (one trailing newline dropped)
  credproxy key rm NAME           remove the key
  credproxy key ls                list key names, one per line

set and rm work on the host only; get and ls also work through the proxy.`

const keyExample = `  printf '%s' "$OPENAI_API_KEY" | credproxy key set openai
  credproxy key get -raw openai`

// maxSecretInput bounds what set reads from stdin: a frame's worth.
const maxSecretInput = credproxy.MaxFrameSize

// The commands of token and key, in the order the help gives them.
var storeVerbs = []string{"get", "set", "rm", "ls"}

func tokenCommand(ctx context.Context, args []string, std stdio) error {
	fs := newFlags("token", tokenSynopsis, tokenExample, std)
	withRefresh := fs.Bool("with-refresh-token", false, "get: include the refresh token (host only; it is a long-lived secret)")
	verb, rest, err := parseVerb(fs, args)
	if err != nil {
		return err
	}
	provider, bucket := "", ""
	switch {
	case verb == "ls" && len(rest) <= 1:
		if len(rest) == 1 {
			provider = rest[0]
		}
	case verb != "ls" && (len(rest) == 1 || len(rest) == 2):
		provider = rest[0]
		if len(rest) == 2 {
			bucket = rest[1]
		}
	case verb == "ls":
		return usageError("token ls takes [PROVIDER]; run 'credproxy token -help'")
	default:
		return usageError("token %s takes PROVIDER [BUCKET]; run 'credproxy token -help'", verb)
	}
	var tok credproxy.Token
	if verb == "set" {
		if tok, err = readToken(std); err != nil {
			return err
		}
	}
	st, err := openStore(ctx, verb, std)
	if st == nil {
		return err
	}
	defer st.Close()

	switch verb {
	case "get":
		tok, err := st.GetToken(ctx, provider, bucket)
		if errors.Is(err, credproxy.ErrNotFound) {
			return fmt.Errorf("%w; 'credproxy token ls' lists the tokens there are", err)
		}
		if err != nil {
			return err
		}
		if !*withRefresh {
			tok = tok.WithoutRefreshToken()
		}
		fmt.Fprintf(std.out, "%s\n", tok.Reveal())
	case "set":
		return st.SaveToken(ctx, provider, bucket, tok)
	case "rm":
		return st.RemoveToken(ctx, provider, bucket)
	case "ls":
		providers := []string{provider}
		if provider == "" {
			if providers, err = st.ListProviders(ctx); err != nil {
				return err
			}
		}
		for _, p := range providers {
			buckets, err := st.ListBuckets(ctx, p)
			if err != nil {
				return err
			}
			for _, b := range buckets {
				fmt.Fprintf(std.out, "%s/%s\n", p, b)
			}
		}
	}
	return nil
}

// readToken reads the token that token set stores from stdin, before the
// store is opened, so that bad input neither creates a store nor asks for
// its password.
func readToken(std stdio) (credproxy.Token, error) {
	data, err := io.ReadAll(io.LimitReader(std.in, maxSecretInput+1))
	if err != nil {
		return credproxy.Token{}, err
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return credproxy.Token{}, errors.New("stdin is empty: give the token as JSON on stdin, as in 'credproxy token set PROVIDER < token.json'")
	}
	tok, converted, err := credproxy.ImportToken(data)
	if err != nil {
		return credproxy.Token{}, fmt.Errorf("the token on stdin: %w", err)
	}
	if converted != "" {
		fmt.Fprintf(std.err, "credproxy: the token on stdin: %s\n", converted)
	}
	tok, renamed, err := tok.NormalizeRefreshToken()
	if err != nil {
		return credproxy.Token{}, fmt.Errorf("the token on stdin: %w", err)
	}
	if renamed != "" {
		fmt.Fprintf(std.err, "credproxy: stored the member %q as refresh_token, the name credproxy refreshes with\n", renamed)
	}
	return tok, nil
}

func keyCommand(ctx context.Context, args []string, std stdio) error {
	fs := newFlags("key", keySynopsis, keyExample, std)
	raw := fs.Bool("raw", false, "get: print the bare key instead of a JSON string")
	verb, rest, err := parseVerb(fs, args)
	if err != nil {
		return err
	}
	if verb == "ls" && len(rest) != 0 {
		return usageError("key ls takes no arguments; run 'credproxy key -help'")
	}
	if verb != "ls" && len(rest) != 1 {
		return usageError("key %s takes NAME; run 'credproxy key -help'", verb)
	}
	var key string
	if verb == "set" {
		data, err := io.ReadAll(io.LimitReader(std.in, maxSecretInput+1))
		if err != nil {
			return err
		}
		if len(data) > maxSecretInput {
			return fmt.Errorf("the key on stdin is longer than %d bytes", maxSecretInput)
		}
		key = strings.TrimSuffix(strings.TrimSuffix(string(data), "\n"), "\r")
		if key == "" {
			return errors.New(`stdin is empty: give the key on stdin, as in printf '%s' "$KEY" | credproxy key set NAME`)
		}
	}
	st, err := openStore(ctx, verb, std)
	if st == nil {
		return err
	}
	defer st.Close()

	switch verb {
	case "get":
		key, err := st.GetAPIKey(ctx, rest[0])
		if errors.Is(err, credproxy.ErrNotFound) {
			return fmt.Errorf("%w; 'credproxy key ls' lists the keys there are", err)
		}
		if err != nil {
			return err
		}
		if *raw {
			fmt.Fprintln(std.out, string(key))
			return nil
		}
		quoted, err := jsontext.AppendQuote(nil, string(key))
		if err != nil {
			return fmt.Errorf("key %s is not valid UTF-8; use -raw", rest[0])
		}
		fmt.Fprintf(std.out, "%s\n", quoted)
	case "set":
		return st.SaveAPIKey(ctx, rest[0], credproxy.Secret(key))
	case "rm":
		return st.RemoveAPIKey(ctx, rest[0])
	case "ls":
		names, err := st.ListAPIKeys(ctx)
		if err != nil {
			return err
		}
		for _, n := range names {
			fmt.Fprintln(std.out, n)
		}
	}
	return nil
}

// parseVerb parses "VERB ARGS" with fs's flags anywhere among them, up to
// a "--" after which every argument is a name. An unknown VERB is named
// before anything else is looked at.
func parseVerb(fs *flag.FlagSet, args []string) (verb string, rest []string, err error) {
	unknown := func(verb string) error {
		return usageError("unknown %s command %q; use get, set, rm or ls", fs.Name(), verb)
	}
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") && !slices.Contains(storeVerbs, args[0]) {
		return "", nil, unknown(args[0])
	}
	names, err := parseNames(fs, args)
	if err != nil {
		return "", nil, err
	}
	if len(names) == 0 {
		return "", nil, usageError("%s needs a command: get, set, rm or ls; run 'credproxy %s -help'", fs.Name(), fs.Name())
	}
	if !slices.Contains(storeVerbs, names[0]) {
		return "", nil, unknown(names[0])
	}
	return names[0], names[1:], nil
}

// parseNames parses args with fs's flags anywhere among them, up to a
// "--" after which every argument is a name, and returns the names.
func parseNames(fs *flag.FlagSet, args []string) ([]string, error) {
	var names []string
	for {
		if err := parseFlags(fs, args); err != nil {
			return nil, err
		}
		left := fs.Args()
		if len(left) == 0 {
			return names, nil
		}
		if len(args) > len(left) && args[len(args)-len(left)-1] == "--" {
			return append(names, left...), nil
		}
		names, args = append(names, left[0]), left[1:]
	}
}

// defaultStore is run's and serve's -store default: $CREDPROXY_STORE, else
// keyring.
func defaultStore() string {
	if s := os.Getenv(storeEnv); s != "" {
		return s
	}
	return "keyring"
}

// hostStore opens the host's store for the commands that manage it
// (token, key, login, logout, providers): the keyring store, or with
// CREDPROXY_STORE=etcd the fleet's, whose settings come from the
// providers file that providersFlag (or the default) names. mustExist
// applies to the keyring store: a command that only reads or removes does
// not create one.
func hostStore(ctx context.Context, providersFlag string, mustExist bool, std stdio) (credproxy.StoreCloser, error) {
	switch kind := defaultStore(); kind {
	case "keyring":
		return credproxy.OpenKeyringStore(credproxy.KeyringOptions{MustExist: mustExist})
	case "etcd":
		provs, err := openProviders(providersFlag)
		if err != nil {
			return nil, err
		}
		log := slog.New(slog.NewTextHandler(std.err, &slog.HandlerOptions{Level: slog.LevelWarn}))
		return openEtcdStore(ctx, provs.etcd, log, std)
	default:
		return nil, fmt.Errorf("%s=%s: the commands that manage credentials work on keyring or etcd", storeEnv, kind)
	}
}

// openStore opens the store a token or key command works on: the proxy's
// when LLXPRT_CREDENTIAL_SOCKET is set, else the host's. On a host with no
// store yet, a command that only reads or removes does not create one (or
// ask for its password): ls says there is none and succeeds, with a nil
// store and error; get and rm fail, saying so.
func openStore(ctx context.Context, verb string, std stdio) (credproxy.StoreCloser, error) {
	if os.Getenv(credproxy.SocketEnv) != "" {
		return credproxy.OpenStore(ctx)
	}
	st, err := hostStore(ctx, "", verb != "set", std)
	if errors.Is(err, credproxy.ErrNoStore) {
		dir, _ := credproxy.DefaultKeyringDir()
		msg := fmt.Sprintf("no credential store in %s yet; 'credproxy token set PROVIDER < token.json' or 'credproxy key set NAME < key' creates it", dir)
		if verb == "ls" {
			fmt.Fprintln(std.err, "credproxy:", msg)
			return nil, nil
		}
		return nil, errors.New(msg)
	}
	if err != nil {
		return nil, err
	}
	return st, nil
}
