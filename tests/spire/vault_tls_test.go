package spire_test

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"testing"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// TestVaultTLSTrust: against OpenBao's -dev-tls server (a certificate from its own CA), the
// plugin refuses the server without ca_cert_path (the system roots do not know that CA),
// trusts it with ca_cert_path, and with insecure_skip_verify = true connects without
// checking, with a warning in the log.
func TestVaultTLSTrust(t *testing.T) {
	clearVaultEnv(t)
	bao := startBaoTLS(t)
	auth := tokenAuth(baoRootToken)

	_, err := tryLoad(catalogConfig(t, vaultPluginData(bao.Addr, "tls-untrusted", auth)))
	require.Error(t, err, "an unknown CA must not be trusted")
	require.Contains(t, err.Error(), "certificate", err.Error())

	digest := sha256.Sum256([]byte("over TLS"))
	for name, extra := range map[string]string{
		"ca_cert_path":         "ca_cert_path = \"" + bao.CACertPath + "\"\n",
		"insecure_skip_verify": "insecure_skip_verify = true\n",
	} {
		t.Run(name, func(t *testing.T) {
			loaded := loadExternal(t, vaultPluginData(bao.Addr, "tls-"+name, auth, extra))
			key, err := loaded.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
			require.NoError(t, err)
			_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
			require.NoError(t, err)
			if name == "insecure_skip_verify" {
				require.NotNil(t, loaded.Logs.find("insecure_skip_verify = true: Vault's TLS certificate is not verified; anyone on the path can read the token and forge signatures"))
			}
		})
	}
}
