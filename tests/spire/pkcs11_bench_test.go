package spire_test

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"fmt"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
)

// BenchmarkPkcs11SignDataAsSpireSeesIt measures SignData of the pkcs11 backend through
// SPIRE's own KeyManager facade on a SoftHSM2 token (PKCS11_BENCH_TOKEN, initialised by
// scripts/bench-pkcs11.sh), for each key type at concurrency 1 and 16, with the default
// session pool and with max_sessions = 1 (how throughput scales with sessions). The script
// runs the in-process cryptoki floor on the same token right after.
//
// Run: scripts/bench-pkcs11.sh (see docs/benchmarks.md).
func BenchmarkPkcs11SignDataAsSpireSeesIt(b *testing.B) {
	label := os.Getenv("PKCS11_BENCH_TOKEN")
	if label == "" {
		b.Skip("PKCS11_BENCH_TOKEN is not set: run scripts/bench-pkcs11.sh")
	}
	token := softToken{softHSMModule, label, "1234"}
	for _, sessions := range []string{"", "max_sessions = 1\n"} {
		pool := "default-pool"
		if sessions != "" {
			pool = "one-session"
		}
		km := loadExternal(b, pkcs11PluginData(token, "bench-"+pool)+sessions).KeyManager
		for _, kt := range []keymanager.KeyType{keymanager.ECP256, keymanager.ECP384, keymanager.RSA2048, keymanager.RSA4096} {
			key, err := km.GenerateKey(ctx, fmt.Sprintf("k-%d", kt), kt)
			if err != nil {
				b.Fatal(err)
			}
			hash, digest := crypto.SHA256, sha256.Sum256([]byte("benchmark"))
			digestBytes := digest[:]
			if kt == keymanager.ECP384 {
				d := sha512.Sum384([]byte("benchmark"))
				hash, digestBytes = crypto.SHA384, d[:]
			}
			for _, concurrency := range []int{1, 16} {
				b.Run(fmt.Sprintf("%s/%s/c%d", kt, pool, concurrency), func(b *testing.B) {
					benchSignHash(b, key, digestBytes, hash, concurrency)
				})
			}
		}
	}
}

// benchSignHash runs b.N signatures of `digest` (made with `hash`) over `concurrency`
// goroutines and reports p50/p99 latency and signatures per second next to Go's ns/op.
func benchSignHash(b *testing.B, signer crypto.Signer, digest []byte, hash crypto.Hash, concurrency int) {
	var mu sync.Mutex
	latencies := make([]time.Duration, 0, b.N)
	var wg sync.WaitGroup
	work := make(chan struct{}, b.N)
	for i := 0; i < b.N; i++ {
		work <- struct{}{}
	}
	close(work)
	b.ResetTimer()
	start := time.Now()
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]time.Duration, 0, b.N/concurrency+1)
			for range work {
				t := time.Now()
				if _, err := signer.Sign(rand.Reader, digest, hash); err != nil {
					b.Error(err)
					return
				}
				local = append(local, time.Since(t))
			}
			mu.Lock()
			latencies = append(latencies, local...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
	if len(latencies) == 0 {
		return
	}
	b.ReportMetric(float64(latencies[len(latencies)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(latencies[len(latencies)*99/100].Microseconds()), "p99-µs")
	b.ReportMetric(float64(len(latencies))/elapsed.Seconds(), "signs/s")
}
