package spire_test

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Logs and planted secrets (issue #14 §6). Every secret a test configures contains
// plantedPrefix, or, where a peer dictates its form (a token Vault issued, an RSA key), is
// registered with registerSecret; scripts/scan-secrets.py then fails the run if any of them
// shows up in a log the tests produced. The logs go to KMS_KEYMANAGER_TEST_LOG_DIR
// (scripts/test-all.sh sets it): go/ for this module's (the plugin's stderr as SPIRE's
// catalog logged it, spire-server logs, CLI output), planted-secrets/ for the registry.

// plantedPrefix marks every secret value the tests configure.
const plantedPrefix = "PLANTED-SECRET-"

// planted is the secret value a test configures for `what` (e.g. "aws-secret-access-key").
func planted(what string) string { return plantedPrefix + what }

// baoRootToken is the root token of the OpenBao dev servers the tests start.
var baoRootToken = planted("bao-root-token")

// The planted AWS credentials every test that talks to an AWS peer uses.
var (
	plantedAWSAccessKeyID = planted("aws-access-key-id")
	plantedAWSSecretKey   = planted("aws-secret-access-key")
)

func testLogDir() string { return os.Getenv("KMS_KEYMANAGER_TEST_LOG_DIR") }

var testLogSeq atomic.Int64

var unsafeLogName = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

// testLogPath is a fresh file name under the test log dir's go/ for a log about `name`, or
// "" without a test log dir.
func testLogPath(name string) string {
	dir := testLogDir()
	if dir == "" {
		return ""
	}
	dir = filepath.Join(dir, "go")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return ""
	}
	return filepath.Join(dir, fmt.Sprintf("%s-%d-%d.log", unsafeLogName.ReplaceAllString(name, "_"), os.Getpid(), testLogSeq.Add(1)))
}

// appendLog is an io.Writer that appends each write to a file, opening it per write: a
// catalog's log outlives no test, but nothing closes it either.
type appendLog struct {
	mu   sync.Mutex
	path string
}

func (a *appendLog) Write(p []byte) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	f, err := os.OpenFile(a.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return len(p), nil // a test log that cannot be written must not fail the plugin's host
	}
	defer f.Close()
	return f.Write(p)
}

// testLogWriter is where a log about `name` goes: a file under the test log dir, or nowhere.
func testLogWriter(name string) io.Writer {
	path := testLogPath(name)
	if path == "" {
		return io.Discard
	}
	return &appendLog{path: path}
}

// keepLog copies a log the test writes elsewhere (a spire-server's) into the test log dir at
// cleanup; register it before whatever stops the writer, so that the copy runs after.
func keepLog(t testing.TB, path string) {
	t.Helper()
	name := t.Name() + "-" + filepath.Base(path)
	t.Cleanup(func() {
		dst := testLogPath(name)
		if dst == "" {
			return
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return
		}
		_ = os.WriteFile(dst, data, 0o644)
	})
}

// registerPEMKey registers a private key the tests generated: two of its base64 lines from
// the middle (the first lines of every PKCS#8 RSA key look alike), which any copy of the key
// in a log holds whole, JSON-escaped or not.
func registerPEMKey(t testing.TB, label string, keyPEM []byte) {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(string(keyPEM)), "\n")
	if len(lines) < 8 {
		t.Fatalf("%s: a PEM key of %d lines", label, len(lines))
	}
	registerSecret(t, label+"-a", lines[len(lines)/2])
	registerSecret(t, label+"-b", lines[len(lines)/2+2])
}

// registerSecret adds a secret a peer generated to the scan's registry.
func registerSecret(t testing.TB, label, value string) {
	t.Helper()
	dir := testLogDir()
	if dir == "" {
		return
	}
	dir = filepath.Join(dir, "planted-secrets")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("go-%s-%d-%d", unsafeLogName.ReplaceAllString(label, "_"), os.Getpid(), time.Now().UnixNano())
	if err := os.WriteFile(filepath.Join(dir, name), []byte(value), 0o600); err != nil {
		t.Fatal(err)
	}
}
