package spire_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	kmstypes "github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	keymanagertest "github.com/spiffe/spire/pkg/server/plugin/keymanager/test"
	"github.com/stretchr/testify/require"
)

// TestConformanceAwsKms runs SPIRE's conformance suite against the aws_kms backend with
// moto (plus the shim) standing in for AWS KMS. The exclusions are AWS's own: ECDSA only
// with the curve's hash — the same list SPIRE's built-in aws_kms test declares.
func TestConformanceAwsKms(t *testing.T) {
	endpoint := startMoto(t)
	awsConformance(t, awsPluginData(endpoint, ""), "conformance")
}

// TestConformanceAwsKmsSharedKeys runs SPIRE's conformance suite on aws_kms in shared-keys
// mode: every key id is shared (`shared_key_ids = ".*"`), under aliases of a fresh prefix
// per key manager (the suite expects an empty store each time).
func TestConformanceAwsKmsSharedKeys(t *testing.T) {
	t.Parallel()
	endpoint := startMoto(t)
	n := 0
	keymanagertest.Test(t, keymanagertest.Config{
		Create: func(t *testing.T) keymanager.KeyManager {
			n++
			data := strings.Replace(awsPluginData(endpoint, ""), `key_identifier_value = ""`,
				fmt.Sprintf("key_identifier_value = %q", fmt.Sprintf("shared-%d", n)), 1)
			data += fmt.Sprintf(`shared_keys {
    alias_template = "alias/SPIRE_SHARED/conf%d/{{ .KeyID }}"
    key_id_extraction_regex = "^alias/SPIRE_SHARED/conf%d/([^/]+)$"
    shared_key_ids = ".*"
}
`, n, n)
			return loadExternal(t, data).KeyManager
		},
		UnsupportedSignatureAlgorithms: map[keymanager.KeyType][]x509.SignatureAlgorithm{
			keymanager.ECP256: {x509.ECDSAWithSHA384, x509.ECDSAWithSHA512},
			keymanager.ECP384: {x509.ECDSAWithSHA256, x509.ECDSAWithSHA512},
		},
	})
}

// awsConformance runs SPIRE's conformance suite on aws_kms, each instance with a fresh
// server id (`key_identifier_value` replaces the empty one in pluginData). The exclusions
// are AWS's own: ECDSA only with the curve's hash, as SPIRE's built-in aws_kms test declares.
func awsConformance(t *testing.T, pluginData, idPrefix string) {
	n := 0
	keymanagertest.Test(t, keymanagertest.Config{
		Create: func(t *testing.T) keymanager.KeyManager {
			n++
			data := strings.Replace(pluginData, `key_identifier_value = ""`,
				fmt.Sprintf("key_identifier_value = %q", fmt.Sprintf("%s-%d", idPrefix, n)), 1)
			return loadExternal(t, data).KeyManager
		},
		UnsupportedSignatureAlgorithms: map[keymanager.KeyType][]x509.SignatureAlgorithm{
			keymanager.ECP256: {x509.ECDSAWithSHA384, x509.ECDSAWithSHA512},
			keymanager.ECP384: {x509.ECDSAWithSHA256, x509.ECDSAWithSHA512},
		},
	})
}

func kmsClient(endpoint string) *kms.Client {
	return kms.New(kms.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String(endpoint),
		Credentials:  credentials.NewStaticCredentialsProvider(plantedAWSAccessKeyID, plantedAWSSecretKey, ""),
	})
}

// TestAwsKmsKeysLiveInKms checks in KMS itself (AWS SDK for Go) what the plugin did: the
// key behind this server's alias is the one SPIRE got, it is tagged, a replaced key is on
// the deletion path with its intent recorded, and a restarted plugin finds the same key.
func TestAwsKmsKeysLiveInKms(t *testing.T) {
	ctx := context.Background()
	endpoint := startMoto(t)
	client := kmsClient(endpoint)
	p := loadExternal(t, awsPluginData(endpoint, "server-a"))

	first, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	alias := "alias/SPIRE_SERVER/example_org/server-a/x509-CA-A"
	described, err := client.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String(alias)})
	require.NoError(t, err)
	firstArn := aws.ToString(described.KeyMetadata.Arn)
	pub, err := client.GetPublicKey(ctx, &kms.GetPublicKeyInput{KeyId: aws.String(alias)})
	require.NoError(t, err)
	parsed, err := x509.ParsePKIXPublicKey(pub.PublicKey)
	require.NoError(t, err)
	require.True(t, first.Public().(equaler).Equal(parsed), "SPIRE's key is the KMS key behind the alias")
	tags, err := client.ListResourceTags(ctx, &kms.ListResourceTagsInput{KeyId: aws.String(firstArn)})
	require.NoError(t, err)
	tagMap := map[string]string{}
	for _, tag := range tags.Tags {
		tagMap[aws.ToString(tag.TagKey)] = aws.ToString(tag.TagValue)
	}
	require.Equal(t, "example.org", tagMap["spire-server-td"])
	require.Equal(t, "server-a", tagMap["spire-server-id"])
	require.Equal(t, "x509-CA-A", tagMap["spire-key-id"])
	require.Equal(t, "true", tagMap["spire-active"], "activated once the alias points at it")

	// Rotation: the alias moves, the old key goes to PendingDeletion with its intent tag.
	_, err = p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	old, err := client.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String(firstArn)})
	require.NoError(t, err)
	require.Equal(t, kmstypes.KeyStatePendingDeletion, old.KeyMetadata.KeyState)
	oldTags, err := client.ListResourceTags(ctx, &kms.ListResourceTagsInput{KeyId: aws.String(firstArn)})
	require.NoError(t, err)
	intent := false
	for _, tag := range oldTags.Tags {
		intent = intent || aws.ToString(tag.TagKey) == "spire-delete-intent"
	}
	require.True(t, intent, "deletion intent is recorded in KMS")

	current, err := p.KeyManager.GetKey(ctx, "x509-CA-A")
	require.NoError(t, err)
	require.NoError(t, p.catalog.Close())

	// Enough foreign aliases that discovery has to follow ListAliases pages (the shim pages
	// like AWS: 50 per page by default).
	for i := 0; i < 120; i++ {
		createForeignKey(t, client, fmt.Sprintf("alias/SPIRE_SERVER/example_org/zz-foreign-%03d/x509-CA-A", i))
	}
	firstPage, err := client.ListAliases(ctx, &kms.ListAliasesInput{})
	require.NoError(t, err)
	require.True(t, firstPage.Truncated, "the emulator must page ListAliases, as AWS does")
	late := loadExternal(t, awsPluginData(endpoint, "late"))
	lateKey, err := late.KeyManager.GenerateKey(ctx, "JWT-Signer-A", keymanager.ECP256)
	require.NoError(t, err)
	require.NoError(t, late.catalog.Close())
	lateAgain, err := loadExternal(t, awsPluginData(endpoint, "late")).KeyManager.GetKey(ctx, "JWT-Signer-A")
	require.NoError(t, err, "a key whose alias is on the third ListAliases page is found")
	require.True(t, lateAgain.Public().(equaler).Equal(lateKey.Public()))

	// A restarted plugin finds the same key through its alias; another server id does not.
	again := loadExternal(t, awsPluginData(endpoint, "server-a"))
	found, err := again.KeyManager.GetKey(ctx, "x509-CA-A")
	require.NoError(t, err)
	require.True(t, found.Public().(equaler).Equal(current.Public()))
	other := loadExternal(t, awsPluginData(endpoint, "server-b"))
	keys, err := other.KeyManager.GetKeys(ctx)
	require.NoError(t, err)
	require.Empty(t, keys, "server-b must not see server-a's keys")

	// Combinations KMS cannot sign are refused before any call, with InvalidArgument.
	_, err = loadExternal(t, awsPluginData(endpoint, "server-c")).KeyManager.GenerateKey(ctx, "k", keymanager.ECP256)
	require.NoError(t, err)
	_, err = found.Sign(rand.Reader, make([]byte, 48), crypto.SHA384)
	requireStatusContains(t, err, "cannot sign ECDSA/SHA-384 with ec-p256 key")

	// A disabled key behind this server's alias does not break start-up: it is reported,
	// and SPIRE's next GenerateKey replaces it.
	arn, err := client.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String(alias)})
	require.NoError(t, err)
	_, err = client.DisableKey(ctx, &kms.DisableKeyInput{KeyId: arn.KeyMetadata.KeyId})
	require.NoError(t, err)
	restarted := loadExternal(t, awsPluginData(endpoint, "server-a"))
	_, err = restarted.KeyManager.GetKey(ctx, "x509-CA-A")
	require.Error(t, err)
	require.Contains(t, err.Error(), "NotFound")
	_, err = restarted.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
}

func requireStatusContains(t *testing.T, err error, text string) {
	t.Helper()
	require.Error(t, err)
	require.True(t, strings.Contains(err.Error(), text), err.Error())
	require.Contains(t, err.Error(), "InvalidArgument")
}

// kmsKeysOf lists, in KMS itself, the public keys behind one server's aliases.
func kmsKeysOf(t *testing.T, endpoint, serverID string) map[string]crypto.PublicKey {
	ctx := context.Background()
	client := kmsClient(endpoint)
	prefix := "alias/SPIRE_SERVER/example_org/" + serverID + "/"
	out := map[string]crypto.PublicKey{}
	paginator := kms.NewListAliasesPaginator(client, &kms.ListAliasesInput{})
	for paginator.HasMorePages() {
		page, err := paginator.NextPage(ctx)
		require.NoError(t, err)
		for _, alias := range page.Aliases {
			name := aws.ToString(alias.AliasName)
			if !strings.HasPrefix(name, prefix) {
				continue
			}
			pub, err := client.GetPublicKey(ctx, &kms.GetPublicKeyInput{KeyId: alias.AliasName})
			require.NoError(t, err)
			parsed, err := x509.ParsePKIXPublicKey(pub.PublicKey)
			require.NoError(t, err)
			out[strings.TrimPrefix(name, prefix)] = parsed
		}
	}
	return out
}

// TestRealSpireServerAwsKms: two real spire-servers with different identities share one
// (moto) KMS account, with short lifecycle thresholds. Both mint SVIDs that verify against
// their bundles with CA and JWT keys held in KMS under their own aliases; a restart finds
// the same CA key; while both run, each one's stamps protect its keys from the other's
// sweeps; once server-a is gone for good (its identity changed), server-b's sweep puts
// server-a's keys on the deletion path.
// It runs on every spire-server release, side by side (each with its own moto).
func TestRealSpireServerAwsKms(t *testing.T) { forEachSpireServer(t, true, realSpireServerAwsKms) }

func realSpireServerAwsKms(t *testing.T, _ spireServerRelease) {
	ctx := context.Background()
	endpoint := startMoto(t)
	fast := "liveness_interval = \"1s\"\nsweep_interval = \"1s\"\nstale_key_age = \"6s\"\nclock_skew_allowance = \"1s\"\n"
	newServer := func(serverID string) *spireServer {
		s := newSpireServerWith(t, func(*spireServer) string {
			return "plugin_data {\n" + awsPluginData(endpoint, serverID) + fast + "}"
		})
		s.storeKeys = func() map[string]crypto.PublicKey { return kmsKeysOf(t, endpoint, serverID) }
		return s
	}
	caKeyState := func(serverID string) kmstypes.KeyState {
		out, err := kmsClient(endpoint).DescribeKey(ctx, &kms.DescribeKeyInput{
			KeyId: aws.String("alias/SPIRE_SERVER/example_org/" + serverID + "/x509-CA-A"),
		})
		require.NoError(t, err)
		return out.KeyMetadata.KeyState
	}

	a := newServer("server-a")
	a.start(1)
	rootA := a.mintAndVerify(t)
	requireCleanPluginExitOf(t, a.stop())
	a.start(2)
	require.True(t, a.mintAndVerify(t).PublicKey.(equaler).Equal(rootA.PublicKey), "restart reuses the CA key in KMS")
	keysA := kmsKeysOf(t, endpoint, "server-a")
	require.Contains(t, keysA, "x509-CA-A")

	b := newServer("server-b")
	b.start(1)
	rootB := b.mintAndVerify(t)
	require.False(t, rootA.PublicKey.(equaler).Equal(rootB.PublicKey), "each server has its own CA key")
	time.Sleep(7 * time.Second) // several stamps and sweeps by both servers
	for id, key := range kmsKeysOf(t, endpoint, "server-a") {
		require.True(t, key.(equaler).Equal(keysA[id]), "server-b must not touch live server-a's key %s", id)
	}
	require.Equal(t, kmstypes.KeyStateEnabled, caKeyState("server-a"))

	requireCleanPluginExitOf(t, a.stop()) // server-a never comes back under this identity
	require.Eventually(t, func() bool { return caKeyState("server-a") == kmstypes.KeyStatePendingDeletion },
		40*time.Second, 250*time.Millisecond, "server-b's sweep must remove the abandoned keys")
	require.Equal(t, kmstypes.KeyStateEnabled, caKeyState("server-b"))
	b.mintAndVerify(t)
	requireCleanPluginExitOf(t, b.stop())
}

// requireCleanPluginExitOf checks a server's log only (another server's plugin may still run).
func requireCleanPluginExitOf(t *testing.T, log string) {
	t.Helper()
	require.Contains(t, log, "Shutdown requested by the host; exiting")
	require.NotContains(t, log, "plugin failed to exit gracefully")
}

// TestAwsKmsSweepRemovesAbandonedKeys: a server whose identity changed ("old") leaves keys
// behind; the sweep of another server ("sweeper", short thresholds) puts them on the
// deletion path. A live peer's key older than the stale threshold stays, and its
// spire-last-update stamp in KMS shows that the peer's stamps are what keep it; an equally
// old key whose server stopped stamping ("quitter", unloaded) is swept once its last stamp
// is stale. The sweeper's own key stays.
func TestAwsKmsSweepRemovesAbandonedKeys(t *testing.T) {
	ctx := context.Background()
	endpoint := startMoto(t)
	client := kmsClient(endpoint)
	fast := "liveness_interval = \"1s\"\nsweep_interval = \"1s\"\nstale_key_age = \"6s\"\nclock_skew_allowance = \"1s\"\n"
	const staleAfter = 7 * time.Second // stale_key_age + clock_skew_allowance
	describe := func(serverID string) *kmstypes.KeyMetadata {
		out, err := client.DescribeKey(ctx, &kms.DescribeKeyInput{
			KeyId: aws.String("alias/SPIRE_SERVER/example_org/" + serverID + "/x509-CA-A"),
		})
		require.NoError(t, err)
		return out.KeyMetadata
	}
	state := func(serverID string) kmstypes.KeyState { return describe(serverID).KeyState }
	// lastUpdate is the key's spire-last-update stamp (Unix seconds) as KMS holds it.
	lastUpdate := func(serverID string) time.Time {
		tags, err := client.ListResourceTags(ctx, &kms.ListResourceTagsInput{KeyId: describe(serverID).Arn})
		require.NoError(t, err)
		for _, tag := range tags.Tags {
			if aws.ToString(tag.TagKey) == "spire-last-update" {
				secs, err := strconv.ParseInt(aws.ToString(tag.TagValue), 10, 64)
				require.NoError(t, err, "stamp %q", aws.ToString(tag.TagValue))
				return time.Unix(secs, 0)
			}
		}
		t.Fatalf("%s's key has no spire-last-update tag: %v", serverID, tags.Tags)
		return time.Time{}
	}
	// savedByStamps checks that serverID's key is older than the stale threshold, still
	// enabled, and stamped recently: well after its creation would have made it stale.
	savedByStamps := func(serverID string) {
		t.Helper()
		key := describe(serverID)
		created := aws.ToTime(key.CreationDate)
		require.Greater(t, time.Since(created), staleAfter, "%s's key is old enough to be swept without stamps", serverID)
		require.Equal(t, kmstypes.KeyStateEnabled, key.KeyState, "%s's live key stays", serverID)
		stamp := lastUpdate(serverID)
		require.Less(t, time.Since(stamp), 3*time.Second, "%s's key was stamped within the last liveness intervals", serverID)
		require.True(t, stamp.After(created.Add(staleAfter-time.Second)),
			"%s's stamp (%s) is newer than its creation (%s) plus the stale threshold", serverID, stamp, created)
	}

	old := loadExternal(t, awsPluginData(endpoint, "old"))
	_, err := old.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	require.NoError(t, old.catalog.Close()) // its identity file is gone: nobody stamps these keys

	peer := loadExternal(t, awsPluginData(endpoint, "peer")+fast)
	_, err = peer.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	quitter := loadExternal(t, awsPluginData(endpoint, "quitter")+fast)
	_, err = quitter.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	sweeper := loadExternal(t, awsPluginData(endpoint, "sweeper")+fast)
	_, err = sweeper.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)

	require.Eventually(t, func() bool {
		return state("old") == kmstypes.KeyStatePendingDeletion
	}, 40*time.Second, 250*time.Millisecond, "the abandoned key must be swept")

	// Let the live keys grow older than the threshold, with several sweeps past it.
	for _, id := range []string{"peer", "quitter"} {
		if wait := time.Until(aws.ToTime(describe(id).CreationDate).Add(staleAfter + 3*time.Second)); wait > 0 {
			time.Sleep(wait)
		}
	}
	savedByStamps("peer")
	savedByStamps("quitter")

	// The control: the quitter stops stamping; its key, as old as the peer's, is swept
	// once its last stamp is stale, not before.
	require.NoError(t, quitter.catalog.Close())
	stopped := time.Now()
	require.Eventually(t, func() bool {
		return state("quitter") == kmstypes.KeyStatePendingDeletion
	}, 40*time.Second, 250*time.Millisecond, "a key nobody stamps any more must be swept")
	require.Greater(t, time.Since(stopped), staleAfter-3*time.Second, "swept only once its last stamp was stale")

	savedByStamps("peer")
	require.Equal(t, kmstypes.KeyStateEnabled, state("sweeper"), "the sweeper's own key stays")
	// Both live servers sweep; whichever got there first logged it.
	require.Eventually(t, func() bool {
		return sweeper.Logs.find("stale key put on the deletion path") != nil ||
			peer.Logs.find("stale key put on the deletion path") != nil
	}, 5*time.Second, 50*time.Millisecond)
}

// TestAwsKmsFaults: throttling, 5xx, dropped connections and a timeout between the plugin
// and KMS never yield a wrong signature or a leaked key; SignData succeeds within SPIRE's
// 30 s deadline once the fault clears.
func TestAwsKmsFaults(t *testing.T) {
	ctx := context.Background()
	endpoint := startMoto(t)
	proxy := newFaultProxy(t, endpoint)
	p := loadExternal(t, awsPluginData(proxy.URL, "faulty"))
	key, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	digest := sha256.Sum256([]byte("fault tolerant"))

	for name, faults := range map[string][]fault{
		"throttled three times": {faultThrottle, faultThrottle, faultThrottle},
		"two 500s":              {faultServer500, faultServer500},
		"dropped connections":   {faultDrop, faultDrop},
		"one timeout":           {faultSlow},
	} {
		t.Run(name, func(t *testing.T) {
			before := proxy.calls("Sign")
			proxy.inject("Sign", faults...)
			started := time.Now()
			sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
			require.NoError(t, err)
			require.Less(t, time.Since(started), 30*time.Second, "inside SPIRE's deadline")
			require.True(t, ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), digest[:], sig), "never a wrong signature")
			require.Equal(t, len(faults)+1, proxy.calls("Sign")-before, "one retry per fault, no more")
		})
	}

	t.Run("persistent throttling fails cleanly within the deadline", func(t *testing.T) {
		// More throttles than the retry policy makes attempts (12, in a 20 s budget).
		persistent := make([]fault, 30)
		for i := range persistent {
			persistent[i] = faultThrottle
		}
		proxy.inject("Sign", persistent...)
		started := time.Now()
		_, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.Error(t, err)
		require.Contains(t, err.Error(), "ResourceExhausted")
		require.Less(t, time.Since(started), 30*time.Second)
		proxy.clear("Sign")
		_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.NoError(t, err, "signing works again once the fault clears")
	})

	liveKeys := func() int {
		client := kmsClient(endpoint)
		out, err := client.ListKeys(ctx, &kms.ListKeysInput{})
		require.NoError(t, err)
		n := 0
		for _, k := range out.Keys {
			d, err := client.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: k.KeyId})
			require.NoError(t, err)
			if d.KeyMetadata.KeyState == kmstypes.KeyStateEnabled {
				n++
			}
		}
		return n
	}
	t.Run("a failed GenerateKey leaves no live key", func(t *testing.T) {
		before := liveKeys()
		proxy.inject("CreateKey", faultServer500)
		_, err := p.KeyManager.GenerateKey(ctx, "JWT-Signer-A", keymanager.ECP256)
		require.Error(t, err, "key creation is never retried blindly")
		// The alias cannot be created at all: publishing fails after its retries, the store
		// confirms the alias does not point at the new key, and the new key is aborted.
		drops := make([]fault, 20)
		for i := range drops {
			drops[i] = faultDrop
		}
		proxy.inject("CreateAlias", drops...)
		_, err = p.KeyManager.GenerateKey(ctx, "JWT-Signer-A", keymanager.ECP256)
		require.Error(t, err)
		proxy.clear("CreateAlias")
		require.Equal(t, before, liveKeys(), "the unpublished key was put on the deletion path")
		again, err := p.KeyManager.GenerateKey(ctx, "JWT-Signer-A", keymanager.ECP256)
		require.NoError(t, err)
		require.Equal(t, before+1, liveKeys())
		current, err := p.KeyManager.GetKey(ctx, "x509-CA-A")
		require.NoError(t, err)
		require.True(t, current.Public().(equaler).Equal(key.Public()), "no fault replaced a key")
		require.NotNil(t, again)
	})
	t.Run("an alias switched before activation failed keeps the new key", func(t *testing.T) {
		// The defect this engine fixes: on rotation the alias is pointed at the new key,
		// then tagging it active fails. The new key is what discovery finds now: it must be
		// kept and the old one retired, so that a restart finds the new key.
		fails := make([]fault, 20)
		for i := range fails {
			fails[i] = faultServer500
		}
		proxy.inject("TagResource", fails...)
		rotated, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
		proxy.clear("TagResource")
		require.NoError(t, err, "discovery finds the new key: the rotation took place")
		require.False(t, rotated.Public().(equaler).Equal(key.Public()))
		restarted := loadExternal(t, awsPluginData(proxy.URL, "faulty"))
		found, err := restarted.KeyManager.GetKey(ctx, "x509-CA-A")
		require.NoError(t, err, "a restart finds a key for the id")
		require.True(t, found.Public().(equaler).Equal(rotated.Public()), "a restart finds the new key")
		// The new key is enabled (not pending deletion); the old one is on its way out.
		client := kmsClient(endpoint)
		alias, err := client.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String("alias/SPIRE_SERVER/example_org/faulty/x509-CA-A")})
		require.NoError(t, err)
		require.Equal(t, kmstypes.KeyStateEnabled, alias.KeyMetadata.KeyState)
	})
}

// TestAwsKmsTagDiscovery: with enable_tag_based_key_discovery the plugin finds its keys by
// tags, so start-up costs the same number of KMS calls whatever else is in the account, and
// a rotated-out key (tagged inactive) is never picked up again.
func TestAwsKmsTagDiscovery(t *testing.T) {
	ctx := context.Background()
	endpoint := startMoto(t)
	proxy := newFaultProxy(t, endpoint)
	data := awsPluginData(proxy.URL, "tagged") + "enable_tag_based_key_discovery = true\n"

	t.Run("conformance", func(t *testing.T) {
		awsConformance(t, awsPluginData(proxy.URL, "")+"enable_tag_based_key_discovery = true\n", "tag-conformance")
	})

	first := loadExternal(t, data)
	for _, id := range []string{"x509-CA-A", "JWT-Signer-A"} {
		_, err := first.KeyManager.GenerateKey(ctx, id, keymanager.ECP256)
		require.NoError(t, err)
	}
	current, err := first.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256) // rotation
	require.NoError(t, err)
	require.NoError(t, first.catalog.Close())

	startupCalls := func() map[string]int {
		proxy.snapshot()
		p := loadExternal(t, data)
		calls := proxy.snapshot()
		keys, err := p.KeyManager.GetKeys(ctx)
		require.NoError(t, err)
		require.Len(t, keys, 2, "the rotated-out key is not discovered")
		found, err := p.KeyManager.GetKey(ctx, "x509-CA-A")
		require.NoError(t, err)
		require.True(t, found.Public().(equaler).Equal(current.Public()))
		require.NoError(t, p.catalog.Close())
		return calls
	}
	quiet := startupCalls()
	client := kmsClient(endpoint)
	for i := 0; i < 300; i++ {
		_, err := client.CreateKey(ctx, &kms.CreateKeyInput{KeySpec: kmstypes.KeySpecEccNistP256, KeyUsage: kmstypes.KeyUsageTypeSignVerify})
		require.NoError(t, err)
	}
	crowded := startupCalls()
	require.Equal(t, quiet, crowded, "start-up calls must not depend on foreign keys")
	require.Equal(t, 2, crowded["GetPublicKey"])
}

// TestAwsKmsAssumedRoleKeyPolicy: with assume_role_arn the plugin works through STS
// credentials of that role, and (no key_policy_file) new keys get a least-privilege policy
// naming exactly that role; as a plain user, keys get the account default policy.
func TestAwsKmsAssumedRoleKeyPolicy(t *testing.T) {
	ctx := context.Background()
	endpoint := startMoto(t)
	client := kmsClient(endpoint)
	policyOf := func(serverID string) string { return caKeyPolicy(t, client, serverID) }

	role := loadExternal(t, awsPluginData(endpoint, "with-role")+assumeRole)
	key, err := role.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	digest := sha256.Sum256([]byte("as the role"))
	sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	require.NoError(t, err)
	require.True(t, ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), digest[:], sig))
	policy := policyOf("with-role")
	require.Contains(t, policy, `"arn:aws:iam::123456789012:role/spire-server"`)
	require.Contains(t, policy, `"kms:Sign"`)
	require.NotContains(t, policy, `"kms:*"`)
	require.NotContains(t, policy, plantedExternalID, "the external id is a secret, never in a policy")
	require.NotNil(t, role.Logs.find("new keys get a least-privilege key policy for this server's role"))

	user := loadExternal(t, awsPluginData(endpoint, "as-user"))
	_, err = user.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	require.NotContains(t, policyOf("as-user"), "spire-server", "plain users get the account default policy")
}

// assumeRole is the plugin_data of TestAwsKmsAssumedRoleKeyPolicy's role (moto's STS lets
// anyone assume it).
var assumeRole = "assume_role_arn = \"arn:aws:iam::123456789012:role/spire-server\"\nexternal_id = \"" + plantedExternalID + "\"\n"

var plantedExternalID = planted("aws-external-id")

// caKeyPolicy reads the key policy of serverID's x509-CA-A key from KMS.
func caKeyPolicy(t *testing.T, client *kms.Client, serverID string) string {
	t.Helper()
	ctx := context.Background()
	// GetKeyPolicy takes a key id or ARN, not an alias.
	described, err := client.DescribeKey(ctx, &kms.DescribeKeyInput{
		KeyId: aws.String("alias/SPIRE_SERVER/example_org/" + serverID + "/x509-CA-A"),
	})
	require.NoError(t, err)
	out, err := client.GetKeyPolicy(ctx, &kms.GetKeyPolicyInput{
		KeyId:      described.KeyMetadata.KeyId,
		PolicyName: aws.String("default"),
	})
	require.NoError(t, err)
	return aws.ToString(out.Policy)
}

// TestAwsKmsCallerIdentityAtConfigure: without key_policy_file, Configure asks STS who this
// server runs as (GetCallerIdentity), since the default policy of new keys depends on it. A
// transient STS failure is retried and the keys still get the role's least-privilege policy;
// an STS that keeps failing fails Configure with Unavailable, saying what the plugin could not
// tell and how to do without it, instead of silently giving new keys another policy.
func TestAwsKmsCallerIdentityAtConfigure(t *testing.T) {
	ctx := context.Background()
	endpoint := startMoto(t)
	proxy := newFaultProxy(t, endpoint) // STS is served by the same endpoint as KMS
	const getCallerIdentity = "GetCallerIdentity"

	for _, tc := range []struct{ name, data string }{
		{"assumed role", awsPluginData(proxy.URL, "sts-down-role") + assumeRole},
		{"plain user", awsPluginData(proxy.URL, "sts-down-user")},
	} {
		t.Run("persistent failure fails Configure as "+tc.name, func(t *testing.T) {
			fails := make([]fault, 30)
			for i := range fails {
				fails[i] = faultServer500
			}
			proxy.inject(getCallerIdentity, fails...)
			defer proxy.clear(getCallerIdentity)
			proxy.snapshot()
			started := time.Now()
			_, err := tryLoad(catalogConfig(t, tc.data))
			require.Error(t, err, "Configure must fail when it cannot tell which policy new keys get")
			require.Less(t, time.Since(started), 30*time.Second, "inside SPIRE's deadline")
			require.Contains(t, err.Error(), "code = Unavailable", err.Error())
			require.Contains(t, err.Error(), "cannot tell which role this server runs as", err.Error())
			require.Contains(t, err.Error(), "key_policy_file", err.Error())
			require.Contains(t, err.Error(), "STS GetCallerIdentity", "the failed call is named")
			calls := proxy.snapshot()
			require.Greater(t, calls[getCallerIdentity], 1, "GetCallerIdentity is retried before giving up")
			require.Zero(t, calls["CreateKey"])
		})
	}

	t.Run("one failure is retried and keys get the role's policy", func(t *testing.T) {
		proxy.snapshot()
		proxy.inject(getCallerIdentity, faultServer500)
		p := loadExternal(t, awsPluginData(proxy.URL, "sts-blip")+assumeRole)
		require.Equal(t, 2, proxy.calls(getCallerIdentity), "one failure, one retry")
		require.NotNil(t, p.Logs.find("new keys get a least-privilege key policy for this server's role"))
		_, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
		require.NoError(t, err)
		policy := caKeyPolicy(t, kmsClient(endpoint), "sts-blip")
		require.Contains(t, policy, `"arn:aws:iam::123456789012:role/spire-server"`, policy)
		require.Contains(t, policy, `"kms:Sign"`)
		require.NotContains(t, policy, `"kms:*"`, "not the account default policy")
	})
}

// TestAwsKmsAgainstLocalStack runs the aws_kms backend against a second, independent KMS
// implementation: SPIRE's conformance suite (every signature verified by Go's crypto), and
// discovery across LocalStack's own ListAliases paging.
func TestAwsKmsAgainstLocalStack(t *testing.T) {
	ctx := context.Background()
	endpoint := startLocalStack(t)
	t.Run("conformance", func(t *testing.T) {
		awsConformance(t, awsPluginData(endpoint, ""), "ls-conformance")
	})
	t.Run("discovery across ListAliases pages", func(t *testing.T) {
		client := kmsClient(endpoint)
		for i := 0; i < 110; i++ {
			createForeignKey(t, client, fmt.Sprintf("alias/SPIRE_SERVER/example_org/ls-foreign-%03d/x509-CA-A", i))
		}
		page, err := client.ListAliases(ctx, &kms.ListAliasesInput{Limit: aws.Int32(100)})
		require.NoError(t, err)
		require.True(t, page.Truncated, "LocalStack pages ListAliases")
		late := loadExternal(t, awsPluginData(endpoint, "ls-late"))
		key, err := late.KeyManager.GenerateKey(ctx, "JWT-Signer-A", keymanager.ECP256)
		require.NoError(t, err)
		require.NoError(t, late.catalog.Close())
		found, err := loadExternal(t, awsPluginData(endpoint, "ls-late")).KeyManager.GetKey(ctx, "JWT-Signer-A")
		require.NoError(t, err)
		require.True(t, found.Public().(equaler).Equal(key.Public()))
	})
}

// createForeignKey creates a key behind `alias`, as another server would have. The SDK may
// retry a CreateAlias whose first attempt succeeded (a slow emulator), so an alias that
// already points at a key counts as done.
func createForeignKey(t *testing.T, client *kms.Client, alias string) {
	t.Helper()
	ctx := context.Background()
	out, err := client.CreateKey(ctx, &kms.CreateKeyInput{KeySpec: kmstypes.KeySpecEccNistP256, KeyUsage: kmstypes.KeyUsageTypeSignVerify})
	require.NoError(t, err)
	_, err = client.CreateAlias(ctx, &kms.CreateAliasInput{AliasName: aws.String(alias), TargetKeyId: out.KeyMetadata.KeyId})
	var exists *kmstypes.AlreadyExistsException
	if errors.As(err, &exists) {
		return
	}
	require.NoError(t, err)
}
