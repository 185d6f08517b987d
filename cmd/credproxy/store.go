package main

import (
	"context"
	"flag"
	"fmt"
	"io"
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
and an expires_in (seconds from now) to it, and refuses milliseconds.
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
	default:
		return usageError("token %s: wrong number of arguments", verb)
	}
	st, err := credproxy.OpenStore(ctx)
	if err != nil {
		return err
	}
	defer st.Close()

	switch verb {
	case "get":
		tok, err := st.GetToken(ctx, provider, bucket)
		if err != nil {
			return err
		}
		if !*withRefresh {
			tok = tok.WithoutRefreshToken()
		}
		fmt.Fprintf(std.out, "%s\n", tok.Reveal())
	case "set":
		data, err := io.ReadAll(io.LimitReader(std.in, maxSecretInput+1))
		if err != nil {
			return err
		}
		tok, err := credproxy.ParseToken(data)
		if err != nil {
			return fmt.Errorf("the token on stdin: %w", err)
		}
		tok, renamed, err := tok.NormalizeRefreshToken()
		if err != nil {
			return fmt.Errorf("the token on stdin: %w", err)
		}
		if renamed != "" {
			fmt.Fprintf(std.err, "credproxy: stored the member %q as refresh_token, the name credproxy refreshes with\n", renamed)
		}
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
	default:
		return usageError("unknown token command %q", verb)
	}
	return nil
}

func keyCommand(ctx context.Context, args []string, std stdio) error {
	fs := newFlags("key", keySynopsis, keyExample, std)
	raw := fs.Bool("raw", false, "get: print the bare key instead of a JSON string")
	verb, rest, err := parseVerb(fs, args)
	if err != nil {
		return err
	}
	if (verb == "ls") != (len(rest) == 0) || len(rest) > 1 {
		return usageError("key %s: wrong number of arguments", verb)
	}
	st, err := credproxy.OpenStore(ctx)
	if err != nil {
		return err
	}
	defer st.Close()

	switch verb {
	case "get":
		key, err := st.GetAPIKey(ctx, rest[0])
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
		data, err := io.ReadAll(io.LimitReader(std.in, maxSecretInput+1))
		if err != nil {
			return err
		}
		if len(data) > maxSecretInput {
			return fmt.Errorf("the key on stdin is longer than %d bytes", maxSecretInput)
		}
		key := strings.TrimSuffix(strings.TrimSuffix(string(data), "\n"), "\r")
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
	default:
		return usageError("unknown key command %q", verb)
	}
	return nil
}

// parseVerb parses "VERB [flags] ARGS" or "[flags] VERB ARGS".
func parseVerb(fs *flag.FlagSet, args []string) (verb string, rest []string, err error) {
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		verb, args = args[0], args[1:]
	}
	if err := parseFlags(fs, args); err != nil {
		return "", nil, err
	}
	rest = fs.Args()
	if verb == "" {
		if len(rest) == 0 {
			return "", nil, usageError("missing command: get, set, rm or ls")
		}
		verb, rest = rest[0], rest[1:]
	}
	return verb, rest, nil
}
