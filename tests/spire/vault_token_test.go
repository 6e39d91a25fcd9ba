package spire_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// signVerified signs a fresh digest with an EC key and reports an error for a failed call
// or a signature that does not verify against the key's public key.
func signVerified(key keymanager.Key, n int) error {
	digest := sha256.Sum256([]byte(fmt.Sprint("signature ", n)))
	sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		return err
	}
	if !ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), digest[:], sig) {
		return fmt.Errorf("signature %d does not verify", n)
	}
	return nil
}

// TestVaultTokenRenewalAndRelogin: the plugin logs in with AppRole and gets a token with a
// 10 s TTL (renewable up to an hour). It keeps signing for 30 s without a single failure, and
// the token it got at start-up is still alive at the end, renewed (Vault recorded a renewal):
// it was renewed, not replaced. Then that token is revoked behind the plugin's back; the next
// signatures still succeed, through a new AppRole login.
func TestVaultTokenRenewalAndRelogin(t *testing.T) {
	ctx := context.Background()
	clearVaultEnv(t)
	bao := startBao(t)
	bao.WritePolicy(t, "spire", vaultSpirePolicy)
	roleID, secretID := bao.EnableAppRole(t, "spire", map[string]any{
		"token_policies": []string{"spire"}, "token_ttl": "10s", "token_max_ttl": "1h",
	})
	p := loadExternal(t, vaultPluginData(bao.Addr, "renewing", appRoleAuth(roleID, secretID)))
	key, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	first := bao.TokenAccessors(t, "auth/approle/login")
	require.Len(t, first, 1, "one AppRole login at start-up")
	require.LessOrEqual(t, bao.LookupAccessor(t, first[0]).TTL, 10, "the role gives 10 s tokens")

	var failures []string
	n := 0
	for started := time.Now(); time.Since(started) < 30*time.Second; time.Sleep(500 * time.Millisecond) {
		n++
		if err := signVerified(key, n); err != nil {
			failures = append(failures, fmt.Sprintf("%s: %v", time.Since(started).Round(time.Millisecond), err))
		}
	}
	require.Empty(t, failures, "no signature may fail while the 10 s token is renewed (%d signatures)", n)
	info := bao.LookupAccessor(t, first[0])
	require.NotZero(t, info.LastRenewalTime, "the start-up token was renewed")
	require.Greater(t, info.TTL, 0, "the start-up token is still alive after 30 s")
	t.Logf("%d signatures in 30 s, none failed; the start-up token was last renewed at %s, %d s left",
		n, time.Unix(info.LastRenewalTime, 0).Format(time.RFC3339), info.TTL)

	bao.Do(t, http.MethodPost, "auth/token/revoke-accessor", map[string]any{"accessor": first[0]}, nil)
	for i := 0; i < 3; i++ {
		require.NoError(t, signVerified(key, 1000+i), "signing after the token was revoked (re-login)")
	}
	after := bao.TokenAccessors(t, "auth/approle/login")
	require.NotEmpty(t, after, "the plugin logged in again")
	require.NotContains(t, after, first[0], "the revoked token is gone")
	// The role id is an identifier (Vault's word); the secret id is the credential.
	requireNoSecretsLogged(t, p.Logs, secretID)
}

// TestVaultOpenBaoRestart: OpenBao is a non-dev server with its storage on disk (integrated
// storage, one raft node: OpenBao 2.x has no "file" backend), initialised and unsealed by the
// test through sys/init and sys/unseal with one key share. It is killed (SIGKILL) and started
// again on the same storage and port, then unsealed. While it is down SignData fails, inside
// SPIRE's deadline; once it is back the plugin, still running with
// its AppRole token, signs again within 30 s with the same key, and a freshly started plugin
// finds that key in the restarted OpenBao.
func TestVaultOpenBaoRestart(t *testing.T) {
	ctx := context.Background()
	clearVaultEnv(t)
	bao := startBaoPersistent(t)
	bao.WritePolicy(t, "spire", vaultSpirePolicy)
	roleID, secretID := bao.EnableAppRole(t, "spire", map[string]any{"token_policies": []string{"spire"}, "token_ttl": "1h"})
	data := vaultPluginData(bao.Addr, "restarted", appRoleAuth(roleID, secretID))
	p := loadExternal(t, data)
	key, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	require.NoError(t, signVerified(key, 1))

	bao.Stop(t)
	started := time.Now()
	err = signVerified(key, 2)
	require.Error(t, err, "no signature while OpenBao is down")
	require.Less(t, time.Since(started), 30*time.Second, "SignData fails inside SPIRE's deadline")
	t.Logf("SignData while OpenBao was down: %v (after %s)", err, time.Since(started).Round(time.Millisecond))
	bao.Restart(t)
	unsealed := time.Now()
	var lastErr error
	resumed := false
	for n := 3; time.Since(unsealed) < 30*time.Second; n++ {
		if lastErr = signVerified(key, n); lastErr == nil {
			resumed = true
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	require.True(t, resumed, "signing resumes within 30 s of the restart; last error: %v", lastErr)
	t.Logf("signing resumed %s after OpenBao was unsealed", time.Since(unsealed).Round(time.Millisecond))

	again := loadExternal(t, data)
	found, err := again.KeyManager.GetKey(ctx, "x509-CA-A")
	require.NoError(t, err)
	require.True(t, found.Public().(equaler).Equal(key.Public()), "the key survived the restart in OpenBao's storage")
	require.NoError(t, signVerified(found, 100))
}
