package spire_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha512"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// azureDropInKeys are the keys each side creates for the other to find.
var azureDropInKeys = map[string]keymanager.KeyType{
	"x509-CA-A":    keymanager.ECP256,
	"x509-CA-B":    keymanager.ECP256,
	"JWT-Signer-A": keymanager.RSA2048,
	"JWT-Signer-B": keymanager.ECP384,
}

// spireStaleAfter is SPIRE v1.15.3 azure_key_vault's maxStaleDuration.
const spireStaleAfter = 14 * 24 * time.Hour

// spireWouldDispose lists the keys SPIRE's built-in azure_key_vault, running as sweeperID,
// would enqueue for deletion at its 48-hourly disposal, reading the vault as it does (the
// SDK's key list pager): keys whose spire-server-td tag is the trust domain, whose
// spire-server-id tag is another server's, and whose `updated` is older than 14 days. Its
// disposal runs only every 48 h, with no hook to run it sooner, so its rule is applied here
// to what it would list. A key with the trust-domain tag and no server-id tag is returned
// in panics: SPIRE dereferences that tag unchecked, and its sweep would panic on it.
func spireWouldDispose(t *testing.T, client *azkeys.Client, sweeperID string, now time.Time) (dispose []string, panics []string) {
	t.Helper()
	pager := client.NewListKeyPropertiesPager(nil)
	for pager.More() {
		page, err := pager.NextPage(context.Background())
		require.NoError(t, err)
		for _, key := range page.Value {
			td, ok := key.Tags["spire-server-td"]
			if !ok || td == nil || *td != trustDomain {
				continue
			}
			id, ok := key.Tags["spire-server-id"]
			if !ok || id == nil {
				panics = append(panics, key.KID.Name())
				continue
			}
			if *id == sweeperID {
				continue
			}
			if key.Attributes.Updated.Before(now.Add(-spireStaleAfter)) {
				dispose = append(dispose, key.KID.Name())
			}
		}
	}
	return dispose, panics
}

// liveNames returns the names of the live keys of serverID.
func liveNames(t *testing.T, fake *azureKeyVaultFake, serverID string) map[string]bool {
	t.Helper()
	live, _ := fake.State(t)
	out := map[string]bool{}
	for _, ks := range azureKeysOf(live, serverID) {
		for _, k := range ks {
			out[k.Name] = true
		}
	}
	return out
}

func deletedNames(t *testing.T, fake *azureKeyVaultFake) map[string]bool {
	t.Helper()
	_, deleted := fake.State(t)
	out := map[string]bool{}
	for _, k := range deleted {
		out[k.Name] = true
	}
	return out
}

// TestAzureDropInWithSpiresBuiltIn: our backend is a drop-in for SPIRE's built-in
// azure_key_vault both ways, with the same plugin_data text (SPIRE's decoder ignores our
// backend and ca_cert_path keys) on one Key Vault fake, both authenticating through the App
// Service managed identity environment. Keys SPIRE's built-in created are found by ours (same key
// ids, same key names, same public keys, not one key created) and sign verifiably; keys ours
// created are found by SPIRE's built-in the same way. Ours rotating a key SPIRE made
// soft-deletes the old one, and SPIRE's built-in, restarted, follows.
func TestAzureDropInWithSpiresBuiltIn(t *testing.T) {
	fake := startAzureKeyVaultFake(t)
	fake.UseManagedIdentity(t)

	t.Run("SPIRE's built-in creates, ours finds and signs", func(t *testing.T) {
		builtin := loadBuiltInAzureKeyVault(t, fake, ourAzurePluginData(fake, "spire-made"))
		created := map[string]crypto.PublicKey{}
		for id, keyType := range azureDropInKeys {
			key, err := builtin.KeyManager.GenerateKey(ctx, id, keyType)
			require.NoError(t, err)
			created[id] = key.Public()
		}
		names := liveNames(t, fake, "spire-made")
		require.Len(t, names, len(created), "SPIRE's built-in made one key per id")
		require.NoError(t, builtin.catalog.Close())

		fake.ResetStats(t)
		ours := loadOurAzure(t, fake, "spire-made")
		found, err := ours.KeyManager.GetKeys(ctx)
		require.NoError(t, err)
		byID := requireSameKeys(t, created, found)
		for _, key := range byID {
			requireAzureSignsAndVerifies(t, key)
		}
		require.Zero(t, fake.Stats(t)["create"], "ours created no key: it uses SPIRE's")
		require.Equal(t, names, liveNames(t, fake, "spire-made"), "the same keys, by name")
		requireAzureStoreHolds(t, fake, "spire-made", ours.KeyManager)

		// Ours rotates a key SPIRE made: a new SPIRE-style key, the old one soft-deleted (not
		// purged), and SPIRE's built-in, restarted, serves the new one.
		old := onlyKey(t, spireAzureKeys(mustLive(t, fake), "x509-CA-A"), "SPIRE's x509-CA-A")
		rotated, err := ours.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
		require.NoError(t, err)
		require.False(t, rotated.Public().(equaler).Equal(created["x509-CA-A"]))
		require.Eventually(t, func() bool { return deletedNames(t, fake)[old.Name] }, 10*time.Second, 100*time.Millisecond,
			"the replaced key %s is soft-deleted", old.Name)
		require.Zero(t, fake.Stats(t)["purge"])
		again := loadBuiltInAzureKeyVault(t, fake, ourAzurePluginData(fake, "spire-made"))
		key, err := again.KeyManager.GetKey(ctx, "x509-CA-A")
		require.NoError(t, err)
		require.True(t, key.Public().(equaler).Equal(rotated.Public()), "SPIRE's built-in finds the key ours rotated to")
		requireAzureSignsAndVerifies(t, key)
	})

	t.Run("ours creates, SPIRE's built-in finds and signs", func(t *testing.T) {
		ours := loadOurAzure(t, fake, "ours-made")
		created := map[string]crypto.PublicKey{}
		for id, keyType := range azureDropInKeys {
			key, err := ours.KeyManager.GenerateKey(ctx, id, keyType)
			require.NoError(t, err)
			created[id] = key.Public()
		}
		requireAzureStoreHolds(t, fake, "ours-made", ours.KeyManager)
		live := mustLive(t, fake)
		for id := range created {
			onlyKey(t, spireAzureKeys(azureKeysOf(live, "ours-made")[id], id), "ours named "+id+" as SPIRE does (spire-key-<uuid>-<id>)")
		}
		names := liveNames(t, fake, "ours-made")
		require.NoError(t, ours.catalog.Close())

		fake.ResetStats(t)
		builtin := loadBuiltInAzureKeyVault(t, fake, ourAzurePluginData(fake, "ours-made"))
		found, err := builtin.KeyManager.GetKeys(ctx)
		require.NoError(t, err)
		byID := requireSameKeys(t, created, found)
		for _, key := range byID {
			requireAzureSignsAndVerifies(t, key)
		}
		require.Zero(t, fake.Stats(t)["create"], "SPIRE's built-in created no key: it uses ours")
		require.Equal(t, names, liveNames(t, fake, "ours-made"))
	})
}

// requireAzureSignsAndVerifies signs with key and verifies with Go's crypto against its public
// key: ECDSA with the curve's hash (Key Vault's ES256/ES384 take only that digest), RSA
// PKCS#1 v1.5 and PSS with salt = hash length.
func requireAzureSignsAndVerifies(t *testing.T, key keymanager.Key) {
	t.Helper()
	pub, ok := key.Public().(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P384() {
		requireSignsAndVerifies(t, key)
		return
	}
	digest := sha512.Sum384([]byte("signed with " + key.ID()))
	sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA384)
	require.NoError(t, err, "sign with %s", key.ID())
	require.True(t, ecdsa.VerifyASN1(pub, digest[:], sig), "ECDSA P-384 signature of %s verifies", key.ID())
}

func mustLive(t *testing.T, fake *azureKeyVaultFake) []azureFakeKey {
	t.Helper()
	live, _ := fake.State(t)
	return live
}

// TestAzureLivenessAgreesWithSpiresBuiltIn: our liveness stamp and sweep and SPIRE's built-in
// azure_key_vault read each other's keys the same way, on one vault.
//   - Our stamp is SPIRE's refresh: a no-op update of key_ops that bumps the key's `updated`
//     time, on the same version, tags and key_ops unchanged. A key of ours aged 20 days (so
//     that SPIRE's disposal rule, applied to the SDK's listing, would delete it) is fresh
//     again after one liveness_interval, and SPIRE's rule keeps it.
//   - Our sweep, with SPIRE's thresholds (14 days stale, the default) and a 1 s
//     sweep_interval, soft-deletes the keys SPIRE's built-in made for a server whose keys
//     were last refreshed 15 days ago, and keeps those of a server refreshed 13 days ago, a
//     key of another trust domain and a key with the trust-domain tag but no server-id tag
//     (which would panic SPIRE's own sweep).
func TestAzureLivenessAgreesWithSpiresBuiltIn(t *testing.T) {
	fake := startAzureKeyVaultFake(t)
	sdk := azureSDKClient(t, fake)
	now := time.Now()
	day := 24 * time.Hour

	t.Run("our stamp keeps our keys alive for SPIRE's disposal", func(t *testing.T) {
		ours := loadOurAzure(t, fake, "ours-live", "liveness_interval = \"2s\"\n")
		_, err := ours.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
		require.NoError(t, err)
		key := onlyKey(t, spireAzureKeys(mustLive(t, fake), "x509-CA-A"), "our x509-CA-A")
		aged := time.Now().Add(-20 * day)
		fake.SetKeyTimes(t, key.Name, aged, aged)
		dispose, _ := spireWouldDispose(t, sdk, "spire-sweeper", time.Now())
		require.Contains(t, dispose, key.Name, "aged 20 days, SPIRE's disposal would delete our key")

		require.Eventually(t, func() bool {
			dispose, _ := spireWouldDispose(t, sdk, "spire-sweeper", time.Now())
			return len(dispose) == 0
		}, 10*time.Second, 200*time.Millisecond, "our stamp makes the key fresh for SPIRE's rule")
		after := onlyKey(t, spireAzureKeys(mustLive(t, fake), "x509-CA-A"), "our x509-CA-A")
		require.Len(t, after.Versions, 1, "the stamp adds no version")
		v := after.Versions[0]
		require.Less(t, time.Since(time.Unix(v.Attributes.Updated, 0)), 5*time.Second, "updated was bumped")
		require.Equal(t, aged.Unix(), v.Attributes.Created, "created is untouched")
		require.Equal(t, key.Versions[0].Tags, v.Tags, "tags unchanged")
		require.ElementsMatch(t, []string{"sign", "verify"}, v.Key.KeyOps)
		require.True(t, v.Attributes.Enabled)
		require.Positive(t, fake.Stats(t)["update"])
	})

	t.Run("our sweep keeps SPIRE's live keys and deletes its dead ones", func(t *testing.T) {
		fake.UseManagedIdentity(t)
		for _, id := range []string{"spire-live", "spire-dead"} {
			builtin := loadBuiltInAzureKeyVault(t, fake, azurePluginData(fake.VaultURL, id))
			for keyID, keyType := range map[string]keymanager.KeyType{"x509-CA-A": keymanager.ECP256, "JWT-Signer-A": keymanager.ECP256} {
				_, err := builtin.KeyManager.GenerateKey(ctx, keyID, keyType)
				require.NoError(t, err)
			}
			require.NoError(t, builtin.catalog.Close())
		}
		liveSpire, deadSpire := liveNames(t, fake, "spire-live"), liveNames(t, fake, "spire-dead")
		require.Len(t, liveSpire, 2)
		require.Len(t, deadSpire, 2)
		for name := range liveSpire {
			fake.SetKeyTimes(t, name, now.Add(-30*day), now.Add(-13*day)) // SPIRE refreshed it 13 days ago
		}
		for name := range deadSpire {
			fake.SetKeyTimes(t, name, now.Add(-30*day), now.Add(-15*day)) // not refreshed for 15 days
		}
		old := now.Add(-60 * day).Unix()
		fake.Bulk(t,
			azureBulkKey{Name: "spire-key-00000000-0000-4000-8000-000000000001-x509-CA-A", Created: old, Updated: old,
				Tags: map[string]string{"spire-server-td": trustDomain}},
			azureBulkKey{Name: "spire-key-00000000-0000-4000-8000-000000000002-x509-CA-A", Created: old, Updated: old,
				Tags: map[string]string{"spire-server-td": "other.example", "spire-server-id": "elsewhere"}},
		)
		dispose, panics := spireWouldDispose(t, sdk, "spire-sweeper", time.Now())
		require.ElementsMatch(t, keysOf(deadSpire), dispose, "SPIRE's rule: only the dead server's keys")
		require.Equal(t, []string{"spire-key-00000000-0000-4000-8000-000000000001-x509-CA-A"}, panics)

		fake.ResetStats(t)
		sweeper := loadOurAzure(t, fake, "ours-sweeper", "sweep_interval = \"1s\"\n")
		_, err := sweeper.KeyManager.GetKeys(ctx)
		require.NoError(t, err)
		require.Eventually(t, func() bool {
			deleted := deletedNames(t, fake)
			for name := range deadSpire {
				if !deleted[name] {
					return false
				}
			}
			return true
		}, 15*time.Second, 200*time.Millisecond, "our sweep soft-deletes the dead SPIRE server's keys")
		time.Sleep(2500 * time.Millisecond) // more sweeps
		require.Equal(t, liveSpire, liveNames(t, fake, "spire-live"), "the live SPIRE server's keys stay")
		deleted := deletedNames(t, fake)
		require.Len(t, deleted, len(deadSpire), "nothing else is deleted")
		live := map[string]bool{}
		for _, k := range mustLive(t, fake) {
			live[k.Name] = true
		}
		require.True(t, live["spire-key-00000000-0000-4000-8000-000000000001-x509-CA-A"], "a key without a server-id tag is never touched")
		require.True(t, live["spire-key-00000000-0000-4000-8000-000000000002-x509-CA-A"], "another trust domain's key is never touched")
		require.Zero(t, fake.Stats(t)["purge"], "soft delete only, as SPIRE")
	})
}

func keysOf(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
