package spire_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/spire/pkg/common/catalog"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// azurePluginData is SPIRE's azure_key_vault plugin_data for a vault and a server id. (Our
// plugin takes the same text plus `backend = "azure_key_vault"`; SPIRE ignores unknown keys.)
func azurePluginData(vaultURL, serverID string, extra ...string) string {
	return fmt.Sprintf("key_vault_uri = %q\nkey_identifier_value = %q\n", vaultURL, serverID) + strings.Join(extra, "")
}

// loadBuiltInAzureKeyVault starts SPIRE's own azure_key_vault KeyManager through SPIRE's
// catalog with this plugin_data, authenticating with DefaultAzureCredential through the
// fake's App Service managed identity endpoint (IDENTITY_ENDPOINT/IDENTITY_HEADER; every
// other Azure identity variable unset for the test). The fake's CA is trusted through
// SSL_CERT_FILE, set for the whole test process by TestMain: SPIRE's plugin has no CA option.
func loadBuiltInAzureKeyVault(t *testing.T, fake *azureKeyVaultFake, pluginData string) *loaded {
	t.Helper()
	fake.UseManagedIdentity(t)
	return load(t, builtInAzureConfig(pluginData))
}

// builtInAzureConfig is the catalog configuration of SPIRE's built-in azure_key_vault.
func builtInAzureConfig(pluginData string) catalog.PluginConfig {
	return catalog.PluginConfig{Type: "KeyManager", Name: "azure_key_vault", DataSource: catalog.FixedData(pluginData)}
}

// PublicKey is the public key of the key's latest version, from the JWK the fake holds.
func (k azureFakeKey) PublicKey(t *testing.T) crypto.PublicKey {
	t.Helper()
	require.NotEmpty(t, k.Versions, "key %s has versions", k.Name)
	jwk := k.Versions[len(k.Versions)-1].Key
	decode := func(s string) *big.Int {
		b, err := base64.RawURLEncoding.DecodeString(s)
		require.NoError(t, err)
		return new(big.Int).SetBytes(b)
	}
	switch jwk.Crv {
	case "P-256":
		return &ecdsa.PublicKey{Curve: elliptic.P256(), X: decode(jwk.X), Y: decode(jwk.Y)}
	case "P-384":
		return &ecdsa.PublicKey{Curve: elliptic.P384(), X: decode(jwk.X), Y: decode(jwk.Y)}
	case "":
		return &rsa.PublicKey{N: decode(jwk.N), E: int(decode(jwk.E).Int64())}
	}
	t.Fatalf("key %s: unexpected curve %q", k.Name, jwk.Crv)
	return nil
}

// spireAzureKeys returns the live keys SPIRE's naming (spire-key-<uuid>-<key id>) gives to
// spireKeyID, by name.
func spireAzureKeys(keys []azureFakeKey, spireKeyID string) map[string]azureFakeKey {
	out := map[string]azureFakeKey{}
	for _, k := range keys {
		if strings.HasPrefix(k.Name, "spire-key-") && len(k.Name) == len("spire-key-")+37+len(spireKeyID) &&
			strings.HasSuffix(k.Name, "-"+spireKeyID) {
			out[k.Name] = k
		}
	}
	return out
}

func onlyKey(t *testing.T, keys map[string]azureFakeKey, what string) azureFakeKey {
	t.Helper()
	require.Len(t, keys, 1, what)
	for _, k := range keys {
		return k
	}
	return azureFakeKey{}
}

// TestAzurePeerWithSpiresBuiltIn checks the Key Vault fake with SPIRE's own azure_key_vault
// KeyManager, unmodified, through SPIRE's catalog: it generates keys under its naming and
// tags, signs (ECDSA re-encoded to DER by SPIRE, RSA PSS with salt = hash length, PKCS#1),
// rotates (a new key name; the old one soft-deleted, never purged) and rediscovers its keys
// in a second instance. A failure of ours on the same fake is then ours, not the fake's.
func TestAzurePeerWithSpiresBuiltIn(t *testing.T) {
	fake := startAzureKeyVaultFake(t)
	pluginData := azurePluginData(fake.VaultURL, "srv-a")
	first := loadBuiltInAzureKeyVault(t, fake, pluginData)

	ecKey, err := first.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	require.NoError(t, signVerified(ecKey, 1))
	rsaKey, err := first.KeyManager.GenerateKey(ctx, "JWT-Signer-A", keymanager.RSA2048)
	require.NoError(t, err)
	digest := sha256.Sum256([]byte("SPIRE's built-in on the fake"))
	rsaPub := rsaKey.Public().(*rsa.PublicKey)
	sig, err := rsaKey.Sign(rand.Reader, digest[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256})
	require.NoError(t, err)
	require.NoError(t, rsa.VerifyPSS(rsaPub, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}))
	sig, err = rsaKey.Sign(rand.Reader, digest[:], crypto.SHA256)
	require.NoError(t, err)
	require.NoError(t, rsa.VerifyPKCS1v15(rsaPub, crypto.SHA256, digest[:], sig))

	// What the vault holds: SPIRE's names, its two tags, the public keys it returned.
	live, deleted := fake.State(t)
	require.Empty(t, deleted)
	wantTags := map[string]string{"spire-server-td": trustDomain, "spire-server-id": "srv-a"}
	oldEC := onlyKey(t, spireAzureKeys(live, "x509-CA-A"), "one key for x509-CA-A")
	require.Equal(t, wantTags, oldEC.Versions[0].Tags)
	require.True(t, ecKey.Public().(equaler).Equal(oldEC.PublicKey(t)))
	rsaEntry := onlyKey(t, spireAzureKeys(live, "JWT-Signer-A"), "one key for JWT-Signer-A")
	require.Equal(t, wantTags, rsaEntry.Versions[0].Tags)
	require.True(t, rsaKey.Public().(equaler).Equal(rsaEntry.PublicKey(t)))
	require.GreaterOrEqual(t, fake.Stats(t)["token_app_service"], 1, "SPIRE authenticated through the managed identity endpoint")

	// Rotation: a new key name, and the old name soft-deleted (asynchronously), not purged.
	rotated, err := first.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	require.NoError(t, signVerified(rotated, 2))
	require.Eventually(t, func() bool {
		_, deleted := fake.State(t)
		return len(deleted) == 1 && deleted[0].Name == oldEC.Name
	}, 20*time.Second, 50*time.Millisecond, "the old key %s is soft-deleted", oldEC.Name)
	live, _ = fake.State(t)
	newEC := onlyKey(t, spireAzureKeys(live, "x509-CA-A"), "one live key for x509-CA-A after rotation")
	require.NotEqual(t, oldEC.Name, newEC.Name)
	require.True(t, rotated.Public().(equaler).Equal(newEC.PublicKey(t)))
	require.Zero(t, fake.Stats(t)["purge"], "SPIRE never purges")
	require.NoError(t, first.catalog.Close())

	// Rediscovery: a second instance with the same plugin_data finds both keys by tags.
	second := loadBuiltInAzureKeyVault(t, fake, pluginData)
	keys, err := second.KeyManager.GetKeys(ctx)
	require.NoError(t, err)
	byID := requireSameKeys(t, map[string]crypto.PublicKey{"x509-CA-A": rotated.Public(), "JWT-Signer-A": rsaKey.Public()}, keys)
	require.NoError(t, signVerified(byID["x509-CA-A"], 3))

	// Another server id in the same vault sees none of them.
	other := loadBuiltInAzureKeyVault(t, fake, azurePluginData(fake.VaultURL, "srv-b"))
	keys, err = other.KeyManager.GetKeys(ctx)
	require.NoError(t, err)
	require.Empty(t, keys)

	// A disabled key of ours fails SPIRE's start-up: the fake serves GetKey on a disabled key
	// with enabled=false, as Key Vault does, and SPIRE checks it.
	fake.SetKeyEnabled(t, newEC.Name, false)
	_, err = tryLoad(catalog.PluginConfig{Type: "KeyManager", Name: "azure_key_vault", DataSource: catalog.FixedData(pluginData)})
	require.ErrorContains(t, err, "found disabled SPIRE key")
	fake.SetKeyEnabled(t, newEC.Name, true)

	// A revoked token: SPIRE's credential chain gets a new one after the claims challenge.
	// SPIRE v1.14's built-in (on sdk/keyvault/azkeys v0.10) does not answer the challenge:
	// it keeps the revoked token, and every call of this process fails until the token
	// expires (a difference between the releases); hence this check comes last.
	fake.ResetStats(t)
	fake.ExpireTokens(t, "cae")
	if spireAzureAnswersClaimsChallenge {
		require.NoError(t, signVerified(byID["x509-CA-A"], 4))
		require.Equal(t, 1, fake.Stats(t)["token"], "one new token")
	} else {
		err = signVerified(byID["x509-CA-A"], 4)
		require.ErrorContains(t, err, "The access token has been revoked (continuous access evaluation)")
		require.Zero(t, fake.Stats(t)["token"], "no new token")
	}
}
