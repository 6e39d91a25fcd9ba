package spire_test

import (
	"context"
	"crypto/x509"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	keymanagertest "github.com/spiffe/spire/pkg/server/plugin/keymanager/test"
	"github.com/stretchr/testify/require"
)

// ourAzurePluginData is our plugin's plugin_data on backend azure_key_vault: SPIRE's keys
// for this vault and server id, the fake's CA as ca_cert_path, and extra lines (lifecycle
// keys, ...). Credentials come from the environment's chain (UseManagedIdentity).
func ourAzurePluginData(fake *azureKeyVaultFake, serverID string, extra ...string) string {
	return "backend = \"azure_key_vault\"\n" +
		azurePluginData(fake.VaultURL, serverID, append([]string{fmt.Sprintf("ca_cert_path = %q\n", fake.CACertPath)}, extra...)...)
}

// loadOurAzure loads our plugin through SPIRE's catalog on the fake, authenticating through
// the fake's App Service managed identity endpoint (the environment the plugin inherits).
func loadOurAzure(t *testing.T, fake *azureKeyVaultFake, serverID string, extra ...string) *loaded {
	t.Helper()
	fake.UseManagedIdentity(t)
	return loadExternal(t, ourAzurePluginData(fake, serverID, extra...))
}

// azureKeyID is the SPIRE key id of a key named spire-key-<uuid>-<id> (offset 47), or "".
func azureKeyID(name string) string {
	const offset = len("spire-key-") + 37
	if !strings.HasPrefix(name, "spire-key-") || len(name) <= offset || name[offset-1] != '-' {
		return ""
	}
	return name[offset:]
}

// latestTags are the tags of a key's latest version.
func (k azureFakeKey) latestTags() map[string]string {
	if len(k.Versions) == 0 {
		return nil
	}
	return k.Versions[len(k.Versions)-1].Tags
}

// azureKeysOf groups the keys tagged with serverID (published or not) by SPIRE key id.
func azureKeysOf(keys []azureFakeKey, serverID string) map[string][]azureFakeKey {
	out := map[string][]azureFakeKey{}
	for _, k := range keys {
		if k.latestTags()["spire-server-id"] == serverID {
			out[azureKeyID(k.Name)] = append(out[azureKeyID(k.Name)], k)
		}
	}
	return out
}

// requireAzureStoreHolds checks what km reports against the vault: one live key per SPIRE
// key id of serverID, named as SPIRE names keys, with SPIRE's two tags (no pending marker
// left), key_ops sign and verify, and the public key SPIRE got; rotated-out keys are
// soft-deleted (never purged) within a few seconds.
func requireAzureStoreHolds(t *testing.T, fake *azureKeyVaultFake, serverID string, km keymanager.KeyManager) {
	t.Helper()
	keys, err := km.GetKeys(context.Background())
	require.NoError(t, err)
	var live []azureFakeKey
	require.Eventually(t, func() bool {
		live, _ = fake.State(t)
		n := 0
		for _, ks := range azureKeysOf(live, serverID) {
			n += len(ks)
		}
		return n == len(keys)
	}, 10*time.Second, 100*time.Millisecond, "the vault holds exactly one live key per key id of %s (rotated-out keys soft-deleted)", serverID)
	byID := azureKeysOf(live, serverID)
	for _, key := range keys {
		stored := byID[key.ID()]
		require.Len(t, stored, 1, "key %s of %s is in the vault once", key.ID(), serverID)
		require.Equal(t, map[string]string{"spire-server-td": trustDomain, "spire-server-id": serverID}, stored[0].latestTags(),
			"key %s carries SPIRE's two tags", stored[0].Name)
		require.ElementsMatch(t, []string{"sign", "verify"}, stored[0].Versions[len(stored[0].Versions)-1].Key.KeyOps, "key %s", stored[0].Name)
		require.True(t, key.Public().(equaler).Equal(stored[0].PublicKey(t)), "key %s: SPIRE's public key is the vault's", key.ID())
	}
	require.Zero(t, fake.Stats(t)["purge"], "nothing is purged by default")
}

// TestAzureConformance runs SPIRE's own KeyManager conformance suite against our plugin on
// backend azure_key_vault, on the Key Vault fake, each instance with a fresh server id and
// credentials from the App Service managed identity environment. Every signature is checked
// by Go's crypto (x509.CreateCertificate verifies what it signed; PSS with salt = hash
// length). As for aws_kms and hashicorp_vault, ECDSA is offered only with the curve's hash:
// Key Vault's ES256/ES384 take only that digest length. When an instance ends, the keys it
// reports must be exactly the vault's live keys of its server id, and the identity header
// (a credential) must not be in its logs.
func TestAzureConformance(t *testing.T) {
	fake := startAzureKeyVaultFake(t)
	fake.UseManagedIdentity(t)
	n := 0
	keymanagertest.Test(t, keymanagertest.Config{
		Create: func(t *testing.T) keymanager.KeyManager {
			n++
			serverID := fmt.Sprintf("conformance-%d", n)
			p := loadExternal(t, ourAzurePluginData(fake, serverID))
			// Registered after loadExternal's unload: runs first, while the plugin is up.
			t.Cleanup(func() {
				requireAzureStoreHolds(t, fake, serverID, p.KeyManager)
				requireNoSecretsLogged(t, p.Logs, fake.IdentityHeader)
			})
			return p.KeyManager
		},
		UnsupportedSignatureAlgorithms: map[keymanager.KeyType][]x509.SignatureAlgorithm{
			keymanager.ECP256: {x509.ECDSAWithSHA384, x509.ECDSAWithSHA512},
			keymanager.ECP384: {x509.ECDSAWithSHA256, x509.ECDSAWithSHA512},
		},
	})
	require.Positive(t, fake.Stats(t)["token_app_service"], "the plugin authenticated through the managed identity endpoint")
}
