package spire_test

import (
	"crypto"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// handoverCATTL is short so that SPIRE rotates its CA and JWT keys (both slots) during the
// test; a CA lifetime is what a hand-over takes.
const handoverCATTL = 90 * time.Second

// TestRealSpireServerHandOverDiskToAwsKms: a spire-server on disk mints SVIDs; its
// plugin_data switches to aws_kms (moto) with `migrate_from { disk }` and it restarts. The
// bundle is the same at once, SVIDs minted every few seconds verify throughout (zero
// failures) while SPIRE's rotation moves each key id into KMS, the plugin reports when the
// block can be removed, the keys SPIRE then uses live in KMS, and the keys file is never
// written (same hash before and after).
func TestRealSpireServerHandOverDiskToAwsKms(t *testing.T) {
	endpoint := startMoto(t)
	serverID := fmt.Sprintf("handover-%d", os.Getpid())
	var dataFile string
	serverExtra := fmt.Sprintf("    ca_ttl = %q\n    default_x509_svid_ttl = \"10s\"\n    default_jwt_svid_ttl = \"10s\"", handoverCATTL)
	s := newSpireServerConf(t, serverExtra, func(s *spireServer) string {
		dataFile = filepath.Join(s.dir, "kms.hcl")
		return fmt.Sprintf("plugin_data_file = %q", dataFile)
	})
	disk := fmt.Sprintf("backend = \"disk\"\nkeys_path = %q\n", s.keysPath())
	require.NoError(t, os.WriteFile(dataFile, []byte(disk), 0o600))

	s.start(1)
	s.mintAndVerify(t)
	bundle := s.mustCLI("bundle", "show")
	requireCleanPluginExitOf(t, s.stop())
	diskKeys := s.keysInStore()
	keysFileHash := sha256File(t, s.keysPath())

	handover := awsPluginData(endpoint, serverID) +
		"migrate_from {\n" + indent(disk) + "}\n"
	require.NoError(t, os.WriteFile(dataFile, []byte(handover), 0o600))
	// The keys SPIRE may use now: the disk keys until each id has moved, then KMS's.
	s.storeKeys = func() map[string]crypto.PublicKey {
		keys := map[string]crypto.PublicKey{}
		for id, key := range diskKeys {
			keys[id] = key
		}
		for id, key := range kmsKeysOf(t, endpoint, serverID) {
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
	for id := range diskKeys {
		require.Contains(t, log, id, "the move of %s is logged", id)
	}
	require.Contains(t, log, "key id moved to the target store")

	// Now every key SPIRE signs with is in KMS.
	kmsKeys := kmsKeysOf(t, endpoint, serverID)
	s.storeKeys = func() map[string]crypto.PublicKey { return kmsKeys }
	root := s.mintAndVerify(t)
	require.NotEmpty(t, idOfKey(kmsKeys, root.PublicKey), "the CA key is in KMS")
	for id := range diskKeys {
		require.Contains(t, kmsKeys, id, "%s moved to KMS", id)
		require.False(t, kmsKeys[id].(equaler).Equal(diskKeys[id]), "%s has a new key in KMS", id)
	}
	requireCleanPluginExitOf(t, s.stop())
	require.Equal(t, keysFileHash, sha256File(t, s.keysPath()), "the keys file was never written")
	t.Logf("%d mints verified during the hand-over", mints+1)
}

func indent(text string) string {
	var out strings.Builder
	for _, line := range strings.Split(strings.TrimRight(text, "\n"), "\n") {
		out.WriteString("  " + line + "\n")
	}
	return out.String()
}
