package spire_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	keymanagertest "github.com/spiffe/spire/pkg/server/plugin/keymanager/test"
	"github.com/stretchr/testify/require"
)

// vaultConformance runs SPIRE's KeyManager conformance suite on backend hashicorp_vault,
// each instance with a fresh server id. Every signature is checked by Go's crypto (x509
// CreateCertificate verifies what it signed; PSS with salt = hash length). The exclusions are
// the aws_kms ones: ECDSA only with the curve's hash, since the backend checks digest lengths
// before calling Vault (SPIRE's built-in sends any EC digest, and OpenBao signs it; SPIRE
// itself only asks for the curve's hash). When an instance ends, the keys it
// reports must be exactly the keys published in the transit mount under its server id, not
// exportable, with no other key of that server left behind (retired keys are deleted), and
// none of the secrets may be in its logs.
func vaultConformance(t *testing.T, bao *baoServer, idPrefix string, pluginData func(serverID string) string, secrets ...string) {
	n := 0
	keymanagertest.Test(t, keymanagertest.Config{
		Create: func(t *testing.T) keymanager.KeyManager {
			n++
			serverID := fmt.Sprintf("%s-%d", idPrefix, n)
			p := loadExternal(t, pluginData(serverID))
			// Registered after loadExternal's unload: runs first, while the plugin is up.
			t.Cleanup(func() {
				requireStoreHolds(t, bao, serverID, p.KeyManager)
				requireNoSecretsLogged(t, p.Logs, secrets...)
			})
			return p.KeyManager
		},
		UnsupportedSignatureAlgorithms: map[keymanager.KeyType][]x509.SignatureAlgorithm{
			keymanager.ECP256: {x509.ECDSAWithSHA384, x509.ECDSAWithSHA512},
			keymanager.ECP384: {x509.ECDSAWithSHA256, x509.ECDSAWithSHA512},
		},
	})
}

// requireStoreHolds checks that what km reports is what the transit mount holds for
// serverID: the same SPIRE key ids with the same public keys, published (deletion not
// allowed) and not exportable; a rotated-out key is deleted within a few seconds.
func requireStoreHolds(t *testing.T, bao *baoServer, serverID string, km keymanager.KeyManager) {
	t.Helper()
	keys, err := km.GetKeys(context.Background())
	require.NoError(t, err)
	published := bao.PublishedKeys(t, "transit", serverID)
	require.Len(t, published, len(keys), "transit holds one published key per SPIRE key id of %s", serverID)
	for _, key := range keys {
		stored, ok := published[key.ID()]
		require.True(t, ok, "key %s of %s is in the transit mount", key.ID(), serverID)
		require.True(t, key.Public().(equaler).Equal(stored), "key %s: SPIRE's public key is the transit key's", key.ID())
	}
	for name, key := range bao.TransitKeysOf(t, "transit", serverID) {
		require.False(t, key.Exportable, "key %s must not be exportable", name)
	}
	require.Eventually(t, func() bool { return len(bao.TransitKeysOf(t, "transit", serverID)) == len(keys) },
		10*time.Second, 100*time.Millisecond, "rotated-out keys of %s are deleted from transit", serverID)
}

// TestVaultConformanceTokenAuth: token_auth with a token holding only SPIRE's documented
// transit policy.
func TestVaultConformanceTokenAuth(t *testing.T) {
	clearVaultEnv(t)
	bao := startBao(t)
	bao.WritePolicy(t, "spire", vaultSpirePolicy)
	token := bao.CreateToken(t, "1h", "spire")
	vaultConformance(t, bao, "token", func(serverID string) string {
		return vaultPluginData(bao.Addr, serverID, tokenAuth(token))
	}, token)
}

// TestVaultConformanceAppRoleAuth: approle_auth; the plugin's tokens come from AppRole logins.
func TestVaultConformanceAppRoleAuth(t *testing.T) {
	clearVaultEnv(t)
	bao := startBao(t)
	bao.WritePolicy(t, "spire", vaultSpirePolicy)
	roleID, secretID := bao.EnableAppRole(t, "spire", map[string]any{"token_policies": []string{"spire"}, "token_ttl": "1h"})
	vaultConformance(t, bao, "approle", func(serverID string) string {
		return vaultPluginData(bao.Addr, serverID, appRoleAuth(roleID, secretID))
	}, secretID)
	require.NotEmpty(t, bao.TokenAccessors(t, "auth/approle/login"), "the plugin logged in through AppRole")
}

// TestVaultConformanceCertAuth: cert_auth over TLS (OpenBao -dev-tls, its CA in
// ca_cert_path); the client certificate's CA is trusted by the cert auth role.
func TestVaultConformanceCertAuth(t *testing.T) {
	clearVaultEnv(t)
	bao := startBaoTLS(t)
	bao.WritePolicy(t, "spire", vaultSpirePolicy)
	caPEM, certPath, keyPath := clientCertificate(t, "spire-server")
	bao.EnableCertAuth(t, "spire", caPEM, "spire")
	keyPEM, err := os.ReadFile(keyPath)
	require.NoError(t, err)
	vaultConformance(t, bao, "cert", func(serverID string) string {
		return vaultPluginData(bao.Addr, serverID, certAuth("spire", certPath, keyPath), fmt.Sprintf("ca_cert_path = %q\n", bao.CACertPath))
	}, string(keyPEM[40:100]))
	require.NotEmpty(t, bao.TokenAccessors(t, "auth/cert/login"), "the plugin logged in with its client certificate")
}

// TestVaultConformanceK8sAuth: k8s_auth against a JWT auth method mounted at k8sjwt/ (the
// login body SPIRE's k8s_auth sends, {role, jwt}, is the jwt method's): the service account
// token is an ES256 JWT the test signs and writes to token_path.
func TestVaultConformanceK8sAuth(t *testing.T) {
	clearVaultEnv(t)
	bao := startBao(t)
	bao.WritePolicy(t, "spire", vaultSpirePolicy)
	issuer, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	bao.EnableJWTAuth(t, "k8sjwt", "spire", issuer.Public(), "spire")
	now := time.Now()
	jwt := es256JWT(t, issuer, map[string]any{
		"iss": "kubernetes/serviceaccount", "sub": "system:serviceaccount:spire:spire-server", "aud": []string{"vault"},
		"iat": now.Unix(), "nbf": now.Add(-time.Minute).Unix(), "exp": now.Add(time.Hour).Unix(),
	})
	tokenPath := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(tokenPath, []byte(jwt), 0o600))
	vaultConformance(t, bao, "k8s", func(serverID string) string {
		return vaultPluginData(bao.Addr, serverID, k8sAuth("k8sjwt", "spire", tokenPath))
	}, jwt)
	require.NotEmpty(t, bao.TokenAccessors(t, "auth/k8sjwt/login"), "the plugin logged in with its service account token")
}
