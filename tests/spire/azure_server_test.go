package spire_test

import (
	"crypto"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// newAzureSpireServer is a real spire-server whose KeyManager is our plugin on backend
// azure_key_vault with this server id and extra plugin_data (a nested plugin_data block in
// server.conf, as a user writes it); its store is the fake's published keys of serverID. The
// server and its plugin authenticate through the fake's App Service managed identity
// environment, which they inherit.
func newAzureSpireServer(t *testing.T, fake *azureKeyVaultFake, serverID string, extra ...string) *spireServer {
	t.Helper()
	fake.UseManagedIdentity(t)
	s := newSpireServerWith(t, func(*spireServer) string {
		return "plugin_data {\n" + ourAzurePluginData(fake, serverID, extra...) + "}"
	})
	s.storeKeys = func() map[string]crypto.PublicKey { return azurePublishedKeys(t, fake, serverID) }
	return s
}

// azurePublishedKeys returns the public keys of serverID's live keys that carry SPIRE's two
// tags (what SPIRE's built-in or ours would serve), by SPIRE key id; where an id has more
// than one (a planted duplicate), the newest by creation time, which is the one the plugin
// must serve.
func azurePublishedKeys(t *testing.T, fake *azureKeyVaultFake, serverID string) map[string]crypto.PublicKey {
	t.Helper()
	out := map[string]crypto.PublicKey{}
	newest := map[string]int64{}
	for id, keys := range azureKeysOf(mustLive(t, fake), serverID) {
		for _, k := range keys {
			if k.latestTags()["spire-server-td"] != trustDomain {
				continue
			}
			if created := k.Versions[len(k.Versions)-1].Attributes.Created; out[id] == nil || created > newest[id] {
				out[id], newest[id] = k.PublicKey(t), created
			}
		}
	}
	return out
}

// requireOneKeyPerID checks that every key id of serverID has exactly one live key.
func requireOneKeyPerID(t *testing.T, fake *azureKeyVaultFake, serverID string) {
	t.Helper()
	for id, keys := range azureKeysOf(mustLive(t, fake), serverID) {
		require.Len(t, keys, 1, "key id %s of %s has one live key", id, serverID)
	}
}

func sortedNames(m map[string]bool) []string {
	out := keysOf(m)
	sort.Strings(out)
	return out
}

// TestAzureRealSpireServer: real spire-servers with our plugin on backend azure_key_vault
// share one Key Vault fake, with short lifecycle thresholds. server-a mints an X.509-SVID and
// a JWT-SVID that verify against its bundle, signed by keys in the vault under its server id;
// a restart reuses the same CA key and the bundle is unchanged. server-b gets its own keys.
// While both run, each one's keys are stamped (their `updated` stays fresh) and neither
// touches the other's. Once server-a is stopped for good, server-b's sweep soft-deletes
// server-a's keys, once stale and not before; server-b's keys stay.
// It runs on every spire-server release, one after the other (the managed identity
// environment points at one fake).
func TestAzureRealSpireServer(t *testing.T) { forEachSpireServer(t, false, azureRealSpireServer) }

func azureRealSpireServer(t *testing.T, _ spireServerRelease) {
	fake := startAzureKeyVaultFake(t)
	const fast = "liveness_interval = \"1s\"\nsweep_interval = \"1s\"\nstale_key_age = \"6s\"\nclock_skew_allowance = \"1s\"\n"
	const staleAfter = 7 * time.Second // stale_key_age + clock_skew_allowance
	requireFresh := func(serverID string) {
		t.Helper()
		for id, keys := range azureKeysOf(mustLive(t, fake), serverID) {
			for _, k := range keys {
				updated := time.Unix(k.Versions[len(k.Versions)-1].Attributes.Updated, 0)
				require.Less(t, time.Since(updated), 4*time.Second, "%s's key %s (%s) is stamped every liveness_interval", serverID, k.Name, id)
			}
		}
	}

	a := newAzureSpireServer(t, fake, "server-a", fast)
	a.start(1)
	rootA := a.mintAndVerify(t)
	bundleA := a.mustCLI("bundle", "show")
	log := a.stop()
	requireCleanPluginExitOf(t, log)
	keysA := liveNames(t, fake, "server-a")
	require.NotEmpty(t, keysA)
	requireOneKeyPerID(t, fake, "server-a")
	a.start(2)
	require.True(t, a.mintAndVerify(t).PublicKey.(equaler).Equal(rootA.PublicKey), "a restart reuses the CA key in the vault")
	require.Equal(t, bundleA, a.mustCLI("bundle", "show"), "the bundle is unchanged across a restart")
	require.Equal(t, keysA, liveNames(t, fake, "server-a"), "no key was created or deleted by the restart")

	b := newAzureSpireServer(t, fake, "server-b", fast)
	b.start(1)
	rootB := b.mintAndVerify(t)
	require.False(t, rootA.PublicKey.(equaler).Equal(rootB.PublicKey), "each server has its own CA key")
	keysB := liveNames(t, fake, "server-b")
	require.NotEmpty(t, keysB)
	requireOneKeyPerID(t, fake, "server-b")
	for name := range keysB {
		require.False(t, keysA[name], "server-b uses none of server-a's keys")
	}

	time.Sleep(staleAfter + 2*time.Second) // several stamps and sweeps by both servers
	require.Equal(t, sortedNames(keysA), sortedNames(liveNames(t, fake, "server-a")), "server-b must not touch live server-a's keys")
	require.Equal(t, sortedNames(keysB), sortedNames(liveNames(t, fake, "server-b")), "server-a must not touch server-b's keys")
	requireFresh("server-a")
	requireFresh("server-b")
	a.mintAndVerify(t)

	requireCleanPluginExitOf(t, a.stop()) // server-a never comes back
	stopped := time.Now()
	require.Eventually(t, func() bool { return len(liveNames(t, fake, "server-a")) == 0 },
		40*time.Second, 250*time.Millisecond, "server-b's sweep deletes the stopped server's keys")
	// The last stamp can precede the stop by a liveness_interval, and `updated` has
	// one-second resolution: stale from staleAfter-2s on.
	require.Greater(t, time.Since(stopped), staleAfter-3*time.Second, "swept only once stale")
	t.Logf("server-a's keys were swept %s after it stopped", time.Since(stopped).Round(100*time.Millisecond))
	deleted := deletedNames(t, fake)
	for name := range keysA {
		require.True(t, deleted[name], "server-a's key %s is soft-deleted (recoverable), not purged", name)
	}
	require.Zero(t, fake.Stats(t)["purge"])
	require.Equal(t, sortedNames(keysB), sortedNames(liveNames(t, fake, "server-b")), "the sweeper's own keys stay")
	b.mintAndVerify(t)
	requireCleanPluginExitOf(t, b.stop())
}

// TestAzureDeadServerSweptWithDefaultThresholds: with SPIRE's own thresholds (14 days, the
// defaults) and only sweep_interval shortened, a real spire-server with our plugin
// soft-deletes the keys of a server whose keys were last stamped 15 days ago (aged with the
// fake's key times) and keeps those of a server stamped 13 days ago.
func TestAzureDeadServerSweptWithDefaultThresholds(t *testing.T) {
	fake := startAzureKeyVaultFake(t)
	day := 24 * time.Hour
	for _, id := range []string{"recent", "dead"} {
		p := loadOurAzure(t, fake, id)
		_, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
		require.NoError(t, err)
		require.NoError(t, p.catalog.Close())
	}
	recent, dead := liveNames(t, fake, "recent"), liveNames(t, fake, "dead")
	for name := range recent {
		fake.SetKeyTimes(t, name, time.Now().Add(-40*day), time.Now().Add(-13*day))
	}
	for name := range dead {
		fake.SetKeyTimes(t, name, time.Now().Add(-40*day), time.Now().Add(-15*day))
	}
	s := newAzureSpireServer(t, fake, "sweeper", "sweep_interval = \"1s\"\n")
	s.start(1)
	require.Eventually(t, func() bool { return len(liveNames(t, fake, "dead")) == 0 }, 20*time.Second, 250*time.Millisecond,
		"the dead server's keys are swept")
	time.Sleep(2 * time.Second)
	require.Equal(t, recent, liveNames(t, fake, "recent"), "keys stamped 13 days ago stay")
	deleted := deletedNames(t, fake)
	for name := range dead {
		require.True(t, deleted[name], "%s is soft-deleted", name)
	}
	s.mintAndVerify(t)
	requireCleanPluginExitOf(t, s.stop())
}

// TestAzureDuplicateResolvedToNewest: what a crash mid-rotation leaves, two published keys
// for one key id of one server, is resolved the same way at every start: the newest by
// creation time. The planted duplicate is the newer one and its name sorts first, so neither
// the order of the listing nor a name comparison picks it by accident. Over 20 restarts of
// our plugin through SPIRE's catalog (what spire-server does at each start), SPIRE's facade
// gets the planted key every time and its signatures verify with that key's public key from
// the vault; the older key is left alone while it could still be a GenerateKey in flight,
// then, once older than the half-created grace (1 h), the sweep soft-deletes it.
func TestAzureDuplicateResolvedToNewest(t *testing.T) {
	fake := startAzureKeyVaultFake(t)
	first := loadOurAzure(t, fake, "dup")
	_, err := first.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	require.NoError(t, first.catalog.Close())
	original := onlyKey(t, spireAzureKeys(mustLive(t, fake), "x509-CA-A"), "the original x509-CA-A")
	tenMinutesAgo := time.Now().Add(-10 * time.Minute)
	fake.SetKeyTimes(t, original.Name, tenMinutesAgo, tenMinutesAgo)

	planted := "spire-key-00000000-0000-4000-8000-000000000000-x509-CA-A"
	require.Less(t, planted, original.Name)
	fiveMinutesAgo := time.Now().Add(-5 * time.Minute).Unix()
	fake.Bulk(t, azureBulkKey{Name: planted, Created: fiveMinutesAgo, Updated: fiveMinutesAgo,
		Tags: map[string]string{"spire-server-td": trustDomain, "spire-server-id": "dup"}})
	var plantedKey azureFakeKey
	for _, k := range mustLive(t, fake) {
		if k.Name == planted {
			plantedKey = k
		}
	}
	plantedPub := plantedKey.PublicKey(t)

	for run := 1; run <= 20; run++ {
		p := loadOurAzure(t, fake, "dup")
		key, err := p.KeyManager.GetKey(ctx, "x509-CA-A")
		require.NoError(t, err, "restart %d", run)
		require.True(t, key.Public().(equaler).Equal(plantedPub), "restart %d: the newest key is served", run)
		require.NoError(t, signVerifiedWith(key, plantedPub, run), "restart %d", run)
		require.NoError(t, p.catalog.Close())
	}
	require.Len(t, spireAzureKeys(mustLive(t, fake), "x509-CA-A"), 2, "the older key is kept while younger than the grace")

	// For the record, not asserted (it is chance): SPIRE's built-in on the same duplicate.
	plantedPicks := 0
	for run := 1; run <= 20; run++ {
		builtin := loadBuiltInAzureKeyVault(t, fake, azurePluginData(fake.VaultURL, "dup"))
		key, err := builtin.KeyManager.GetKey(ctx, "x509-CA-A")
		require.NoError(t, err)
		if key.Public().(equaler).Equal(plantedPub) {
			plantedPicks++
		}
		require.NoError(t, builtin.catalog.Close())
	}
	t.Logf("SPIRE's built-in served the newest key at %d of 20 starts, ours at 20", plantedPicks)

	twoHoursAgo := time.Now().Add(-2 * time.Hour)
	fake.SetKeyTimes(t, original.Name, twoHoursAgo, twoHoursAgo)
	p := loadOurAzure(t, fake, "dup", "sweep_interval = \"1s\"\nclock_skew_allowance = \"1s\"\n")
	require.Eventually(t, func() bool { return deletedNames(t, fake)[original.Name] }, 15*time.Second, 200*time.Millisecond,
		"the older duplicate is retired (soft-deleted)")
	key, err := p.KeyManager.GetKey(ctx, "x509-CA-A")
	require.NoError(t, err)
	require.True(t, key.Public().(equaler).Equal(plantedPub))
	require.NoError(t, signVerifiedWith(key, plantedPub, 21))
	require.Equal(t, planted, onlyKey(t, spireAzureKeys(mustLive(t, fake), "x509-CA-A"), "one key left").Name)
}

// TestAzureCredentials: our plugin authenticates to the vault the ways SPIRE's built-in can:
// managed identity in the App Service style (IDENTITY_ENDPOINT/IDENTITY_HEADER) and the IMDS
// style (its address from AZURE_POD_IDENTITY_AUTHORITY_HOST), a client secret in plugin_data
// (tenant_id, subscription_id, app_id, app_secret) or in the environment, and workload
// identity (a federated token file), the last three through the fake's Entra endpoint at
// AZURE_AUTHORITY_HOST. Each signs (verified), the token came from the expected endpoint, and
// no secret is in the plugin's logs. A revoked token (plain expiry or a claims challenge) is
// replaced without a failed signature; a wrong secret fails Configure without showing it.
func TestAzureCredentials(t *testing.T) {
	fake := startAzureKeyVaultFake(t, "--client", "spire-app:"+azureAppSecret, "--client-assertion", "wi-app:"+azureAssertion)
	signs := func(t *testing.T, p *loaded, endpoint string, secrets ...string) {
		t.Helper()
		key, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
		require.NoError(t, err)
		require.NoError(t, signVerified(key, 1))
		require.Positive(t, fake.Stats(t)[endpoint], "the token came from %s", endpoint)
		requireNoSecretsLogged(t, p.Logs, secrets...)
	}

	t.Run("managed identity, App Service", func(t *testing.T) {
		fake.ResetStats(t)
		p := loadOurAzure(t, fake, "cred-app-service")
		signs(t, p, "token_app_service", fake.IdentityHeader)
		require.Zero(t, fake.Stats(t)["token_entra"])

		for _, mode := range []string{"plain", "cae"} {
			fake.ResetStats(t)
			fake.ExpireTokens(t, mode)
			key, err := p.KeyManager.GetKey(ctx, "x509-CA-A")
			require.NoError(t, err)
			require.NoError(t, signVerified(key, 2), "a %s-revoked token is replaced without a failed signature", mode)
			stats := fake.Stats(t)
			require.Equal(t, 1, stats["token"], "%s: one new token", mode)
			require.Equal(t, 1, stats["unauthorized"], "%s: one challenge", mode)
		}
	})

	t.Run("managed identity, IMDS", func(t *testing.T) {
		fake.ResetStats(t)
		fake.UseManagedIdentity(t)
		require.NoError(t, os.Unsetenv("IDENTITY_ENDPOINT"))
		require.NoError(t, os.Unsetenv("IDENTITY_HEADER"))
		t.Setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", fake.TokenURL)
		p := loadExternal(t, ourAzurePluginData(fake, "cred-imds"))
		signs(t, p, "token_imds")
	})

	t.Run("client secret in plugin_data", func(t *testing.T) {
		fake.ResetStats(t)
		fake.UseManagedIdentity(t) // present, but plugin_data's secret wins
		t.Setenv("AZURE_AUTHORITY_HOST", fake.AuthorityHost)
		creds := "tenant_id = \"" + fake.Tenant + "\"\nsubscription_id = \"sub\"\napp_id = \"spire-app\"\napp_secret = \"" + azureAppSecret + "\"\n"
		p := loadExternal(t, ourAzurePluginData(fake, "cred-secret", creds))
		signs(t, p, "token_entra", azureAppSecret)
		require.Zero(t, fake.Stats(t)["token_app_service"])

		wrong := strings.Replace(creds, azureAppSecret, planted("azure-wrong-app-secret"), 1)
		l, err := tryLoad(catalogConfig(t, ourAzurePluginData(fake, "cred-wrong", wrong)))
		if err == nil {
			_ = l.catalog.Close()
		}
		require.Error(t, err, "a wrong secret fails Configure")
		require.NotContains(t, err.Error(), planted("azure-wrong-app-secret"))
	})

	t.Run("client secret in the environment", func(t *testing.T) {
		fake.ResetStats(t)
		fake.UseManagedIdentity(t)
		t.Setenv("AZURE_AUTHORITY_HOST", fake.AuthorityHost)
		t.Setenv("AZURE_TENANT_ID", fake.Tenant)
		t.Setenv("AZURE_CLIENT_ID", "spire-app")
		t.Setenv("AZURE_CLIENT_SECRET", azureAppSecret)
		p := loadExternal(t, ourAzurePluginData(fake, "cred-env"))
		signs(t, p, "token_entra", azureAppSecret)
		require.Zero(t, fake.Stats(t)["token_app_service"], "the environment's secret comes first in the chain")
	})

	t.Run("workload identity", func(t *testing.T) {
		fake.ResetStats(t)
		fake.UseManagedIdentity(t)
		require.NoError(t, os.Unsetenv("IDENTITY_ENDPOINT"))
		require.NoError(t, os.Unsetenv("IDENTITY_HEADER"))
		tokenFile := filepath.Join(t.TempDir(), "azure-identity-token")
		require.NoError(t, os.WriteFile(tokenFile, []byte(azureAssertion), 0o600))
		t.Setenv("AZURE_AUTHORITY_HOST", fake.AuthorityHost)
		t.Setenv("AZURE_TENANT_ID", fake.Tenant)
		t.Setenv("AZURE_CLIENT_ID", "wi-app")
		t.Setenv("AZURE_FEDERATED_TOKEN_FILE", tokenFile)
		p := loadExternal(t, ourAzurePluginData(fake, "cred-wi"))
		signs(t, p, "token_entra", azureAssertion)
	})
}

// TestAzureFaultsDoNotFailSignData: Key Vault throttling (429 with Retry-After), an
// unavailable vault (503), a dropped connection and a request that gets no answer, injected
// into the fake's sign operation, are retried: the signature through SPIRE's facade
// succeeds and verifies (after Retry-After), each fault costing one more sign call. A fault
// that does not end fails the signature.
func TestAzureFaultsDoNotFailSignData(t *testing.T) {
	fake := startAzureKeyVaultFake(t)
	p := loadOurAzure(t, fake, "faults")
	key, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)

	fake.ResetStats(t)
	fake.Faults(t, azureFault{Op: "sign", Status: http.StatusTooManyRequests, RetryAfter: to.Ptr(1), Count: 1})
	started := time.Now()
	require.NoError(t, signVerified(key, 1), "a 429 is retried")
	require.GreaterOrEqual(t, time.Since(started), 900*time.Millisecond, "after Retry-After")
	require.Equal(t, 2, fake.Stats(t)["sign"])

	fake.ResetStats(t)
	fake.Faults(t, azureFault{Op: "sign", Status: http.StatusServiceUnavailable, Count: 2})
	require.NoError(t, signVerified(key, 2), "503s are retried")
	require.Equal(t, 3, fake.Stats(t)["sign"])

	fake.ResetStats(t)
	fake.Faults(t, azureFault{Op: "sign", Drop: true, Count: 1})
	require.NoError(t, signVerified(key, 3), "a dropped connection is retried")
	require.Equal(t, 2, fake.Stats(t)["sign"])

	// A vault that does not answer: the request times out (10 s) and is retried.
	fake.ResetStats(t)
	fake.Faults(t, azureFault{Op: "sign", LatencyMS: 12000, Count: 1})
	started = time.Now()
	require.NoError(t, signVerified(key, 6), "a timed-out request is retried")
	require.Less(t, time.Since(started), 20*time.Second)
	require.Equal(t, 2, fake.Stats(t)["sign"])

	// A fault that does not end is reported, not hidden.
	fake.Faults(t, azureFault{Op: "sign", Status: http.StatusServiceUnavailable, Count: -1})
	require.Error(t, signVerified(key, 4))
	fake.ClearFaults(t)
	require.NoError(t, signVerified(key, 5))
}

// signVerifiedWith signs a digest and verifies the ECDSA signature with pub (a public key
// read from the vault, not the one SPIRE's facade reports).
func signVerifiedWith(key keymanager.Key, pub crypto.PublicKey, n int) error {
	return signVerified(pubOverride{key, pub}, n)
}

type pubOverride struct {
	keymanager.Key
	pub crypto.PublicKey
}

func (p pubOverride) Public() crypto.PublicKey { return p.pub }

// TestAzureRealSpireServerLeftoverOfInterruptedRotation: the duplicate a rotation cut short
// leaves when the replaced key is deleted after answering (as SPIRE's built-in does, from a
// queue): the key SPIRE's journal holds and an older key of the same id, both with SPIRE's
// tags. It is planted here with a name that sorts after the real one, so that neither the
// listing order nor a name comparison picks the right key by accident. Over 20 restarts of a
// real spire-server with our plugin, every start serves the newest key: the CA key and the
// bundle are those of the first start, SVIDs verify, and no key is generated. (SPIRE's
// built-in picks either key at each start; the older one does not match its journal and it
// prepares a new CA.) Once the older key is past the half-created grace (1 h, aged with the
// fake's key times), the running server's sweep soft-deletes it.
func TestAzureRealSpireServerLeftoverOfInterruptedRotation(t *testing.T) {
	fake := startAzureKeyVaultFake(t)
	s := newAzureSpireServer(t, fake, "leftover", "sweep_interval = \"2s\"\nclock_skew_allowance = \"1s\"\n")
	s.start(0)
	root := s.mintAndVerify(t)
	bundle := s.mustCLI("bundle", "show")
	requireCleanPluginExitOf(t, s.stop())

	caKeyID := idOfKey(azurePublishedKeys(t, fake, "leftover"), root.PublicKey)
	require.True(t, strings.HasPrefix(caKeyID, "x509-CA-"), "the root CA key %q is a plugin key", caKeyID)
	current := onlyKey(t, spireAzureKeys(azureKeysOf(mustLive(t, fake), "leftover")[caKeyID], caKeyID), "the CA key")
	leftover := "spire-key-ffffffff-ffff-4fff-bfff-ffffffffffff-" + caKeyID
	require.Greater(t, leftover, current.Name)
	created := current.Versions[0].Attributes.Created - 600
	fake.Bulk(t, azureBulkKey{Name: leftover, Created: created, Updated: created,
		Tags: map[string]string{"spire-server-td": trustDomain, "spire-server-id": "leftover"}})

	for run := 1; run <= 20; run++ {
		s.start(run)
		require.Equal(t, bundle, s.mustCLI("bundle", "show"), "restart %d: the bundle is unchanged", run)
		if run%5 == 0 {
			require.True(t, s.mintAndVerify(t).PublicKey.(equaler).Equal(root.PublicKey), "restart %d: the same CA key signs", run)
		}
		log := s.stop()
		require.NotContains(t, log, "\"generated key\"", "restart %d: no key is generated", run)
		require.NotContains(t, log, "public key does not match key manager key", "restart %d", run)
		requireCleanPluginExitOf(t, log)
	}
	require.Len(t, spireAzureKeys(azureKeysOf(mustLive(t, fake), "leftover")[caKeyID], caKeyID), 2,
		"the older key is kept while younger than the grace")

	s.start(21)
	twoHoursAgo := time.Now().Add(-2 * time.Hour)
	fake.SetKeyTimes(t, leftover, twoHoursAgo, twoHoursAgo)
	require.Eventually(t, func() bool { return deletedNames(t, fake)[leftover] }, 15*time.Second, 200*time.Millisecond,
		"the older key is retired (soft-deleted) by the sweep")
	require.Equal(t, current.Name, onlyKey(t, spireAzureKeys(azureKeysOf(mustLive(t, fake), "leftover")[caKeyID], caKeyID), "one key left").Name)
	require.True(t, s.mintAndVerify(t).PublicKey.(equaler).Equal(root.PublicKey))
	requireCleanPluginExitOf(t, s.stop())
}

// TestAzureDisabledKeyAndDeniedOperations: a key of this server disabled in the vault behind
// its back fails SPIRE's built-in at start-up; ours starts, reports the id as absent
// (NotFound through SPIRE's facade) and the next GenerateKey makes a new key that signs. An
// operation the vault's RBAC refuses fails with PermissionDenied naming it, and works again
// once allowed.
func TestAzureDisabledKeyAndDeniedOperations(t *testing.T) {
	fake := startAzureKeyVaultFake(t)
	first := loadOurAzure(t, fake, "disabled")
	_, err := first.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	jwt, err := first.KeyManager.GenerateKey(ctx, "JWT-Signer-A", keymanager.ECP256)
	require.NoError(t, err)
	require.NoError(t, first.catalog.Close())
	disabled := onlyKey(t, spireAzureKeys(azureKeysOf(mustLive(t, fake), "disabled")["x509-CA-A"], "x509-CA-A"), "x509-CA-A")
	fake.SetKeyEnabled(t, disabled.Name, false)

	_, err = tryLoad(builtInAzureConfig(azurePluginData(fake.VaultURL, "disabled")))
	require.ErrorContains(t, err, "found disabled SPIRE key", "SPIRE's built-in refuses to start")

	ours := loadOurAzure(t, fake, "disabled")
	_, err = ours.KeyManager.GetKey(ctx, "x509-CA-A")
	require.Equal(t, codes.NotFound, status.Code(err), "the disabled key's id is absent: %v", err)
	key, err := ours.KeyManager.GetKey(ctx, "JWT-Signer-A")
	require.NoError(t, err, "the other keys are served")
	require.True(t, key.Public().(equaler).Equal(jwt.Public()))
	regenerated, err := ours.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	require.NoError(t, signVerified(regenerated, 1))

	fake.Deny(t, "sign")
	err = signVerified(regenerated, 2)
	require.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
	require.Contains(t, err.Error(), "sign")
	fake.Deny(t)
	require.NoError(t, signVerified(regenerated, 3))
}

// The planted Azure client secret and federated assertion of the credential tests (the
// fake wants the assertion shaped as a JWT: three dot-separated parts).
var (
	azureAppSecret = planted("azure-app-secret")
	azureAssertion = planted("azure-federated-assertion") + ".payload.signature"
)
