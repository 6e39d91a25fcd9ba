package spire_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// TestVaultFaults: 429, 503 and 500 answers and dropped connections between the plugin and
// OpenBao on transit/sign are retried, and SignData returns a signature that verifies, inside
// SPIRE's 30 s deadline, with one retry per fault. A fault that does not clear fails SignData
// within the deadline, and signing works again once it clears. A sealed OpenBao fails SignData
// with a message that says so; unsealed, signing resumes. No error carries the token.
func TestVaultFaults(t *testing.T) {
	ctx := context.Background()
	clearVaultEnv(t)
	bao := startBao(t)
	bao.WritePolicy(t, "spire", vaultSpirePolicy)
	token := bao.CreateToken(t, "1h", "spire")
	proxy := newFaultProxy(t, bao.Addr)
	p := loadExternal(t, vaultPluginData(proxy.URL, "faulty", tokenAuth(token)))
	key, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	digest := sha256.Sum256([]byte("fault tolerant"))
	const sign = "transit/sign"

	for _, tc := range []struct {
		name   string
		faults []fault
	}{
		{"429 three times", []fault{faultThrottle, faultThrottle, faultThrottle}},
		{"503 twice", []fault{faultUnavailable, faultUnavailable}},
		{"500 twice", []fault{faultServer500, faultServer500}},
		{"dropped connections", []fault{faultDrop, faultDrop}},
		{"one of each", []fault{faultThrottle, faultUnavailable, faultServer500, faultDrop}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := proxy.calls(sign)
			proxy.inject(sign, tc.faults...)
			started := time.Now()
			sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
			require.NoError(t, err)
			require.Less(t, time.Since(started), 30*time.Second, "inside SPIRE's deadline")
			require.True(t, ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), digest[:], sig), "never a wrong signature")
			require.Equal(t, len(tc.faults)+1, proxy.calls(sign)-before, "one retry per fault, no more")
		})
	}

	t.Run("a persistent 503 fails within the deadline, then clears", func(t *testing.T) {
		faults := make([]fault, 40)
		for i := range faults {
			faults[i] = faultUnavailable
		}
		proxy.inject(sign, faults...)
		started := time.Now()
		_, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
		proxy.clear(sign)
		require.Error(t, err)
		require.Less(t, time.Since(started), 30*time.Second, "inside SPIRE's deadline")
		require.Contains(t, err.Error(), "503", "the error says what OpenBao answered")
		require.NotContains(t, err.Error(), token)
		sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.NoError(t, err, "signing works again once the fault clears")
		require.True(t, ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), digest[:], sig))
	})

	t.Run("sealed", func(t *testing.T) {
		bao.Seal(t)
		started := time.Now()
		_, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.Error(t, err)
		require.Less(t, time.Since(started), 30*time.Second, "inside SPIRE's deadline")
		message := strings.ToLower(err.Error())
		require.True(t, strings.Contains(message, "sealed") || strings.Contains(message, "503"),
			"the error says OpenBao is sealed: %v", err)
		require.NotContains(t, err.Error(), token)
		t.Logf("SignData against a sealed OpenBao: %v (after %s)", err, time.Since(started).Round(time.Millisecond))
		bao.Unseal(t)
		sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.NoError(t, err, "signing resumes once unsealed")
		require.True(t, ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), digest[:], sig))
	})
	requireNoSecretsLogged(t, p.Logs, token)
}
