package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/credproxy/credproxy"
)

const providersSynopsis = `Usage: credproxy providers [-providers FILE]

Lists the providers configured in the providers file, then every token in
the host's store, with when it expires and whether the host can refresh it.
It prints no secret.

` + providersHelp

const providersExample = `  mkdir -p -m 700 ~/.config/credproxy   # the store's directory too: only you may read it
  echo '{"providers": {"demo": {"client_id": "credproxy-cli",
    "auth_url": "http://127.0.0.1:9998/auth", "token_url": "http://127.0.0.1:9998/oauth/token",
    "device_auth_url": "http://127.0.0.1:9998/device_authorization",
    "revocation_url": "http://127.0.0.1:9998/revoke", "scopes": ["openid", "offline_access"]}}}' \
    > ~/.config/credproxy/providers.json
  credproxy providers`

func providersCommand(ctx context.Context, args []string, std stdio) error {
	if os.Getenv(credproxy.SocketEnv) != "" {
		return errors.New("providers lists the host's configuration and store; run it on the host, not in a sandbox")
	}
	fs := newFlags("providers", providersSynopsis, providersExample, std)
	file := fs.String("providers", "", "the providers `file` (default: $"+providersEnv+", else providers.json in the config directory)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError("providers takes no arguments; 'credproxy token ls PROVIDER' lists one provider's tokens")
	}
	provs, err := openProviders(*file)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(std.out, 0, 4, 2, ' ', 0)
	if len(provs.byName) == 0 {
		fmt.Fprintf(w, "no providers configured in %s; 'credproxy providers -help' shows how\n", provs.path)
	} else {
		fmt.Fprintf(w, "providers in %s:\n", provs.path)
		for _, name := range provs.names() {
			fmt.Fprintf(w, "  %s\t%s\n", name, provs.byName[name].describe())
		}
	}
	st, err := hostStore(ctx, *file, true, std)
	if errors.Is(err, credproxy.ErrNoStore) {
		fmt.Fprintln(w, "\ntokens: none, and no store yet: 'credproxy login PROVIDER' creates it")
		return w.Flush()
	}
	if err != nil {
		w.Flush()
		return err
	}
	defer st.Close()
	rows, err := tokenStates(ctx, st, provs, time.Now())
	if err != nil {
		w.Flush()
		return err
	}
	fmt.Fprintln(w, "\ntokens:")
	if len(rows) == 0 {
		fmt.Fprintln(w, "  none: 'credproxy login PROVIDER' gets one")
	}
	for _, r := range rows {
		fmt.Fprintf(w, "  %s\t%s\t%s\n", r.key, r.expiry, r.refresh)
	}
	return w.Flush()
}

// tokenState is how providers lists a token.
type tokenState struct{ key, expiry, refresh string }

// tokenStates describes every token in st, by provider and bucket: its
// expiry, and whether the host can refresh it (it has a refresh token and
// its provider is configured).
func tokenStates(ctx context.Context, st credproxy.Store, provs providers, now time.Time) ([]tokenState, error) {
	names, err := st.ListProviders(ctx)
	if err != nil {
		return nil, err
	}
	var rows []tokenState
	for _, p := range names {
		buckets, err := st.ListBuckets(ctx, p)
		if err != nil {
			return nil, err
		}
		slices.Sort(buckets)
		for _, b := range buckets {
			tok, err := st.GetToken(ctx, p, b)
			if errors.Is(err, credproxy.ErrNotFound) {
				continue // removed meanwhile
			}
			row := tokenState{key: p + "/" + b}
			if err != nil {
				row.expiry, row.refresh = "unreadable: "+message(err), "-"
				rows = append(rows, row)
				continue
			}
			row.expiry = describeExpiry(tok, now)
			_, configured := provs.byName[p]
			switch {
			case tok.RefreshToken() == "" && configured:
				row.refresh = fmt.Sprintf("not refreshable: no refresh token ('credproxy login %s %s' gets one)", p, b)
			case tok.RefreshToken() == "":
				row.refresh = "not refreshable: no refresh token"
			case !configured:
				row.refresh = fmt.Sprintf("not refreshed: no provider %q in the providers file", p)
			default:
				row.refresh = "refreshable: run and serve refresh it on the host"
			}
			rows = append(rows, row)
		}
	}
	return rows, nil
}

func describeExpiry(tok credproxy.Token, now time.Time) string {
	exp, ok := tok.Expiry()
	switch {
	case !ok:
		return "no expiry"
	case !exp.After(now):
		return fmt.Sprintf("expired %s (%s ago)", exp.UTC().Format(time.RFC3339), roughly(now.Sub(exp)))
	}
	return fmt.Sprintf("valid until %s (%s)", exp.UTC().Format(time.RFC3339), roughly(exp.Sub(now)))
}

// roughly is d as a person reads it: to the second under a minute, to the
// minute under two days, else in days.
func roughly(d time.Duration) string {
	switch {
	case d < time.Minute:
		return d.Round(time.Second).String()
	case d < 48*time.Hour:
		return strings.TrimSuffix(d.Round(time.Minute).String(), "0s")
	}
	return fmt.Sprintf("%d days", d/(24*time.Hour))
}

// reauthHint returns the OnRefresh hook of run and serve: when a provider
// refuses a refresh token, the user is told, on the host, how to log in
// again, rather than finding out from a failing sandbox. The server's own
// log line says why the refresh failed.
func reauthHint(std stdio) func(credproxy.RefreshEvent) {
	return func(ev credproxy.RefreshEvent) {
		if ev.Outcome == credproxy.RefreshReauthRequired {
			fmt.Fprintf(std.err, "credproxy: %s refused the refresh token of %s/%s; log in again on the host: credproxy login %s %s\n",
				ev.Provider, ev.Provider, ev.Bucket, ev.Provider, ev.Bucket)
		}
	}
}

// describe is how a provider is listed: its endpoints and client, never
// its secret, and where it injects.
func (pv *provider) describe() string {
	inject := ""
	if c := pv.Inject; c != nil {
		cred := "its token"
		if c.Key != "" {
			cred = "API key " + c.Key
		}
		inject = fmt.Sprintf("inject %s to %s", cred, c.Upstream)
		if !pv.oauth() {
			return inject
		}
		inject = ", " + inject
	}
	return pv.describeOAuth() + inject
}

// describeOAuth is the OAuth half of describe.
func (pv *provider) describeOAuth() string {
	var flows []string
	if pv.AuthURL != "" {
		flows = append(flows, "browser")
	}
	if pv.DeviceAuthURL != "" {
		flows = append(flows, "device")
	}
	if len(flows) == 0 {
		flows = append(flows, "none")
	}
	secret := "public client"
	switch {
	case pv.ClientSecretKey != "":
		secret = "secret in key " + pv.ClientSecretKey
	case pv.ClientSecret != "":
		secret = "secret in the file"
	}
	revoke := "no revocation"
	if pv.RevocationURL != "" {
		revoke = "revocation"
	}
	return fmt.Sprintf("client %s (%s), token %s, login: %s, %s", pv.ClientID, secret, pv.TokenURL, strings.Join(flows, "+"), revoke)
}
