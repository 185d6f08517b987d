package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"time"
)

// transport returns the transport the injecting front reaches the
// upstreams with (Options.InjectTransport): nil, the front's own with the
// system's roots, unless a route has a ca_file; then one that trusts each
// ca_file's certificates, besides the system's roots, for its upstream's
// host and port alone, so that a private CA given for a test upstream can
// vouch for nothing else, api.anthropic.com included. Its other settings
// are the front's own transport's.
func (in *injection) transport() (http.RoundTripper, error) {
	if len(in.roots) == 0 {
		return nil, nil
	}
	system, err := x509.SystemCertPool()
	if err != nil {
		system = x509.NewCertPool() // none on this system: the ca_files alone
	}
	pools := map[string]*x509.CertPool{} // by host:port, as the transport dials it
	for upstream, file := range in.roots {
		data, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("inject ca_file: %w", err)
		}
		pool := system.Clone()
		if !pool.AppendCertsFromPEM(data) {
			return nil, fmt.Errorf("inject ca_file %s holds no PEM certificate", file)
		}
		pools[dialAddr(upstream)] = pool
	}
	dialer := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	return &http.Transport{
		Proxy: nil, // never a proxy from the environment
		// crypto/tls knows one pool of roots per config: the dial picks
		// the pool of the address it dials.
		DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			host, _, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, err
			}
			ctx, cancel := context.WithTimeout(ctx, 40*time.Second) // dial and handshake
			defer cancel()
			cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: host, RootCAs: pools[addr],
				NextProtos: []string{"h2", "http/1.1"}} // RootCAs nil: the system's
			return (&tls.Dialer{NetDialer: dialer, Config: cfg}).DialContext(ctx, network, addr)
		},
		ForceAttemptHTTP2:      true,
		MaxIdleConns:           16,
		IdleConnTimeout:        90 * time.Second,
		ExpectContinueTimeout:  time.Second,
		MaxResponseHeaderBytes: 1 << 20,
		DisableCompression:     true, // the sandbox's Accept-Encoding goes upstream, and the answer back as sent
	}, nil
}

// dialAddr is the host:port the transport dials for an https upstream's
// URL host (u.Host), which may leave out the port.
func dialAddr(host string) string {
	u := url.URL{Host: host}
	if u.Port() == "" {
		return net.JoinHostPort(u.Hostname(), "443")
	}
	return net.JoinHostPort(u.Hostname(), u.Port())
}
