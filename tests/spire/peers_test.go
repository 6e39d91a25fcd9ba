package spire_test

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
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
	cmd := exec.Command(python, shim, "-H", "127.0.0.1", "-p", fmt.Sprint(port))
	logPath := filepath.Join(t.TempDir(), "moto.log")
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
	endpoint := fmt.Sprintf("http://127.0.0.1:%d", port)
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(endpoint + "/moto-api/")
		if err == nil {
			resp.Body.Close()
			return endpoint
		}
		if time.Now().After(deadline) {
			data, _ := os.ReadFile(logPath)
			t.Fatalf("moto did not start: %v\n%s", err, data)
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
