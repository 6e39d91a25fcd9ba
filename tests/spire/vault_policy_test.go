package spire_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"testing"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// TestVaultPolicyErrors: a token whose policy lacks a path SPIRE documents gets an error that
// names the path. Without transit/sign/*, Configure and GenerateKey work and SignData fails
// with PermissionDenied; without list on transit/keys, Configure (which lists the mount)
// fails. A refused AppRole login fails Configure with Unauthenticated, without the secret.
func TestVaultPolicyErrors(t *testing.T) {
	ctx := context.Background()
	clearVaultEnv(t)
	bao := startBao(t)

	t.Run("no transit/sign", func(t *testing.T) {
		bao.WritePolicy(t, "nosign", `path "transit/keys/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
`)
		token := bao.CreateToken(t, "1h", "nosign")
		p := loadExternal(t, vaultPluginData(bao.Addr, "nosign", tokenAuth(token)))
		key, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
		require.NoError(t, err)
		digest := sha256.Sum256([]byte("not allowed"))
		_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.Error(t, err)
		require.Contains(t, err.Error(), "PermissionDenied", "the code says what went wrong")
		require.Contains(t, err.Error(), "transit/sign/", "the error names the path the policy lacks")
		require.NotContains(t, err.Error(), token)
		t.Logf("SignData: %v", err)
	})

	t.Run("no list on transit/keys", func(t *testing.T) {
		bao.WritePolicy(t, "nolist", `path "transit/keys/*" {
  capabilities = ["create", "read", "update", "delete"]
}
path "transit/sign/*" {
  capabilities = ["update"]
}
`)
		token := bao.CreateToken(t, "1h", "nolist")
		_, err := tryLoad(catalogConfig(t, vaultPluginData(bao.Addr, "nolist", tokenAuth(token))))
		require.Error(t, err, "Configure lists the transit mount")
		require.Contains(t, err.Error(), "PermissionDenied", err.Error())
		require.Contains(t, err.Error(), "transit/keys", "the error names the path the policy lacks")
		require.NotContains(t, err.Error(), token)
		t.Logf("Configure: %v", err)
	})

	t.Run("a refused login fails Configure", func(t *testing.T) {
		roleID, _ := bao.EnableAppRole(t, "spire", map[string]any{"token_policies": []string{"spire"}})
		wrongSecret := planted("approle-wrong-secret-id")
		_, err := tryLoad(catalogConfig(t, vaultPluginData(bao.Addr, "refused", appRoleAuth(roleID, wrongSecret))))
		require.Error(t, err)
		require.Contains(t, err.Error(), "Unauthenticated", err.Error())
		require.NotContains(t, err.Error(), wrongSecret)
		t.Logf("Configure: %v", err)
	})
}

// TestVaultEnvFallback: the Vault environment variables are fallbacks only. With vault_addr
// and a token in plugin_data, a VAULT_ADDR and VAULT_TOKEN that point elsewhere are ignored
// (SPIRE's built-in would let them win) and neither token is logged; with an empty token_auth block and no vault_addr,
// the plugin takes both from the environment.
func TestVaultEnvFallback(t *testing.T) {
	ctx := context.Background()
	clearVaultEnv(t)
	bao := startBao(t)
	bao.WritePolicy(t, "spire", vaultSpirePolicy)
	token := bao.CreateToken(t, "1h", "spire")

	t.Run("explicit plugin_data wins", func(t *testing.T) {
		t.Setenv("VAULT_ADDR", fmt.Sprintf("http://127.0.0.1:%d", freePort(t)))
		t.Setenv("VAULT_TOKEN", "not-a-token")
		p := loadExternal(t, vaultPluginData(bao.Addr, "explicit", tokenAuth(token)))
		key, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
		require.NoError(t, err)
		require.NoError(t, signVerified(key, 1))
		requireNoSecretsLogged(t, p.Logs, token, "not-a-token")
	})

	t.Run("environment as fallback", func(t *testing.T) {
		t.Setenv("VAULT_ADDR", bao.Addr)
		t.Setenv("VAULT_TOKEN", token)
		p := loadExternal(t, "backend = \"hashicorp_vault\"\nkey_identifier_value = \"from-env\"\ntoken_auth {}\n")
		key, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
		require.NoError(t, err)
		require.NoError(t, signVerified(key, 1))
		requirePublicKeysEqual(t, map[string]crypto.PublicKey{"x509-CA-A": key.Public()},
			bao.PublishedKeys(t, "transit", "from-env"), "the key in the OpenBao VAULT_ADDR names")
		requireNoSecretsLogged(t, p.Logs, token)
	})
}
