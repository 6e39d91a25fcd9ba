package spire_test

import (
	"context"
	"crypto"
	"fmt"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// newVaultSpireServer is a real spire-server whose KeyManager is our plugin on backend
// hashicorp_vault with this server id, auth block and extra plugin_data (written as a nested
// plugin_data block in server.conf, as a user would); its store is the transit mount.
func newVaultSpireServer(t *testing.T, bao *baoServer, serverID, auth, extra string) *spireServer {
	t.Helper()
	s := newSpireServerWith(t, func(*spireServer) string {
		return "plugin_data {\n" + vaultPluginData(bao.Addr, serverID, auth, extra) + "}"
	})
	s.storeKeys = func() map[string]crypto.PublicKey { return bao.PublishedKeys(t, "transit", serverID) }
	return s
}

// keyNames returns the sorted names of a server's keys in the transit mount.
func keyNames(keys map[string]*transitKey) []string {
	names := make([]string, 0, len(keys))
	for name := range keys {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// TestVaultRealSpireServer: real spire-servers with our plugin on backend hashicorp_vault
// share one OpenBao transit mount, with liveness records in KV v2 (secret/) and short
// lifecycle thresholds. server-a (AppRole) mints an X.509-SVID and a JWT-SVID that verify
// against its bundle, signed by keys published in transit under its name; a restart reuses
// the same CA key. server-b (token) gets its own keys. While both run, each one's liveness
// records (one per key) stay fresh and neither touches the other's keys. Once server-a is stopped for good,
// server-b's sweep deletes server-a's keys and their records, once stale and not before; keys of
// a server that never wrote a record ("bystander") are never touched.
// It runs on every spire-server release, side by side (each with its own OpenBao).
func TestVaultRealSpireServer(t *testing.T) {
	clearVaultEnv(t) // here: a parallel subtest may not set the environment
	forEachSpireServer(t, true, vaultRealSpireServer)
}

func vaultRealSpireServer(t *testing.T, _ spireServerRelease) {
	ctx := context.Background()
	clearVaultEnv(t)
	bao := startBao(t)
	bao.WritePolicy(t, "spire", vaultSpirePolicy+vaultLivenessPolicy)
	roleID, secretID := bao.EnableAppRole(t, "spire", map[string]any{"token_policies": []string{"spire"}, "token_ttl": "1h"})
	token := bao.CreateToken(t, "1h", "spire")
	const fast = "liveness_kv_mount = \"secret\"\nliveness_interval = \"1s\"\nsweep_interval = \"1s\"\n" +
		"stale_key_age = \"6s\"\nclock_skew_allowance = \"1s\"\n"
	const staleAfter = 7 * time.Second // stale_key_age + clock_skew_allowance
	// requireFreshRecords checks the liveness records of serverID in KV: one per key it
	// serves, at secret/data/kms-keymanager/<trust domain>/<server id>/<key name>, each
	// {"stamp": "<unix seconds>"} written within the last few liveness intervals.
	requireFreshRecords := func(serverID string) {
		t.Helper()
		dir := "kms-keymanager/" + trustDomain + "/" + serverID + "/"
		keys := keyNames(bao.TransitKeysOf(t, "transit", serverID))
		require.Equal(t, keys, bao.KVList(t, "secret", dir), "one liveness record per key of %s", serverID)
		for _, name := range keys {
			data, ok := bao.KVRecord(t, "secret", dir+name)
			require.True(t, ok)
			stamp, err := strconv.ParseInt(fmt.Sprint(data["stamp"]), 10, 64)
			require.NoError(t, err, "record %s%s: %v", dir, name, data)
			require.Less(t, time.Since(time.Unix(stamp, 0)), 3*time.Second, "%s's record of %s is refreshed every liveness_interval", serverID, name)
		}
	}

	// A server without liveness records (our plugin, liveness_kv_mount unset).
	bystander := loadExternal(t, vaultPluginData(bao.Addr, "bystander", tokenAuth(token)))
	_, err := bystander.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	require.NoError(t, bystander.catalog.Close())
	bystanderKeys := keyNames(bao.TransitKeysOf(t, "transit", "bystander"))
	require.Len(t, bystanderKeys, 1)

	a := newVaultSpireServer(t, bao, "server-a", appRoleAuth(roleID, secretID), fast)
	a.start(1)
	rootA := a.mintAndVerify(t)
	requireCleanPluginExitOf(t, a.stop())
	a.start(2)
	require.True(t, a.mintAndVerify(t).PublicKey.(equaler).Equal(rootA.PublicKey), "a restart reuses the CA key in transit")
	keysA := bao.TransitKeysOf(t, "transit", "server-a")
	require.NotEmpty(t, keysA)

	b := newVaultSpireServer(t, bao, "server-b", tokenAuth(token), fast)
	b.start(1)
	rootB := b.mintAndVerify(t)
	require.False(t, rootA.PublicKey.(equaler).Equal(rootB.PublicKey), "each server has its own CA key")
	keysB := bao.TransitKeysOf(t, "transit", "server-b")
	require.NotEmpty(t, keysB)

	time.Sleep(staleAfter + 2*time.Second) // several records and sweeps by both servers
	require.Equal(t, keyNames(keysA), keyNames(bao.TransitKeysOf(t, "transit", "server-a")), "server-b must not touch live server-a's keys")
	require.Equal(t, keyNames(keysB), keyNames(bao.TransitKeysOf(t, "transit", "server-b")), "server-a must not touch server-b's keys")
	requireFreshRecords("server-a")
	requireFreshRecords("server-b")
	a.mintAndVerify(t)

	requireCleanPluginExitOf(t, a.stop()) // server-a never comes back
	stopped := time.Now()
	require.Eventually(t, func() bool { return len(bao.TransitKeysOf(t, "transit", "server-a")) == 0 },
		40*time.Second, 250*time.Millisecond, "server-b's sweep deletes the stopped server's keys")
	require.Greater(t, time.Since(stopped), staleAfter-2*time.Second, "swept only once the records were stale")
	t.Logf("server-a's keys were swept %s after it stopped", time.Since(stopped).Round(100*time.Millisecond))
	require.Empty(t, bao.KVList(t, "secret", "kms-keymanager/"+trustDomain+"/server-a/"),
		"the liveness records of deleted keys are removed")
	require.Equal(t, keyNames(keysB), keyNames(bao.TransitKeysOf(t, "transit", "server-b")), "the sweeper's own keys stay")
	require.Equal(t, bystanderKeys, keyNames(bao.TransitKeysOf(t, "transit", "bystander")),
		"keys of a server with no liveness record are never touched")
	b.mintAndVerify(t)
	requireCleanPluginExitOf(t, b.stop())
}
