package spire_test

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// TestAzureSideBySide measures our azure_key_vault and SPIRE's built-in azure_key_vault in one
// run, both called through SPIRE's own KeyManager facade, against one Key Vault fake that
// counts requests per operation (its /_fake/stats) and adds KMS_BENCH_AZURE_LATENCY (25 ms by
// default) to every vault request through a fault rule for all operations. Start-up is
// measured with no other keys in the vault and then among KMS_BENCH_FOREIGN_KEYS (5,000) keys
// of other trust domains, made directly in the fake (POST /_fake/bulk). It is a benchmark,
// not a test: it runs only with KMS_BENCH=1 (see docs/benchmarks.md section 10).
func TestAzureSideBySide(t *testing.T) {
	if os.Getenv("KMS_BENCH") != "1" {
		t.Skip("benchmark; run with KMS_BENCH=1")
	}
	foreign := 5000
	if n, err := fmt.Sscan(os.Getenv("KMS_BENCH_FOREIGN_KEYS"), &foreign); n != 1 || err != nil {
		foreign = 5000
	}
	latency := 25 * time.Millisecond
	if d, err := time.ParseDuration(os.Getenv("KMS_BENCH_AZURE_LATENCY")); err == nil {
		latency = d
	}
	const (
		ownKeys  = 10
		duration = 3 * time.Second
	)
	fake := startAzureKeyVaultFake(t)
	fake.UseManagedIdentity(t)
	setLatency := func(d time.Duration) {
		fake.ClearFaults(t)
		if d > 0 {
			fake.Faults(t, azureFault{Op: "*", LatencyMS: int(d / time.Millisecond), Count: -1})
		}
	}

	type impl struct {
		name     string
		serverID string
		load     func(serverID string, extra ...string) *loaded
		ours     bool
	}
	impls := []impl{
		{"kms-keymanager", "bench-ours", func(id string, extra ...string) *loaded {
			return loadExternal(t, ourAzurePluginData(fake, id, extra...))
		}, true},
		{"SPIRE built-in azure_key_vault", "bench-spire", func(id string, extra ...string) *loaded {
			return loadBuiltInAzureKeyVault(t, fake, azurePluginData(fake.VaultURL, id, extra...))
		}, false},
	}

	var rows []string
	cells := map[string]map[string]string{}
	set := func(row, name, format string, args ...any) {
		if cells[row] == nil {
			cells[row] = map[string]string{}
			rows = append(rows, row)
		}
		cells[row][name] = fmt.Sprintf(format, args...)
	}
	// snapshot returns and resets the fake's per-operation counts: vault operations,
	// "unauthorized" (401 challenges: round trips too) and "token" (token endpoint calls;
	// the per-endpoint sub-counts token_app_service etc. count the same calls, left out).
	snapshot := func() map[string]int {
		stats := fake.Stats(t)
		fake.ResetStats(t)
		for op := range stats {
			if strings.HasPrefix(op, "token_") {
				delete(stats, op)
			}
		}
		return stats
	}
	// startUp loads im (its ownKeys keys are in the vault) and reports the calls of load +
	// Configure + one GetPublicKeys, and of anything it starts in the next 500 ms, at no
	// added latency and at `latency`.
	startUp := func(im impl, row string) {
		for _, d := range []time.Duration{0, latency} {
			setLatency(d)
			time.Sleep(200 * time.Millisecond)
			snapshot()
			started := time.Now()
			l := im.load(im.serverID)
			keys, err := l.KeyManager.GetKeys(ctx)
			elapsed := time.Since(started)
			require.NoError(t, err)
			require.Len(t, keys, ownKeys)
			time.Sleep(500 * time.Millisecond)
			calls := snapshot()
			require.NoError(t, l.catalog.Close())
			if d == 0 {
				set(row, im.name, "%s; %v", describeCalls(calls), elapsed.Round(time.Millisecond))
			} else {
				set(row+fmt.Sprintf(", time at +%v per call", latency), im.name, "%v", elapsed.Round(time.Millisecond))
			}
		}
	}

	setLatency(0)
	for _, im := range impls {
		l := im.load(im.serverID)
		for i := 0; i < ownKeys; i++ {
			_, err := l.KeyManager.GenerateKey(ctx, fmt.Sprintf("key-%d", i), keymanager.ECP256)
			require.NoError(t, err)
		}
		require.NoError(t, l.catalog.Close())
	}
	hashStarted := time.Now()
	sha256File(t, pluginBinary(t))
	hashing := time.Since(hashStarted)

	for _, im := range impls {
		startUp(im, fmt.Sprintf("start-up, %d own keys, %d other keys in the vault", ownKeys, ownKeys))
	}
	seeded := time.Now()
	seedForeignAzureKeys(t, fake, foreign)
	seeding := time.Since(seeded)
	for _, im := range impls {
		startUp(im, fmt.Sprintf("start-up, %d own keys among %d other trust domains' keys", ownKeys, foreign))
	}

	// Our sweep round and stamp round among the foreign keys: an instance whose sweeper
	// first runs 3 s after start (counted until the vault is quiet for a second), then one
	// whose stamper first runs 2 s after start (SPIRE's built-in: 6 h and 48 h tickers,
	// nothing to trigger them sooner; their calls are read from its code).
	setLatency(0)
	livenessRow := fmt.Sprintf("liveness round, %d keys (every 6 h by default, as SPIRE)", ownKeys)
	sweepRow := fmt.Sprintf("sweep round among %d other keys (every 48 h by default, as SPIRE)", foreign)
	for _, im := range impls {
		if !im.ours {
			set(livenessRow, im.name, "%d calls (get %d, update %d), from its code", 2*ownKeys, ownKeys, ownKeys)
			set(sweepRow, im.name, "%d calls (list %d), from its code", (foreign+2*ownKeys+24)/25, (foreign+2*ownKeys+24)/25)
			continue
		}
		l := im.load(im.serverID, "sweep_interval = \"3s\"\n")
		loadedAt := time.Now()
		snapshot()
		time.Sleep(time.Until(loadedAt.Add(2500 * time.Millisecond)))
		snapshot()
		swept := map[string]int{}
		started := time.Now()
		for quiet := 0; quiet < 5 && time.Since(started) < 60*time.Second; {
			time.Sleep(200 * time.Millisecond)
			calls := snapshot()
			if len(calls) == 0 && len(swept) > 0 {
				quiet++
				continue
			}
			quiet = 0
			for op, n := range calls {
				swept[op] += n
			}
		}
		set(sweepRow, im.name, "%s", describeCalls(swept))
		require.NoError(t, l.catalog.Close())

		l = im.load(im.serverID, "liveness_interval = \"2s\"\n")
		loadedAt = time.Now()
		time.Sleep(time.Until(loadedAt.Add(1500 * time.Millisecond)))
		snapshot()
		time.Sleep(time.Until(loadedAt.Add(3000 * time.Millisecond)))
		set(livenessRow, im.name, "%s", describeCalls(snapshot()))
		require.NoError(t, l.catalog.Close())
	}

	// Calls per operation, one implementation at a time; both stay loaded for the load runs.
	digest := sha256.Sum256([]byte("bench"))
	type signers struct {
		km          keymanager.KeyManager
		ec, rsa2048 crypto.Signer
	}
	running := map[string]*signers{}
	for _, im := range impls {
		setLatency(0)
		km := im.load(im.serverID).KeyManager
		for _, d := range []time.Duration{0, latency} {
			setLatency(d)
			time.Sleep(1500 * time.Millisecond) // SPIRE deletes a replaced key from a queue
			snapshot()
			at, keyID := "", "x509-CA-A"
			if d > 0 {
				at, keyID = fmt.Sprintf(", time at +%v per call", d), "x509-CA-B"
			}
			generate := func(row string) {
				started := time.Now()
				_, err := km.GenerateKey(ctx, keyID, keymanager.ECP256)
				elapsed := time.Since(started)
				require.NoError(t, err)
				time.Sleep(1500 * time.Millisecond)
				calls := snapshot()
				if d == 0 {
					set(row, im.name, "%s; %v", describeCalls(calls), elapsed.Round(100*time.Microsecond))
				} else {
					set(row+at, im.name, "%v", elapsed.Round(100*time.Microsecond))
				}
			}
			generate("GenerateKey (ec-p256), new key id")
			generate("GenerateKey (ec-p256), rotation")
		}
		setLatency(0)
		snapshot()
		key, err := km.GetKey(ctx, "x509-CA-A")
		require.NoError(t, err)
		set("GetPublicKey", im.name, "%s", describeCalls(snapshot()))
		_, err = km.GetKeys(ctx)
		require.NoError(t, err)
		set("GetPublicKeys", im.name, "%s", describeCalls(snapshot()))
		_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.NoError(t, err)
		set("SignData", im.name, "%s", describeCalls(snapshot()))
		rsaKey, err := km.GenerateKey(ctx, "rsa-signer", keymanager.RSA2048)
		require.NoError(t, err)
		running[im.name] = &signers{km: km, ec: key, rsa2048: rsaKey}
	}

	// SignData load at `latency`, the implementations taking turns cell by cell (and which
	// goes first alternating), so that a change in the machine's load falls on both.
	setLatency(latency)
	turn := 0
	inTurn := func() []impl {
		turn++
		if turn%2 == 0 {
			return []impl{impls[1], impls[0]}
		}
		return impls
	}
	for _, kt := range []string{"ec-p256", "rsa-2048"} {
		signer := func(im impl) crypto.Signer {
			if kt == "ec-p256" {
				return running[im.name].ec
			}
			return running[im.name].rsa2048
		}
		for _, c := range []int{1, 16, 64} {
			for _, im := range inTurn() {
				snapshot()
				p50, p99, rate := signLoad(t, signer(im), digest[:], c, duration, nil)
				calls := snapshot()
				set(fmt.Sprintf("SignData %s c=%d, +%v per call", kt, c, latency), im.name, "p50 %v, p99 %v, %.0f signs/s (sign calls %.0f/s)",
					p50, p99, rate, float64(calls["sign"])/duration.Seconds())
			}
		}
		for _, im := range inTurn() {
			km := running[im.name].km
			_, quietP99, _ := signLoad(t, signer(im), digest[:], 16, duration, nil)
			var generated atomic.Int64
			_, busyP99, _ := signLoad(t, signer(im), digest[:], 16, duration, func(stop <-chan struct{}) {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					if _, err := km.GenerateKey(ctx, fmt.Sprintf("JWT-Signer-%d", i%2), keymanager.ECP256); err != nil {
						t.Error(err)
						return
					}
					generated.Add(1)
				}
			})
			time.Sleep(1500 * time.Millisecond)
			set(fmt.Sprintf("SignData %s c=16 p99 while GenerateKeys (ec-p256) run / without, +%v per call", kt, latency), im.name,
				"%v / %v = %.2f×, %d GenerateKeys in %v", busyP99, quietP99, float64(busyP99)/float64(quietP99), generated.Load(), duration)
		}
	}
	setLatency(0)

	out := []string{"| measurement |", "|---|"}
	for _, im := range impls {
		out[0] += " " + im.name + " |"
		out[1] += "---|"
	}
	for _, row := range rows {
		line := "| " + row + " |"
		for _, im := range impls {
			v, ok := cells[row][im.name]
			if !ok {
				v = "—"
			}
			line += " " + v + " |"
		}
		out = append(out, line)
	}
	t.Logf("azure_key_vault through SPIRE's KeyManager facade on the Key Vault fake, %d CPUs, %v added per vault call in the load cells:\n%s",
		runtime.NumCPU(), latency, strings.Join(out, "\n"))
	t.Logf("harness: hashing the plugin binary for plugin_checksum (part of each kms-keymanager start-up) took %v; seeding %d foreign keys took %v",
		hashing.Round(time.Millisecond), foreign, seeding.Round(time.Millisecond))
}

// seedForeignAzureKeys makes n EC P-256 keys named as SPIRE names them, tagged for other
// trust domains (other-<i%100>.example, server other-<i>), directly in the fake, 500 a request.
func seedForeignAzureKeys(t *testing.T, fake *azureKeyVaultFake, n int) {
	t.Helper()
	for start := 0; start < n; start += 500 {
		var batch []azureBulkKey
		for i := start; i < n && i < start+500; i++ {
			u := make([]byte, 16)
			_, err := rand.Read(u)
			require.NoError(t, err)
			u[6] = u[6]&0x0f | 0x40
			u[8] = u[8]&0x3f | 0x80
			batch = append(batch, azureBulkKey{
				Name: fmt.Sprintf("spire-key-%x-%x-%x-%x-%x-x509-CA-A", u[:4], u[4:6], u[6:8], u[8:10], u[10:]),
				Tags: map[string]string{"spire-server-td": fmt.Sprintf("other-%d.example", i%100), "spire-server-id": fmt.Sprintf("other-%d", i)},
			})
		}
		require.Len(t, fake.Bulk(t, batch...), len(batch))
	}
}
