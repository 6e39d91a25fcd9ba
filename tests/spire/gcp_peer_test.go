package spire_test

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// gcpKmsFake is a running tests/peers/gcp_kms_fake.py: a fake of the Cloud KMS REST API (v1)
// with test controls under /_fake/.
//
// Under --require-auth the fake verifies every caller's credentials against the service
// account keys registered with it and enforces IAM. The tests' own API calls (do) then
// authenticate as the harness: a service account whose key startGcpKmsFake generates and
// registers (--service-account-key) and that CreateKeyRing makes roles/owner of the ring's
// project. There is no unsigned or built-in identity.
type gcpKmsFake struct {
	// Endpoint is the base URL (http://127.0.0.1:PORT); the API is under Endpoint+"/v1/",
	// the OAuth2 token endpoint is Endpoint+"/token".
	Endpoint string
	client   *http.Client
	// harness signs the tests' own calls.
	harness *gcpServiceAccountKey
}

// gcpHarnessEmail is the service account the tests' own calls authenticate as.
const gcpHarnessEmail = "test-harness@test-project.iam.gserviceaccount.com"

// gcpServiceAccountKey is a generated service account key: what Google's IAM API hands out as
// a JSON key file, and the private key, to sign JWTs with here.
type gcpServiceAccountKey struct {
	Email   string
	KeyID   string
	Key     *rsa.PrivateKey
	KeyFile []byte // the JSON key file
}

// newGcpServiceAccountKey generates an RSA-2048 key for email; tokenURI goes in the key file.
func newGcpServiceAccountKey(t *testing.T, email, tokenURI string) *gcpServiceAccountKey {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	id := make([]byte, 20)
	if _, err := rand.Read(id); err != nil {
		t.Fatal(err)
	}
	_, domain, _ := strings.Cut(email, "@")
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	// An RSA key has no room for a marker: the scan looks for the key itself.
	registerPEMKey(t, "gcp-service-account-key", keyPEM)
	keyFile, err := json.Marshal(map[string]string{
		"type":           "service_account",
		"project_id":     strings.TrimSuffix(domain, ".iam.gserviceaccount.com"),
		"private_key_id": hex.EncodeToString(id),
		"private_key":    string(keyPEM),
		"client_email":   email,
		"client_id":      "1234567890",
		"token_uri":      tokenURI,
	})
	if err != nil {
		t.Fatal(err)
	}
	return &gcpServiceAccountKey{Email: email, KeyID: hex.EncodeToString(id), Key: key, KeyFile: keyFile}
}

// File writes the JSON key file into a temporary directory and returns its path.
func (k *gcpServiceAccountKey) File(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "service-account.json")
	if err := os.WriteFile(path, k.KeyFile, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// Member is the IAM member naming this service account.
func (k *gcpServiceAccountKey) Member() string { return "serviceAccount:" + k.Email }

// SelfSignedJWT is a bearer token as Google's auth libraries make from a service account key:
// an RS256 JWT with the key id, iss = sub = the account, the cloud-platform scope, one hour.
func (k *gcpServiceAccountKey) SelfSignedJWT(t *testing.T) string {
	t.Helper()
	now := time.Now().Unix()
	header, err := json.Marshal(map[string]string{"alg": "RS256", "typ": "JWT", "kid": k.KeyID})
	if err != nil {
		t.Fatal(err)
	}
	claims, err := json.Marshal(map[string]any{
		"iss": k.Email, "sub": k.Email, "iat": now, "exp": now + 3600,
		"scope": "https://www.googleapis.com/auth/cloud-platform",
	})
	if err != nil {
		t.Fatal(err)
	}
	input := base64.RawURLEncoding.EncodeToString(header) + "." + base64.RawURLEncoding.EncodeToString(claims)
	digest := sha256.Sum256([]byte(input))
	sig, err := rsa.SignPKCS1v15(rand.Reader, k.Key, crypto.SHA256, digest[:])
	if err != nil {
		t.Fatal(err)
	}
	return input + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// gcpFakeState is what the fake holds for one key ring (GET /_fake/state). Enums are names.
type gcpFakeState struct {
	KeyRing    string             `json:"keyRing"`
	CryptoKeys []gcpFakeCryptoKey `json:"cryptoKeys"`
}

type gcpFakeCryptoKey struct {
	Name                     string                 `json:"name"`
	Purpose                  string                 `json:"purpose"`
	Labels                   map[string]string      `json:"labels"`
	VersionTemplate          gcpFakeVersionTemplate `json:"versionTemplate"`
	CreateTime               time.Time              `json:"createTime"`
	DestroyScheduledDuration string                 `json:"destroyScheduledDuration"`
	IamPolicy                gcpFakePolicy          `json:"iamPolicy"`
	Versions                 []gcpFakeVersion       `json:"versions"`
}

type gcpFakeVersionTemplate struct {
	Algorithm       string `json:"algorithm"`
	ProtectionLevel string `json:"protectionLevel"`
}

type gcpFakeVersion struct {
	Name            string     `json:"name"`
	State           string     `json:"state"`
	Algorithm       string     `json:"algorithm"`
	ProtectionLevel string     `json:"protectionLevel"`
	CreateTime      time.Time  `json:"createTime"`
	GenerateTime    *time.Time `json:"generateTime,omitempty"`
	DestroyTime     *time.Time `json:"destroyTime,omitempty"`
}

type gcpFakePolicy struct {
	Version  int `json:"version,omitempty"`
	Bindings []struct {
		Role    string   `json:"role"`
		Members []string `json:"members"`
	} `json:"bindings,omitempty"`
	Etag string `json:"etag"`
}

// Key returns the CryptoKey whose name ends in "/cryptoKeys/"+id, or nil.
func (s *gcpFakeState) Key(id string) *gcpFakeCryptoKey {
	for i := range s.CryptoKeys {
		if strings.HasSuffix(s.CryptoKeys[i].Name, "/cryptoKeys/"+id) {
			return &s.CryptoKeys[i]
		}
	}
	return nil
}

// startGcpKmsFake starts tests/peers/gcp_kms_fake.py on a free 127.0.0.1 port and stops it at
// cleanup. args are passed on (e.g. "--generation-delay", "0.5", "--require-auth"); the
// harness's key is registered with --service-account-key.
func startGcpKmsFake(t *testing.T, args ...string) *gcpKmsFake {
	t.Helper()
	f, argv := gcpKmsFakeCommandLine(t, args...)
	startPeerProcess(t, "gcp_kms_fake", exec.Command(argv[0], argv[1:]...), f.Endpoint+"/_fake/health")
	return f
}

// gcpKmsFakeCommandLine picks a free 127.0.0.1 port and returns the client side of a fake there
// (with the harness's service-account key) and the fake's command line, args appended.
// GCP_FAKE_PYTHON is the interpreter of the venv holding tests/peers/requirements-gcp.txt.
func gcpKmsFakeCommandLine(t *testing.T, args ...string) (*gcpKmsFake, []string) {
	t.Helper()
	python := os.Getenv("GCP_FAKE_PYTHON")
	if python == "" {
		t.Fatal("GCP_FAKE_PYTHON must point at the python of the venv with tests/peers/requirements-gcp.txt installed")
	}
	script, err := filepath.Abs(filepath.Join("..", "peers", "gcp_kms_fake.py"))
	if err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	f := &gcpKmsFake{
		Endpoint: fmt.Sprintf("http://127.0.0.1:%d", port),
		client:   &http.Client{Timeout: 30 * time.Second},
	}
	f.harness = newGcpServiceAccountKey(t, gcpHarnessEmail, f.Endpoint+"/token")
	argv := append([]string{python, script, "--host", "127.0.0.1", "--port", fmt.Sprint(port),
		"--service-account-key", f.harness.File(t)}, args...)
	return f, argv
}

// do sends a JSON request as the harness and decodes a 200 answer into out (if non-nil); any
// other status fails the test.
func (f *gcpKmsFake) do(t *testing.T, method, path string, body, out any) {
	t.Helper()
	f.doAs(t, f.harness, method, path, body, out)
}

// doAs is do with another service account's self-signed JWT.
func (f *gcpKmsFake) doAs(t *testing.T, who *gcpServiceAccountKey, method, path string, body, out any) {
	t.Helper()
	status, data := f.request(t, who, method, path, body)
	if status != http.StatusOK {
		t.Fatalf("gcp_kms_fake %s %s as %s: HTTP %d: %s", method, path, who.Email, status, data)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("gcp_kms_fake %s %s: %v: %s", method, path, err, data)
		}
	}
}

// request sends a JSON request as who and returns the HTTP status and the body.
func (f *gcpKmsFake) request(t *testing.T, who *gcpServiceAccountKey, method, path string, body any) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, f.Endpoint+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer "+who.SelfSignedJWT(t))
	resp, err := f.client.Do(req)
	if err != nil {
		t.Fatalf("gcp_kms_fake %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, data
}

// NewServiceAccount generates a key for NAME@PROJECT.iam.gserviceaccount.com (token_uri the
// fake's) and registers the key file with the fake (POST /_fake/service_accounts). The account
// has no bindings yet.
func (f *gcpKmsFake) NewServiceAccount(t *testing.T, name, project string) *gcpServiceAccountKey {
	t.Helper()
	key := newGcpServiceAccountKey(t, name+"@"+project+".iam.gserviceaccount.com", f.Endpoint+"/token")
	f.do(t, http.MethodPost, "/_fake/service_accounts", map[string]json.RawMessage{"key_file": key.KeyFile}, nil)
	return key
}

// CreateRole makes (or replaces) a custom role, projects/P/roles/ID, with these permissions.
func (f *gcpKmsFake) CreateRole(t *testing.T, name string, permissions []string) {
	t.Helper()
	f.do(t, http.MethodPost, "/_fake/roles", map[string]any{"name": name, "includedPermissions": permissions}, nil)
}

// Grant adds member to resource's binding for role; resource is projects/P, a KeyRing or a
// CryptoKey name (a test control: no etag, no permission needed).
func (f *gcpKmsFake) Grant(t *testing.T, resource, role, member string) {
	t.Helper()
	f.do(t, http.MethodPost, "/_fake/grant", map[string]any{"resource": resource, "role": role, "member": member}, nil)
}

// Faults makes the next calls of an API method (e.g. "cryptoKeyVersions.asymmetricSign")
// fail in order: "resource_exhausted" (429), "unavailable" (503), "internal" (500),
// "deadline_exceeded" (504), "aborted" (409), "permission_denied" (403), "drop" (connection
// closed without a response) or "slow" / "slow:SECONDS" (answer normally after sleeping,
// 10 s by default). It replaces the method's pending faults.
func (f *gcpKmsFake) Faults(t *testing.T, method string, faults ...string) {
	t.Helper()
	if faults == nil {
		faults = []string{}
	}
	f.do(t, http.MethodPost, "/_fake/faults", map[string]any{"method": method, "faults": faults}, nil)
}

// SetLatency adds d to every API call (not to /_fake/ controls).
func (f *gcpKmsFake) SetLatency(t *testing.T, d time.Duration) {
	t.Helper()
	f.do(t, http.MethodPost, "/_fake/latency", map[string]any{"seconds": d.Seconds()}, nil)
}

// Calls returns how many times each API method was called since the start or ResetCalls.
func (f *gcpKmsFake) Calls(t *testing.T) map[string]int {
	t.Helper()
	calls := map[string]int{}
	f.do(t, http.MethodGet, "/_fake/calls", nil, &calls)
	return calls
}

// Callers returns, per caller email (from the bearer token; "" when anonymous), the calls
// of each API method.
func (f *gcpKmsFake) Callers(t *testing.T) map[string]map[string]int {
	t.Helper()
	callers := map[string]map[string]int{}
	f.do(t, http.MethodGet, "/_fake/callers", nil, &callers)
	return callers
}

// ResetCalls zeroes the call counters.
func (f *gcpKmsFake) ResetCalls(t *testing.T) {
	t.Helper()
	f.do(t, http.MethodPost, "/_fake/calls/reset", map[string]any{}, nil)
}

// SetGenerationDelay sets how long new versions stay PENDING_GENERATION (at least).
func (f *gcpKmsFake) SetGenerationDelay(t *testing.T, d time.Duration) {
	t.Helper()
	f.do(t, http.MethodPost, "/_fake/generation_delay", map[string]any{"seconds": d.Seconds()}, nil)
}

// Corrupt makes the next count responses of method ("asymmetricSign" or "getPublicKey")
// carry a wrong signatureCrc32c / pemCrc32c.
func (f *gcpKmsFake) Corrupt(t *testing.T, method, what string, count int) {
	t.Helper()
	_ = what // the checksum field is implied by the method
	f.do(t, http.MethodPost, "/_fake/corrupt", map[string]any{"method": method, "count": count}, nil)
}

// SeedForeignKeys creates count ASYMMETRIC_SIGN CryptoKeys without versions in keyRing (a
// full resource name; created if missing), labelled owner=someone-else, so that lists have
// to page past keys that are not ours.
func (f *gcpKmsFake) SeedForeignKeys(t *testing.T, keyRing string, count int) {
	t.Helper()
	f.do(t, http.MethodPost, "/_fake/seed", map[string]any{
		"keyRing": keyRing, "count": count, "labels": map[string]string{"owner": "someone-else"},
	}, nil)
}

// CreateKeyRing creates a key ring through the API (keyRings.create) from its full name,
// projects/P/locations/L/keyRings/R, as the harness, which it first makes roles/owner of P.
func (f *gcpKmsFake) CreateKeyRing(t *testing.T, name string) {
	t.Helper()
	parent, id, ok := strings.Cut(name, "/keyRings/")
	if !ok || id == "" || strings.Contains(id, "/") || !strings.HasPrefix(parent, "projects/") {
		t.Fatalf("CreateKeyRing: %q is not projects/P/locations/L/keyRings/R", name)
	}
	f.Grant(t, strings.Join(strings.SplitN(parent, "/", 3)[:2], "/"), "roles/owner", f.harness.Member())
	f.do(t, http.MethodPost, "/v1/"+parent+"/keyRings?keyRingId="+url.QueryEscape(id), map[string]any{}, nil)
}

// State returns every CryptoKey of keyRing with its labels, template, IAM policy and
// versions: what "the KMS holds".
func (f *gcpKmsFake) State(t *testing.T, keyRing string) *gcpFakeState {
	t.Helper()
	var s gcpFakeState
	f.do(t, http.MethodGet, "/_fake/state?keyRing="+url.QueryEscape(keyRing), nil, &s)
	return &s
}

// SetLabels replaces a CryptoKey's labels through the API (cryptoKeys.patch with
// updateMask=labels), as the harness: what an operator or another tool would do.
func (f *gcpKmsFake) SetLabels(t *testing.T, cryptoKey string, labels map[string]string) {
	t.Helper()
	var out gcpFakeCryptoKey
	f.do(t, http.MethodPatch, "/v1/"+cryptoKey+"?updateMask=labels", map[string]any{"labels": labels}, &out)
	if !maps.Equal(out.Labels, labels) {
		t.Fatalf("SetLabels %s: the fake answered labels %v, want %v", cryptoKey, out.Labels, labels)
	}
}

func TestGcpKmsFakeStarts(t *testing.T) {
	fake := startGcpKmsFake(t, "--generation-delay", "0")
	ring := "projects/p/locations/global/keyRings/r1"
	fake.CreateKeyRing(t, ring)
	if got := fake.Calls(t)["keyRings.create"]; got != 1 {
		t.Fatalf("keyRings.create calls = %d, want 1", got)
	}
	fake.SeedForeignKeys(t, ring, 3)
	state := fake.State(t, ring)
	if len(state.CryptoKeys) != 3 || state.CryptoKeys[0].Labels["owner"] != "someone-else" {
		t.Fatalf("unexpected state: %+v", state)
	}
	fake.Faults(t, "keyRings.get", "unavailable")
	resp, err := http.Get(fake.Endpoint + "/v1/" + ring)
	if err != nil {
		t.Fatal(err)
	}
	var body struct {
		Error struct {
			Code   int    `json:"code"`
			Status string `json:"status"`
		} `json:"error"`
	}
	err = json.NewDecoder(resp.Body).Decode(&body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 503 || body.Error.Status != "UNAVAILABLE" || body.Error.Code != 503 {
		t.Fatalf("injected fault: HTTP %d %+v (%v)", resp.StatusCode, body, err)
	}
	fake.ResetCalls(t)
	if calls := fake.Calls(t); len(calls) != 0 {
		t.Fatalf("calls after reset: %v", calls)
	}
	fake.SetLatency(t, 0)
	fake.SetGenerationDelay(t, 10*time.Millisecond)
	fake.Corrupt(t, "asymmetricSign", "signatureCrc32c", 1)
}
