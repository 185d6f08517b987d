package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/credproxy/credproxy"
	"github.com/credproxy/credproxy/etcdstore"
)

// The environment of -store etcd. CREDPROXY_STORE=etcd selects the store
// for every command (run and serve also take -store); the others give
// what a file should not hold, or what differs per host.
const (
	storeEnv         = "CREDPROXY_STORE"
	etcdEndpointsEnv = "CREDPROXY_ETCD_ENDPOINTS"
	etcdPasswordEnv  = "CREDPROXY_ETCD_PASSWORD"
	etcdDataKeyEnv   = "CREDPROXY_ETCD_DATA_KEY"
)

// etcdConfig is how the host reaches the fleet's etcd cluster: the
// providers file's "etcd" member, overridden by run's and serve's -etcd-*
// flags. The zero value (with CREDPROXY_ETCD_ENDPOINTS unset) names no
// cluster, and -store etcd then says what is missing.
type etcdConfig struct {
	Endpoints    []string `json:"endpoints,omitempty"`
	Prefix       string   `json:"prefix,omitempty"`
	CAFile       string   `json:"ca_file,omitempty"`
	CertFile     string   `json:"cert_file,omitempty"`
	KeyFile      string   `json:"key_file,omitempty"`
	Username     string   `json:"username,omitempty"`
	PasswordFile string   `json:"password_file,omitempty"`
	LockTTL      string   `json:"lock_ttl,omitempty"`
	DataKey      string   `json:"data_key,omitempty"`
	OldDataKeys  []string `json:"old_data_keys,omitempty"`
}

const etcdHelp = `With -store etcd (or CREDPROXY_STORE=etcd, which every command reads), the
store is an etcd cluster that a fleet of hosts shares, with every value sealed
on the host (AES-256-GCM) by a data key that etcd never sees. Its settings go
in the providers file's "etcd" member, or in run's and serve's -etcd-* flags,
which win:

  {"providers": {...},
   "etcd": {"endpoints": ["https://etcd1:2379", "https://etcd2:2379", "https://etcd3:2379"],
            "ca_file": "/etc/credproxy/etcd-ca.pem",
            "cert_file": "/etc/credproxy/host.pem", "key_file": "/etc/credproxy/host-key.pem",
            "username": "credproxy", "password_file": "/etc/credproxy/etcd-password",
            "prefix": "/credproxy/", "lock_ttl": "10s",
            "data_key": "file:/etc/credproxy/data-key",
            "old_data_keys": ["file:/etc/credproxy/data-key.old"]}}

endpoints (or CREDPROXY_ETCD_ENDPOINTS, comma-separated) is required; http is
for loopback only unless there is no password. The password comes from
CREDPROXY_ETCD_PASSWORD or password_file. data_key is where this host's copy
of the fleet's 32-byte data key is, written as 64 hex characters ('openssl
rand -hex 32'): file:PATH (readable by its owner only), env:NAME, or
keyring:NAME (an API key in the host's keyring store: put it there with
CREDPROXY_STORE=keyring credproxy key set NAME); by default
env:CREDPROXY_ETCD_DATA_KEY. Every host of a fleet needs the same key and
prefix. lock_ttl is how long a dead or cut-off host's refresh lock lasts.

To rotate the data key: give every host the new key as data_key and the old
one in old_data_keys (sources as data_key's), which still open what it
sealed; run 'credproxy reseal' once, from one host, to seal everything with
the new key; then drop old_data_keys and destroy the old key.
`

// hostSecretEnv is the variables that hold a store's secrets, which no
// process credproxy starts (run's CMD, login's browser) inherits.
func hostSecretEnv() []string {
	return []string{credproxy.KeyringPasswordEnv, etcdPasswordEnv, etcdDataKeyEnv}
}

// registerEtcdFlags adds the -etcd-* flags, which override cfg's members.
func registerEtcdFlags(fs *flag.FlagSet, cfg *etcdConfig) {
	fs.Func("etcd-endpoints", "with -store etcd, the cluster's client `URLs`, comma-separated (default: $"+etcdEndpointsEnv+", else the providers file's etcd.endpoints)", func(v string) error {
		cfg.Endpoints = splitList(v)
		return nil
	})
	fs.StringVar(&cfg.Prefix, "etcd-prefix", "", "with -store etcd, the key `prefix` the fleet's items live under (default /credproxy/)")
	fs.StringVar(&cfg.CAFile, "etcd-ca", "", "with -store etcd, the `file` of the CA certificate that signed the cluster members' certificates")
	fs.StringVar(&cfg.CertFile, "etcd-cert", "", "with -store etcd, this host's client certificate `file`")
	fs.StringVar(&cfg.KeyFile, "etcd-key", "", "with -store etcd, this host's client key `file`")
	fs.StringVar(&cfg.Username, "etcd-user", "", "with -store etcd, the etcd user `name` (password: $"+etcdPasswordEnv+" or -etcd-password-file)")
	fs.StringVar(&cfg.PasswordFile, "etcd-password-file", "", "with -store etcd, the `file` holding the etcd user's password")
	fs.StringVar(&cfg.LockTTL, "etcd-lock-ttl", "", "with -store etcd, how long a dead host's refresh lock lasts (`duration`, default 10s)")
	fs.Func("etcd-old-data-key", "with -store etcd, where a data key that a rotation replaced is (`source`, as -etcd-data-key; repeatable): it still opens, never seals", appendTo(&cfg.OldDataKeys))
	fs.StringVar(&cfg.DataKey, "etcd-data-key", "", "with -store etcd, where the fleet's data key is: file:PATH, env:NAME or keyring:NAME (`source`; default env:"+etcdDataKeyEnv+")")
}

// overriddenBy returns cfg with every member that flags sets replacing
// its own.
func (cfg etcdConfig) overriddenBy(flags etcdConfig) etcdConfig {
	if len(flags.Endpoints) > 0 {
		cfg.Endpoints = flags.Endpoints
	}
	if len(flags.OldDataKeys) > 0 {
		cfg.OldDataKeys = flags.OldDataKeys
	}
	for _, m := range []struct{ dst, src *string }{
		{&cfg.Prefix, &flags.Prefix}, {&cfg.CAFile, &flags.CAFile}, {&cfg.CertFile, &flags.CertFile},
		{&cfg.KeyFile, &flags.KeyFile}, {&cfg.Username, &flags.Username}, {&cfg.PasswordFile, &flags.PasswordFile},
		{&cfg.LockTTL, &flags.LockTTL}, {&cfg.DataKey, &flags.DataKey},
	} {
		if *m.src != "" {
			*m.dst = *m.src
		}
	}
	return cfg
}

func splitList(v string) []string {
	var out []string
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}

// secretEnv names the variables cfg reads secrets from, which a sandboxed
// command must not inherit.
func (cfg etcdConfig) secretEnv() []string {
	names := []string{etcdPasswordEnv, etcdDataKeyEnv}
	for _, source := range append([]string{cfg.DataKey}, cfg.OldDataKeys...) {
		if kind, name, _ := strings.Cut(source, ":"); kind == "env" && name != "" {
			names = append(names, name)
		}
	}
	return names
}

// openEtcdStore opens the fleet's store that cfg describes (and the
// environment completes), logging what the store reports on log.
func openEtcdStore(ctx context.Context, cfg etcdConfig, log *slog.Logger, std stdio) (credproxy.StoreCloser, error) {
	opts, err := cfg.options(ctx, std)
	if err != nil {
		return nil, fmt.Errorf("-store etcd: %w; 'credproxy providers -help' shows the settings", err)
	}
	opts.Logger = log
	st, err := etcdstore.Open(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("-store etcd: %w", err)
	}
	return st, nil
}

// options turns cfg into the store's options, reading the files and
// variables it names.
func (cfg etcdConfig) options(ctx context.Context, std stdio) (etcdstore.Options, error) {
	opts := etcdstore.Options{Endpoints: cfg.Endpoints, Prefix: cfg.Prefix, Username: cfg.Username}
	if len(opts.Endpoints) == 0 {
		opts.Endpoints = splitList(os.Getenv(etcdEndpointsEnv))
	}
	if len(opts.Endpoints) == 0 {
		return opts, fmt.Errorf("no endpoints: give -etcd-endpoints, %s, or etcd.endpoints in the providers file", etcdEndpointsEnv)
	}
	if cfg.LockTTL != "" {
		d, err := time.ParseDuration(cfg.LockTTL)
		if err != nil || d <= 0 {
			return opts, fmt.Errorf("lock TTL %q is not a positive duration such as 10s", cfg.LockTTL)
		}
		opts.LockTTL = d
	}
	var err error
	if cfg.Username != "" {
		if opts.Password, err = etcdPassword(cfg.PasswordFile); err != nil {
			return opts, err
		}
	} else if cfg.PasswordFile != "" {
		return opts, errors.New("a password file without a user name: give -etcd-user or etcd.username")
	} else if os.Getenv(etcdPasswordEnv) != "" {
		fmt.Fprintf(std.err, "credproxy: warning: %s is set but no etcd user is given (-etcd-user or etcd.username), so it is not used\n", etcdPasswordEnv)
	}
	if opts.TLS, err = cfg.tlsConfig(); err != nil {
		return opts, err
	}
	if err := checkEndpoints(opts, std); err != nil {
		return opts, err
	}
	if opts.DataKey, err = dataKey(ctx, cfg.DataKey); err != nil {
		return opts, err
	}
	for _, source := range cfg.OldDataKeys {
		if source == "" {
			return opts, errors.New("an empty old data key source: write file:PATH, env:NAME or keyring:NAME")
		}
		key, err := dataKey(ctx, source)
		if err != nil {
			return opts, fmt.Errorf("old data key: %w", err)
		}
		opts.OldDataKeys = append(opts.OldDataKeys, key)
	}
	return opts, nil
}

func etcdPassword(file string) (string, error) {
	if file == "" {
		if pw := os.Getenv(etcdPasswordEnv); pw != "" {
			return pw, nil
		}
		return "", fmt.Errorf("an etcd user without a password: set %s or give a password file", etcdPasswordEnv)
	}
	data, err := readPrivateFile(file, "the etcd password file")
	if err != nil {
		return "", err
	}
	return strings.TrimRight(string(data), "\r\n"), nil
}

// tlsConfig is nil without TLS files: plain connections, or https with
// the system's roots.
func (cfg etcdConfig) tlsConfig() (*tls.Config, error) {
	if cfg.CAFile == "" && cfg.CertFile == "" && cfg.KeyFile == "" {
		return nil, nil
	}
	if (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return nil, errors.New("a client certificate needs both its certificate and key files")
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, err
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s holds no PEM certificate", cfg.CAFile)
		}
	}
	if cfg.CertFile != "" {
		if _, err := readPrivateFile(cfg.KeyFile, "the etcd client key"); err != nil {
			return nil, err
		}
		cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
		if err != nil {
			return nil, err
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

// checkEndpoints refuses what would send a secret in clear across a
// network: a password to a cluster reached by plain http beyond
// loopback, or TLS files with http endpoints (which would go unused). A
// plain remote cluster without a password is allowed, with a warning: the
// values it holds are sealed, but their names and the lock traffic are
// not.
func checkEndpoints(opts etcdstore.Options, std stdio) error {
	for _, ep := range opts.Endpoints {
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("endpoint %q is not an http:// or https:// URL", ep)
		}
		if u.Scheme == "https" {
			continue
		}
		if opts.TLS != nil {
			return fmt.Errorf("endpoint %s is http:// but TLS files are given: write it https://", ep)
		}
		ip := net.ParseIP(u.Hostname())
		if ip != nil && ip.IsLoopback() {
			continue
		}
		if opts.Password != "" {
			return fmt.Errorf("endpoint %s is plain http beyond loopback: the etcd password would cross the network in clear; use https", ep)
		}
		fmt.Fprintf(std.err, "credproxy: warning: etcd endpoint %s is plain http: values stay sealed, but item names and locks cross the network in clear\n", ep)
	}
	return nil
}

// errBadKeySource refuses a data key source of no known kind without
// quoting it: what was written there may be the key itself.
var errBadKeySource = errors.New("the data key source (not shown: it may be the key itself) is none of file:PATH, env:NAME or keyring:NAME")

// dataKey reads the fleet's data key from source: file:PATH, env:NAME or
// keyring:NAME; "" is env:CREDPROXY_ETCD_DATA_KEY.
func dataKey(ctx context.Context, source string) ([]byte, error) {
	if source == "" {
		source = "env:" + etcdDataKeyEnv
	}
	kind, name, _ := strings.Cut(source, ":")
	var text string
	switch {
	case name == "":
		return nil, errBadKeySource
	case kind == "file":
		data, err := readPrivateFile(name, "the data key file")
		if err != nil {
			return nil, err
		}
		text = string(data)
	case kind == "env":
		if text = os.Getenv(name); text == "" {
			return nil, fmt.Errorf("no data key: %s is not set; every host of the fleet needs the same 32-byte key, as 64 hex characters ('openssl rand -hex 32')", name)
		}
	case kind == "keyring":
		st, err := credproxy.OpenKeyringStore(credproxy.KeyringOptions{MustExist: true})
		if err != nil {
			return nil, fmt.Errorf("data key %s: %w", source, err)
		}
		defer st.Close()
		key, err := st.GetAPIKey(ctx, name)
		if err != nil {
			return nil, fmt.Errorf("data key %s: %w ('%s=keyring credproxy key set %s' puts it there)", source, err, storeEnv, name)
		}
		text = string(key)
	default:
		return nil, errBadKeySource
	}
	key, err := hex.DecodeString(strings.TrimSpace(text))
	if err != nil || len(key) != etcdstore.DataKeySize {
		// Neither the text nor the decoding error: either may hold the key.
		return nil, fmt.Errorf("the data key from %s is not 64 hex characters (32 bytes; 'openssl rand -hex 32' makes one)", source)
	}
	return key, nil
}

// readPrivateFile reads a file that holds a secret, refusing one that
// others may read or write, or that belongs to another user. It checks
// the file it opened (fstat), so a swap between check and read is caught.
func readPrivateFile(path, what string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if runtime.GOOS != "windows" && fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s %s is readable by others (mode %04o): chmod 600 it", what, path, fi.Mode().Perm())
	}
	if err := checkConfigWriters(path, fi); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxConfigSize))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return data, nil
}
