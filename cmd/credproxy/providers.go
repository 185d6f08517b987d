package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"

	"github.com/credproxy/credproxy"
	"golang.org/x/oauth2"
)

// providersEnv names the providers file when set; the default is
// providers.json in the config directory, beside the file store.
const providersEnv = "CREDPROXY_PROVIDERS"

// provider is one provider's entry in the providers file: how the host
// logs in to it, refreshes its tokens and revokes them. The JSON names are
// the file's; see providersHelp.
type provider struct {
	ClientID        string   `json:"client_id"`
	ClientSecret    string   `json:"client_secret,omitempty"`
	ClientSecretKey string   `json:"client_secret_key,omitempty"`
	AuthURL         string   `json:"auth_url,omitempty"`
	TokenURL        string   `json:"token_url"`
	DeviceAuthURL   string   `json:"device_auth_url,omitempty"`
	RevocationURL   string   `json:"revocation_url,omitempty"`
	RedirectURL     string   `json:"redirect_url,omitempty"`
	Scopes          []string `json:"scopes,omitempty"`
	AuthStyle       string   `json:"auth_style,omitempty"`

	// Inject is how run -inject routes the sandbox's SDK to the
	// provider's API (inject.go); nil for the built-in member, if any.
	Inject *injectConfig `json:"inject,omitempty"`

	name string
}

// providers is the providers file: where it was read from, and its
// entries by name. The zero value is an empty file that was not there.
type providers struct {
	path   string
	byName map[string]*provider
	etcd   etcdConfig // the file's "etcd" member: see etcdHelp
}

const providersHelp = `The providers file (providers.json in the config directory, beside the
store: ~/.config/credproxy/providers.json on Linux; CREDPROXY_PROVIDERS or
-providers names another) says, per provider, how the host logs in to it
and refreshes its tokens:

  {"providers": {"github": {
      "client_id": "Iv1.0123456789abcdef",
      "client_secret_key": "github-client-secret",
      "auth_url": "https://github.com/login/oauth/authorize",
      "token_url": "https://github.com/login/oauth/access_token",
      "device_auth_url": "https://github.com/login/device/code",
      "scopes": ["repo"]}}}

client_id and token_url are required. client_secret_key names an API key in
the store that holds the client secret ('credproxy key set NAME' puts it
there; grant no sandbox that key); client_secret gives it in the file
itself, which must then be readable by its owner only. A public client (most
CLIs) has neither. auth_url is for 'login' in a browser (authorization code
with PKCE, redirected to 127.0.0.1, or to redirect_url if the provider needs
a registered one); device_auth_url for 'login -device' on a machine with no
browser; revocation_url (RFC 7009) for 'logout'. auth_style is "header"
(HTTP Basic) or "params" (client_id in the form); by default "header" with a
secret and "params" without. Every URL is https, or http on a loopback
address.

` + injectHelp + "\n\n" + etcdHelp

// providersPath is the providers file the commands read: flag if set, else
// CREDPROXY_PROVIDERS, else providers.json in the config directory. named
// says it was named (flag or variable), and so must exist.
func providersPath(flag string) (path string, named bool, err error) {
	if flag != "" {
		return flag, true, nil
	}
	if p := os.Getenv(providersEnv); p != "" {
		return p, true, nil
	}
	dir, err := credproxy.DefaultKeyringDir()
	if err != nil {
		return "", false, err
	}
	return filepath.Join(dir, "providers.json"), false, nil
}

// openProviders reads the providers file that flag, CREDPROXY_PROVIDERS or
// the default names.
func openProviders(flag string) (providers, error) {
	path, named, err := providersPath(flag)
	if err != nil {
		return providers{}, err
	}
	return loadProviders(path, named)
}

// loadProviders reads the providers file at path. A file that is not
// there is an empty one, unless it was named (required): run and serve
// work without providers, but a file named by -providers or
// CREDPROXY_PROVIDERS must exist, so that a misspelt name is not taken
// for "no providers".
func loadProviders(path string, required bool) (providers, error) {
	p := providers{path: path}
	data, err := readConfig(path)
	if errors.Is(err, fs.ErrNotExist) && !required {
		return p, nil
	}
	if errors.Is(err, fs.ErrNotExist) {
		return p, fmt.Errorf("no providers file %s (named by -providers or %s)", path, providersEnv)
	}
	if err != nil {
		return p, err
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return p, fmt.Errorf("the providers file %s is empty; 'credproxy providers -help' shows what goes in it", path)
	}
	var file struct {
		Providers map[string]*provider `json:"providers"`
		Etcd      *etcdConfig          `json:"etcd"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields() // a misspelt member must not be ignored
	if err := dec.Decode(&file); err != nil {
		return p, fmt.Errorf("%s: %w; 'credproxy providers -help' shows the format", path, err)
	}
	if dec.More() {
		return p, fmt.Errorf("%s: more than one JSON value", path)
	}
	p.byName = file.Providers
	if file.Etcd != nil {
		p.etcd = *file.Etcd
	}
	for name, pv := range p.byName {
		if pv == nil {
			return p, fmt.Errorf("%s: provider %q is null", path, name)
		}
		pv.name = name
		if err := pv.check(); err != nil {
			return p, fmt.Errorf("%s: provider %q: %w", path, name, err)
		}
		if pv.ClientSecret != "" && runtime.GOOS != "windows" {
			if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
				return p, fmt.Errorf("%s holds provider %q's client_secret and is readable by others (mode %04o): chmod 600 it, or keep the secret in the store with client_secret_key", path, name, fi.Mode().Perm())
			}
		}
	}
	return p, nil
}

// maxConfigSize bounds the providers file: it holds a few URLs per provider.
const maxConfigSize = 1 << 20

func readConfig(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if err := checkConfigWriters(path, fi); err != nil {
		return nil, err
	}
	data, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err == nil && len(data) > maxConfigSize {
		err = fmt.Errorf("%s is larger than %d bytes", path, maxConfigSize)
	}
	return data, err
}

var providerName = regexp.MustCompile(`^[A-Za-z0-9._@-]{1,64}$`)

func (pv *provider) check() error {
	if !providerName.MatchString(pv.name) {
		return errors.New("a provider name must match ^[A-Za-z0-9._@-]{1,64}$, as store names do")
	}
	if pv.Inject != nil {
		if err := pv.Inject.check(); err != nil {
			return err
		}
		if !pv.oauth() {
			return nil // an entry for injection only
		}
	}
	if pv.ClientID == "" {
		return errors.New("client_id is missing")
	}
	if pv.TokenURL == "" {
		return errors.New("token_url is missing")
	}
	if pv.ClientSecret != "" && pv.ClientSecretKey != "" {
		return errors.New("give client_secret or client_secret_key, not both")
	}
	if pv.ClientSecretKey != "" && !providerName.MatchString(pv.ClientSecretKey) {
		return errors.New("client_secret_key must be an API key name, matching ^[A-Za-z0-9._@-]{1,64}$")
	}
	for member, u := range map[string]string{"auth_url": pv.AuthURL, "token_url": pv.TokenURL,
		"device_auth_url": pv.DeviceAuthURL, "revocation_url": pv.RevocationURL} {
		if err := checkEndpoint(u); err != nil {
			return fmt.Errorf("%s: %w", member, err)
		}
	}
	if pv.RedirectURL != "" {
		u, err := url.Parse(pv.RedirectURL)
		if err != nil || u.Scheme != "http" || !isLoopback(u.Hostname()) || u.Port() == "" {
			return errors.New("redirect_url must be http on a loopback address, written as one, with a port, such as http://127.0.0.1:8085/callback (RFC 8252, sections 7.3 and 8.3: not localhost, which may resolve to another address, where another user could listen)")
		}
	}
	if !slices.Contains([]string{"", "header", "params"}, pv.AuthStyle) {
		return fmt.Errorf("auth_style is %q; use \"header\" or \"params\"", pv.AuthStyle)
	}
	return nil
}

// oauth reports whether the entry says anything of OAuth; one that does
// not is for injection only (an inject member with an API key), and needs
// no client_id or token_url.
func (pv *provider) oauth() bool {
	return pv.ClientID != "" || pv.ClientSecret != "" || pv.ClientSecretKey != "" || pv.AuthURL != "" || pv.TokenURL != "" ||
		pv.DeviceAuthURL != "" || pv.RevocationURL != "" || pv.RedirectURL != "" || len(pv.Scopes) > 0 || pv.AuthStyle != ""
}

// checkEndpoint accepts "" (not offered), https, and http on a loopback
// address, where nothing crosses a network.
func checkEndpoint(raw string) error {
	if raw == "" {
		return nil
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || u.User != nil || u.Fragment != "" {
		return fmt.Errorf("%q is not an absolute URL", raw)
	}
	if u.Scheme == "https" || u.Scheme == "http" && isLoopback(u.Hostname()) {
		return nil
	}
	if u.Scheme == "http" && u.Hostname() == "localhost" {
		return fmt.Errorf("%q: write the loopback address, 127.0.0.1 or [::1], not localhost, which may resolve to the other one, where another user could listen", raw)
	}
	return fmt.Errorf("%q must be https (http only on a loopback address)", raw)
}

// isLoopback reports whether host is a loopback address, written as one.
// The name localhost is not: it resolves to 127.0.0.1 or ::1, browsers
// and resolvers try them in different orders, and any local user may
// listen on the one credproxy does not use, so a code or a token sent
// there could reach them (RFC 8252, section 8.3, advises against it).
func isLoopback(host string) bool {
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// get returns the named provider, or an error that says where to add it.
func (p providers) get(name string) (*provider, error) {
	if pv, ok := p.byName[name]; ok {
		return pv, nil
	}
	return nil, fmt.Errorf("no provider %q in %s; 'credproxy providers -help' shows how to add one", name, p.path)
}

// names returns the providers' names, sorted.
func (p providers) names() []string {
	names := make([]string, 0, len(p.byName))
	for n := range p.byName {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// clientSecret returns the provider's client secret: from the file, or
// from the store's API key that client_secret_key names, or none.
func (pv *provider) clientSecret(ctx context.Context, st credproxy.Store) (credproxy.Secret, error) {
	if pv.ClientSecretKey == "" {
		return credproxy.Secret(pv.ClientSecret), nil
	}
	s, err := st.GetAPIKey(ctx, pv.ClientSecretKey)
	if errors.Is(err, credproxy.ErrNotFound) {
		return "", fmt.Errorf("provider %q: its client_secret_key %q is not in the store; 'credproxy key set %s' puts it there", pv.name, pv.ClientSecretKey, pv.ClientSecretKey)
	}
	if err != nil {
		return "", fmt.Errorf("provider %q: reading its client secret: %w", pv.name, err)
	}
	return s, nil
}

// authStyle is the provider's auth style for golang.org/x/oauth2, never
// AuthStyleAutoDetect, which repeats a refused request with the other
// style (see credproxy.OAuth2Refresher.AuthStyle).
func (pv *provider) authStyle(secret credproxy.Secret) oauth2.AuthStyle {
	switch {
	case pv.AuthStyle == "header":
		return oauth2.AuthStyleInHeader
	case pv.AuthStyle == "params", secret == "":
		return oauth2.AuthStyleInParams
	}
	return oauth2.AuthStyleInHeader
}

// oauth2Config is the provider's configuration for golang.org/x/oauth2,
// with its client secret.
func (pv *provider) oauth2Config(secret credproxy.Secret, redirect string) *oauth2.Config {
	return &oauth2.Config{
		ClientID:     pv.ClientID,
		ClientSecret: string(secret),
		Endpoint: oauth2.Endpoint{AuthURL: pv.AuthURL, TokenURL: pv.TokenURL,
			DeviceAuthURL: pv.DeviceAuthURL, AuthStyle: pv.authStyle(secret)},
		RedirectURL: redirect,
		Scopes:      pv.Scopes,
	}
}

// refreshers returns a credproxy.OAuth2Refresher per provider, for
// Options.Refreshers, with client secrets read from st.
func (p providers) refreshers(ctx context.Context, st credproxy.Store) (map[string]credproxy.Refresher, error) {
	if len(p.byName) == 0 {
		return nil, nil
	}
	out := make(map[string]credproxy.Refresher, len(p.byName))
	for _, name := range p.names() {
		pv := p.byName[name]
		if pv.TokenURL == "" {
			continue // for injection only
		}
		secret, err := pv.clientSecret(ctx, st)
		if err != nil {
			return nil, err
		}
		out[name] = &credproxy.OAuth2Refresher{TokenURL: pv.TokenURL, ClientID: pv.ClientID,
			ClientSecret: secret, AuthStyle: pv.authStyle(secret)}
	}
	return out, nil
}

// exceptClientSecrets keeps the API keys that hold the providers' client
// secrets from grant's sandbox, even under -allow-key '*' (see
// credproxy.Grant.ExceptKeys), and refuses a grant that names one: a
// client secret stays on the host, as refresh tokens do.
func (p providers) exceptClientSecrets(grant *credproxy.Grant) error {
	for _, name := range p.names() {
		k := p.byName[name].ClientSecretKey
		if k == "" || slices.Contains(grant.ExceptKeys, k) {
			continue
		}
		if slices.Contains(grant.Keys, k) {
			return usageError("-allow-key %s: that key holds provider %s's client secret, which stays on the host", k, name)
		}
		grant.ExceptKeys = append(grant.ExceptKeys, k)
	}
	return nil
}
