package spire_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// TestOperatorBenchmark (KMS_BENCH=1): `keys list` and `keys prune` (dry run) on gcp_kms with
// 500 keys of this trust domain (10 servers × 50 ids) among 5,000 other CryptoKeys of the key
// ring, 25 ms added to every Cloud KMS call: calls made and wall time, with and without the
// foreign keys (listing is label-filtered, so they must not change either).
func TestOperatorBenchmark(t *testing.T) {
	if os.Getenv("KMS_BENCH") != "1" {
		t.Skip("benchmark; run with KMS_BENCH=1")
	}
	const (
		servers = 10
		ids     = 50
		foreign = 5000
		latency = 25 * time.Millisecond
	)
	ctx := context.Background()
	env := newGcpEnv(t, "--generation-delay", "0")
	fake := env.fake
	for s := 0; s < servers; s++ {
		l := loadExternal(t, env.pluginData(fmt.Sprintf("server-%d", s)))
		for i := 0; i < ids; i++ {
			_, err := l.KeyManager.GenerateKey(ctx, fmt.Sprintf("key-%d", i), keymanager.ECP256)
			require.NoError(t, err)
		}
		require.NoError(t, l.catalog.Close())
	}
	data := filepath.Join(t.TempDir(), "plugin_data.hcl")
	require.NoError(t, os.WriteFile(data, []byte(env.pluginData("server-0")), 0o600))

	var report []string
	add := func(format string, args ...any) { report = append(report, fmt.Sprintf(format, args...)) }
	add("| command | foreign CryptoKeys | calls | wall time |")
	add("|---|---|---|---|")
	measure := func(foreignKeys int, args ...string) {
		fake.SetLatency(t, latency)
		fake.ResetCalls(t)
		started := time.Now()
		run := runOperator(t, append(args, "--plugin-data", data, "--trust-domain", trustDomain, "--json")...)
		elapsed := time.Since(started)
		fake.SetLatency(t, 0)
		require.Equal(t, 0, run.code, run.stderr)
		add("| `%s` | %d | %s | %v |", strings.Join(args, " "), foreignKeys, describeCalls(fake.Calls(t)), elapsed.Round(time.Millisecond))
	}
	for _, foreignKeys := range []int{0, foreign} {
		if foreignKeys > 0 {
			fake.SeedForeignKeys(t, env.ring, foreignKeys)
		}
		measure(foreignKeys, "keys", "list")
		measure(foreignKeys, "keys", "list", "--all-servers")
		measure(foreignKeys, "keys", "prune")
		measure(foreignKeys, "doctor")
	}
	t.Logf("operator CLI on gcp_kms, %d keys of the trust domain (%d servers × %d ids), Cloud KMS fake + %v per call:\n%s",
		servers*ids, servers, ids, latency, strings.Join(report, "\n"))
}
