package spire_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// testCADir holds a CA made once for this test process (ca.pem, ca-key.pem) and the trust
// bundle SSL_CERT_FILE names (the system roots plus that CA). Fakes that serve TLS to clients
// using the system roots (the Azure Key Vault fake: SPIRE's built-in azure_key_vault and the
// Go SDK offer no CA option) get their server certificate from this CA.
var testCADir string

// TestMain trusts the process CA through SSL_CERT_FILE before any test runs. Go's crypto/x509
// reads the system roots once per process (the first TLS verification without explicit
// roots), so setting SSL_CERT_FILE inside a test would be too late, or would be ignored if
// another test verified a certificate first. Child processes (plugins, spire-server) inherit
// the variable; the bundle keeps the system roots, so nothing else loses trust.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kms-keymanager-test-ca-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "test CA:", err)
		os.Exit(2)
	}
	testCADir = dir
	if err := writeTestCA(dir); err != nil {
		fmt.Fprintln(os.Stderr, "test CA:", err)
		os.Exit(2)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func writeTestCA(dir string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	template := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: "kms-keymanager tests/spire test CA"},
		NotBefore: now.Add(-5 * time.Minute), NotAfter: now.Add(7 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, MaxPathLen: 1,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, key.Public(), key)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), caPEM, 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "ca-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	bundle := caPEM
	for _, system := range []string{os.Getenv("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"} {
		if system == "" {
			continue
		}
		if data, err := os.ReadFile(system); err == nil {
			bundle = append(append(data, '\n'), caPEM...)
			break
		}
	}
	bundlePath := filepath.Join(dir, "trust-bundle.pem")
	if err := os.WriteFile(bundlePath, bundle, 0o644); err != nil {
		return err
	}
	return os.Setenv("SSL_CERT_FILE", bundlePath)
}
