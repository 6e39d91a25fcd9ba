package spire_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startMoto starts moto's KMS with the project's compatibility shim
// (tests/peers/moto_kms_shim.py) on a free 127.0.0.1 port and stops it at cleanup.
func startMoto(t *testing.T) string {
	t.Helper()
	endpoint, argv := motoCommandLine(t)
	startPeerProcess(t, "moto", exec.Command(argv[0], argv[1:]...), endpoint+"/moto-api/")
	return endpoint
}

// motoCommandLine picks a free 127.0.0.1 port and returns moto's endpoint there and the shim's
// command line (extra arguments appended). MOTO_PYTHON is the venv interpreter that
// scripts/test-all.sh installs moto into.
func motoCommandLine(t *testing.T, extra ...string) (string, []string) {
	t.Helper()
	python := os.Getenv("MOTO_PYTHON")
	if python == "" {
		t.Fatal("MOTO_PYTHON must point at the python of the moto venv (scripts/test-all.sh sets it)")
	}
	shim, err := filepath.Abs(filepath.Join("..", "peers", "moto_kms_shim.py"))
	if err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	argv := append([]string{python, shim, "-H", "127.0.0.1", "-p", fmt.Sprint(port)}, extra...)
	return fmt.Sprintf("http://127.0.0.1:%d", port), argv
}

// startPeerProcess starts a single-process test peer with its output in a log file, kills it
// at cleanup, and waits until readyURL answers 200 (or fails the test with the log).
func startPeerProcess(t *testing.T, name string, cmd *exec.Cmd, readyURL string) {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), name+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_, _ = cmd.Process.Wait()
		logFile.Close()
	})
	waitReady(t, name, readyURL, 30*time.Second, logPath)
}

// waitReady polls url until it answers 200, or fails the test with the peer's log.
func waitReady(t *testing.T, name, url string, timeout time.Duration, logPath string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			data, _ := os.ReadFile(logPath)
			t.Fatalf("%s did not start: %v\n%s", name, err, data)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// awsPluginData configures the aws_kms backend against a local endpoint.
func awsPluginData(endpoint, serverID string) string {
	return fmt.Sprintf(`backend = "aws_kms"
region = "us-east-1"
endpoint = %q
access_key_id = %q
secret_access_key = %q
key_identifier_value = %q
`, endpoint, plantedAWSAccessKeyID, plantedAWSSecretKey, serverID)
}

// startLocalStack starts LocalStack (KMS and STS, host mode, no docker) on a free 127.0.0.1
// port as a second AWS peer: independent KMS signing and real ListAliases paging.
// LOCALSTACK_PYTHON is the interpreter of the venv scripts/test-all.sh installs it into.
func startLocalStack(t *testing.T) string {
	t.Helper()
	python := os.Getenv("LOCALSTACK_PYTHON")
	if python == "" {
		t.Fatal("LOCALSTACK_PYTHON must point at the python of the LocalStack venv (scripts/test-all.sh sets it)")
	}
	port := freePort(t)
	dir := t.TempDir()
	cmd := exec.Command(python, "-m", "localstack.runtime.main")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(),
		fmt.Sprintf("GATEWAY_LISTEN=127.0.0.1:%d", port),
		fmt.Sprintf("LOCALSTACK_HOST=127.0.0.1:%d", port),
		"SERVICES=kms,sts", "DNS_ADDRESS=0", "DISABLE_EVENTS=1", "SKIP_SSL_CERT_DOWNLOAD=1",
		"EAGER_SERVICE_LOADING=1", "PERSISTENCE=0", "LOCALSTACK_VOLUME_DIR="+filepath.Join(dir, "data"),
	)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	logPath := filepath.Join(dir, "localstack.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _, _ = cmd.Process.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		}
		logFile.Close()
	})
	endpoint := fmt.Sprintf("http://127.0.0.1:%d", port)
	waitReady(t, "LocalStack", endpoint+"/_localstack/health", 90*time.Second, logPath)
	return endpoint
}

// azureKeyVaultFake is a running tests/peers/azure_keyvault_fake.py: a fake of the Azure Key
// Vault keys REST API (HTTPS) with Key Vault's challenge authentication, managed identity
// token endpoints (plain HTTP, as in Azure), a Microsoft Entra token endpoint, and test
// controls under /_fake/. Its server certificate comes from the process CA that TestMain
// trusts through SSL_CERT_FILE, so Go clients with default options (SPIRE's built-in, the Go
// SDK) trust it.
type azureKeyVaultFake struct {
	// VaultURL is the vault, https://127.0.0.1:PORT (key_vault_uri).
	VaultURL string
	// CertDir holds ca.pem (the CA, in SSL_CERT_FILE), ca-key.pem and the server certificate.
	CertDir    string
	CACertPath string
	// TokenURL is the managed identity port's base URL, http://127.0.0.1:TPORT.
	TokenURL string
	// AppServiceEndpoint is IDENTITY_ENDPOINT for App Service managed identity.
	AppServiceEndpoint string
	// IdentityHeader is the IDENTITY_HEADER value the fake expects.
	IdentityHeader string
	// AuthorityHost is AZURE_AUTHORITY_HOST for the fake's Entra endpoint (clients must
	// disable instance discovery, which would ask login.microsoftonline.com).
	AuthorityHost string
	// Tenant is the tenant the challenges name and the Entra endpoint serves.
	Tenant string
	client *http.Client
}

// startAzureKeyVaultFake starts the fake on free 127.0.0.1 ports and stops it at cleanup.
// args are passed on (e.g. "--page-size", "5", "--client", "APP:SECRET").
// AZURE_FAKE_PYTHON is the interpreter of the venv holding tests/peers/requirements-azure.txt.
func startAzureKeyVaultFake(t *testing.T, args ...string) *azureKeyVaultFake {
	t.Helper()
	python := os.Getenv("AZURE_FAKE_PYTHON")
	if python == "" {
		t.Fatal("AZURE_FAKE_PYTHON must point at the python of the venv with tests/peers/requirements-azure.txt installed (scripts/test-all.sh sets it)")
	}
	script, err := filepath.Abs(filepath.Join("..", "peers", "azure_keyvault_fake.py"))
	if err != nil {
		t.Fatal(err)
	}
	// The fake reuses a CA it finds in its certificate directory: give it the process CA.
	certDir := filepath.Join(t.TempDir(), "tls")
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"ca.pem", "ca-key.pem"} {
		data, err := os.ReadFile(filepath.Join(testCADir, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(certDir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	port, tokenPort := freePort(t), freePort(t)
	f := &azureKeyVaultFake{
		VaultURL:       fmt.Sprintf("https://127.0.0.1:%d", port),
		CertDir:        certDir,
		CACertPath:     filepath.Join(certDir, "ca.pem"),
		TokenURL:       fmt.Sprintf("http://127.0.0.1:%d", tokenPort),
		IdentityHeader: "kms-keymanager-test-identity-header",
		Tenant:         "fake-tenant",
		client:         &http.Client{Timeout: 30 * time.Second},
	}
	f.AppServiceEndpoint = f.TokenURL + "/msi/token"
	f.AuthorityHost = f.VaultURL + "/"
	cmd := exec.Command(python, append([]string{script, "--host", "127.0.0.1", "--port", fmt.Sprint(port),
		"--token-port", fmt.Sprint(tokenPort), "--certdir", certDir, "--tenant", f.Tenant,
		"--identity-header", f.IdentityHeader}, args...)...)
	startPeerProcess(t, "azure_keyvault_fake", cmd, f.TokenURL+"/_fake/health")
	waitReady(t, "azure_keyvault_fake (https)", f.VaultURL+"/_fake/health", 10*time.Second, "")
	return f
}

// azureIdentityEnv lists the variables azidentity's DefaultAzureCredential reads.
var azureIdentityEnv = []string{
	"AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH",
	"AZURE_CLIENT_CERTIFICATE_PASSWORD", "AZURE_USERNAME", "AZURE_PASSWORD", "AZURE_FEDERATED_TOKEN_FILE",
	"AZURE_AUTHORITY_HOST", "AZURE_TOKEN_CREDENTIALS", "AZURE_POD_IDENTITY_AUTHORITY_HOST",
	"IDENTITY_ENDPOINT", "IDENTITY_HEADER", "IDENTITY_SERVER_THUMBPRINT", "MSI_ENDPOINT", "MSI_SECRET", "IMDS_ENDPOINT",
}

// UseManagedIdentity points DefaultAzureCredential (in this process and in plugins it
// starts) at the fake's App Service managed identity endpoint for this test, with every other
// Azure identity variable unset (restored at cleanup).
func (f *azureKeyVaultFake) UseManagedIdentity(t *testing.T) {
	t.Helper()
	for _, name := range azureIdentityEnv {
		if _, set := os.LookupEnv(name); set {
			t.Setenv(name, "")
			if err := os.Unsetenv(name); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Setenv("IDENTITY_ENDPOINT", f.AppServiceEndpoint)
	t.Setenv("IDENTITY_HEADER", f.IdentityHeader)
}

// control sends a test-control request and decodes a 200 answer into out (if non-nil).
func (f *azureKeyVaultFake) control(t *testing.T, method, path string, body, out any) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, f.VaultURL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := f.client.Do(req)
	if err != nil {
		t.Fatalf("azure_keyvault_fake %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("azure_keyvault_fake %s %s: HTTP %d: %s", method, path, resp.StatusCode, data)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("azure_keyvault_fake %s %s: %v: %s", method, path, err, data)
		}
	}
}

// Stats returns the requests per operation since the start or ResetStats ("create", "get",
// "update", "list", "delete", "sign", "token", "unauthorized", ...).
func (f *azureKeyVaultFake) Stats(t *testing.T) map[string]int {
	t.Helper()
	stats := map[string]int{}
	f.control(t, http.MethodGet, "/_fake/stats", nil, &stats)
	return stats
}

func (f *azureKeyVaultFake) ResetStats(t *testing.T) {
	t.Helper()
	f.control(t, http.MethodPost, "/_fake/stats/reset", map[string]any{}, nil)
}

// azureFault is one fault rule: the first Count requests of Op ("*" for every vault
// operation) are delayed by LatencyMS, answered with Status (and Retry-After) or dropped.
type azureFault struct {
	Op         string `json:"op"`
	Status     int    `json:"status,omitempty"`
	RetryAfter *int   `json:"retry_after,omitempty"`
	Count      int    `json:"count"`
	LatencyMS  int    `json:"latency_ms,omitempty"`
	Drop       bool   `json:"drop,omitempty"`
}

// Faults appends fault rules.
func (f *azureKeyVaultFake) Faults(t *testing.T, rules ...azureFault) {
	t.Helper()
	f.control(t, http.MethodPost, "/_fake/faults", rules, nil)
}

func (f *azureKeyVaultFake) ClearFaults(t *testing.T) {
	t.Helper()
	f.control(t, http.MethodDelete, "/_fake/faults", nil, nil)
}

// ExpireTokens revokes every token the fake issued. mode "cae" answers them with a
// continuous access evaluation claims challenge (the SDKs then bypass their token caches),
// "plain" with the ordinary challenge an expired token gets.
func (f *azureKeyVaultFake) ExpireTokens(t *testing.T, mode string) {
	t.Helper()
	f.control(t, http.MethodPost, "/_fake/tokens/expire", map[string]string{"mode": mode}, nil)
}

// Deny makes these operations answer 403 Forbidden (ForbiddenByRbac); none lifts it.
func (f *azureKeyVaultFake) Deny(t *testing.T, ops ...string) {
	t.Helper()
	if ops == nil {
		ops = []string{}
	}
	f.control(t, http.MethodPost, "/_fake/rbac", map[string]any{"deny": ops}, nil)
}

// SetKeyTimes sets attributes.created and .updated of every version of a key (sweep tests).
func (f *azureKeyVaultFake) SetKeyTimes(t *testing.T, name string, created, updated time.Time) {
	t.Helper()
	f.control(t, http.MethodPost, "/_fake/keys/"+name+"/attributes",
		map[string]int64{"created": created.Unix(), "updated": updated.Unix()}, nil)
}

// SetKeyEnabled enables or disables every version of a key behind the client's back.
func (f *azureKeyVaultFake) SetKeyEnabled(t *testing.T, name string, enabled bool) {
	t.Helper()
	f.control(t, http.MethodPost, "/_fake/keys/"+name+"/attributes", map[string]bool{"enabled": enabled}, nil)
}

// azureFakeKey is a key as GET /_fake/keys shows it.
type azureFakeKey struct {
	Name     string `json:"name"`
	Versions []struct {
		Kty        string            `json:"kty"`
		Tags       map[string]string `json:"tags"`
		Attributes struct {
			Enabled bool  `json:"enabled"`
			Created int64 `json:"created"`
			Updated int64 `json:"updated"`
		} `json:"attributes"`
		Key struct {
			Kid    string   `json:"kid"`
			KeyOps []string `json:"key_ops"`
			Crv    string   `json:"crv"`
			X      string   `json:"x"`
			Y      string   `json:"y"`
			N      string   `json:"n"`
			E      string   `json:"e"`
		} `json:"key"`
	} `json:"versions"`
	DeletedDate int64 `json:"deletedDate"`
}

// State returns every live and soft-deleted key: what "the vault holds".
func (f *azureKeyVaultFake) State(t *testing.T) (live, deleted []azureFakeKey) {
	t.Helper()
	var out struct {
		Keys    []azureFakeKey `json:"keys"`
		Deleted []azureFakeKey `json:"deleted"`
	}
	f.control(t, http.MethodGet, "/_fake/keys", nil, &out)
	return out.Keys, out.Deleted
}

// azureBulkKey is one key for Bulk: Kty defaults to EC, Crv to P-256, KeySize to 2048;
// Created and Updated (Unix seconds) to now.
type azureBulkKey struct {
	Name    string            `json:"name"`
	Kty     string            `json:"kty,omitempty"`
	Crv     string            `json:"crv,omitempty"`
	KeySize int               `json:"key_size,omitempty"`
	Tags    map[string]string `json:"tags,omitempty"`
	Created int64             `json:"created,omitempty"`
	Updated int64             `json:"updated,omitempty"`
}

// Bulk creates keys directly in the fake (POST /_fake/bulk: no token, not counted in Stats)
// and returns their kids: seeding thousands of other servers' keys, or planting a key.
func (f *azureKeyVaultFake) Bulk(t *testing.T, keys ...azureBulkKey) []string {
	t.Helper()
	var out struct {
		Kids []string `json:"kids"`
	}
	f.control(t, http.MethodPost, "/_fake/bulk", map[string]any{"keys": keys}, &out)
	return out.Kids
}

// restartablePeer is a single-process test peer that keeps its state in a file across
// restarts (the moto shim's and the Cloud KMS fake's --state-file): Restart stops it with
// SIGTERM (it saves its state and exits) and starts it again on the same port.
type restartablePeer struct {
	t        *testing.T
	name     string
	newCmd   func() *exec.Cmd
	readyURL string
	logPath  string
	cmd      *exec.Cmd
	exited   chan struct{}
}

func startRestartablePeer(t *testing.T, name string, newCmd func() *exec.Cmd, readyURL string) *restartablePeer {
	t.Helper()
	p := &restartablePeer{t: t, name: name, newCmd: newCmd, readyURL: readyURL, logPath: filepath.Join(t.TempDir(), name+".log")}
	p.start()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.exited
	})
	return p
}

func (p *restartablePeer) start() {
	p.t.Helper()
	logFile, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		p.t.Fatal(err)
	}
	cmd := p.newCmd()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); logFile.Close(); close(exited) }()
	p.cmd, p.exited = cmd, exited
	waitReady(p.t, p.name, p.readyURL, 30*time.Second, p.logPath)
}

// Restart stops the peer with SIGTERM (it writes its state file), waits for it to exit and
// starts it again; it returns how long the peer was not serving.
func (p *restartablePeer) Restart() time.Duration {
	p.t.Helper()
	started := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		p.t.Fatal(err)
	}
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		data, _ := os.ReadFile(p.logPath)
		p.t.Fatalf("%s did not exit within 30s of SIGTERM:\n%s", p.name, data)
	}
	p.start()
	return time.Since(started)
}

// startPersistentMoto is startMoto with the KMS state kept across Restart.
func startPersistentMoto(t *testing.T) (string, *restartablePeer) {
	t.Helper()
	state := filepath.Join(t.TempDir(), "moto-state.pickle")
	endpoint, argv := motoCommandLine(t, "--state-file", state)
	peer := startRestartablePeer(t, "moto", func() *exec.Cmd {
		return exec.Command(argv[0], argv[1:]...)
	}, endpoint+"/moto-api/")
	return endpoint, peer
}

// startPersistentGcpKmsFake is startGcpKmsFake with the fake's resources kept across Restart.
func startPersistentGcpKmsFake(t *testing.T, args ...string) (*gcpKmsFake, *restartablePeer) {
	t.Helper()
	state := filepath.Join(t.TempDir(), "gcp-state.pickle")
	f, argv := gcpKmsFakeCommandLine(t, append([]string{"--state-file", state}, args...)...)
	peer := startRestartablePeer(t, "gcp_kms_fake", func() *exec.Cmd {
		return exec.Command(argv[0], argv[1:]...)
	}, f.Endpoint+"/_fake/health")
	return f, peer
}

// postgresCluster is a private PostgreSQL cluster (Debian's postgresql package, which
// scripts/test-all.sh installs) for one test: initdb into a temporary directory, listening on
// 127.0.0.1 and a free port only, trust authentication, durability off (a test datastore).
type postgresCluster struct {
	Port int
	User string
	bin  string
}

// postgresBinDir finds initdb and postgres: PG_BIN_DIR, else the newest
// /usr/lib/postgresql/<major>/bin (Debian keeps them off PATH), else PATH.
func postgresBinDir(t *testing.T) string {
	t.Helper()
	if dir := os.Getenv("PG_BIN_DIR"); dir != "" {
		return dir
	}
	if dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin"); len(dirs) > 0 {
		sort.Slice(dirs, func(i, j int) bool {
			vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[i])))
			vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[j])))
			return vi < vj
		})
		return dirs[len(dirs)-1]
	}
	path, err := exec.LookPath("initdb")
	if err != nil {
		t.Fatal("PostgreSQL not found: install Debian's postgresql (scripts/test-all.sh does) or set PG_BIN_DIR")
	}
	return filepath.Dir(path)
}

// startPostgres starts the cluster and stops it (fast shutdown) at cleanup. PostgreSQL
// refuses to run as root, so under root initdb and postgres run as the `postgres` user the
// Debian package creates (its directory is chowned to it).
func startPostgres(t *testing.T) *postgresCluster {
	t.Helper()
	bin := postgresBinDir(t)
	// Not t.TempDir(): its parents are 0700 root, which the postgres user cannot traverse.
	dir, err := os.MkdirTemp("", "kmskm-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("running as root, PostgreSQL needs an unprivileged user: %v (install Debian's postgresql, which creates `postgres`)", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	asUser := func(cmd *exec.Cmd) *exec.Cmd {
		if cred != nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		}
		return cmd
	}
	data := filepath.Join(dir, "data")
	if out, err := asUser(exec.Command(filepath.Join(bin, "initdb"), "-D", data, "-U", "postgres", "--auth=trust",
		"-E", "UTF8", "--no-sync", "--no-instructions")).CombinedOutput(); err != nil {
		t.Fatalf("initdb failed: %v\n%s", err, out)
	}
	p := &postgresCluster{Port: freePort(t), User: "postgres", bin: bin}
	logPath := filepath.Join(dir, "postgres.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := asUser(exec.Command(filepath.Join(bin, "postgres"), "-D", data, "-k", dir, "-h", "127.0.0.1",
		"-p", fmt.Sprint(p.Port), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
		"-c", "max_connections=300"))
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); logFile.Close() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGINT) // fast shutdown
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := p.psql("postgres", "SELECT 1")
		if err == nil {
			break
		}
		select {
		case err := <-exited:
			log, _ := os.ReadFile(logPath)
			t.Fatalf("postgres exited during start-up (%v):\n%s", err, log)
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logPath)
			t.Fatalf("postgres not accepting connections on 127.0.0.1:%d after 30s (%v: %s); log:\n%s", p.Port, err, out, log)
		}
	}
	return p
}

// psql runs one SQL command as the cluster's superuser over TCP.
func (p *postgresCluster) psql(database, sql string) (string, error) {
	psql := filepath.Join(p.bin, "psql")
	if _, err := os.Stat(psql); err != nil {
		psql = "psql"
	}
	out, err := exec.Command(psql, "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
		"-p", fmt.Sprint(p.Port), "-U", p.User, "-d", database, "-c", sql).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// CreateDatabase creates a database and returns SPIRE's sql DataStore plugin_data lines for it.
func (p *postgresCluster) CreateDatabase(t *testing.T, name string) string {
	t.Helper()
	if out, err := p.psql("postgres", "CREATE DATABASE "+name); err != nil {
		t.Fatalf("CREATE DATABASE %s: %v: %s", name, err, out)
	}
	return fmt.Sprintf("database_type = \"postgres\"\n            connection_string = \"dbname=%s host=127.0.0.1 port=%d user=%s sslmode=disable\"",
		name, p.Port, p.User)
}
