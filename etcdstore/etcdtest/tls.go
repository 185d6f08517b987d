package etcdtest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// ClientCommonName is the subject common name of [TLS.CertFile]. It names
// no etcd user: a cluster with authentication enabled would take a client
// certificate's common name as the user name of a request that carries no
// password, so a test that wants that must add a user of this name.
const ClientCommonName = "credproxy-etcdtest-client"

// TLS is what a client of a cluster started by [StartTLS] needs: PEM files
// made for the test (ECDSA P-256, valid for an hour) in its temporary
// directory, and a ready client configuration. The key file is 0600.
type TLS struct {
	// CAFile is the certificate of the test CA that signed the cluster's
	// server certificate (for 127.0.0.1 and localhost) and CertFile.
	CAFile string

	// CertFile and KeyFile are a client certificate and its key, which the
	// cluster accepts.
	CertFile string
	KeyFile  string

	// OtherCAFile is the certificate of a second CA, which signed nothing
	// the cluster uses: a client that trusts it alone must refuse the
	// cluster.
	OtherCAFile string

	// Config trusts CAFile and presents CertFile. It is shared: clone it
	// before changing it.
	Config *tls.Config
}

// serverTLS is a member's side: its certificate, key and the CA it
// checks client certificates against.
type serverTLS struct {
	caFile, certFile, keyFile string
}

// newTLS writes a test CA, a server and a client certificate signed by
// it, and another CA, into dir.
func newTLS(t testing.TB, dir string) (*TLS, serverTLS) {
	t.Helper()
	ca := newCert(t, nil, &x509.Certificate{
		Subject:               pkix.Name{CommonName: "credproxy etcdtest CA"},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	})
	other := newCert(t, nil, &x509.Certificate{
		Subject:               pkix.Name{CommonName: "credproxy etcdtest other CA"},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	})
	// The server certificate serves client auth too: a member presents
	// it when it dials itself.
	server := newCert(t, ca, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "credproxy etcdtest member"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:    []string{"localhost"},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	})
	client := newCert(t, ca, &x509.Certificate{
		Subject:     pkix.Name{CommonName: ClientCommonName},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	path := func(name string) string { return filepath.Join(dir, name) }
	c := &TLS{CAFile: path("ca.pem"), CertFile: path("client.pem"), KeyFile: path("client-key.pem"), OtherCAFile: path("other-ca.pem")}
	s := serverTLS{caFile: c.CAFile, certFile: path("server.pem"), keyFile: path("server-key.pem")}
	ca.writeCert(t, c.CAFile)
	other.writeCert(t, c.OtherCAFile)
	server.writeCert(t, s.certFile)
	server.writeKey(t, s.keyFile)
	client.writeCert(t, c.CertFile)
	client.writeKey(t, c.KeyFile)

	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	pair, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	c.Config = &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	return c, s
}

type certKey struct {
	cert *x509.Certificate
	der  []byte
	key  *ecdsa.PrivateKey
}

// newCert makes a certificate from tmpl, valid from a minute ago for an
// hour, signed by parent (nil: by itself).
func newCert(t testing.TB, parent *certKey, tmpl *x509.Certificate) *certKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if tmpl.SerialNumber, err = rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64)); err != nil {
		t.Fatal(err)
	}
	tmpl.NotBefore = time.Now().Add(-time.Minute)
	tmpl.NotAfter = time.Now().Add(time.Hour)
	signer, signerCert := key, tmpl
	if parent != nil {
		signer, signerCert = parent.key, parent.cert
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signerCert, &key.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &certKey{cert: cert, der: der, key: key}
}

func (c *certKey) writeCert(t testing.TB, path string) {
	t.Helper()
	writePEM(t, path, "CERTIFICATE", c.der, 0o644)
}

func (c *certKey) writeKey(t testing.TB, path string) {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(c.key)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, path, "PRIVATE KEY", der, 0o600)
}

func writePEM(t testing.TB, path, typ string, der []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
		t.Fatal(err)
	}
}
