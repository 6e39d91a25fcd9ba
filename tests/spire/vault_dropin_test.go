package spire_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"testing"
	"time"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// vaultDropInKeys are the keys each side creates for the other to find.
var vaultDropInKeys = map[string]keymanager.KeyType{
	"x509-CA-A":    keymanager.ECP256,
	"x509-CA-B":    keymanager.ECP256,
	"JWT-Signer-A": keymanager.RSA2048,
}

// pssEqualsHash is PSS with the salt as long as the hash: what Go's x509 signs and checks.
var pssEqualsHash = &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}

// requireSignsAndVerifies signs a SHA-256 digest with key (ECDSA; RSA PKCS#1 v1.5 and PSS with
// salt = hash length) and verifies each signature with Go's crypto against the key's public
// key.
func requireSignsAndVerifies(t *testing.T, key keymanager.Key) {
	t.Helper()
	digest := sha256.Sum256([]byte("signed with " + key.ID()))
	switch pub := key.Public().(type) {
	case *ecdsa.PublicKey:
		sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.NoError(t, err, "sign with %s", key.ID())
		require.True(t, ecdsa.VerifyASN1(pub, digest[:], sig), "ECDSA signature of %s verifies", key.ID())
	case *rsa.PublicKey:
		sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.NoError(t, err, "sign with %s", key.ID())
		require.NoError(t, rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig), "PKCS#1 v1.5 signature of %s", key.ID())
		sig, err = key.Sign(rand.Reader, digest[:], pssEqualsHash)
		require.NoError(t, err, "PSS sign with %s", key.ID())
		require.NoError(t, rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, pssEqualsHash),
			"PSS signature of %s verifies with salt = hash length", key.ID())
	default:
		t.Fatalf("key %s: unexpected public key type %T", key.ID(), pub)
	}
}

// builtInPSS signs with SPIRE's built-in hashicorp_vault under PSS (SPIRE asks for salt =
// hash length) and returns whether Go's strict check (salt = hash length) and the
// auto-detecting check accept the signature.
func builtInPSS(t *testing.T, key keymanager.Key) (strict, auto bool) {
	t.Helper()
	digest := sha256.Sum256([]byte("PSS through SPIRE's built-in"))
	sig, err := key.Sign(rand.Reader, digest[:], pssEqualsHash)
	require.NoError(t, err)
	pub := key.Public().(*rsa.PublicKey)
	strict = rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, pssEqualsHash) == nil
	auto = rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto}) == nil
	return strict, auto
}

// requirePublicKeysEqual checks two sets of public keys by SPIRE key id.
func requirePublicKeysEqual(t *testing.T, want, got map[string]crypto.PublicKey, what string) {
	t.Helper()
	require.Len(t, got, len(want), "%s: the same key ids", what)
	for id, pub := range want {
		require.NotNil(t, got[id], "%s: key %s is there", what, id)
		require.True(t, pub.(equaler).Equal(got[id]), "%s: key %s has the same public key", what, id)
	}
}

func requireSameKeys(t *testing.T, want map[string]crypto.PublicKey, got []keymanager.Key) map[string]keymanager.Key {
	t.Helper()
	byID := map[string]keymanager.Key{}
	for _, key := range got {
		byID[key.ID()] = key
	}
	require.Len(t, byID, len(want), "the same key ids")
	for id, pub := range want {
		key, ok := byID[id]
		require.True(t, ok, "key %s is found", id)
		require.True(t, key.Public().(equaler).Equal(pub), "key %s: the same public key", id)
	}
	return byID
}

// TestVaultDropInWithSpiresBuiltIn: our backend is a drop-in for SPIRE's built-in
// hashicorp_vault both ways, with the same plugin_data (SPIRE ignores our backend key) on one
// OpenBao transit mount. Keys SPIRE's built-in created are found by ours (same ids and public
// keys) and sign verifiably; keys ours created are found by SPIRE's built-in and sign
// verifiably there. It also documents the PSS difference: ours sends salt_length, so its PSS
// signatures pass Go's strict check (salt = hash length); SPIRE's built-in sends none, Vault
// uses the maximum salt, and only an auto-detecting verifier accepts them.
func TestVaultDropInWithSpiresBuiltIn(t *testing.T) {
	ctx := context.Background()
	clearVaultEnv(t)
	bao := startBao(t)
	bao.WritePolicy(t, "spire", vaultSpirePolicy)
	token := bao.CreateToken(t, "1h", "spire")
	data := func(serverID string) string { return vaultPluginData(bao.Addr, serverID, tokenAuth(token)) }

	t.Run("SPIRE's built-in creates, ours finds and signs", func(t *testing.T) {
		builtin := loadBuiltInVault(t, data("spire-made"))
		created := map[string]crypto.PublicKey{}
		for id, keyType := range vaultDropInKeys {
			key, err := builtin.KeyManager.GenerateKey(ctx, id, keyType)
			require.NoError(t, err)
			created[id] = key.Public()
		}
		requirePublicKeysEqual(t, created, bao.PublishedKeys(t, "transit", "spire-made"), "SPIRE's keys in transit")

		ours := loadExternal(t, data("spire-made"))
		found, err := ours.KeyManager.GetKeys(ctx)
		require.NoError(t, err)
		byID := requireSameKeys(t, created, found)
		for _, key := range byID {
			requireSignsAndVerifies(t, key)
		}

		builtinRSA, err := builtin.KeyManager.GetKey(ctx, "JWT-Signer-A")
		require.NoError(t, err)
		strict, auto := builtInPSS(t, builtinRSA)
		require.False(t, strict, "SPIRE's built-in PSS signature does not pass the salt = hash length check (Vault's maximum salt)")
		require.True(t, auto, "SPIRE's built-in PSS signature is a valid PSS signature with another salt length")

		// Ours rotates a key SPIRE made: the new key is published, the old one leaves
		// transit, and SPIRE's built-in, restarted, follows.
		rotated, err := ours.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
		require.NoError(t, err)
		require.False(t, rotated.Public().(equaler).Equal(created["x509-CA-A"]))
		require.Eventually(t, func() bool { return len(bao.TransitKeysOf(t, "transit", "spire-made")) == len(created) },
			10*time.Second, 100*time.Millisecond, "the rotated-out key is deleted")
		require.NoError(t, builtin.catalog.Close())
		again := loadBuiltInVault(t, data("spire-made"))
		key, err := again.KeyManager.GetKey(ctx, "x509-CA-A")
		require.NoError(t, err)
		require.True(t, key.Public().(equaler).Equal(rotated.Public()), "SPIRE's built-in finds the key ours rotated to")
		requireSignsAndVerifies(t, key)
	})

	t.Run("ours creates, SPIRE's built-in finds and signs", func(t *testing.T) {
		ours := loadExternal(t, data("ours-made"))
		created := map[string]crypto.PublicKey{}
		for id, keyType := range vaultDropInKeys {
			key, err := ours.KeyManager.GenerateKey(ctx, id, keyType)
			require.NoError(t, err)
			created[id] = key.Public()
		}
		requirePublicKeysEqual(t, created, bao.PublishedKeys(t, "transit", "ours-made"), "our keys published in transit")

		builtin := loadBuiltInVault(t, data("ours-made"))
		found, err := builtin.KeyManager.GetKeys(ctx)
		require.NoError(t, err)
		byID := requireSameKeys(t, created, found)
		digest := sha256.Sum256([]byte("signed by SPIRE's built-in"))
		for id, key := range byID {
			sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
			require.NoError(t, err, "SPIRE's built-in signs with %s", id)
			switch pub := key.Public().(type) {
			case *ecdsa.PublicKey:
				require.True(t, ecdsa.VerifyASN1(pub, digest[:], sig), "key %s", id)
			case *rsa.PublicKey:
				require.NoError(t, rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig), "key %s", id)
				strict, auto := builtInPSS(t, key)
				require.False(t, strict, "SPIRE's built-in PSS (maximum salt) fails the strict check on our key too")
				require.True(t, auto)
			}
		}
		ourRSA, err := ours.KeyManager.GetKey(ctx, "JWT-Signer-A")
		require.NoError(t, err)
		requireSignsAndVerifies(t, ourRSA) // ours: PSS with salt = hash length passes
	})
}
