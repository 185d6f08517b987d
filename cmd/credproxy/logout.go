package main

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/credproxy/credproxy"
)

const logoutSynopsis = `Usage: credproxy logout [-no-revoke] [-providers FILE] PROVIDER [BUCKET]

Removes the token of PROVIDER and BUCKET (default: default) from the host's
store, after asking the provider to revoke it (RFC 7009: its refresh token,
then its access token) when the providers file gives PROVIDER a
revocation_url. If the provider does not confirm the revocation, the token
is kept and logout exits 1: try again, or use -no-revoke, which removes the
token here only and leaves it valid at the provider until it expires. Like
login, logout runs on the host; 'credproxy login -help' describes the
providers file.`

const logoutExample = `  credproxy logout anthropic          # revoke at the provider, then remove
  credproxy logout -no-revoke example work   # remove example/work here only`

func logoutCommand(ctx context.Context, args []string, std stdio) error {
	fs := newFlags("logout", logoutSynopsis, logoutExample, std)
	noRevoke := fs.Bool("no-revoke", false, "remove the token here only, without asking the provider to revoke it")
	file := fs.String("providers", "", "the providers `file` (default: $CREDPROXY_PROVIDERS, else providers.json in the config directory)")
	names, err := providerArgs(fs, args)
	if err != nil {
		return err
	}
	name, bucket := names[0], credproxy.DefaultBucket
	if len(names) == 2 {
		bucket = names[1]
	}
	localOnly := fmt.Sprintf("'credproxy logout -no-revoke %s' removes it here only", strings.Join(names, " "))
	var pv *provider
	if !*noRevoke {
		// Only revoking needs the provider's entry.
		if pv, _, err = loadProvider(*file, names); err != nil {
			return fmt.Errorf("%w; %s", err, localOnly)
		}
	}

	st, err := hostStore(ctx, *file, true, std)
	if errors.Is(err, credproxy.ErrNoStore) {
		return fmt.Errorf("no token for %s/%s: %w", name, bucket, err)
	}
	if err != nil {
		return err
	}
	defer st.Close()
	// Hold the token's lock, as a refresh does, so that a proxy serving
	// this store cannot store a refreshed token between the revocation
	// and the removal.
	unlock, err := lockToken(ctx, st, name, bucket)
	if err != nil {
		return err
	}
	defer unlock()
	tok, err := st.GetToken(ctx, name, bucket)
	if errors.Is(err, credproxy.ErrNotFound) {
		return fmt.Errorf("%w; 'credproxy token ls' lists the tokens there are", err)
	}
	if err != nil {
		return err
	}

	switch {
	case *noRevoke:
		fmt.Fprintf(std.err, "credproxy: not revoked (-no-revoke): the token stays valid at %s until it expires\n", name)
	case pv.RevocationURL == "":
		fmt.Fprintf(std.err, "credproxy: %s has no revocation_url, so the token was not revoked there: it stays valid until it expires, or until you revoke the client's access in your account at the provider\n", name)
	default:
		secret, err := pv.clientSecret(ctx, st)
		if err != nil {
			return fmt.Errorf("%w; the token is still in the store; %s", err, localOnly)
		}
		revoked, err := revoke(ctx, pv, secret, tok)
		if err != nil {
			return fmt.Errorf("%w; the token is still in the store: try again, or %s", err, localOnly)
		}
		fmt.Fprintf(std.err, "credproxy: %s revoked %s\n", name, revoked)
	}
	if err := st.RemoveToken(ctx, name, bucket); err != nil {
		return err
	}
	fmt.Fprintf(std.err, "credproxy: removed %s/%s from the store\n", name, bucket)
	return nil
}

// lockToken takes st's lock of a token, if st has one (both the keyring
// and the etcd store do).
func lockToken(ctx context.Context, st credproxy.Store, provider, bucket string) (unlock func(), err error) {
	if l, ok := st.(credproxy.TokenLocker); ok {
		return l.LockToken(ctx, provider, bucket)
	}
	return func() {}, nil
}
