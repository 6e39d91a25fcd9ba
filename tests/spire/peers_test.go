package spire_test

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// startMoto starts moto's KMS with the project's compatibility shim
// (tests/peers/moto_kms_shim.py) on a free 127.0.0.1 port and stops it at cleanup.
// MOTO_PYTHON is the venv interpreter that scripts/test-all.sh installs moto into.
func startMoto(t *testing.T) string {
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
	endpoint := fmt.Sprintf("http://127.0.0.1:%d", port)
	startPeerProcess(t, "moto", exec.Command(python, shim, "-H", "127.0.0.1", "-p", fmt.Sprint(port)), endpoint+"/moto-api/")
	return endpoint
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
access_key_id = "test"
secret_access_key = "test"
key_identifier_value = %q
`, endpoint, serverID)
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
