package spire_test

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// operatorRun is one run of the operator CLI.
type operatorRun struct {
	code   int
	stdout string
	stderr string
}

// runOperator runs `kms-keymanager ARGS…` and returns its exit code and output.
func runOperator(t *testing.T, args ...string) operatorRun {
	t.Helper()
	cmd := exec.Command(pluginBinary(t), args...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if exit, ok := err.(*exec.ExitError); ok {
		code = exit.ExitCode()
	} else {
		require.NoError(t, err)
	}
	_, _ = fmt.Fprintf(testLogWriter("cli-"+t.Name()), "$ kms-keymanager %s\n--- exit %d, stdout:\n%s--- stderr:\n%s", strings.Join(args, " "), code, stdout.String(), stderr.String())
	return operatorRun{code: code, stdout: stdout.String(), stderr: stderr.String()}
}

// bundleFingerprints is the set of SHA-256 fingerprints (lowercase hex of the PKIX DER, as
// the plugin reports them) of every key in the server's bundle: X.509 authorities and JWT keys.
func bundleFingerprints(t *testing.T, s *spireServer) []string {
	t.Helper()
	td := spiffeid.RequireTrustDomainFromString(trustDomain)
	bundle, err := spiffebundle.Parse(td, []byte(s.mustCLI("bundle", "show", "-format", "spiffe")))
	require.NoError(t, err)
	var out []string
	add := func(key any) {
		der, err := x509.MarshalPKIXPublicKey(key)
		require.NoError(t, err)
		sum := sha256.Sum256(der)
		out = append(out, hex.EncodeToString(sum[:]))
	}
	for _, ca := range bundle.X509Authorities() {
		add(ca.PublicKey)
	}
	for _, key := range bundle.JWTAuthorities() {
		add(key)
	}
	sort.Strings(out)
	return out
}

// listedFingerprints runs `keys list --json` on server.conf and returns the fingerprints.
func listedFingerprints(t *testing.T, conf string) []string {
	t.Helper()
	run := runOperator(t, "keys", "list", "--server-conf", conf, "--json")
	require.Equal(t, 0, run.code, run.stderr)
	var listed struct {
		Backend string `json:"backend"`
		Keys    []struct {
			KeyID       string `json:"key_id"`
			Fingerprint string `json:"fingerprint"`
			State       string `json:"state"`
		} `json:"keys"`
	}
	require.NoError(t, json.Unmarshal([]byte(run.stdout), &listed), run.stdout)
	var out []string
	for _, k := range listed.Keys {
		require.Equal(t, "active", k.State, "key %s", k.KeyID)
		out = append(out, k.Fingerprint)
	}
	sort.Strings(out)
	return out
}

// TestOperatorCLIOnRealSpireServer: `keys list` reads SPIRE's own server.conf and shows exactly
// the keys in spire-server's bundle (same fingerprints), on aws_kms (moto) and gcp_kms (the
// fake with IAM enforced); `doctor` passes with the documented permissions; `keys delete` of
// the CA key in use is refused and the server keeps minting.
func TestOperatorCLIOnRealSpireServer(t *testing.T) {
	endpoint := startMoto(t)
	gcp := newGcpEnv(t, "--generation-delay", "0.05")
	for _, backend := range []struct {
		name  string
		data  string
		store func() map[string]crypto.PublicKey
	}{
		{"aws_kms", awsPluginData(endpoint, "server-a"), func() map[string]crypto.PublicKey { return kmsKeysOf(t, endpoint, "server-a") }},
		{"gcp_kms", gcp.pluginData("server-a"), func() map[string]crypto.PublicKey { return gcp.standardKeysOf(t, "server-a") }},
		// JWT keys in shared CryptoKeys, filed under the shared owner: still this server's.
		{"gcp_kms_shared_keys", gcp.pluginData("server-s", sharedKeys("op")), func() map[string]crypto.PublicKey {
			keys := gcp.standardKeysOf(t, "server-s")
			for id, key := range gcp.keysOf(t, func(k *gcpFakeCryptoKey) string {
				if k.Labels["spire-shared"] != "true" {
					return ""
				}
				return k.Name[strings.LastIndex(k.Name, "-JWT-Signer-")+1:]
			}) {
				keys[id] = key
			}
			return keys
		}},
	} {
		t.Run(backend.name, func(t *testing.T) {
			s := newSpireServerWith(t, func(*spireServer) string {
				return "plugin_data {\n" + backend.data + "}"
			})
			s.storeKeys = backend.store
			s.start(1)
			s.mintAndVerify(t)
			require.Equal(t, bundleFingerprints(t, s), listedFingerprints(t, s.conf),
				"keys list must show exactly the keys in spire-server's bundle")

			doctor := runOperator(t, "doctor", "--server-conf", s.conf)
			require.Equal(t, 0, doctor.code, "doctor:\n%s\n%s", doctor.stdout, doctor.stderr)
			require.NotContains(t, doctor.stdout, "[FAIL]")

			refused := runOperator(t, "keys", "delete", "x509-CA-A", "--server-conf", s.conf, "--yes")
			require.Equal(t, 1, refused.code, refused.stdout)
			require.Contains(t, refused.stderr, "refusing to delete")
			s.mintAndVerify(t)
			requireCleanPluginExitOf(t, s.stop())
		})
	}
}

// TestOperatorDoctorNamesMissingGcpPermission: with one documented permission missing on the
// key ring (the fake enforces IAM), doctor fails and names it, using Cloud KMS's own
// testIamPermissions.
func TestOperatorDoctorNamesMissingGcpPermission(t *testing.T) {
	env := newGcpEnvWith(t, without(gcpDocumentedPermissions(t), "cloudkms.cryptoKeyVersions.destroy"))
	dir := t.TempDir()
	data := filepath.Join(dir, "plugin_data.hcl")
	require.NoError(t, os.WriteFile(data, []byte(env.pluginData("server-a")), 0o600))
	run := runOperator(t, "doctor", "--plugin-data", data, "--trust-domain", trustDomain)
	require.Equal(t, 1, run.code, "doctor:\n%s\n%s", run.stdout, run.stderr)
	require.Contains(t, run.stdout, "[FAIL] permissions on the key ring: missing on "+env.ring+": cloudkms.cryptoKeyVersions.destroy")

	full := newGcpEnv(t)
	require.NoError(t, os.WriteFile(data, []byte(full.pluginData("server-a")), 0o600))
	run = runOperator(t, "doctor", "--plugin-data", data, "--trust-domain", trustDomain, "--json")
	require.Equal(t, 0, run.code, "doctor:\n%s\n%s", run.stdout, run.stderr)
	var report struct {
		OK bool `json:"ok"`
	}
	require.NoError(t, json.Unmarshal([]byte(run.stdout), &report))
	require.True(t, report.OK)
}

// TestOperatorOnAzureKeyVault: the operator CLI on the Key Vault fake with keys our plugin
// made: `keys list` shows the plugin's fingerprint, disable/enable round-trip in the vault,
// `doctor` passes and, when the vault's access control refuses listing, fails naming it.
func TestOperatorOnAzureKeyVault(t *testing.T) {
	fake := startAzureKeyVaultFake(t)
	p := loadOurAzure(t, fake, "server-a")
	key, err := p.KeyManager.GenerateKey(context.Background(), "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	require.NoError(t, err)
	sum := sha256.Sum256(der)
	require.NoError(t, p.catalog.Close())

	data := filepath.Join(t.TempDir(), "plugin_data.hcl")
	require.NoError(t, os.WriteFile(data, []byte(ourAzurePluginData(fake, "server-a")), 0o600))
	source := []string{"--plugin-data", data, "--trust-domain", trustDomain}
	list := func() string {
		run := runOperator(t, append([]string{"keys", "list", "--json"}, source...)...)
		require.Equal(t, 0, run.code, run.stderr)
		return run.stdout
	}
	require.Contains(t, list(), hex.EncodeToString(sum[:]))

	disable := runOperator(t, append([]string{"keys", "disable", "x509-CA-A", "--force"}, source...)...)
	require.Equal(t, 0, disable.code, disable.stderr)
	require.Contains(t, list(), `"state": "disabled"`)
	live, _ := fake.State(t)
	require.Len(t, live, 1)
	latest := live[0].Versions[len(live[0].Versions)-1]
	require.False(t, latest.Attributes.Enabled, "the vault holds the key disabled")
	enable := runOperator(t, append([]string{"keys", "enable", "x509-CA-A"}, source...)...)
	require.Equal(t, 0, enable.code, enable.stderr)
	require.Contains(t, list(), `"state": "active"`)

	doctor := runOperator(t, append([]string{"doctor"}, source...)...)
	require.Equal(t, 0, doctor.code, "doctor:\n%s\n%s", doctor.stdout, doctor.stderr)
	fake.Deny(t, "list")
	doctor = runOperator(t, append([]string{"doctor"}, source...)...)
	require.Equal(t, 1, doctor.code, doctor.stdout)
	require.Contains(t, doctor.stdout, "[FAIL] credentials and keys/list")
	require.Contains(t, doctor.stdout, "Key Vault Crypto User")
}
