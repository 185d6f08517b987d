package main

import (
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/credproxy/credproxy"
	"golang.org/x/oauth2"
)

const loginSynopsis = `Usage: credproxy login [-device] [-timeout D] [-providers FILE] PROVIDER [BUCKET]

Logs in to PROVIDER, as the providers file describes it, and stores the
token it gives in the host's store under PROVIDER and BUCKET (default:
default), replacing the one there, for run and serve to hand to sandboxes
and refresh. It runs on the host, never in a sandbox, and says on stderr
what it stored; it never prints a token or the client secret.

In a browser (auth_url; RFC 8252 and RFC 7636): login prints a URL on stderr
and opens it with $BROWSER (a program and its arguments, separated by
spaces; the URL is added last), or else xdg-open (Linux, with a display),
open (macOS) or the shell's URL handler (Windows). The provider sends the
browser back to 127.0.0.1 on this machine (a free port, or redirect_url),
where login takes one answer and stops listening. The code is exchanged with
a PKCE verifier that never leaves this process.

With -device, or when the provider has a device_auth_url but no auth_url
(RFC 8628): login prints a URL and a code to enter there, on any device, and
waits for the provider to say the code was approved.

The store is opened (and its password asked for) before the browser step.
Without a refresh token from the provider, run and serve cannot refresh the
token; OpenID providers give one for the scope offline_access.

`

const loginExample = `  # A providers file for a public client (most CLIs) of an OpenID provider:
  echo '{"providers": {"example": {"client_id": "my-cli", "auth_url": "https://id.example.com/authorize", "token_url": "https://id.example.com/token", "device_auth_url": "https://id.example.com/device", "revocation_url": "https://id.example.com/revoke", "scopes": ["openid", "offline_access"]}}}' > providers.json
  credproxy login -providers providers.json example             # in a browser on this machine
  credproxy login -providers providers.json -device example work # a code to enter elsewhere; bucket work
  credproxy token ls                                             # example/default, example/work
  # To try it with no account anywhere: README.md, "Logging in", runs a provider on this machine.`

func loginCommand(ctx context.Context, args []string, std stdio) error {
	ctx = withProviderClient(ctx)
	fs := newFlags("login", loginSynopsis+providersHelp, loginExample, std)
	device := fs.Bool("device", false, "use the device flow: a code to enter in a browser on any device")
	timeout := fs.Duration("timeout", 5*time.Minute, "give up if the login is not done within this `duration`")
	file := fs.String("providers", "", "the providers `file` (default: $CREDPROXY_PROVIDERS, else providers.json in the config directory)")
	names, err := providerArgs(fs, args)
	if err != nil {
		return err
	}
	if *timeout <= 0 {
		return usageError("login: -timeout must be positive")
	}
	pv, bucket, err := loadProvider(*file, names)
	if err != nil {
		return err
	}
	useDevice := *device || pv.AuthURL == "" && pv.DeviceAuthURL != ""
	switch {
	case useDevice && pv.DeviceAuthURL == "":
		return fmt.Errorf("provider %q has no device_auth_url, so it cannot log in with -device", pv.name)
	case !useDevice && pv.AuthURL == "":
		return fmt.Errorf("provider %q has neither auth_url nor device_auth_url: it cannot log in", pv.name)
	}

	st, err := hostStore(ctx, *file, false, std)
	if err != nil {
		return err
	}
	defer st.Close()
	secret, err := pv.clientSecret(ctx, st)
	if err != nil {
		return err
	}
	f := &loginFlow{pv: pv, secret: secret, timeout: *timeout, std: std}
	lctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	var tok *oauth2.Token
	if useDevice {
		tok, err = f.device(lctx)
	} else {
		tok, err = f.browser(lctx)
	}
	if err != nil {
		return fmt.Errorf("%w; nothing was stored", err)
	}
	t, err := credproxy.TokenFromOAuth2(tok)
	if err != nil {
		return fmt.Errorf("the provider's token: %w; nothing was stored", err)
	}
	// Under the token's lock, as a refresh saves, so that a proxy serving
	// this store cannot overwrite the new token with a refresh of the old.
	unlock, err := lockToken(ctx, st, pv.name, bucket)
	if err != nil {
		return err
	}
	err = st.SaveToken(ctx, pv.name, bucket, t)
	unlock()
	if err != nil {
		return err
	}
	f.reportStored(bucket, t)
	return nil
}

// providerArgs parses the arguments of login or logout, fs's command:
// flags anywhere, PROVIDER and an optional BUCKET. It refuses to go on in
// a sandbox: these commands work on the host's store and client secrets,
// which a sandbox has no business holding.
func providerArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	names, err := parseNames(fs, args)
	if err != nil {
		return nil, err
	}
	if len(names) < 1 || len(names) > 2 {
		return nil, usageError("%s takes PROVIDER [BUCKET]; run 'credproxy %s -help'", fs.Name(), fs.Name())
	}
	if os.Getenv(credproxy.SocketEnv) != "" {
		return nil, fmt.Errorf("%s runs on the host, not in a sandbox (%s is set here): run it outside, and give the sandbox the token with 'credproxy run -allow-provider'", fs.Name(), credproxy.SocketEnv)
	}
	return names, nil
}

// loadProvider reads the providers file and returns the provider that
// names[0] names and the bucket names[1] names, or the default bucket.
func loadProvider(file string, names []string) (*provider, string, error) {
	bucket := credproxy.DefaultBucket
	if len(names) == 2 {
		bucket = names[1]
	}
	if !providerName.MatchString(bucket) {
		return nil, "", fmt.Errorf("bucket %q: a bucket name must match ^[A-Za-z0-9._@-]{1,64}$", bucket)
	}
	ps, err := openProviders(file)
	if err != nil {
		return nil, "", err
	}
	pv, err := ps.get(names[0])
	return pv, bucket, err
}

// loginFlow is one login: the provider, its client secret, and where to
// tell the user what to do.
type loginFlow struct {
	pv      *provider
	secret  credproxy.Secret
	timeout time.Duration
	std     stdio
}

// browser runs the authorization code flow with PKCE and a loopback
// redirect, and returns the provider's token.
func (f *loginFlow) browser(ctx context.Context) (*oauth2.Token, error) {
	state := rand.Text() // 130 random bits
	cb, err := listenCallback(f.pv.RedirectURL, state)
	if err != nil {
		return nil, err
	}
	defer cb.close()
	cfg := f.pv.oauth2Config(f.secret, cb.redirect)
	verifier := oauth2.GenerateVerifier()
	authURL := cfg.AuthCodeURL(state, oauth2.S256ChallengeOption(verifier))
	fmt.Fprintf(f.std.err, "credproxy: to log in to %s, open this URL in a browser on this machine:\n\n  %s\n\n", f.pv.name, authURL)
	if openBrowser(authURL, f.std) {
		fmt.Fprintf(f.std.err, "credproxy: opened it in the browser; waiting for the provider's answer at %s (at most %s)\n", cb.redirect, f.timeout)
	} else {
		fmt.Fprintf(f.std.err, "credproxy: found no browser to open it (no $BROWSER, and no display); waiting for the provider's answer at %s (at most %s). The browser must run on this machine; elsewhere, use 'credproxy login -device'\n", cb.redirect, f.timeout)
	}
	code, err := cb.wait(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		return nil, fmt.Errorf("no answer reached %s within %s (-timeout)", cb.redirect, f.timeout)
	}
	if err != nil {
		return nil, err
	}
	tok, err := cfg.Exchange(ctx, code, oauth2.VerifierOption(verifier))
	if err != nil {
		return nil, f.providerError("exchanging the code for a token", err, credproxy.Secret(code), credproxy.Secret(verifier))
	}
	return tok, nil
}

// providerError is err, from a request to the provider, with the client
// secret and the given secrets that the request carried redacted, as
// they would be from the host's log, in case the provider quoted them.
func (f *loginFlow) providerError(doing string, err error, secrets ...credproxy.Secret) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: no answer from the provider within %s (-timeout)", doing, f.timeout)
	}
	return fmt.Errorf("%s: %w", doing, credproxy.RedactOAuth2Error(err, f.pv.ClientID, f.secret, secrets...))
}

// reportStored says on stderr what login stored, and warns when the token
// cannot be refreshed.
func (f *loginFlow) reportStored(bucket string, t credproxy.Token) {
	until := "with no expiry given"
	if exp, ok := t.Expiry(); ok {
		until = "valid until " + exp.Local().Format("2006-01-02 15:04:05 MST")
	}
	if t.RefreshToken() != "" {
		fmt.Fprintf(f.std.err, "credproxy: stored %s/%s, %s, refreshable\n", f.pv.name, bucket, until)
		return
	}
	fmt.Fprintf(f.std.err, "credproxy: stored %s/%s, %s\n", f.pv.name, bucket, until)
	msg := fmt.Sprintf("credproxy: warning: %s gave no refresh token, so run and serve cannot refresh this token: log in again when it expires", f.pv.name)
	switch {
	case slices.Contains(f.pv.Scopes, "openid") && !slices.Contains(f.pv.Scopes, "offline_access"):
		msg += `. OpenID providers give one for the scope offline_access: add it to the provider's "scopes" in the providers file`
	case slices.Contains(f.pv.Scopes, "offline_access"):
		msg += " (offline_access was asked for: the provider, or its client settings, declined it)"
	}
	fmt.Fprintln(f.std.err, msg)
}
