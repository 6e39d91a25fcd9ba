package spire_test

import (
	"crypto"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// switchStore is a key store that SPIRE's built-in KeyManager `name` and our backend `name`
// share, for one server.
type switchStore struct {
	name string
	// data is the built-in's plugin_data; ours gets the same text plus `backend = name`.
	data string
	// env is spire-server's environment (both plugins read their credentials and endpoints
	// from it, as in production).
	env []string
	// keys lists the public keys the store holds for this server, by SPIRE key id.
	keys func() map[string]crypto.PublicKey
	// creates counts the keys created in the store so far, as the store saw them; nil where
	// keys alone tell (a new key changes the keys file).
	creates func() int
}

// TestSwitchFromSpireBuiltIns: a real spire-server on SPIRE's built-in KeyManager is switched
// to ours and back, for every store both can use and on every spire-server release. The
// built-in mints SVIDs and stops; server.conf gets our plugin with the same plugin_data plus
// `backend`; after the restart the bundle and the active authorities are the same, the store
// holds the same keys and saw no key created, and SVIDs verify. Ours then rotates once
// (`localauthority x509|jwt prepare` and `activate`: one new key each, in the store, signing
// the SVIDs). The switch back to the built-in finds our keys: the same bundle and authorities,
// no key created, SVIDs signed by the rotated keys verify.
//
// gcp_kms is not switched: SPIRE's built-in talks gRPC to Cloud KMS with no endpoint option,
// and the Cloud KMS fake speaks REST. SPIRE has no built-in PKCS#11 KeyManager, and v1.14 none
// for hashicorp_vault.
func TestSwitchFromSpireBuiltIns(t *testing.T) {
	t.Parallel() // mostly waiting on spire-server start-ups
	for _, store := range []struct {
		name string
		new  func(t *testing.T, s *spireServer) switchStore
	}{
		{"disk", diskSwitchStore},
		{"aws_kms", awsSwitchStore},
		{"hashicorp_vault", vaultSwitchStore},
		{"azure_key_vault", azureSwitchStore},
	} {
		t.Run(store.name, func(t *testing.T) {
			t.Parallel()
			forEachSpireServer(t, true, func(t *testing.T, release spireServerRelease) {
				if !release.hasBuiltIn(store.name) {
					t.Skipf("spire-server %s has no built-in %s KeyManager", release.Name, store.name)
				}
				switchAndRollBack(t, store.new)
			})
		})
	}
}

func diskSwitchStore(_ *testing.T, s *spireServer) switchStore {
	return switchStore{
		name: "disk",
		data: fmt.Sprintf("keys_path = %q\n", s.keysPath()),
		keys: s.keysInStore,
	}
}

// awsSwitchStore: moto behind the fault proxy, which counts CreateKey calls. Both plugins
// find it through AWS_ENDPOINT_URL_KMS (STS through AWS_ENDPOINT_URL) and take dummy
// credentials from the environment, as SPIRE's documentation has it for a VPC endpoint.
func awsSwitchStore(t *testing.T, _ *spireServer) switchStore {
	endpoint := startMoto(t)
	proxy := newFaultProxy(t, endpoint)
	const serverID = "switch"
	return switchStore{
		name: "aws_kms",
		data: fmt.Sprintf("region = \"us-east-1\"\nkey_identifier_value = %q\n", serverID),
		env: environWithout([]string{"AWS_"},
			"AWS_ENDPOINT_URL_KMS="+proxy.URL, "AWS_ENDPOINT_URL="+proxy.URL,
			"AWS_ACCESS_KEY_ID=test", "AWS_SECRET_ACCESS_KEY=test", "AWS_EC2_METADATA_DISABLED=true"),
		keys:    func() map[string]crypto.PublicKey { return kmsKeysOf(t, endpoint, serverID) },
		creates: func() int { return proxy.calls("CreateKey") },
	}
}

// vaultSwitchStore: an OpenBao transit mount, with token auth. OpenBao cannot count key
// creations; a created key shows as a new key name or public key in the mount.
func vaultSwitchStore(t *testing.T, _ *spireServer) switchStore {
	bao := startBao(t)
	bao.WritePolicy(t, "spire", vaultSpirePolicy)
	const serverID = "switch"
	return switchStore{
		name: "hashicorp_vault",
		data: fmt.Sprintf("vault_addr = %q\nkey_identifier_value = %q\n", bao.Addr, serverID) +
			tokenAuth(bao.CreateToken(t, "1h", "spire")),
		env:  environWithout(vaultEnvNames),
		keys: func() map[string]crypto.PublicKey { return bao.PublishedKeys(t, "transit", serverID) },
	}
}

// azureSwitchStore: the Key Vault fake, reached with the fake's App Service managed identity
// and its CA trusted through SSL_CERT_FILE (set by TestMain; SPIRE's built-in has no CA
// option); the fake counts key creations.
func azureSwitchStore(t *testing.T, _ *spireServer) switchStore {
	fake := startAzureKeyVaultFake(t)
	const serverID = "switch"
	return switchStore{
		name: "azure_key_vault",
		data: azurePluginData(fake.VaultURL, serverID),
		env: environWithout(azureIdentityEnv,
			"IDENTITY_ENDPOINT="+fake.AppServiceEndpoint, "IDENTITY_HEADER="+fake.IdentityHeader),
		keys:    func() map[string]crypto.PublicKey { return azurePublishedKeys(t, fake, serverID) },
		creates: func() int { return fake.Stats(t)["create"] },
	}
}

// environWithout is the test's environment without the variables named or prefixed (a name
// ending in "_" is a prefix) in drop, plus set.
func environWithout(drop []string, set ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		keep := true
		for _, d := range drop {
			if name == d || (strings.HasSuffix(d, "_") && strings.HasPrefix(name, d)) {
				keep = false
			}
		}
		if keep {
			env = append(env, kv)
		}
	}
	return append(env, set...)
}

// useBuiltIn makes server.conf's KeyManager SPIRE's built-in store.name with store.data.
func (s *spireServer) useBuiltIn(store switchStore) {
	s.setKeyManager(fmt.Sprintf("KeyManager %q {\n        plugin_data {\n%s        }\n    }\n", store.name, store.data))
}

// useOurs makes server.conf's KeyManager our plugin with store.data plus `backend`.
func (s *spireServer) useOurs(store switchStore) {
	plugin := pluginBinary(s.t)
	s.setKeyManager(fmt.Sprintf("KeyManager \"kms\" {\n        plugin_cmd = %q\n        plugin_checksum = %q\n"+
		"        plugin_data {\nbackend = %q\n%s        }\n    }\n", plugin, sha256File(s.t, plugin), store.name, store.data))
}

// setKeyManager replaces the KeyManager block of server.conf (newSpireServerConf writes it
// before the NodeAttestor block).
func (s *spireServer) setKeyManager(block string) {
	s.t.Helper()
	data, err := os.ReadFile(s.conf)
	require.NoError(s.t, err)
	conf := string(data)
	start := strings.Index(conf, "    KeyManager \"")
	end := strings.Index(conf, "    NodeAttestor \"")
	require.True(s.t, start > 0 && end > start, "server.conf has a KeyManager block before the NodeAttestor:\n%s", conf)
	require.NoError(s.t, os.WriteFile(s.conf, []byte(conf[:start]+"    "+block+conf[end:]), 0o600))
}

// authorities are the IDs of the active X.509 and JWT authorities (`localauthority … show`).
type authorities struct{ X509, JWT string }

func (s *spireServer) activeAuthorities() authorities {
	s.t.Helper()
	active := func(kind string) string {
		var state struct {
			Active struct {
				AuthorityID string `json:"authority_id"`
			} `json:"active"`
		}
		out := s.mustCLI("localauthority", kind, "show", "-output", "json")
		require.NoError(s.t, json.Unmarshal([]byte(out), &state), out)
		require.NotEmpty(s.t, state.Active.AuthorityID, "an active %s authority: %s", kind, out)
		return state.Active.AuthorityID
	}
	return authorities{X509: active("x509"), JWT: active("jwt")}
}

// rotate prepares a new X.509 and JWT authority (a new key each) and activates them.
func (s *spireServer) rotate() authorities {
	s.t.Helper()
	rotate := func(kind string) string {
		var prepared struct {
			Prepared struct {
				AuthorityID string `json:"authority_id"`
			} `json:"prepared_authority"`
		}
		out := s.mustCLI("localauthority", kind, "prepare", "-output", "json")
		require.NoError(s.t, json.Unmarshal([]byte(out), &prepared), out)
		require.NotEmpty(s.t, prepared.Prepared.AuthorityID, out)
		s.mustCLI("localauthority", kind, "activate", "-authorityID", prepared.Prepared.AuthorityID)
		return prepared.Prepared.AuthorityID
	}
	return authorities{X509: rotate("x509"), JWT: rotate("jwt")}
}

// switchAndRollBack is the scenario of TestSwitchFromSpireBuiltIns on one store.
func switchAndRollBack(t *testing.T, newStore func(t *testing.T, s *spireServer) switchStore) {
	s := newSpireServerWith(t, func(*spireServer) string { return "" })
	store := newStore(t, s)
	s.env, s.storeKeys = store.env, store.keys
	creates := func() int {
		if store.creates == nil {
			return 0
		}
		return store.creates()
	}
	type state struct {
		bundle      string
		authorities authorities
		keys        map[string]crypto.PublicKey
		creates     int
		root        crypto.PublicKey
	}
	observe := func() state {
		root := s.mintAndVerify(t) // X.509- and JWT-SVIDs verify, signed by keys in the store
		return state{s.mustCLI("bundle", "show"), s.activeAuthorities(), store.keys(), creates(), root.PublicKey}
	}
	requireSame := func(want, got state, what string) {
		t.Helper()
		require.Equal(t, want.bundle, got.bundle, "%s: the same bundle", what)
		require.Equal(t, want.authorities, got.authorities, "%s: the same active authorities", what)
		requirePublicKeysEqual(t, want.keys, got.keys, what+": the same keys in the store")
		require.Equal(t, want.creates, got.creates, "%s: no key created", what)
		require.True(t, want.root.(equaler).Equal(got.root), "%s: the same CA key signs", what)
	}

	s.useBuiltIn(store)
	s.start(1)
	builtIn := observe()
	requireKeyManagerLoaded(t, s.stop(), store.name, false)

	s.useOurs(store)
	s.start(2)
	ours := observe()
	requireSame(builtIn, ours, "switched to ours")

	rotated := s.rotate()
	require.NotEqual(t, ours.authorities.X509, rotated.X509)
	require.NotEqual(t, ours.authorities.JWT, rotated.JWT)
	after := observe()
	require.Equal(t, rotated, after.authorities, "the prepared authorities are active")
	require.False(t, after.root.(equaler).Equal(ours.root), "the rotated CA key signs")
	if store.creates != nil {
		require.Equal(t, ours.creates+2, after.creates, "one new key per rotated authority")
	}
	require.NotEqual(t, ours.bundle, after.bundle, "the new CA is in the bundle")
	log := s.stop()
	requireKeyManagerLoaded(t, log, "kms", true)
	requireCleanPluginExitOf(t, log)

	s.useBuiltIn(store)
	s.start(3)
	back := observe()
	requireSame(after, back, "rolled back to SPIRE's built-in")
	requireKeyManagerLoaded(t, s.stop(), store.name, false)
	t.Logf("%s: switched to ours, rotated, rolled back; key creations seen by the store: %d", store.name, back.creates)
}

// requireKeyManagerLoaded checks in spire-server's log which KeyManager it ran: SPIRE's
// built-in (external=false) or a plugin_cmd (external=true).
func requireKeyManagerLoaded(t *testing.T, log, name string, external bool) {
	t.Helper()
	line := fmt.Sprintf(`msg="Plugin loaded" external=%t plugin_name=%s plugin_type=KeyManager`, external, name)
	require.Contains(t, log, line, "spire-server loaded KeyManager %q (external=%t)", name, external)
}
