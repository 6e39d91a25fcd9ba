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

// softToken is a PKCS#11 token the tests initialised: its module, label and user PIN.
type softToken struct{ module, label, pin string }

// pkcs11Peers are the two independent software tokens every pkcs11 test runs on.
var pkcs11Peers = []struct {
	name string
	new  func(t *testing.T) softToken
}{{"SoftHSM2", softHSMToken}, {"kryoptic", kryopticToken}}

// The planted PINs of every software token the tests initialise.
var (
	pkcs11UserPIN = planted("pkcs11-user-pin")
	pkcs11SOPIN   = planted("pkcs11-so-pin")
)

// softHSMToken initialises a fresh SoftHSM2 token (user PIN pkcs11UserPIN) in the run's token
// directory (SOFTHSM2_CONF, set by scripts/test-all.sh).
func softHSMToken(t *testing.T) softToken {
	t.Helper()
	if os.Getenv("SOFTHSM2_CONF") == "" {
		t.Fatal("SOFTHSM2_CONF must point at a SoftHSM2 configuration (scripts/test-all.sh sets it)")
	}
	label := fmt.Sprintf("go-%d-%d", os.Getpid(), tokenCounter.Add(1))
	out, err := exec.Command("softhsm2-util", "--init-token", "--free", "--label", label,
		"--pin", pkcs11UserPIN, "--so-pin", pkcs11SOPIN).CombinedOutput()
	require.NoError(t, err, string(out))
	return softToken{softHSMModule, label, pkcs11UserPIN}
}

var uninitializedSlot = regexp.MustCompile(`(?m)^Slot \d+ \((0x[0-9a-f]+)\):.*\n\s*token state:\s*uninitialized`)

// kryopticToken initialises a token in a free slot of kryoptic (KRYOPTIC_MODULE and
// KRYOPTIC_CONF, built and written by scripts/test-all.sh) with OpenSC's pkcs11-tool.
func kryopticToken(t *testing.T) softToken {
	t.Helper()
	module := os.Getenv("KRYOPTIC_MODULE")
	if module == "" || os.Getenv("KRYOPTIC_CONF") == "" {
		t.Fatal("KRYOPTIC_MODULE and KRYOPTIC_CONF must be set (scripts/test-all.sh builds kryoptic and sets them)")
	}
	tool := func(args ...string) string {
		out, err := exec.Command("pkcs11-tool", append([]string{"--module", module}, args...)...).CombinedOutput()
		require.NoError(t, err, string(out))
		return string(out)
	}
	m := uninitializedSlot.FindStringSubmatch(tool("--list-slots"))
	require.NotNil(t, m, "no free kryoptic slot in KRYOPTIC_CONF")
	label := fmt.Sprintf("go-%d-%d", os.Getpid(), tokenCounter.Add(1))
	tool("--slot", m[1], "--init-token", "--label", label, "--so-pin", pkcs11SOPIN)
	tool("--slot", m[1], "--init-pin", "--login", "--so-pin", pkcs11SOPIN, "--pin", pkcs11UserPIN)
	return softToken{module, label, pkcs11UserPIN}
}

func pkcs11PluginData(token softToken, serverID string) string {
	return fmt.Sprintf("backend = \"pkcs11\"\nmodule = %q\ntoken_label = %q\npin = %q\nkey_identifier_value = %q\n",
		token.module, token.label, token.pin, serverID)
}

// TestConformancePkcs11 runs SPIRE's conformance suite on the pkcs11 backend with each
// software token; ECDSA is signed with the curve's own hash, as on the cloud KMSes.
func TestConformancePkcs11(t *testing.T) {
	for _, peer := range pkcs11Peers {
		t.Run(peer.name, func(t *testing.T) {
			token := peer.new(t)
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
		})
	}
}

var (
	objectHeader = regexp.MustCompile(`^Public Key Object;`)
	objectLabel  = regexp.MustCompile(`^\s*label:\s*(\S+)`)
	objectID     = regexp.MustCompile(`^\s*ID:\s*([0-9a-f]+)`)
)

// tokenKeys reads the live public keys of serverID from the token with OpenSC's
// pkcs11-tool (not through the plugin), by SPIRE key id.
func tokenKeys(t *testing.T, token softToken, serverID string) map[string]crypto.PublicKey {
	t.Helper()
	tool := func(args ...string) []byte {
		base := []string{"--module", token.module, "--token-label", token.label, "--login", "--pin", token.pin}
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
// It runs on every spire-server release, one after the other.
func TestRealSpireServerPkcs11(t *testing.T) { forEachSpireServer(t, false, realSpireServerPkcs11) }

func realSpireServerPkcs11(t *testing.T, _ spireServerRelease) {
	for _, peer := range pkcs11Peers {
		t.Run(peer.name, func(t *testing.T) {
			token := peer.new(t)
			s := newSpireServerWith(t, func(*spireServer) string {
				return "plugin_data {\n" + pkcs11PluginData(token, "server-a") + "}"
			})
			s.storeKeys = func() map[string]crypto.PublicKey { return tokenKeys(t, token, "server-a") }
			s.start(1)
			root := s.mintAndVerify(t)
			log := s.stop()
			requireCleanPluginExitOf(t, log)
			require.Contains(t, log, "PKCS#11 module finalised (C_Finalize)", "the module is finalised at shutdown")
			s.start(2)
			require.True(t, s.mintAndVerify(t).PublicKey.(equaler).Equal(root.PublicKey), "restart reuses the CA key on the token")
			requireCleanPluginExitOf(t, s.stop())
		})
	}
}
