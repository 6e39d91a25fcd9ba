package spire_test

import (
	"crypto"
	"crypto/x509"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	keymanagertest "github.com/spiffe/spire/pkg/server/plugin/keymanager/test"
	"github.com/stretchr/testify/require"
)

const softHSMModule = "/usr/lib/softhsm/libsofthsm2.so"

var tokenCounter atomic.Int64

// softHSMToken initialises a fresh SoftHSM2 token (user PIN 1234) in the run's token
// directory (SOFTHSM2_CONF, set by scripts/test-all.sh) and returns its label.
func softHSMToken(t *testing.T) string {
	t.Helper()
	if os.Getenv("SOFTHSM2_CONF") == "" {
		t.Fatal("SOFTHSM2_CONF must point at a SoftHSM2 configuration (scripts/test-all.sh sets it)")
	}
	label := fmt.Sprintf("go-%d-%d", os.Getpid(), tokenCounter.Add(1))
	out, err := exec.Command("softhsm2-util", "--init-token", "--free", "--label", label,
		"--pin", "1234", "--so-pin", "5678").CombinedOutput()
	require.NoError(t, err, string(out))
	return label
}

func pkcs11PluginData(token, serverID string) string {
	return fmt.Sprintf("backend = \"pkcs11\"\nmodule = %q\ntoken_label = %q\npin = \"1234\"\nkey_identifier_value = %q\n",
		softHSMModule, token, serverID)
}

// TestConformancePkcs11 runs SPIRE's conformance suite on the pkcs11 backend with a
// SoftHSM2 token; ECDSA is signed with the curve's own hash, as on the cloud KMSes.
func TestConformancePkcs11(t *testing.T) {
	token := softHSMToken(t)
	n := 0
	keymanagertest.Test(t, keymanagertest.Config{
		Create: func(t *testing.T) keymanager.KeyManager {
			n++
			return loadExternal(t, pkcs11PluginData(token, fmt.Sprintf("conformance-%d", n))).KeyManager
		},
		UnsupportedSignatureAlgorithms: map[keymanager.KeyType][]x509.SignatureAlgorithm{
			keymanager.ECP256: {x509.ECDSAWithSHA384, x509.ECDSAWithSHA512},
			keymanager.ECP384: {x509.ECDSAWithSHA256, x509.ECDSAWithSHA512},
		},
	})
}

var (
	objectHeader = regexp.MustCompile(`^Public Key Object;`)
	objectLabel  = regexp.MustCompile(`^\s*label:\s*(\S+)`)
	objectID     = regexp.MustCompile(`^\s*ID:\s*([0-9a-f]+)`)
)

// tokenKeys reads the live public keys of serverID from the token with OpenSC's
// pkcs11-tool (not through the plugin), by SPIRE key id.
func tokenKeys(t *testing.T, token, serverID string) map[string]crypto.PublicKey {
	t.Helper()
	tool := func(args ...string) []byte {
		base := []string{"--module", softHSMModule, "--token-label", token, "--login", "--pin", "1234"}
		out, err := exec.Command("pkcs11-tool", append(base, args...)...).CombinedOutput()
		require.NoError(t, err, string(out))
		return out
	}
	keys := map[string]crypto.PublicKey{}
	var label string
	inPublic := false
	for _, line := range strings.Split(string(tool("--list-objects", "--type", "pubkey")), "\n") {
		if objectHeader.MatchString(line) {
			inPublic, label = true, ""
			continue
		}
		if m := objectLabel.FindStringSubmatch(line); inPublic && m != nil {
			label = m[1]
		}
		m := objectID.FindStringSubmatch(line)
		if !inPublic || m == nil {
			continue
		}
		parts := strings.Split(label, ":")
		if len(parts) != 6 || parts[0] != "spire" || parts[1] != "live" || parts[3] != serverID {
			continue
		}
		out := filepath.Join(t.TempDir(), "key.der")
		tool("--read-object", "--type", "pubkey", "--id", m[1], "-o", out)
		der, err := os.ReadFile(out)
		require.NoError(t, err)
		key, err := x509.ParsePKIXPublicKey(der)
		require.NoError(t, err)
		keys[parts[4]] = key
	}
	return keys
}

// TestRealSpireServerPkcs11: a real spire-server with its keys on a SoftHSM2 token mints
// X.509- and JWT-SVIDs that verify against its bundle, signed by keys that live on the
// token (read back with pkcs11-tool), and restarts onto the same CA key.
func TestRealSpireServerPkcs11(t *testing.T) {
	token := softHSMToken(t)
	s := newSpireServerWith(t, func(*spireServer) string {
		return "plugin_data {\n" + pkcs11PluginData(token, "server-a") + "}"
	})
	s.storeKeys = func() map[string]crypto.PublicKey { return tokenKeys(t, token, "server-a") }
	s.start(1)
	root := s.mintAndVerify(t)
	requireCleanPluginExitOf(t, s.stop())
	s.start(2)
	require.True(t, s.mintAndVerify(t).PublicKey.(equaler).Equal(root.PublicKey), "restart reuses the CA key on the token")
	requireCleanPluginExitOf(t, s.stop())
}
