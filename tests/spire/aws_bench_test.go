package spire_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/kms"
	kmstypes "github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/spiffe/spire/pkg/common/catalog"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// TestAwsKmsSideBySide measures kms-keymanager's aws_kms and SPIRE's built-in aws_kms in
// one run, both called through SPIRE's own KeyManager facade, against moto behind a proxy
// that adds 25 ms to every KMS call and counts calls per operation. It is a benchmark, not
// a test: it runs only with KMS_BENCH=1 (see docs/benchmarks.md).
func TestAwsKmsSideBySide(t *testing.T) {
	if os.Getenv("KMS_BENCH") != "1" {
		t.Skip("benchmark; run with KMS_BENCH=1")
	}
	foreign := 5000
	if n, err := strconv.Atoi(os.Getenv("KMS_BENCH_FOREIGN_KEYS")); err == nil {
		foreign = n
	}
	duration := 3 * time.Second
	ctx := context.Background()
	endpoint := startMoto(t)
	proxy := newFaultProxy(t, endpoint)
	// SPIRE's built-in reads the endpoint from the AWS SDK for Go's environment.
	t.Setenv("AWS_ENDPOINT_URL", proxy.URL)
	t.Setenv("AWS_ACCESS_KEY_ID", plantedAWSAccessKeyID)
	t.Setenv("AWS_SECRET_ACCESS_KEY", plantedAWSSecretKey)

	// Foreign keys: other servers' aliases and plain keys in the same account.
	client := kmsClient(endpoint)
	for i := 0; i < foreign; i++ {
		if i%2 == 0 {
			createForeignKey(t, client, fmt.Sprintf("alias/SPIRE_SERVER/example_org/foreign-%d/x509-CA-A", i))
			continue
		}
		_, err := client.CreateKey(ctx, &kms.CreateKeyInput{KeySpec: kmstypes.KeySpecEccNistP256, KeyUsage: kmstypes.KeyUsageTypeSignVerify})
		require.NoError(t, err)
	}

	impls := []struct {
		name string
		load func(serverID string) *loaded
	}{
		{"kms-keymanager", func(id string) *loaded {
			return loadExternal(t, awsPluginData(proxy.URL, id))
		}},
		{"kms-keymanager-tag-discovery", func(id string) *loaded {
			return loadExternal(t, awsPluginData(proxy.URL, id)+"enable_tag_based_key_discovery = true\n")
		}},
		{"spire-builtin-aws_kms", func(id string) *loaded {
			return load(t, catalog.PluginConfig{
				Type: "KeyManager", Name: "aws_kms",
				DataSource: catalog.FixedData(fmt.Sprintf("region = \"us-east-1\"\nkey_identifier_value = %q\n", id)),
			})
		}},
	}
	var report []string
	add := func(format string, args ...any) { report = append(report, fmt.Sprintf(format, args...)) }
	add("| implementation | measurement | value |")
	add("|---|---|---|")
	for _, impl := range impls {
		id := "bench-" + strings.ReplaceAll(impl.name, "_", "-")
		proxy.latency = 0
		first := impl.load(id)
		for i := 0; i < 10; i++ {
			_, err := first.KeyManager.GenerateKey(ctx, fmt.Sprintf("key-%d", i), keymanager.ECP256)
			require.NoError(t, err)
		}
		require.NoError(t, first.catalog.Close())
		proxy.latency = 25 * time.Millisecond

		proxy.snapshot()
		started := time.Now()
		km := impl.load(id).KeyManager
		add("| %s | start-up with 10 own keys among %d foreign keys | %s, %v |", impl.name, foreign, describeCalls(proxy.snapshot()), time.Since(started).Round(time.Millisecond))

		_, err := km.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
		require.NoError(t, err)
		add("| %s | KMS calls per GenerateKey (new id) | %s |", impl.name, describeCalls(proxy.snapshot()))
		_, err = km.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
		require.NoError(t, err)
		time.Sleep(200 * time.Millisecond) // asynchronous deletion queues
		add("| %s | KMS calls per GenerateKey (rotation) | %s |", impl.name, describeCalls(proxy.snapshot()))
		key, err := km.GetKey(ctx, "x509-CA-A")
		require.NoError(t, err)
		_, err = km.GetKeys(ctx)
		require.NoError(t, err)
		add("| %s | KMS calls per GetPublicKey + GetPublicKeys | %s |", impl.name, describeCalls(proxy.snapshot()))
		digest := sha256.Sum256([]byte("bench"))
		_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.NoError(t, err)
		add("| %s | KMS calls per SignData | %s |", impl.name, describeCalls(proxy.snapshot()))

		for _, c := range []int{1, 16, 64} {
			p50, p99, rate := signLoad(t, key, digest[:], c, duration, nil)
			add("| %s | SignData c=%d, 25 ms KMS latency | p50 %v, p99 %v, %.0f signs/s |", impl.name, c, p50, p99, rate)
		}
		_, quietP99, _ := signLoad(t, key, digest[:], 16, duration, nil)
		_, busyP99, _ := signLoad(t, key, digest[:], 16, duration, func(stop <-chan struct{}) {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				_, _ = km.GenerateKey(ctx, fmt.Sprintf("JWT-Signer-%d", i%2), keymanager.ECP256)
			}
		})
		add("| %s | SignData c=16 p99 while GenerateKeys run / without | %v / %v (%.2f×) |", impl.name, busyP99, quietP99, float64(busyP99)/float64(quietP99))
		proxy.snapshot()
	}
	fmt.Println(strings.Join(report, "\n"))
}

func describeCalls(calls map[string]int) string {
	total := 0
	var parts []string
	for op, n := range calls {
		if op == "" {
			op = "other"
		}
		total += n
		parts = append(parts, fmt.Sprintf("%s %d", op, n))
	}
	sort.Strings(parts)
	return fmt.Sprintf("%d calls (%s)", total, strings.Join(parts, ", "))
}

// signLoad signs for `duration` with `concurrency` goroutines; `background`, if set, runs
// alongside until the load ends. Returns p50, p99 and signatures per second.
func signLoad(t *testing.T, key crypto.Signer, digest []byte, concurrency int, duration time.Duration, background func(stop <-chan struct{})) (time.Duration, time.Duration, float64) {
	stop := make(chan struct{})
	var bg sync.WaitGroup
	if background != nil {
		bg.Add(1)
		go func() { defer bg.Done(); background(stop) }()
	}
	var mu sync.Mutex
	var latencies []time.Duration
	var wg sync.WaitGroup
	started := time.Now()
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(started) < duration {
				t0 := time.Now()
				if _, err := key.Sign(rand.Reader, digest, crypto.SHA256); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				latencies = append(latencies, time.Since(t0))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(started)
	close(stop)
	bg.Wait()
	sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
	if len(latencies) == 0 {
		return 0, 0, 0
	}
	round := func(d time.Duration) time.Duration { return d.Round(100 * time.Microsecond) }
	return round(latencies[len(latencies)/2]), round(latencies[len(latencies)*99/100]), float64(len(latencies)) / elapsed.Seconds()
}
