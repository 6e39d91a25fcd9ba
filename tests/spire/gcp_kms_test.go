package spire_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	keymanagertest "github.com/spiffe/spire/pkg/server/plugin/keymanager/test"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
)

// gcpEnv is a Cloud KMS fake that verifies credentials and enforces IAM (--require-auth),
// with a key ring and the plugin's service account: a generated key, registered with the fake,
// holding on the key ring exactly the permissions README.md documents for gcp_kms (through a
// custom role).
type gcpEnv struct {
	fake   *gcpKmsFake
	ring   string
	sa     *gcpServiceAccountKey
	saFile string
	email  string
}

const (
	gcpProject        = "test-project"
	gcpServiceAccount = "spire-server@test-project.iam.gserviceaccount.com"
	// gcpPluginRole is the custom role the plugin's service account holds on the key ring.
	gcpPluginRole = "projects/test-project/roles/spireKeyManager"
)

func newGcpEnv(t *testing.T, fakeArgs ...string) *gcpEnv {
	t.Helper()
	return newGcpEnvWith(t, gcpDocumentedPermissions(t), fakeArgs...)
}

// newGcpEnvWith is newGcpEnv with these permissions for the plugin on the key ring instead.
func newGcpEnvWith(t *testing.T, permissions []string, fakeArgs ...string) *gcpEnv {
	t.Helper()
	return newGcpEnvOn(t, startGcpKmsFake(t, append([]string{"--require-auth"}, fakeArgs...)...), permissions)
}

// newGcpEnvOn sets up the key ring and the plugin's service account on a running fake
// (started with --require-auth).
func newGcpEnvOn(t *testing.T, fake *gcpKmsFake, permissions []string) *gcpEnv {
	t.Helper()
	ring := "projects/" + gcpProject + "/locations/europe-west1/keyRings/spire"
	fake.CreateKeyRing(t, ring)
	// A real service account key file: the plugin signs its own JWTs with it.
	sa := fake.NewServiceAccount(t, "spire-server", gcpProject)
	fake.CreateRole(t, gcpPluginRole, permissions)
	fake.Grant(t, ring, gcpPluginRole, sa.Member())
	return &gcpEnv{fake: fake, ring: ring, sa: sa, saFile: sa.File(t), email: sa.Email}
}

// gcpDocumentedPermissions is the permission list of README.md's "Required permissions
// (gcp_kms)" paragraph, so that the tests grant what the documentation says.
func gcpDocumentedPermissions(t testing.TB) []string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	require.NoError(t, err)
	_, rest, ok := strings.Cut(string(data), "**Required permissions (gcp_kms)**")
	require.True(t, ok, "README.md has no \"Required permissions (gcp_kms)\" paragraph")
	paragraph, _, _ := strings.Cut(rest, "\n\n")
	var perms []string
	for _, m := range regexp.MustCompile("`(cloudkms\\.[A-Za-z]+\\.[A-Za-z]+)`").FindAllStringSubmatch(paragraph, -1) {
		if !slices.Contains(perms, m[1]) {
			perms = append(perms, m[1])
		}
	}
	require.GreaterOrEqual(t, len(perms), 10, "permissions found in README.md: %v", perms)
	return perms
}

// without returns perms minus the given ones.
func without(perms []string, drop ...string) []string {
	var out []string
	for _, p := range perms {
		if !slices.Contains(drop, p) {
			out = append(out, p)
		}
	}
	return out
}

// pluginData configures the gcp_kms backend against the fake.
func (e *gcpEnv) pluginData(serverID string, extra ...string) string {
	return e.pluginDataVia(e.fake.Endpoint, serverID, extra...)
}

// pluginDataVia is pluginData with the Cloud KMS API at endpoint (a fault proxy in front of
// the fake; the service account's token endpoint stays the fake's).
func (e *gcpEnv) pluginDataVia(endpoint, serverID string, extra ...string) string {
	return fmt.Sprintf(`backend = "gcp_kms"
key_ring = %q
endpoint = %q
service_account_file = %q
key_identifier_value = %q
`, e.ring, endpoint, e.saFile, serverID) + strings.Join(extra, "\n") + "\n"
}

// sharedKeys is a shared_keys block whose CryptoKeys start with prefix.
func sharedKeys(prefix string, extra ...string) string {
	return fmt.Sprintf(`shared_keys {
    crypto_key_template = "%s-{{ .TrustDomain }}-{{ .KeyID }}"
    key_id_extraction_regex = "^%s-[0-9a-f]+-(.+)$"
    %s
}`, prefix, prefix, strings.Join(extra, "\n    "))
}

// publicKey reads a version's public key straight from the fake's REST API.
func (e *gcpEnv) publicKey(t *testing.T, version string) crypto.PublicKey {
	t.Helper()
	var body struct{ Pem string }
	e.fake.do(t, http.MethodGet, "/v1/"+version+"/publicKey", nil, &body)
	block, _ := pem.Decode([]byte(body.Pem))
	require.NotNil(t, block)
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	require.NoError(t, err)
	return pub
}

// enabledVersions lists a CryptoKey's ENABLED versions, oldest first.
func enabledVersions(key *gcpFakeCryptoKey) []gcpFakeVersion {
	var out []gcpFakeVersion
	for _, v := range key.Versions {
		if v.State == "ENABLED" {
			out = append(out, v)
		}
	}
	return out
}

// keysOf lists, by SPIRE key id, the newest enabled public key of every CryptoKey that
// keyID names (keyID returns "" for CryptoKeys that are not this server's).
func (e *gcpEnv) keysOf(t *testing.T, keyID func(*gcpFakeCryptoKey) string) map[string]crypto.PublicKey {
	keys := map[string]crypto.PublicKey{}
	state := e.fake.State(t, e.ring)
	for i := range state.CryptoKeys {
		key := &state.CryptoKeys[i]
		id := keyID(key)
		enabled := enabledVersions(key)
		if id == "" || len(enabled) == 0 {
			continue
		}
		keys[id] = e.publicKey(t, enabled[len(enabled)-1].Name)
	}
	return keys
}

func (e *gcpEnv) standardKeysOf(t *testing.T, serverID string) map[string]crypto.PublicKey {
	prefix := "spire-key-" + serverID + "-"
	return e.keysOf(t, func(k *gcpFakeCryptoKey) string {
		id := k.Name[strings.LastIndex(k.Name, "/")+1:]
		if k.Labels["spire-server-id"] != serverID || !strings.HasPrefix(id, prefix) {
			return ""
		}
		return strings.TrimPrefix(id, prefix)
	})
}

func tdHash() string {
	sum := sha1.Sum([]byte(trustDomain))
	return hex.EncodeToString(sum[:])
}

func gcpConformance(t *testing.T, env *gcpEnv, shared bool) {
	n := 0
	keymanagertest.Test(t, keymanagertest.Config{
		Create: func(t *testing.T) keymanager.KeyManager {
			n++
			extra := ""
			if shared {
				// Every conformance key id goes through the shared path (fresh CryptoKeys
				// per key manager: the suite expects an empty store each time).
				extra = sharedKeys(fmt.Sprintf("conf%d", n), `shared_key_ids = ".*"`)
			}
			return loadExternal(t, env.pluginData(fmt.Sprintf("conformance-%d", n), extra)).KeyManager
		},
		UnsupportedSignatureAlgorithms: map[keymanager.KeyType][]x509.SignatureAlgorithm{
			keymanager.ECP256:  {x509.ECDSAWithSHA384, x509.ECDSAWithSHA512},
			keymanager.ECP384:  {x509.ECDSAWithSHA256, x509.ECDSAWithSHA512},
			keymanager.RSA2048: {x509.SHA384WithRSA, x509.SHA512WithRSA, x509.SHA256WithRSAPSS, x509.SHA384WithRSAPSS, x509.SHA512WithRSAPSS},
			keymanager.RSA4096: {x509.SHA384WithRSA, x509.SHA512WithRSA, x509.SHA256WithRSAPSS, x509.SHA384WithRSAPSS, x509.SHA512WithRSAPSS},
		},
	})
}

// TestConformanceGcpKms runs SPIRE's KeyManager conformance suite on gcp_kms, in standard
// and in shared-keys mode, against the Cloud KMS fake.
func TestConformanceGcpKms(t *testing.T) {
	env := newGcpEnv(t, "--generation-delay", "0.02")
	t.Run("standard", func(t *testing.T) { gcpConformance(t, env, false) })
	t.Run("shared_keys", func(t *testing.T) { gcpConformance(t, env, true) })
}

// TestGcpKmsKeysLiveInKms checks in the KMS what the plugin did: SPIRE's CryptoKey name and
// labels, the IAM policy, versions (rotation destroys the replaced one), restart, key type
// change, slow generation, the hash rule and the CRC32C checks.
func TestGcpKmsKeysLiveInKms(t *testing.T) {
	ctx := context.Background()
	env := newGcpEnv(t, "--generation-delay", "0.02")
	p := loadExternal(t, env.pluginData("server-a"))

	first, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	state := env.fake.State(t, env.ring)
	key := state.Key("spire-key-server-a-x509-CA-A")
	require.NotNil(t, key, "SPIRE's CryptoKey id spire-key-<server id>-<key id>")
	require.Equal(t, "ASYMMETRIC_SIGN", key.Purpose)
	require.Equal(t, "EC_SIGN_P256_SHA256", key.VersionTemplate.Algorithm)
	require.Equal(t, tdHash(), key.Labels["spire-server-td"])
	require.Equal(t, "server-a", key.Labels["spire-server-id"])
	require.Equal(t, "true", key.Labels["spire-active"])
	require.NotEmpty(t, key.Labels["spire-last-update"])
	require.Len(t, key.IamPolicy.Bindings, 1)
	require.Equal(t, "roles/cloudkms.signerVerifier", key.IamPolicy.Bindings[0].Role)
	require.Equal(t, []string{"serviceAccount:" + gcpServiceAccount}, key.IamPolicy.Bindings[0].Members)
	require.Len(t, enabledVersions(key), 1)
	require.True(t, env.publicKey(t, key.Versions[0].Name).(equaler).Equal(first.Public()), "SPIRE got the KMS key")
	// The plugin authenticated as the service account (self-signed JWTs from the key file).
	require.NotZero(t, env.fake.Callers(t)[gcpServiceAccount]["cryptoKeys.create"])

	digest := sha256.Sum256([]byte("signed in Cloud KMS"))
	sig, err := first.Sign(rand.Reader, digest[:], crypto.SHA256)
	require.NoError(t, err)
	require.True(t, ecdsa.VerifyASN1(first.Public().(*ecdsa.PublicKey), digest[:], sig))

	// The hash must match the key's algorithm: refused before any call, naming the algorithm.
	env.fake.ResetCalls(t)
	d384 := sha512.Sum384([]byte("wrong hash"))
	_, err = first.Sign(rand.Reader, d384[:], crypto.SHA384)
	requireStatus(t, err, codes.InvalidArgument, "EC_SIGN_P256_SHA256")
	require.Zero(t, env.fake.Calls(t)["cryptoKeyVersions.asymmetricSign"])

	// Rotation adds a version and schedules the replaced one for destruction.
	second, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	key = env.fake.State(t, env.ring).Key("spire-key-server-a-x509-CA-A")
	require.Len(t, key.Versions, 2)
	require.Equal(t, "DESTROY_SCHEDULED", key.Versions[0].State)
	require.NotNil(t, key.Versions[0].DestroyTime)
	require.Equal(t, "ENABLED", key.Versions[1].State)
	require.True(t, env.publicKey(t, key.Versions[1].Name).(equaler).Equal(second.Public()))

	// A restarted plugin finds the same key; another server id sees nothing.
	again := loadExternal(t, env.pluginData("server-a"))
	got, err := again.KeyManager.GetKey(ctx, "x509-CA-A")
	require.NoError(t, err)
	require.True(t, got.Public().(equaler).Equal(second.Public()))
	other := loadExternal(t, env.pluginData("server-b"))
	keys, err := other.KeyManager.GetKeys(ctx)
	require.NoError(t, err)
	require.Empty(t, keys)

	// A key type change updates the template and adds a version of the new algorithm.
	rsaKey, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.RSA2048)
	require.NoError(t, err)
	key = env.fake.State(t, env.ring).Key("spire-key-server-a-x509-CA-A")
	require.Equal(t, "RSA_SIGN_PKCS1_2048_SHA256", key.VersionTemplate.Algorithm)
	require.Len(t, enabledVersions(key), 1)
	sig, err = rsaKey.Sign(rand.Reader, digest[:], crypto.SHA256)
	require.NoError(t, err)
	require.NoError(t, rsa.VerifyPKCS1v15(rsaKey.Public().(*rsa.PublicKey), crypto.SHA256, digest[:], sig))

	// Slow generation (RSA-4096, HSM): the plugin waits with backoff instead of giving up
	// after SPIRE's ten quick tries (spiffe/spire#6923).
	env.fake.SetGenerationDelay(t, 3*time.Second)
	started := time.Now()
	_, err = p.KeyManager.GenerateKey(ctx, "JWT-Signer-A", keymanager.ECP256)
	require.NoError(t, err)
	require.GreaterOrEqual(t, time.Since(started), 3*time.Second)
	env.fake.SetGenerationDelay(t, 20*time.Millisecond)

	// CRC32C: a corrupted signature or public key is never used. Once, the read is retried;
	// persistently, the GenerateKey fails and the unusable new version is destroyed.
	env.fake.ResetCalls(t)
	env.fake.Corrupt(t, "asymmetricSign", "signatureCrc32c", 1)
	sig, err = rsaKey.Sign(rand.Reader, digest[:], crypto.SHA256)
	require.NoError(t, err)
	require.NoError(t, rsa.VerifyPKCS1v15(rsaKey.Public().(*rsa.PublicKey), crypto.SHA256, digest[:], sig))
	require.Equal(t, 2, env.fake.Calls(t)["cryptoKeyVersions.asymmetricSign"])
	env.fake.ResetCalls(t)
	env.fake.Corrupt(t, "getPublicKey", "pemCrc32c", 1)
	caB, err := p.KeyManager.GenerateKey(ctx, "x509-CA-B", keymanager.ECP256)
	require.NoError(t, err)
	require.GreaterOrEqual(t, env.fake.Calls(t)["cryptoKeyVersions.getPublicKey"], 2, "the corrupted read was repeated")
	env.fake.Corrupt(t, "getPublicKey", "pemCrc32c", 100)
	_, err = p.KeyManager.GenerateKey(ctx, "x509-CA-B", keymanager.ECP256)
	requireStatus(t, err, codes.Unavailable, "CRC32C")
	env.fake.Corrupt(t, "getPublicKey", "pemCrc32c", 0)
	current, err := p.KeyManager.GetKey(ctx, "x509-CA-B")
	require.NoError(t, err)
	require.True(t, current.Public().(equaler).Equal(caB.Public()), "the current key stays in service")
	caBKey := env.fake.State(t, env.ring).Key("spire-key-server-a-x509-CA-B")
	require.Len(t, caBKey.Versions, 2)
	require.Equal(t, "ENABLED", caBKey.Versions[0].State)
	require.Equal(t, "DESTROY_SCHEDULED", caBKey.Versions[1].State, "the unusable new version is aborted")
}

// TestGcpKmsCustomPolicyAndBadInput: key_policy_file replaces the default policy; bad
// configuration names the key and what is allowed.
func TestGcpKmsCustomPolicyAndBadInput(t *testing.T) {
	ctx := context.Background()
	env := newGcpEnv(t, "--generation-delay", "0")
	policy := filepath.Join(t.TempDir(), "policy.json")
	require.NoError(t, os.WriteFile(policy, []byte(`{"version": 3, "bindings": [
        {"role": "roles/cloudkms.signer", "members": ["group:spire-admins@example.org"]}]}`), 0o600))
	p := loadExternal(t, env.pluginData("custom", fmt.Sprintf("key_policy_file = %q", policy)))
	_, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP384)
	require.NoError(t, err)
	key := env.fake.State(t, env.ring).Key("spire-key-custom-x509-CA-A")
	require.Len(t, key.IamPolicy.Bindings, 1)
	require.Equal(t, "roles/cloudkms.signer", key.IamPolicy.Bindings[0].Role)
	require.Equal(t, []string{"group:spire-admins@example.org"}, key.IamPolicy.Bindings[0].Members)

	// A CryptoKey that already exists with bindings (made by an operator, or left by an
	// earlier run) is taken over with a new version; its policy is left alone.
	existing := env.ring + "/cryptoKeys/spire-key-custom-x509-CA-B"
	env.fake.do(t, http.MethodPost, "/v1/"+env.ring+"/cryptoKeys?cryptoKeyId=spire-key-custom-x509-CA-B&skipInitialVersionCreation=true",
		map[string]any{"purpose": "ASYMMETRIC_SIGN", "versionTemplate": map[string]any{"algorithm": "EC_SIGN_P384_SHA384"}}, nil)
	env.fake.do(t, http.MethodPost, "/v1/"+existing+":setIamPolicy", map[string]any{"policy": map[string]any{
		"version": 3, "bindings": []any{map[string]any{"role": "roles/cloudkms.admin", "members": []string{"user:ops@example.org"}}},
	}}, nil)
	_, err = p.KeyManager.GenerateKey(ctx, "x509-CA-B", keymanager.ECP256)
	require.NoError(t, err)
	key = env.fake.State(t, env.ring).Key("spire-key-custom-x509-CA-B")
	require.Equal(t, "roles/cloudkms.admin", key.IamPolicy.Bindings[0].Role, "existing bindings are left alone")
	require.Len(t, key.IamPolicy.Bindings, 1)
	require.Equal(t, "true", key.Labels["spire-active"])
	require.Equal(t, "EC_SIGN_P256_SHA256", key.VersionTemplate.Algorithm)
	require.Len(t, enabledVersions(key), 1)

	for data, want := range map[string]string{
		`backend = "gcp_kms"` + "\n" + `key_identifier_value = "a"`: `"key_ring" is required`,
		env.pluginData("Upper-Case"):                                "lowercase letters",
		env.pluginData("a", `protection_level = "external"`):        `"software" or "hsm"`,
		env.pluginData("a", "shared_keys {\n crypto_key_template = \"k-{{ .KeyID }}\"\n key_id_extraction_regex = \"^k-(.+)-(.+)$\"\n}"): "has 2 capturing groups",
		env.pluginData("a", sharedKeys("a-much-too-long-prefix")):                                                                        "must be 1 to 63 characters",
	} {
		_, err := tryLoad(catalogConfig(t, data))
		require.Error(t, err, data)
		require.Contains(t, err.Error(), want)
	}
}

// TestRealSpireServerGcpKms: a real spire-server on gcp_kms mints SVIDs that verify against
// its bundle with keys that live in Cloud KMS, and finds the same CA key after a restart.
// It runs on every spire-server release, side by side (each with its own fake).
func TestRealSpireServerGcpKms(t *testing.T) { forEachSpireServer(t, true, realSpireServerGcpKms) }

func realSpireServerGcpKms(t *testing.T, _ spireServerRelease) {
	env := newGcpEnv(t, "--generation-delay", "0.05")
	s := newSpireServerWith(t, func(*spireServer) string {
		return "plugin_data {\n" + env.pluginData("server-a") + "}"
	})
	s.storeKeys = func() map[string]crypto.PublicKey { return env.standardKeysOf(t, "server-a") }
	s.start(1)
	root := s.mintAndVerify(t)
	requireCleanPluginExitOf(t, s.stop())
	s.start(2)
	require.True(t, s.mintAndVerify(t).PublicKey.(equaler).Equal(root.PublicKey), "restart reuses the CA key in Cloud KMS")
	requireCleanPluginExitOf(t, s.stop())
}

// TestRealSpireServersShareJWTKeys: two real spire-servers in shared-keys mode (own
// datastores, own CA keys) end up publishing the same JWT signing key, which lives in one
// shared CryptoKey with exactly one version.
func TestRealSpireServersShareJWTKeys(t *testing.T) {
	env := newGcpEnv(t, "--generation-delay", "0.05")
	newServer := func(serverID string) *spireServer {
		s := newSpireServerWith(t, func(*spireServer) string {
			return "plugin_data {\n" + env.pluginData(serverID, sharedKeys("jwt")) + "}"
		})
		s.storeKeys = func() map[string]crypto.PublicKey {
			keys := env.standardKeysOf(t, serverID)
			for id, key := range env.keysOf(t, func(k *gcpFakeCryptoKey) string {
				if k.Labels["spire-shared"] != "true" {
					return ""
				}
				return k.Name[strings.LastIndex(k.Name, "-JWT-Signer-")+1:]
			}) {
				keys[id] = key
			}
			return keys
		}
		return s
	}
	jwtKeys := func(s *spireServer) []crypto.PublicKey {
		out := s.mustCLI("bundle", "show", "-format", "spiffe")
		bundle, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString(trustDomain), []byte(out))
		require.NoError(t, err)
		var keys []crypto.PublicKey
		for _, key := range bundle.JWTBundle().JWTAuthorities() {
			keys = append(keys, key)
		}
		return keys
	}
	a, b := newServer("server-a"), newServer("server-b")
	a.start(1)
	b.start(1)
	rootA, rootB := a.mintAndVerify(t), b.mintAndVerify(t)
	require.False(t, rootA.PublicKey.(equaler).Equal(rootB.PublicKey), "X509 CA keys stay per-server")
	keysA, keysB := jwtKeys(a), jwtKeys(b)
	require.NotEmpty(t, keysA)
	shared := false
	for _, ka := range keysA {
		for _, kb := range keysB {
			shared = shared || ka.(equaler).Equal(kb)
		}
	}
	require.True(t, shared, "both servers publish the same JWT key")
	key := env.fake.State(t, env.ring).Key(fmt.Sprintf("jwt-%s-JWT-Signer-A", tdHash()))
	require.NotNil(t, key)
	require.Len(t, key.Versions, 1, "one shared version, not one per server")
	requireCleanPluginExitOf(t, a.stop())
	requireCleanPluginExitOf(t, b.stop())
}

// TestGcpKmsSharedRotationLock: N plugin instances rotate the same shared key at the same
// instant, 100 times: every time exactly one new version is created and all instances end
// up on it.
func TestGcpKmsSharedRotationLock(t *testing.T) {
	ctx := context.Background()
	env := newGcpEnv(t, "--generation-delay", "0")
	const instances, trials = 4, 100
	var kms []keymanager.KeyManager
	for i := 0; i < instances; i++ {
		kms = append(kms, loadExternal(t, env.pluginData(fmt.Sprintf("replica-%d", i), sharedKeys("locktest"))).KeyManager)
	}
	name := fmt.Sprintf("locktest-%s-JWT-Signer-A", tdHash())
	versions := func() int {
		key := env.fake.State(t, env.ring).Key(name)
		if key == nil {
			return 0
		}
		return len(key.Versions)
	}
	for trial := 0; trial < trials; trial++ {
		before := versions()
		start := make(chan struct{})
		results := make([]crypto.PublicKey, instances)
		errs := make([]error, instances)
		var wg sync.WaitGroup
		for i, km := range kms {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				key, err := km.GenerateKey(ctx, "JWT-Signer-A", keymanager.ECP256)
				errs[i] = err
				if err == nil {
					results[i] = key.Public()
				}
			}()
		}
		close(start)
		wg.Wait()
		for i := range kms {
			require.NoError(t, errs[i], "trial %d instance %d", trial, i)
			require.True(t, results[i].(equaler).Equal(results[0]), "trial %d: instance %d got another key", trial, i)
		}
		require.Equal(t, before+1, versions(), "trial %d: exactly one new version", trial)
	}
}

// TestGcpKmsSharedLockLeaseAfterCrash: a lock left by a holder that crashed before creating
// its version blocks the rotation only until its lease ends; then exactly one version is made.
func TestGcpKmsSharedLockLeaseAfterCrash(t *testing.T) {
	ctx := context.Background()
	env := newGcpEnv(t, "--generation-delay", "0")
	// Waiters take over a lease only once it has ended plus clock_skew_allowance.
	skew := 3 * time.Second
	p := loadExternal(t, env.pluginData("survivor", sharedKeys("crash"), fmt.Sprintf("clock_skew_allowance = \"%ds\"", int(skew.Seconds()))))
	_, err := p.KeyManager.GenerateKey(ctx, "JWT-Signer-A", keymanager.ECP256)
	require.NoError(t, err)
	name := fmt.Sprintf("%s/cryptoKeys/crash-%s-JWT-Signer-A", env.ring, tdHash())

	// The crashed holder's lock for rotating away from version 1 (documented id scheme).
	sum := sha1.Sum([]byte(name + "@1"))
	lockID := "spire-lock-" + hex.EncodeToString(sum[:])[:24] + "-0"
	lease := 6 * time.Second
	env.fake.do(t, http.MethodPost, "/v1/"+env.ring+"/cryptoKeys?cryptoKeyId="+lockID+"&skipInitialVersionCreation=true", map[string]any{
		"purpose":         "ASYMMETRIC_SIGN",
		"versionTemplate": map[string]any{"algorithm": "EC_SIGN_P256_SHA256"},
		"labels": map[string]string{"spire-lock": "true", "spire-lock-holder": "crashed",
			"spire-lock-expires": fmt.Sprint(time.Now().Add(lease).Unix())},
	}, nil)

	started := time.Now()
	rotated, err := p.KeyManager.GenerateKey(ctx, "JWT-Signer-A", keymanager.ECP256)
	require.NoError(t, err)
	require.GreaterOrEqual(t, time.Since(started), lease+skew-time.Second, "the live lease and the skew allowance were respected")
	require.Less(t, time.Since(started), lease+skew+10*time.Second, "the expired lease was taken over")
	key := env.fake.State(t, env.ring).Key(name[strings.LastIndex(name, "/")+1:])
	require.Len(t, key.Versions, 2, "exactly one new version")
	require.True(t, env.publicKey(t, key.Versions[1].Name).(equaler).Equal(rotated.Public()))
	require.Equal(t, "ENABLED", key.Versions[0].State, "shared versions are not destroyed at rotation: others may still sign")
}

// TestGcpKmsFaults: throttling, 5xx, timeouts and dropped connections between the plugin and
// Cloud KMS never yield a wrong signature; each costs one retry; persistent throttling ends
// in a clean ResourceExhausted; a failed version creation keeps the current key.
func TestGcpKmsFaults(t *testing.T) {
	ctx := context.Background()
	env := newGcpEnv(t, "--generation-delay", "0")
	p := loadExternal(t, env.pluginData("faulty"))
	key, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	digest := sha256.Sum256([]byte("fault tolerant"))
	const sign = "cryptoKeyVersions.asymmetricSign"

	for _, fault := range []string{"resource_exhausted", "unavailable", "internal", "deadline_exceeded", "drop", "slow:9"} {
		t.Run(fault, func(t *testing.T) {
			env.fake.ResetCalls(t)
			env.fake.Faults(t, sign, fault)
			started := time.Now()
			sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
			require.NoError(t, err)
			require.True(t, ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), digest[:], sig))
			require.Equal(t, 2, env.fake.Calls(t)[sign], "exactly one retry")
			require.Less(t, time.Since(started), 30*time.Second, "inside SPIRE's deadline")
		})
	}

	env.fake.Faults(t, sign, strings.Split(strings.Repeat("resource_exhausted,", 40), ",")[:40]...)
	_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
	requireStatus(t, err, codes.ResourceExhausted, "RESOURCE_EXHAUSTED")
	env.fake.Faults(t, sign)

	env.fake.Faults(t, "cryptoKeyVersions.create", "unavailable")
	_, err = p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.Error(t, err)
	current, err := p.KeyManager.GetKey(ctx, "x509-CA-A")
	require.NoError(t, err)
	require.True(t, current.Public().(equaler).Equal(key.Public()), "the current key stays in service")
	_, err = current.Sign(rand.Reader, digest[:], crypto.SHA256)
	require.NoError(t, err)
}

// TestGcpKmsSweep: a server whose identity is gone leaves keys behind; a live server's sweep
// (short thresholds) destroys their versions and marks them inactive. A live peer's key
// older than the stale threshold stays, and its spire-last-update label shows that the
// peer's stamps are what keep it; an equally old key whose server stopped stamping
// ("quitter", unloaded) is swept once its last stamp is stale. The sweeper's own key stays.
func TestGcpKmsSweep(t *testing.T) {
	ctx := context.Background()
	env := newGcpEnv(t, "--generation-delay", "0")
	fast := "liveness_interval = \"1s\"\nsweep_interval = \"1s\"\nstale_key_age = \"6s\"\nclock_skew_allowance = \"1s\""
	const staleAfter = 7 * time.Second // stale_key_age + clock_skew_allowance
	key := func(server string) *gcpFakeCryptoKey {
		return env.fake.State(t, env.ring).Key("spire-key-" + server + "-x509-CA-A")
	}
	swept := func(server string) bool {
		k := key(server)
		return k.Versions[0].State == "DESTROY_SCHEDULED" && k.Labels["spire-active"] == "false"
	}
	// savedByStamps checks that server's key is older than the stale threshold, still
	// enabled and active, and stamped recently: well after its creation would have made it
	// stale.
	savedByStamps := func(server string) {
		t.Helper()
		k := key(server)
		created := k.Versions[0].CreateTime
		require.Greater(t, time.Since(created), staleAfter, "%s's key is old enough to be swept without stamps", server)
		require.Equal(t, "ENABLED", k.Versions[0].State, "%s's live key stays", server)
		require.Equal(t, "true", k.Labels["spire-active"], "%s's live key stays active", server)
		stamp := labelStamp(t, k)
		require.Less(t, time.Since(stamp), 3*time.Second, "%s's key was stamped within the last liveness intervals", server)
		require.True(t, stamp.After(created.Add(staleAfter-time.Second)),
			"%s's stamp (%s) is newer than its creation (%s) plus the stale threshold", server, stamp, created)
	}

	old := loadExternal(t, env.pluginData("old"))
	_, err := old.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	require.NoError(t, old.catalog.Close())

	peer := loadExternal(t, env.pluginData("peer", fast))
	_, err = peer.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	quitter := loadExternal(t, env.pluginData("quitter", fast))
	_, err = quitter.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	sweeper := loadExternal(t, env.pluginData("sweeper", fast))
	_, err = sweeper.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)

	require.Eventually(t, func() bool { return swept("old") }, 40*time.Second, 250*time.Millisecond,
		"the abandoned key's versions are destroyed and it is marked inactive")

	// Let the live keys grow older than the threshold, with several sweeps past it.
	for _, server := range []string{"peer", "quitter"} {
		if wait := time.Until(key(server).Versions[0].CreateTime.Add(staleAfter + 3*time.Second)); wait > 0 {
			time.Sleep(wait)
		}
	}
	savedByStamps("peer")
	savedByStamps("quitter")

	// The control: the quitter stops stamping; its key, as old as the peer's, is swept
	// once its last stamp is stale, not before.
	require.NoError(t, quitter.catalog.Close())
	stopped := time.Now()
	require.Eventually(t, func() bool { return swept("quitter") }, 40*time.Second, 250*time.Millisecond,
		"a key nobody stamps any more must be swept")
	require.Greater(t, time.Since(stopped), staleAfter-3*time.Second, "swept only once its last stamp was stale")

	savedByStamps("peer")
	require.Equal(t, "ENABLED", key("sweeper").Versions[0].State, "the sweeper's own key stays")
	require.Equal(t, "true", key("sweeper").Labels["spire-active"])
	require.Eventually(t, func() bool {
		return sweeper.Logs.find("stale key put on the deletion path") != nil ||
			peer.Logs.find("stale key put on the deletion path") != nil
	}, 5*time.Second, 50*time.Millisecond)
}

// TestGcpKmsStamping: the plugin's stamper refreshes spire-last-update on its CryptoKeys
// every liveness_interval and changes no other label. It does not stamp, nor re-activate, a
// CryptoKey someone marked spire-active=false, nor one relabelled as another server's, and
// it never touches another server's CryptoKey.
func TestGcpKmsStamping(t *testing.T) {
	ctx := context.Background()
	env := newGcpEnv(t, "--generation-delay", "0")
	// A stamp every second; no sweep while the test runs.
	stampEverySecond := "liveness_interval = \"1s\"\nsweep_interval = \"1h\"\nstale_key_age = \"1h\""
	const (
		ca      = "spire-key-stamper-x509-CA-A"
		jwt     = "spire-key-stamper-JWT-Signer-A"
		taken   = "spire-key-stamper-x509-CA-B" // relabelled as another server's below
		foreign = "spire-key-other-x509-CA-A"
	)
	withoutStamp := func(labels map[string]string) map[string]string {
		out := maps.Clone(labels)
		delete(out, "spire-last-update")
		return out
	}

	// Another server's key; that server is gone, so its labels stay as they are now.
	other := loadExternal(t, env.pluginData("other"))
	_, err := other.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	require.NoError(t, other.catalog.Close())
	foreignLabels := env.fake.State(t, env.ring).Key(foreign).Labels

	p := loadExternal(t, env.pluginData("stamper", stampEverySecond))
	for _, id := range []string{"x509-CA-A", "JWT-Signer-A", "x509-CA-B"} {
		_, err := p.KeyManager.GenerateKey(ctx, id, keymanager.ECP256)
		require.NoError(t, err)
	}
	initial := map[string]map[string]string{}
	for _, id := range []string{ca, jwt, taken} {
		k := env.fake.State(t, env.ring).Key(id)
		require.NotNil(t, k, id)
		require.Equal(t, "true", k.Labels["spire-active"])
		initial[id] = k.Labels
	}

	// watch samples the stamps of ids for d and returns, per id, the distinct values seen
	// in order; each must be recent, and later ones newer.
	watch := func(d time.Duration, ids ...string) map[string][]int64 {
		seen := map[string][]int64{}
		for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			state := env.fake.State(t, env.ring)
			for _, id := range ids {
				k := state.Key(id)
				stamp := labelStamp(t, k).Unix()
				values := seen[id]
				if len(values) == 0 || values[len(values)-1] != stamp {
					require.True(t, len(values) == 0 || stamp > values[len(values)-1], "%s: stamps only move forward: %v then %d", id, values, stamp)
					seen[id] = append(values, stamp)
				}
			}
		}
		return seen
	}

	// Every liveness_interval: the stamp moves forward, stays within a few seconds of now,
	// and no other label changes.
	seen := watch(4500*time.Millisecond, ca, jwt, taken)
	state := env.fake.State(t, env.ring)
	for _, id := range []string{ca, jwt, taken} {
		require.GreaterOrEqual(t, len(seen[id]), 3, "%s was re-stamped every liveness_interval: %v", id, seen[id])
		require.Less(t, time.Since(labelStamp(t, state.Key(id))), 3*time.Second, id)
		require.Equal(t, withoutStamp(initial[id]), withoutStamp(state.Key(id).Labels), "%s: a stamp changes spire-last-update only", id)
	}

	// Someone marks one of the plugin's keys inactive and relabels another as someone
	// else's. Both edits land right after a stamp round (the stamper visits CryptoKeys in
	// name order, taken last), not between a round's read and write of the same key.
	last := labelStamp(t, state.Key(taken))
	require.Eventually(t, func() bool {
		return labelStamp(t, env.fake.State(t, env.ring).Key(taken)).After(last)
	}, 5*time.Second, 20*time.Millisecond)
	state = env.fake.State(t, env.ring)
	inactive := maps.Clone(state.Key(jwt).Labels)
	inactive["spire-active"] = "false"
	env.fake.SetLabels(t, state.Key(jwt).Name, inactive)
	relabelled := maps.Clone(state.Key(taken).Labels)
	relabelled["spire-server-id"] = "someone-else"
	env.fake.SetLabels(t, state.Key(taken).Name, relabelled)

	// Several rounds later: the stamper went on with the key that is still its own, and
	// left the other two exactly as they were written.
	seen = watch(4500*time.Millisecond, ca)
	require.GreaterOrEqual(t, len(seen[ca]), 3, "the stamper keeps stamping its active key: %v", seen[ca])
	state = env.fake.State(t, env.ring)
	require.Equal(t, inactive, state.Key(jwt).Labels, "an inactive key is neither stamped nor re-activated")
	require.Equal(t, relabelled, state.Key(taken).Labels, "a key labelled as another server's is not stamped")
	require.Equal(t, foreignLabels, state.Key(foreign).Labels, "another server's key is never stamped")
	require.NotNil(t, p.Logs.find("not stamping a CryptoKey that is no longer this server's active key"))
}

// labelStamp is a CryptoKey's spire-last-update label (Unix seconds).
func labelStamp(t *testing.T, k *gcpFakeCryptoKey) time.Time {
	t.Helper()
	text, ok := k.Labels["spire-last-update"]
	require.True(t, ok, "%s has no spire-last-update label: %v", k.Name, k.Labels)
	secs, err := strconv.ParseInt(text, 10, 64)
	require.NoError(t, err, "stamp %q", text)
	return time.Unix(secs, 0)
}

// gcpOthersKeyPolicy writes a key_policy_file that names someone else than the plugin's
// service account, so that the plugin's new CryptoKeys give it nothing: what it holds on the
// key ring is all it has. It returns the plugin_data line.
func gcpOthersKeyPolicy(t *testing.T) string {
	t.Helper()
	policy := filepath.Join(t.TempDir(), "policy.json")
	require.NoError(t, os.WriteFile(policy, []byte(`{"version": 3, "bindings": [
        {"role": "roles/cloudkms.signerVerifier", "members": ["group:spire-admins@example.org"]}]}`), 0o600))
	return fmt.Sprintf("key_policy_file = %q", policy)
}

// TestGcpKmsMissingPermission: a plugin whose service account holds README.md's documented
// permissions but one fails, where it needs that one, with PermissionDenied naming it (Cloud
// KMS's "Permission '…' denied on resource '…'", passed through).
func TestGcpKmsMissingPermission(t *testing.T) {
	ctx := context.Background()
	documented := gcpDocumentedPermissions(t)
	generate := func(t *testing.T, km keymanager.KeyManager) error {
		_, err := km.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
		return err
	}
	for _, tc := range []struct {
		permission string
		others     bool   // key_policy_file naming someone else (no default binding)
		delay      string // --generation-delay
		run        func(t *testing.T, km keymanager.KeyManager) error
	}{
		{"cloudkms.cryptoKeys.create", false, "0", generate},
		{"cloudkms.cryptoKeys.getIamPolicy", false, "0", generate},
		{"cloudkms.cryptoKeys.setIamPolicy", false, "0", generate},
		{"cloudkms.cryptoKeyVersions.viewPublicKey", true, "0", generate},
		// Polling a version still in PENDING_GENERATION reads the version.
		{"cloudkms.cryptoKeyVersions.get", false, "0.5", generate},
		{"cloudkms.cryptoKeyVersions.create", false, "0", func(t *testing.T, km keymanager.KeyManager) error {
			require.NoError(t, generate(t, km), "a new CryptoKey comes with its first version")
			return generate(t, km) // rotation adds a version
		}},
		{"cloudkms.cryptoKeyVersions.useToSign", true, "0", func(t *testing.T, km keymanager.KeyManager) error {
			key, err := km.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
			require.NoError(t, err)
			digest := sha256.Sum256([]byte("denied"))
			_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
			return err
		}},
	} {
		t.Run(tc.permission, func(t *testing.T) {
			env := newGcpEnvWith(t, without(documented, tc.permission), "--generation-delay", tc.delay)
			extra := ""
			if tc.others {
				extra = gcpOthersKeyPolicy(t)
			}
			p := loadExternal(t, env.pluginData("denied", extra))
			requireStatus(t, tc.run(t, p.KeyManager), codes.PermissionDenied,
				fmt.Sprintf("Permission '%s' denied on resource '%s", tc.permission, env.ring))
		})
	}
}

// TestGcpKmsDefaultBindingIsEffective: the default IAM policy the plugin writes on a new
// CryptoKey (roles/cloudkms.signerVerifier for the authenticated service account) is what lets
// it read the public key and sign when its key-ring grant lacks viewPublicKey and useToSign;
// with a key_policy_file naming someone else, the same grant is not enough.
func TestGcpKmsDefaultBindingIsEffective(t *testing.T) {
	ctx := context.Background()
	cryptoPerms := []string{"cloudkms.cryptoKeyVersions.useToSign", "cloudkms.cryptoKeyVersions.viewPublicKey"}
	env := newGcpEnvWith(t, without(gcpDocumentedPermissions(t), cryptoPerms...), "--generation-delay", "0")
	p := loadExternal(t, env.pluginData("default-policy"))
	key, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err, "getPublicKey is allowed by the binding the plugin just wrote")
	digest := sha256.Sum256([]byte("signed thanks to the default binding"))
	sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	require.NoError(t, err)
	require.True(t, ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), digest[:], sig))

	// The plugin's account holds them on that CryptoKey, not on the key ring.
	name := env.ring + "/cryptoKeys/spire-key-default-policy-x509-CA-A"
	held := func(resource string) []string {
		var out struct{ Permissions []string }
		env.fake.doAs(t, env.sa, http.MethodPost, "/v1/"+resource+":testIamPermissions",
			map[string]any{"permissions": cryptoPerms}, &out)
		return out.Permissions
	}
	require.ElementsMatch(t, cryptoPerms, held(name))
	require.Empty(t, held(env.ring))

	// Another service account, without that binding, cannot sign with the key.
	other := env.fake.NewServiceAccount(t, "someone-else", gcpProject)
	status, body := env.fake.request(t, other, http.MethodPost, "/v1/"+name+"/cryptoKeyVersions/1:asymmetricSign",
		map[string]any{"digest": map[string]string{"sha256": base64.StdEncoding.EncodeToString(digest[:])}})
	require.Equal(t, http.StatusForbidden, status, string(body))
	require.Contains(t, string(body), "Permission 'cloudkms.cryptoKeyVersions.useToSign' denied on resource '"+name+"'")

	// Without the default binding, the same key-ring grant does not reach the public key.
	custom := loadExternal(t, env.pluginData("custom-policy", gcpOthersKeyPolicy(t)))
	_, err = custom.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	requireStatus(t, err, codes.PermissionDenied,
		"Permission 'cloudkms.cryptoKeyVersions.viewPublicKey' denied on resource '"+env.ring+"/cryptoKeys/spire-key-custom-policy-x509-CA-A/")
}
