package spire_test

import (
	"context"
	"crypto"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/stretchr/testify/require"
)

// handoverCATTL is short so that SPIRE rotates its CA and JWT keys (both slots) during the
// test; a CA lifetime is what a hand-over takes. SPIRE refuses to mint with a ca_ttl much
// below a minute.
const handoverCATTL = 90 * time.Second

// handOverStore is one side of a hand-over: its plugin_data, the public keys it holds for
// the server by SPIRE key id, and a snapshot of everything it holds (to prove the old store
// is never written).
type handOverStore struct {
	name  string
	data  string
	keys  func() map[string]crypto.PublicKey
	state func() string
}

// TestRealSpireServerHandOverDiskToAwsKms: from disk to aws_kms (moto); see handOver.
func TestRealSpireServerHandOverDiskToAwsKms(t *testing.T) {
	t.Parallel() // waits a CA lifetime on the clock, as the other hand-over test does
	endpoint := startMoto(t)
	serverID := fmt.Sprintf("handover-%d", os.Getpid())
	disk := func(s *spireServer) handOverStore {
		return handOverStore{
			name:  "disk",
			data:  fmt.Sprintf("backend = \"disk\"\nkeys_path = %q\n", s.keysPath()),
			keys:  s.keysInStore,
			state: func() string { return sha256File(t, s.keysPath()) },
		}
	}
	handOver(t, disk, handOverStore{
		name: "aws_kms",
		data: awsPluginData(endpoint, serverID),
		keys: func() map[string]crypto.PublicKey { return kmsKeysOf(t, endpoint, serverID) },
	})
}

// TestRealSpireServerHandOverAwsKmsToGcpKms: from aws_kms (moto) to gcp_kms (the Cloud KMS
// fake), KMS to KMS: no key material can move, the hand-over moves each key id by rotation.
// The old KMS's whole state (keys, states, tags, aliases) is the same before and after.
func TestRealSpireServerHandOverAwsKmsToGcpKms(t *testing.T) {
	t.Parallel()
	endpoint := startMoto(t)
	gcp := newGcpEnv(t, "--generation-delay", "0.05")
	serverID := fmt.Sprintf("handover-%d", os.Getpid())
	awsKms := func(*spireServer) handOverStore {
		return handOverStore{
			name:  "aws_kms",
			data:  awsPluginData(endpoint, serverID),
			keys:  func() map[string]crypto.PublicKey { return kmsKeysOf(t, endpoint, serverID) },
			state: func() string { return awsKmsState(t, endpoint) },
		}
	}
	handOver(t, awsKms, handOverStore{
		name: "gcp_kms",
		data: gcp.pluginData(serverID),
		keys: func() map[string]crypto.PublicKey { return gcp.standardKeysOf(t, serverID) },
	})
}

// handOver: a spire-server on the old store mints SVIDs; its plugin_data switches to the
// new store with `migrate_from { <old store> }` and it restarts. The bundle is the same at
// once, SVIDs minted every few seconds verify throughout (zero failures) while SPIRE's
// rotation moves each key id into the new store, the plugin reports when the block can be
// removed, the keys SPIRE then uses live in the new store (new keys for every id), and the
// old store was never written (same state before and after).
func handOver(t *testing.T, oldStore func(*spireServer) handOverStore, newStore handOverStore) {
	var dataFile string
	serverExtra := fmt.Sprintf("    ca_ttl = %q\n    default_x509_svid_ttl = \"10s\"\n    default_jwt_svid_ttl = \"10s\"", handoverCATTL)
	s := newSpireServerConf(t, serverExtra, func(s *spireServer) string {
		dataFile = filepath.Join(s.dir, "kms.hcl")
		return fmt.Sprintf("plugin_data_file = %q", dataFile)
	})
	old := oldStore(s)
	require.NoError(t, os.WriteFile(dataFile, []byte(old.data), 0o600))
	s.storeKeys = old.keys

	s.start(1)
	s.mintAndVerify(t)
	bundle := s.mustCLI("bundle", "show")
	requireCleanPluginExitOf(t, s.stop())
	oldKeys := old.keys()
	require.NotEmpty(t, oldKeys)
	oldState := old.state()

	handover := newStore.data + "migrate_from {\n" + indent(old.data) + "}\n"
	require.NoError(t, os.WriteFile(dataFile, []byte(handover), 0o600))
	// The keys SPIRE may use now: the old store's until each id has moved, then the new's.
	s.storeKeys = func() map[string]crypto.PublicKey {
		keys := map[string]crypto.PublicKey{}
		for id, key := range oldKeys {
			keys[id] = key
		}
		for id, key := range newStore.keys() {
			keys[id] = key
		}
		return keys
	}
	s.start(2)
	require.Equal(t, bundle, s.mustCLI("bundle", "show"), "the bundle must not change at the switch")

	deadline := time.Now().Add(3 * handoverCATTL)
	mints := 0
	for !strings.Contains(s.log(), "hand-over complete") {
		require.True(t, time.Now().Before(deadline), "every key id should have moved within %v; log:\n%s", 3*handoverCATTL, s.log())
		s.mintAndVerify(t) // fails the test on the first SVID that does not verify
		mints++
		time.Sleep(3 * time.Second)
	}
	log := s.log()
	for id := range oldKeys {
		require.Contains(t, log, id, "the move of %s is logged", id)
	}
	require.Contains(t, log, "key id moved to the target store")

	// Now every key SPIRE signs with is in the new store.
	newKeys := newStore.keys()
	s.storeKeys = func() map[string]crypto.PublicKey { return newKeys }
	root := s.mintAndVerify(t)
	require.NotEmpty(t, idOfKey(newKeys, root.PublicKey), "the CA key is in %s", newStore.name)
	for id := range oldKeys {
		require.Contains(t, newKeys, id, "%s moved to %s", id, newStore.name)
		require.False(t, newKeys[id].(equaler).Equal(oldKeys[id]), "%s has a new key in %s", id, newStore.name)
	}
	requireCleanPluginExitOf(t, s.stop())
	require.Equal(t, oldState, old.state(), "the old store (%s) was never written", old.name)
	t.Logf("%s → %s: %d mints verified during the hand-over", old.name, newStore.name, mints+1)
}

// awsKmsState is everything a KMS account holds, as JSON: every key with its metadata
// (state, origin, spec, deletion date, ...) and tags, and every alias with its target.
func awsKmsState(t *testing.T, endpoint string) string {
	t.Helper()
	ctx := context.Background()
	client := kmsClient(endpoint)
	type keyState struct {
		Metadata any
		Tags     map[string]string
	}
	keys := map[string]keyState{}
	listed := kms.NewListKeysPaginator(client, &kms.ListKeysInput{})
	for listed.HasMorePages() {
		page, err := listed.NextPage(ctx)
		require.NoError(t, err)
		for _, key := range page.Keys {
			described, err := client.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: key.KeyId})
			require.NoError(t, err)
			tags := map[string]string{}
			tagged := kms.NewListResourceTagsPaginator(client, &kms.ListResourceTagsInput{KeyId: key.KeyId})
			for tagged.HasMorePages() {
				page, err := tagged.NextPage(ctx)
				require.NoError(t, err)
				for _, tag := range page.Tags {
					tags[aws.ToString(tag.TagKey)] = aws.ToString(tag.TagValue)
				}
			}
			keys[aws.ToString(key.KeyId)] = keyState{Metadata: described.KeyMetadata, Tags: tags}
		}
	}
	aliases := map[string]string{}
	listedAliases := kms.NewListAliasesPaginator(client, &kms.ListAliasesInput{})
	for listedAliases.HasMorePages() {
		page, err := listedAliases.NextPage(ctx)
		require.NoError(t, err)
		for _, alias := range page.Aliases {
			aliases[aws.ToString(alias.AliasName)] = aws.ToString(alias.TargetKeyId)
		}
	}
	require.NotEmpty(t, keys, "the KMS holds keys")
	out, err := json.Marshal(map[string]any{"keys": keys, "aliases": aliases})
	require.NoError(t, err)
	return string(out)
}

func indent(text string) string {
	var out strings.Builder
	for _, line := range strings.Split(strings.TrimRight(text, "\n"), "\n") {
		out.WriteString("  " + line + "\n")
	}
	return out.String()
}
