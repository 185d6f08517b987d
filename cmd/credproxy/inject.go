package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/credproxy/credproxy"
)

// injectConfig is a provider's "inject" member in the providers file: how
// run -inject NAME routes the sandbox's SDK, through the session's
// injecting front, to the provider's API. See injectHelp.
type injectConfig struct {
	Upstream       string   `json:"upstream"`
	Header         string   `json:"header,omitempty"`
	Key            string   `json:"key,omitempty"`
	Bucket         string   `json:"bucket,omitempty"`
	Methods        []string `json:"methods,omitempty"`
	Paths          []string `json:"paths,omitempty"`
	MaxRequestBody int64    `json:"max_request_body,omitempty"`
	BaseURLEnv     string   `json:"base_url_env,omitempty"`
	BasePath       string   `json:"base_path,omitempty"`
	KeyEnv         string   `json:"key_env,omitempty"`
	CAFile         string   `json:"ca_file,omitempty"`
}

// builtinInject is what -inject NAME uses for these names when the
// providers file gives NAME no inject member: the provider's public API
// with the API key of the same name, for its official SDKs, which read
// these variables (checked against @anthropic-ai/sdk 1.17 and openai 6.49,
// the versions testdata/sdk pins). The Anthropic SDK appends /v1/messages
// to its base URL, and sends an API key as "Authorization: Bearer"
// (before 1.0 it sent x-api-key: such a client needs a member with
// "header": "x-api-key"); the OpenAI SDK's base URL holds the /v1 and it
// appends /chat/completions, so /v1 is part of that upstream. Each allows
// its inference endpoints (and the model list) with GET and POST: what an
// agent needs, and not the account's files, batches' admin or billing.
var builtinInject = map[string]injectConfig{
	"anthropic": {
		Upstream: "https://api.anthropic.com", Header: "Authorization", Key: "anthropic",
		Methods: []string{"GET", "POST"}, Paths: []string{"/v1/messages", "/v1/models"},
		BaseURLEnv: "ANTHROPIC_BASE_URL", KeyEnv: "ANTHROPIC_API_KEY",
	},
	"openai": {
		Upstream: "https://api.openai.com/v1", Header: "Authorization", Key: "openai",
		Methods: []string{"GET", "POST"}, Paths: []string{"/chat/completions", "/responses", "/completions", "/embeddings", "/models"},
		BaseURLEnv: "OPENAI_BASE_URL", KeyEnv: "OPENAI_API_KEY",
	},
}

const injectHelp = `A provider may also have an "inject" member, for 'run -inject NAME' and
'serve -inject NAME': the sandbox's SDK then talks plain HTTP, through
'credproxy forward' in the sandbox, to the session's injecting front on the
host, which forwards each request to upstream with the real credential put
in place of the session's phantom one. The sandbox never holds the
credential.

  {"providers": {"mistral": {"inject": {
      "upstream": "https://api.mistral.ai/v1", "header": "Authorization",
      "key": "mistral", "methods": ["POST"], "paths": ["/chat/completions"],
      "base_url_env": "MISTRAL_BASE_URL", "key_env": "MISTRAL_API_KEY"}}}}

upstream (required) is the API's base URL, https: a request to
http://127.0.0.1:8787/NAME/REST goes to upstream + /REST. key names the API
key in the store to inject; without it the provider's own OAuth token is
injected, from bucket (default: default), refreshed on the host as for
get_token (so the entry needs client_id and token_url for the host to refresh
it). header is where the SDK sends its key and the real one goes: "" or
"Authorization" means "Authorization: Bearer KEY", any other name (such as
"x-api-key") the bare key. methods (default GET and POST) and paths (path
prefixes after /NAME; default all) are what the front lets through; the rest
is refused with 403. max_request_body bounds a request's body in bytes
(default 32 MiB). base_url_env and key_env name the variables run sets in
CMD's environment to http://127.0.0.1:8787/NAME (plus base_path, for an SDK
whose base URL holds a path that upstream does not) and to the phantom.
ca_file is a PEM file of extra root certificates trusted for upstream's host
alone (a private or test upstream), relative to the providers file's
directory. An entry with an inject member that names a key needs nothing
else. -inject anthropic and -inject openai work with no entry at all: their
built-in members inject the API keys anthropic and openai as
"Authorization: Bearer", for the official SDKs: ANTHROPIC_BASE_URL and
ANTHROPIC_API_KEY, paths /v1/messages and /v1/models (an Anthropic SDK before
1.0 sends x-api-key instead: give it a member with "header": "x-api-key");
OPENAI_BASE_URL and OPENAI_API_KEY, upstream https://api.openai.com/v1,
paths /chat/completions, /responses, /completions, /embeddings and /models.
An inject member replaces the built-in one whole.`

// envName is a variable name run may set.
var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,127}$`)

// check checks the member as far as the file goes; the front checks the
// rest (a header that cannot carry a credential, a path that is not clean)
// when the session starts.
func (c *injectConfig) check() error {
	u, err := url.Parse(c.Upstream)
	switch {
	case c.Upstream == "":
		return errors.New("inject: upstream is missing")
	case err != nil || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "":
		return fmt.Errorf("inject: upstream %q is not a base URL (scheme, host and path only)", c.Upstream)
	case u.Scheme != "https" && !(u.Scheme == "http" && isLoopback(u.Hostname())):
		return fmt.Errorf("inject: upstream %q must be https", c.Upstream)
	case c.Key != "" && !providerName.MatchString(c.Key):
		return errors.New("inject: key must be an API key name, matching ^[A-Za-z0-9._@-]{1,64}$")
	case c.Key != "" && c.Bucket != "":
		return errors.New("inject: bucket is for the provider's token; give key or bucket, not both")
	case c.Bucket != "" && !providerName.MatchString(c.Bucket):
		return errors.New("inject: bucket must match ^[A-Za-z0-9._@-]{1,64}$")
	case c.MaxRequestBody < 0:
		return errors.New("inject: max_request_body is negative")
	case c.BasePath != "" && (!strings.HasPrefix(c.BasePath, "/") || path.Clean(c.BasePath) != c.BasePath):
		return fmt.Errorf("inject: base_path %q is not a clean absolute path", c.BasePath)
	}
	for _, v := range []string{c.BaseURLEnv, c.KeyEnv} {
		if v == "" {
			continue
		}
		if !envName.MatchString(v) {
			return fmt.Errorf("inject: %q is not a variable name", v)
		}
		if strings.HasPrefix(v, "LLXPRT_") || strings.HasPrefix(v, "CREDPROXY_") {
			return fmt.Errorf("inject: %s is credproxy's own variable", v)
		}
	}
	if c.BaseURLEnv != "" && c.BaseURLEnv == c.KeyEnv {
		return errors.New("inject: base_url_env and key_env are the same variable")
	}
	return nil
}

// injection is what -inject asks for: the session's routes, the
// variables CMD gets for them, and the transport that trusts the
// ca_files' roots, if any.
type injection struct {
	routes []credproxy.Route
	env    []routeEnv
	roots  map[string]string // upstream host (as in a URL) → its ca_file
}

// routeEnv is the variables one route sets in CMD's environment.
type routeEnv struct {
	name, basePath, baseURLEnv, keyEnv string
}

// injection returns the routes for names (-inject), from the providers
// file's inject members or the built-in ones.
func (p providers) injection(names []string) (*injection, error) {
	in := &injection{roots: map[string]string{}}
	vars := map[string]string{} // variable → the route that sets it
	for _, name := range names {
		if slices.ContainsFunc(in.routes, func(r credproxy.Route) bool { return r.Name == name }) {
			return nil, usageError("-inject %s is given twice", name)
		}
		c, err := p.injectConfig(name)
		if err != nil {
			return nil, err
		}
		for _, pv := range p.byName {
			if c.Key != "" && c.Key == pv.ClientSecretKey {
				return nil, usageError("-inject %s: key %s holds provider %s's client secret, which stays on the host", name, c.Key, pv.name)
			}
		}
		r := credproxy.Route{Name: name, Upstream: c.Upstream, Key: c.Key, Header: c.Header,
			Methods: c.Methods, PathPrefixes: c.Paths, MaxRequestBody: c.MaxRequestBody}
		if c.Key == "" {
			r.Provider, r.Bucket = name, c.Bucket
		}
		in.routes = append(in.routes, r)
		in.env = append(in.env, routeEnv{name: name, basePath: c.BasePath, baseURLEnv: c.BaseURLEnv, keyEnv: c.KeyEnv})
		for _, v := range []string{c.BaseURLEnv, c.KeyEnv} {
			if other, ok := vars[v]; ok && v != "" {
				return nil, fmt.Errorf("-inject %s and -inject %s both set %s", other, name, v)
			}
			vars[v] = name
		}
		if c.CAFile != "" {
			u, _ := url.Parse(c.Upstream)
			file := c.CAFile
			if !filepath.IsAbs(file) && p.path != "" {
				file = filepath.Join(filepath.Dir(p.path), file)
			}
			if prev, ok := in.roots[u.Host]; ok && prev != file {
				return nil, fmt.Errorf("-inject %s: upstream host %s has two ca_files, %s and %s", name, u.Host, prev, file)
			}
			in.roots[u.Host] = file
		}
	}
	return in, nil
}

// injectConfig returns the inject member of name: the providers file's,
// else the built-in one.
func (p providers) injectConfig(name string) (injectConfig, error) {
	if pv, ok := p.byName[name]; ok && pv.Inject != nil {
		return *pv.Inject, nil
	}
	if c, ok := builtinInject[name]; ok {
		return c, nil
	}
	if _, ok := p.byName[name]; ok {
		return injectConfig{}, fmt.Errorf("-inject %s: provider %s in %s has no inject member; 'credproxy providers -help' shows how to add one", name, name, p.path)
	}
	return injectConfig{}, fmt.Errorf("-inject %s: no provider %s in %s, and no built-in one (anthropic, openai); 'credproxy providers -help' shows how to add one", name, name, p.path)
}

// environ returns the variables CMD gets for the injection: where the
// session's front (socket) and forward (addr) are, the session's phantom
// credential, and each route's base URL and key variables.
func (in *injection) environ(socket, phantom, addr string) []string {
	env := []string{credproxy.InjectSocketEnv + "=" + socket, injectAddrEnv + "=" + addr, injectPhantomEnv + "=" + phantom}
	for _, r := range in.env {
		if r.baseURLEnv != "" {
			env = append(env, r.baseURLEnv+"=http://"+addr+"/"+r.name+r.basePath)
		}
		if r.keyEnv != "" {
			env = append(env, r.keyEnv+"="+phantom)
		}
	}
	return env
}

// names is every variable environ sets, for run to remove from what CMD
// inherits first.
func (in *injection) names() []string {
	names := []string{credproxy.InjectSocketEnv, injectAddrEnv, injectPhantomEnv}
	for _, r := range in.env {
		names = append(names, r.baseURLEnv, r.keyEnv)
	}
	return names
}

// injectPhantomEnv holds the session's phantom credential in CMD's
// environment, for a tool that sets its SDK's key itself (a route with no
// key_env).
const injectPhantomEnv = "LLXPRT_INJECT_PHANTOM"

// checkLoopbackAddr accepts an IP loopback address with a port, written as
// an IP, as forward listens on.
func checkLoopbackAddr(addr string) error {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().IsLoopback() {
		return usageError("%q is not a loopback address and port written as an IP (127.0.0.1:8787 or [::1]:8787): anything that reaches the address reaches the session's injecting front", addr)
	}
	return nil
}

// injectSessionOptions is the session of run or serve under -inject: the
// routes, their policy, and a connection cap no lower than forward's, so
// that the connections forward relays wait there rather than being
// closed by the front (which an attacking review saw: 8 of 40 concurrent
// SDK calls dropped with the default cap of 32).
func injectSessionOptions(grant *credproxy.Grant, routes []credproxy.Route, dir string) credproxy.SessionOptions {
	return credproxy.SessionOptions{Policy: &injectPolicy{grant: grant, routes: routes}, Routes: routes, Dir: dir,
		MaxConnections: max(maxForwardedConns, credproxy.DefaultSessionMaxConnections)}
}

// injectPolicy is a session's policy under -inject: the grant of the
// -allow flags, and besides it, for the injecting front's requests only,
// the credential of each route. -inject NAME lets the sandbox make the
// calls the route allows, with a credential it never holds; it does not
// let it read that credential over the credential socket, which only
// -allow-provider and -allow-key do.
type injectPolicy struct {
	grant  *credproxy.Grant
	routes []credproxy.Route
}

// Authorize allows what the grant allows, and a route's own credential
// for a request that comes through the front.
func (p *injectPolicy) Authorize(ctx context.Context, req *credproxy.Request) error {
	err := p.grant.Authorize(ctx, req)
	if err == nil || req.Route == "" {
		return err
	}
	for _, r := range p.routes {
		switch {
		case r.Name != req.Route:
		case req.Op == credproxy.OpGetAPIKey && r.Key != "" && req.Key == r.Key,
			req.Op == credproxy.OpGetToken && r.Provider != "" && req.Provider == r.Provider && req.Bucket == cmp.Or(r.Bucket, credproxy.DefaultBucket):
			return nil
		}
	}
	return err
}

// String is the grant, as the session's start is logged, and the routes.
func (p *injectPolicy) String() string {
	var b strings.Builder
	b.WriteString(p.grant.String())
	b.WriteString("; injected: ")
	for i, r := range p.routes {
		if i > 0 {
			b.WriteString(", ")
		}
		if r.Key != "" {
			fmt.Fprintf(&b, "%s (API key %s to %s)", r.Name, r.Key, r.Upstream)
		} else {
			fmt.Fprintf(&b, "%s (token %s/%s to %s)", r.Name, r.Provider, cmp.Or(r.Bucket, credproxy.DefaultBucket), r.Upstream)
		}
	}
	return b.String()
}
