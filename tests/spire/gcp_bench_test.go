package spire_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// TestGcpKmsBenchmark measures kms-keymanager's gcp_kms through SPIRE's own KeyManager facade
// against the Cloud KMS REST fake with 25 ms added to every API call: calls per operation
// (start-up with 0 and 5,000 foreign CryptoKeys, GenerateKey, SignData, GetPublicKey(s)),
// SignData latency and throughput, SignData p99 while GenerateKeys run, and concurrent
// rotation of one shared key by 4 instances. SPIRE's built-in gcp_kms cannot be measured
// here (its gRPC client has no endpoint option); docs/benchmarks.md derives its call counts
// from its source. It is a benchmark, not a test: it runs only with KMS_BENCH=1.
func TestGcpKmsBenchmark(t *testing.T) {
	if os.Getenv("KMS_BENCH") != "1" {
		t.Skip("benchmark; run with KMS_BENCH=1")
	}
	const (
		foreign   = 5000
		ownKeys   = 10
		latency   = 25 * time.Millisecond
		duration  = 3 * time.Second
		instances = 4
		rounds    = 20
	)
	ctx := context.Background()
	env := newGcpEnv(t, "--generation-delay", "0")
	fake := env.fake
	// calls returns the API calls since the last call to it.
	calls := func() map[string]int {
		c := fake.Calls(t)
		fake.ResetCalls(t)
		return c
	}
	total := func(c map[string]int) int {
		n := 0
		for _, v := range c {
			n += v
		}
		return n
	}

	var report []string
	add := func(format string, args ...any) { report = append(report, fmt.Sprintf(format, args...)) }
	add("| measurement | value |")
	add("|---|---|")

	// The measured server's own keys, made without latency.
	const serverID = "bench"
	first := loadExternal(t, env.pluginData(serverID))
	for i := 0; i < ownKeys; i++ {
		_, err := first.KeyManager.GenerateKey(ctx, fmt.Sprintf("key-%d", i), keymanager.ECP256)
		require.NoError(t, err)
	}
	require.NoError(t, first.catalog.Close())
	fake.SetLatency(t, latency)

	startUp := func(foreignKeys int) *loaded {
		calls()
		started := time.Now()
		l := loadExternal(t, env.pluginData(serverID))
		elapsed := time.Since(started)
		keys, err := l.KeyManager.GetKeys(ctx)
		require.NoError(t, err)
		require.Len(t, keys, ownKeys)
		add("| start-up (load + Configure + discovery), %d own keys among %d foreign CryptoKeys | %s, %v |",
			ownKeys, foreignKeys, describeCalls(calls()), elapsed.Round(time.Millisecond))
		return l
	}
	hashStarted := time.Now()
	sha256File(t, pluginBinary(t))
	add("| (harness: hashing the plugin binary for plugin_checksum, part of every start-up below) | %v |", time.Since(hashStarted).Round(time.Millisecond))
	l := startUp(0)
	require.NoError(t, l.catalog.Close())
	fake.SetLatency(t, 0)
	fake.SeedForeignKeys(t, env.ring, foreign)
	fake.SetLatency(t, latency)
	km := startUp(foreign).KeyManager

	_, err := km.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	add("| GenerateKey, new key id | %s |", describeCalls(calls()))
	_, err = km.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	time.Sleep(200 * time.Millisecond) // asynchronous clean-up, if any
	add("| GenerateKey, rotation | %s |", describeCalls(calls()))
	key, err := km.GetKey(ctx, "x509-CA-A")
	require.NoError(t, err)
	_, err = km.GetKeys(ctx)
	require.NoError(t, err)
	add("| GetPublicKey + GetPublicKeys | %s |", describeCalls(calls()))
	digest := sha256.Sum256([]byte("bench"))
	_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
	require.NoError(t, err)
	add("| SignData | %s |", describeCalls(calls()))

	for _, c := range []int{1, 16, 64} {
		p50, p99, rate := signLoad(t, key, digest[:], c, duration, nil)
		add("| SignData ec-p256 c=%d, 25 ms KMS latency | p50 %v, p99 %v, %.0f signs/s |", c, p50, p99, rate)
	}
	calls()
	_, quietP99, _ := signLoad(t, key, digest[:], 16, duration, nil)
	generated := 0
	_, busyP99, _ := signLoad(t, key, digest[:], 16, duration, func(stop <-chan struct{}) {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			_, err := km.GenerateKey(ctx, fmt.Sprintf("JWT-Signer-%d", i%2), keymanager.ECP256)
			if err != nil {
				t.Error(err)
				return
			}
			generated++
		}
	})
	calls()
	add("| SignData c=16 p99 while GenerateKeys run / without | %v / %v (%.2f×), %d GenerateKeys during the run |",
		busyP99, quietP99, float64(busyP99)/float64(quietP99), generated)

	// Shared keys: 4 instances (different server ids) rotate one shared CryptoKey at once.
	var replicas []keymanager.KeyManager
	for i := 0; i < instances; i++ {
		replicas = append(replicas, loadExternal(t, env.pluginData(fmt.Sprintf("bench-replica-%d", i), sharedKeys("bench"))).KeyManager)
	}
	shared := fmt.Sprintf("bench-%s-JWT-Signer-A", tdHash())
	versions := func() int {
		k := fake.State(t, env.ring).Key(shared)
		if k == nil {
			return 0
		}
		return len(k.Versions)
	}
	type round struct {
		created int
		wall    time.Duration
		slowest time.Duration
		calls   map[string]int
	}
	rotate := func() round {
		before := versions()
		calls()
		start := make(chan struct{})
		results := make([]crypto.PublicKey, instances)
		errs := make([]error, instances)
		took := make([]time.Duration, instances)
		var wg sync.WaitGroup
		for i, r := range replicas {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				t0 := time.Now()
				k, err := r.GenerateKey(ctx, "JWT-Signer-A", keymanager.ECP256)
				took[i] = time.Since(t0)
				errs[i] = err
				if err == nil {
					results[i] = k.Public()
				}
			}()
		}
		started := time.Now()
		close(start)
		wg.Wait()
		wall := time.Since(started)
		c := calls()
		for i := range replicas {
			require.NoError(t, errs[i], "instance %d", i)
			require.True(t, results[i].(equaler).Equal(results[0]), "instance %d got another key", i)
		}
		sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
		return round{created: versions() - before, wall: wall, slowest: took[instances-1], calls: c}
	}
	creation := rotate()
	require.Equal(t, 1, creation.created, "concurrent creation makes exactly one version")
	add("| shared key, %d instances create it at once | %d version, %v wall, %s |",
		instances, creation.created, creation.wall.Round(time.Millisecond), describeCalls(creation.calls))

	var perRound []string
	var walls []time.Duration
	var callTotals []int
	sums := map[string]int{}
	exactlyOne := 0
	for i := 0; i < rounds; i++ {
		r := rotate()
		if r.created == 1 {
			exactlyOne++
		}
		walls = append(walls, r.wall)
		callTotals = append(callTotals, total(r.calls))
		for op, n := range r.calls {
			sums[op] += n
		}
		perRound = append(perRound, fmt.Sprintf("| %d | %d | %v | %s |", i+1, r.created, r.wall.Round(time.Millisecond), describeCalls(r.calls)))
	}
	sort.Slice(walls, func(i, j int) bool { return walls[i] < walls[j] })
	sort.Ints(callTotals)
	var mean []string
	for op, n := range sums {
		mean = append(mean, fmt.Sprintf("%s %.1f", op, float64(n)/rounds))
	}
	sort.Strings(mean)
	add("| shared key, %d concurrent rotation rounds × %d instances: rounds with exactly 1 new version | %d / %d |", rounds, instances, exactlyOne, rounds)
	add("| shared key rotation wall time per round (all %d instances done) min / median / max | %v / %v / %v |",
		instances, walls[0].Round(time.Millisecond), walls[rounds/2].Round(time.Millisecond), walls[rounds-1].Round(time.Millisecond))
	add("| shared key API calls per round, all instances: min / median / max | %d / %d / %d |", callTotals[0], callTotals[rounds/2], callTotals[rounds-1])
	add("| shared key API calls per round, mean by method | %s |", strings.Join(mean, ", "))

	t.Logf("gcp_kms, through SPIRE's KeyManager facade, Cloud KMS fake + %v per API call:\n%s", latency, strings.Join(report, "\n"))
	t.Logf("shared-key rotation rounds (%d instances):\n| round | versions created | wall time | API calls (all instances) |\n|---|---|---|---|\n%s",
		instances, strings.Join(perRound, "\n"))
	require.Equal(t, rounds, exactlyOne, "every concurrent rotation round creates exactly one version")
}
