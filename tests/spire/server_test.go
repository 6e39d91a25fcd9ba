package spire_test

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
)

// spireServer is a real spire-server (SPIRE_SERVER_BIN, or the release a test runs on: see
// forEachSpireServer) with kms-keymanager as its KeyManager, listening on 127.0.0.1 only.
type spireServer struct {
	t       *testing.T
	bin     string
	dir     string
	socket  string
	conf    string
	cmd     *exec.Cmd
	exited  chan error
	logPath string
	// storeKeys lists the public keys the backend holds for this server, by SPIRE key id.
	storeKeys func() map[string]crypto.PublicKey
	// env, when set, is the whole environment of spire-server (and so of its plugins);
	// otherwise it inherits the test's.
	env []string
}

func newSpireServer(t *testing.T) *spireServer {
	return newSpireServerWith(t, func(s *spireServer) string {
		return fmt.Sprintf("plugin_data {\n            keys_path = %q\n        }", s.keysPath())
	})
}

// newSpireServerWith writes server.conf with the KeyManager's plugin_data (or
// plugin_data_file) line produced by pluginData.
func newSpireServerWith(t *testing.T, pluginData func(*spireServer) string) *spireServer {
	t.Helper()
	return newSpireServerConf(t, "", pluginData)
}

// newSpireServerConf is newSpireServerWith with extra lines in the server block (ca_ttl…).
func newSpireServerConf(t *testing.T, serverExtra string, pluginData func(*spireServer) string) *spireServer {
	t.Helper()
	return newSpireServerDS(t, serverExtra, "", pluginData)
}

// newSpireServerDS is newSpireServerConf with the sql DataStore's plugin_data lines given
// (database_type, connection_string); "" is a private SQLite file in the server's data_dir.
func newSpireServerDS(t *testing.T, serverExtra, dataStore string, pluginData func(*spireServer) string) *spireServer {
	t.Helper()
	bin := spireServerBin(t)
	// A short directory: unix socket paths are limited to ~107 bytes.
	dir, err := os.MkdirTemp("", "kmskm-e2e-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	s := &spireServer{t: t, bin: bin, dir: dir, socket: filepath.Join(dir, "api.sock"), conf: filepath.Join(dir, "server.conf")}
	s.storeKeys = s.keysInStore
	if dataStore == "" {
		dataStore = fmt.Sprintf("database_type = \"sqlite3\"\n            connection_string = %q", filepath.Join(dir, "data", "datastore.sqlite3"))
	}
	plugin := pluginBinary(t)
	conf := fmt.Sprintf(`server {
    bind_address = "127.0.0.1"
    bind_port = "%d"
    socket_path = %q
    trust_domain = %q
    data_dir = %q
    log_level = "DEBUG"
    ca_key_type = "ec-p256"
    jwt_key_type = "ec-p256"
%s
}

plugins {
    DataStore "sql" {
        plugin_data {
            %s
        }
    }
    KeyManager "kms" {
        plugin_cmd = %q
        plugin_checksum = %q
        %s
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
}
`, freePort(t), s.socket, trustDomain, filepath.Join(dir, "data"), serverExtra, dataStore,
		plugin, sha256File(t, plugin), pluginData(s))
	require.NoError(t, os.WriteFile(s.conf, []byte(conf), 0o600))
	return s
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func (s *spireServer) keysPath() string { return filepath.Join(s.dir, "keys.json") }

func (s *spireServer) start(run int) {
	s.t.Helper()
	s.logPath = filepath.Join(s.dir, fmt.Sprintf("server-%d.log", run))
	logFile, err := os.Create(s.logPath)
	require.NoError(s.t, err)
	keepLog(s.t, s.logPath) // registered before the kill below, so it copies after it
	s.cmd = exec.Command(s.bin, "run", "-config", s.conf)
	s.cmd.Env = s.env
	s.cmd.Stdout = logFile
	s.cmd.Stderr = logFile
	require.NoError(s.t, s.cmd.Start())
	s.exited = make(chan error, 1)
	go func(cmd *exec.Cmd, exited chan error) { exited <- cmd.Wait(); logFile.Close() }(s.cmd, s.exited)
	cmd := s.cmd
	s.t.Cleanup(func() { _ = cmd.Process.Kill() })
	deadline := time.Now().Add(90 * time.Second)
	for {
		if _, err := s.cli("healthcheck"); err == nil {
			return
		}
		select {
		case err := <-s.exited:
			s.t.Fatalf("spire-server exited during start-up (%v); log:\n%s", err, s.log())
		case <-time.After(300 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("spire-server not healthy after 90s; log:\n%s", s.log())
		}
	}
}

// stop sends SIGTERM and waits for a clean exit; returns the server's log.
func (s *spireServer) stop() string {
	s.t.Helper()
	require.NoError(s.t, s.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-s.exited:
	case <-time.After(60 * time.Second):
		s.t.Fatalf("spire-server did not stop within 60s; log:\n%s", s.log())
	}
	return s.log()
}

func (s *spireServer) log() string {
	data, _ := os.ReadFile(s.logPath)
	return string(data)
}

func (s *spireServer) cli(args ...string) (string, error) {
	// -socketPath goes after the (sub)command words: "bundle show", "localauthority x509 show".
	words := 1
	for words < len(args) && !strings.HasPrefix(args[words], "-") {
		words++
	}
	full := append(append(append([]string{}, args[:words]...), "-socketPath", s.socket), args[words:]...)
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(s.bin, full...)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("spire-server %v: %v: %s", full, err, stderr.String())
	}
	return stdout.String(), nil
}

func (s *spireServer) mustCLI(args ...string) string {
	s.t.Helper()
	out, err := s.cli(args...)
	require.NoError(s.t, err)
	return out
}

// keysInStore returns the public keys the disk backend holds, by SPIRE key id.
func (s *spireServer) keysInStore() map[string]crypto.PublicKey {
	s.t.Helper()
	data, err := os.ReadFile(s.keysPath())
	require.NoError(s.t, err)
	var file struct{ Keys map[string]string }
	require.NoError(s.t, json.Unmarshal(data, &file))
	out := map[string]crypto.PublicKey{}
	for id, b64 := range file.Keys {
		der, err := base64.StdEncoding.DecodeString(b64)
		require.NoError(s.t, err)
		key, err := x509.ParsePKCS8PrivateKey(der)
		require.NoError(s.t, err)
		out[id] = key.(crypto.Signer).Public()
	}
	return out
}

type equaler interface{ Equal(crypto.PublicKey) bool }

func idOfKey(keys map[string]crypto.PublicKey, pub crypto.PublicKey) string {
	for id, k := range keys {
		if k.(equaler).Equal(pub) {
			return id
		}
	}
	return ""
}

// mintAndVerify mints an X.509-SVID and a JWT-SVID and verifies both against the bundle
// with go-spiffe; returns the X.509 root CA certificate.
func (s *spireServer) mintAndVerify(t *testing.T) *x509.Certificate {
	td := spiffeid.RequireTrustDomainFromString(trustDomain)
	id := spiffeid.RequireFromString("spiffe://example.org/workload")

	bundle, err := spiffebundle.Parse(td, []byte(s.mustCLI("bundle", "show", "-format", "spiffe")))
	require.NoError(t, err)

	out := t.TempDir()
	s.mustCLI("x509", "mint", "-spiffeID", id.String(), "-write", out)
	svid, err := x509svid.Load(filepath.Join(out, "svid.pem"), filepath.Join(out, "key.pem"))
	require.NoError(t, err)
	gotID, chains, err := x509svid.Verify(svid.Certificates, bundle.X509Bundle())
	require.NoError(t, err, "X.509-SVID must chain to the bundle")
	require.Equal(t, id, gotID)
	root := chains[0][len(chains[0])-1]

	token := strings.TrimSpace(s.mustCLI("jwt", "mint", "-spiffeID", id.String(), "-audience", "e2e"))
	jwt, err := jwtsvid.ParseAndValidate(token, bundle.JWTBundle(), []string{"e2e"})
	require.NoError(t, err, "JWT-SVID must verify against the bundle's JWT keys")
	require.Equal(t, id, jwt.ID)

	// The keys that signed are the plugin's: the CA key and the JWT key are in its store.
	keys := s.storeKeys()
	require.True(t, strings.HasPrefix(idOfKey(keys, root.PublicKey), "x509-CA-"), "root CA key must be a plugin key")
	headerJSON, err := base64.RawURLEncoding.DecodeString(strings.Split(token, ".")[0])
	require.NoError(t, err)
	var header struct{ Kid string }
	require.NoError(t, json.Unmarshal(headerJSON, &header))
	jwtKey, ok := bundle.JWTBundle().FindJWTAuthority(header.Kid)
	require.True(t, ok, "the token's kid %q must be in the bundle", header.Kid)
	require.True(t, strings.HasPrefix(idOfKey(keys, jwtKey), "JWT-Signer-"), "JWT key must be a plugin key")
	return root
}

func pluginProcessesRunning(t *testing.T) []string {
	plugin := pluginBinary(t)
	var pids []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe")); err == nil && exe == plugin {
			pids = append(pids, e.Name())
		}
	}
	return pids
}

func requireCleanPluginExit(t *testing.T, log string) {
	t.Helper()
	require.Contains(t, log, "Shutdown requested by the host; exiting", "plugin must receive Shutdown")
	require.NotContains(t, log, "plugin failed to exit gracefully", "plugin must exit without being killed")
	require.Empty(t, pluginProcessesRunning(t), "no plugin process may outlive spire-server")
}

// TestRealSpireServer runs spire-server with kms-keymanager (disk backend), mints SVIDs,
// verifies them against the bundle, restarts, and checks that the CA key was reused.
// It runs on every spire-server release, one after the other (requireCleanPluginExit checks
// that no plugin process of the binary is left anywhere).
func TestRealSpireServer(t *testing.T) { forEachSpireServer(t, false, realSpireServerDisk) }

func realSpireServerDisk(t *testing.T, _ spireServerRelease) {
	s := newSpireServer(t)
	s.start(1)
	root1 := s.mintAndVerify(t)
	bundle1 := s.mustCLI("bundle", "show")
	log1 := s.stop()
	require.Contains(t, log1, "generated key", "the CA keys were generated by the plugin")
	requireCleanPluginExit(t, log1)

	s.start(2)
	root2 := s.mintAndVerify(t)
	require.True(t, root2.PublicKey.(equaler).Equal(root1.PublicKey), "the CA key must be reused after a restart")
	require.Equal(t, bundle1, s.mustCLI("bundle", "show"), "the bundle must not change across a restart")
	log2 := s.stop()
	require.NotContains(t, log2, "\"generated key\"", "no key may be generated on restart")
	requireCleanPluginExit(t, log2)
	block, _ := pem.Decode([]byte(bundle1))
	require.NotNil(t, block)
}

func (s *spireServer) validate() (string, error) {
	out, err := exec.Command(s.bin, "validate", "-config", s.conf).CombinedOutput()
	return string(out), err
}

func waitForLog(t *testing.T, s *spireServer, text string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(s.log(), text) {
		if time.Now().After(deadline) {
			t.Fatalf("log never showed %q:\n%s", text, s.log())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestRealSpireServerValidateAndReconfigure: `spire-server validate` reaches the plugin's
// Validate, and SIGUSR1 with plugin_data_file re-Configures the running plugin, which keeps
// its keys and refuses a key-store switch without breaking signing.
func TestRealSpireServerValidateAndReconfigure(t *testing.T) {
	var dataFile string
	s := newSpireServerWith(t, func(s *spireServer) string {
		dataFile = filepath.Join(s.dir, "kms.hcl")
		return fmt.Sprintf("plugin_data_file = %q", dataFile)
	})
	writeData := func(text string) { require.NoError(t, os.WriteFile(dataFile, []byte(text), 0o600)) }
	good := fmt.Sprintf("keys_path = %q\nlog_level = \"info\"\n", s.keysPath())

	writeData(good)
	out, err := s.validate()
	require.NoError(t, err, out)
	require.Contains(t, out, "SPIRE server configuration file is valid.")

	writeData(good + "keys_pth = \"typo\"\n")
	out, err = s.validate()
	require.Error(t, err)
	require.Contains(t, out, `unknown key "keys_pth" in plugin_data`)

	writeData(fmt.Sprintf("keys_path = %q\n", filepath.Join(s.dir, "missing", "keys.json")))
	out, err = s.validate()
	require.Error(t, err)
	require.Contains(t, out, "does not exist")

	writeData(good)
	s.start(1)
	root := s.mintAndVerify(t)

	writeData(strings.Replace(good, `"info"`, `"debug"`, 1))
	require.NoError(t, s.cmd.Process.Signal(syscall.SIGUSR1))
	waitForLog(t, s, "configuration reloaded; keys kept")
	require.True(t, s.mintAndVerify(t).PublicKey.(equaler).Equal(root.PublicKey))

	writeData(fmt.Sprintf("keys_path = %q\n", filepath.Join(s.dir, "other.json")))
	require.NoError(t, s.cmd.Process.Signal(syscall.SIGUSR1))
	waitForLog(t, s, "cannot switch the key store at run time")
	require.True(t, s.mintAndVerify(t).PublicKey.(equaler).Equal(root.PublicKey),
		"a refused reconfigure must leave the server signing with the same CA key")

	requireCleanPluginExit(t, s.stop())
}
