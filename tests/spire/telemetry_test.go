package spire_test

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// 16 concurrent signers through SPIRE's own KeyManager facade, with metrics_listen and
// audit_log on: the scrape, parsed by the Prometheus project's text-format parser, counts
// exactly the operations made, and the audit log has exactly one valid JSON line per
// request, none interleaved.
func TestTelemetryThroughSPIRE(t *testing.T) {
	const signers, perSigner = 16, 30
	dir := t.TempDir()
	auditPath := filepath.Join(dir, "audit.jsonl")
	address := freeAddress(t)
	p := loadExternal(t, fmt.Sprintf("keys_path = %q\nmetrics_listen = %q\naudit_log = %q\n",
		filepath.Join(dir, "keys.json"), address, auditPath))

	key, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	var wg sync.WaitGroup
	errs := make(chan error, signers*perSigner)
	for s := 0; s < signers; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			for n := 0; n < perSigner; n++ {
				digest := sha256.Sum256([]byte(fmt.Sprintf("%d/%d", s, n)))
				sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
				if err == nil && !ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), digest[:], sig) {
					err = fmt.Errorf("signature %d/%d does not verify", s, n)
				}
				if err != nil {
					errs <- err
				}
			}
		}(s)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	signs := float64(signers * perSigner)

	families := scrapeMetrics(t, address)
	require.Equal(t, signs, counterValue(t, families, "kms_keymanager_sign_total",
		map[string]string{"backend": "disk", "key_type": "ec-p256", "result": "ok"}))
	require.Equal(t, signs, counterValue(t, families, "kms_keymanager_backend_calls_total",
		map[string]string{"backend": "disk", "operation": "sign", "result": "ok"}))
	require.Equal(t, 1.0, counterValue(t, families, "kms_keymanager_generate_key_total",
		map[string]string{"result": "ok"}))
	duration := metricWith(t, families, "kms_keymanager_sign_duration_seconds", map[string]string{"backend": "disk"})
	require.Equal(t, dto.MetricType_HISTOGRAM, families["kms_keymanager_sign_duration_seconds"].GetType())
	require.Equal(t, uint64(signs), duration.GetHistogram().GetSampleCount())
	keys := metricWith(t, families, "kms_keymanager_keys", map[string]string{"state": "active"})
	require.Equal(t, 1.0, keys.GetGauge().GetValue())
	for _, name := range []string{
		"kms_keymanager_rate_limited_wait_seconds", "kms_keymanager_last_stamp_timestamp_seconds",
		"kms_keymanager_last_sweep_timestamp_seconds", "kms_keymanager_swept_keys_total",
		"kms_keymanager_retries_total",
	} {
		require.Contains(t, families, name)
	}

	// The writer runs behind the requests: wait for it, then check every line.
	want := int(signs) + 1
	var lines []map[string]any
	require.Eventually(t, func() bool {
		lines = readAuditLines(t, auditPath)
		return len(lines) >= want
	}, 10*time.Second, 50*time.Millisecond)
	require.Len(t, lines, want)
	spki, err := x509.MarshalPKIXPublicKey(key.Public())
	require.NoError(t, err)
	sum := sha256.Sum256(spki)
	fingerprint := hex.EncodeToString(sum[:])
	ops := map[string]int{}
	for _, line := range lines {
		ops[line["operation"].(string)]++
		require.Equal(t, "ok", line["result"])
		require.Equal(t, "x509-CA-A", line["key_id"])
		require.Equal(t, fingerprint, line["fingerprint"], "the key SPIRE holds")
	}
	require.Equal(t, map[string]int{"GenerateKey": 1, "SignData": int(signs)}, ops)
}

func freeAddress(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	address := l.Addr().String()
	require.NoError(t, l.Close())
	return address
}

func scrapeMetrics(t *testing.T, address string) map[string]*dto.MetricFamily {
	resp, err := http.Get("http://" + address + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, expfmt.TypeTextPlain, expfmt.ResponseFormat(resp.Header).FormatType(),
		"served as the Prometheus text format")
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	return families
}

func metricWith(t *testing.T, families map[string]*dto.MetricFamily, name string, labels map[string]string) *dto.Metric {
	family, ok := families[name]
	require.True(t, ok, "%s missing", name)
	for _, m := range family.GetMetric() {
		got := map[string]string{}
		for _, l := range m.GetLabel() {
			got[l.GetName()] = l.GetValue()
		}
		if fmt.Sprint(got) == fmt.Sprint(labels) {
			return m
		}
	}
	t.Fatalf("%s has no series %v", name, labels)
	return nil
}

func counterValue(t *testing.T, families map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	require.Equal(t, dto.MetricType_COUNTER, families[name].GetType(), "%s is a counter", name)
	return metricWith(t, families, name, labels).GetCounter().GetValue()
}

func readAuditLines(t *testing.T, path string) []map[string]any {
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	require.True(t, len(data) == 0 || data[len(data)-1] == '\n', "a line was cut")
	var lines []map[string]any
	scanner := bufio.NewScanner(bytes.NewReader(data))
	for scanner.Scan() {
		var line map[string]any
		require.NoError(t, json.Unmarshal(scanner.Bytes(), &line), "not one JSON object per line: %s", scanner.Text())
		lines = append(lines, line)
	}
	require.NoError(t, scanner.Err())
	return lines
}
