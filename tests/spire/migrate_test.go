package spire_test

import (
	"crypto"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
)

// TestMigrateDiskToKMSKeepsTheBundle: a spire-server on disk mints SVIDs; `keys migrate`
// copies its keys into aws_kms (LocalStack, which really unwraps imported key material) and
// gcp_kms (the Cloud KMS fake with ImportJobs); server.conf is switched to the KMS and the
// keys file moved away, then spire-server restarts: `bundle show` is byte-identical, the
// SVIDs minted before still verify, and new SVIDs verify and are signed by keys in the KMS.
func TestMigrateDiskToKMSKeepsTheBundle(t *testing.T) {
	endpoint := startLocalStack(t)
	gcp := newGcpEnv(t, "--generation-delay", "0.05")
	for _, target := range []struct {
		name  string
		data  string
		store func() map[string]crypto.PublicKey
	}{
		{"aws_kms", awsPluginData(endpoint, "migrated"), func() map[string]crypto.PublicKey { return kmsKeysOf(t, endpoint, "migrated") }},
		{"gcp_kms", gcp.pluginData("migrated"), func() map[string]crypto.PublicKey { return gcp.standardKeysOf(t, "migrated") }},
	} {
		t.Run(target.name, func(t *testing.T) {
			s := newSpireServer(t)
			s.start(1)
			s.mintAndVerify(t)
			bundleBefore := s.mustCLI("bundle", "show", "-format", "spiffe")
			x509Dir := t.TempDir()
			id := spiffeid.RequireFromString("spiffe://example.org/before-migration")
			s.mustCLI("x509", "mint", "-spiffeID", id.String(), "-write", x509Dir)
			token := strings.TrimSpace(s.mustCLI("jwt", "mint", "-spiffeID", id.String(), "-audience", "migration"))
			requireCleanPluginExitOf(t, s.stop())

			targetData := filepath.Join(s.dir, "target.hcl")
			require.NoError(t, os.WriteFile(targetData, []byte(target.data), 0o600))
			plan := runOperator(t, "keys", "migrate", "--from-server-conf", s.conf, "--to-plugin-data", targetData,
				"--trust-domain", trustDomain, "--dry-run", "--json")
			require.Equal(t, 0, plan.code, plan.stderr)
			migrated := runOperator(t, "keys", "migrate", "--from-server-conf", s.conf, "--to-plugin-data", targetData,
				"--trust-domain", trustDomain, "--json")
			require.Equal(t, 0, migrated.code, migrated.stderr)
			var report struct {
				Imported []struct {
					KeyID string `json:"key_id"`
				} `json:"imported"`
			}
			require.NoError(t, json.Unmarshal([]byte(migrated.stdout), &report), migrated.stdout)
			require.NotEmpty(t, report.Imported)

			// Switch server.conf to the KMS; the keys file goes away, so every signature
			// from now on is the KMS's.
			conf, err := os.ReadFile(s.conf)
			require.NoError(t, err)
			diskBlock := "plugin_data {\n            keys_path = \"" + s.keysPath() + "\"\n        }"
			require.Contains(t, string(conf), diskBlock)
			switched := strings.Replace(string(conf), diskBlock, "plugin_data {\n"+target.data+"}", 1)
			require.NoError(t, os.WriteFile(s.conf, []byte(switched), 0o600))
			require.NoError(t, os.Rename(s.keysPath(), s.keysPath()+".migrated"))
			s.storeKeys = target.store

			s.start(2)
			bundleAfter := s.mustCLI("bundle", "show", "-format", "spiffe")
			require.Equal(t, bundleBefore, bundleAfter, "the bundle must not change")
			td := spiffeid.RequireTrustDomainFromString(trustDomain)
			bundle, err := spiffebundle.Parse(td, []byte(bundleAfter))
			require.NoError(t, err)
			old, err := x509svid.Load(filepath.Join(x509Dir, "svid.pem"), filepath.Join(x509Dir, "key.pem"))
			require.NoError(t, err)
			_, _, err = x509svid.Verify(old.Certificates, bundle.X509Bundle())
			require.NoError(t, err, "an X.509-SVID minted before the migration still verifies")
			_, err = jwtsvid.ParseAndValidate(token, bundle.JWTBundle(), []string{"migration"})
			require.NoError(t, err, "a JWT-SVID minted before the migration still verifies")
			// mintAndVerify also checks that the CA and JWT keys that signed are in the KMS.
			s.mintAndVerify(t)
			_, err = os.Stat(s.keysPath())
			require.True(t, os.IsNotExist(err), "spire-server on the KMS never recreated the keys file")
			requireCleanPluginExitOf(t, s.stop())
		})
	}
}
