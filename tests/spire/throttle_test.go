package spire_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	keymanagerv1 "github.com/spiffe/spire-plugin-sdk/proto/spire/plugin/server/keymanager/v1"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// signDemand is SignData load as SPIRE's CA makes it: `callers` goroutines that each sign
// every `period` (a caller whose call ran late signs again at once: the load a server
// offers shrinks when signing slows, as SPIRE's callers wait for their signatures), plus
// a burst of `burst` simultaneous calls every `burstEvery`.
type signDemand struct {
	callers    int
	period     time.Duration
	burst      int
	burstEvery time.Duration
	duration   time.Duration
}

// perSecond is the demand without any throttling: callers / period, plus the bursts.
func (d signDemand) perSecond() float64 {
	rate := float64(d.callers) / d.period.Seconds()
	if d.burstEvery > 0 {
		rate += float64(d.burst) / d.burstEvery.Seconds()
	}
	return rate
}

// signOutcome is what SPIRE saw of one load run.
type signOutcome struct {
	ok        int
	failures  map[codes.Code]int
	latencies []time.Duration // of the successful calls, sorted
	elapsed   time.Duration
	firstErr  error
}

func (o signOutcome) failed() int {
	n := 0
	for _, c := range o.failures {
		n += c
	}
	return n
}

func (o signOutcome) goodput() float64 { return float64(o.ok) / o.elapsed.Seconds() }

func (o signOutcome) percentile(p int) time.Duration {
	if len(o.latencies) == 0 {
		return 0
	}
	return o.latencies[min(len(o.latencies)-1, len(o.latencies)*p/100)].Round(time.Millisecond)
}

// driveSignDemand runs the demand against key through SPIRE's KeyManager facade and checks
// every signature it gets with Go's crypto.
func driveSignDemand(key keymanager.Key, d signDemand) signOutcome {
	digest := sha256.Sum256([]byte("throttled"))
	public := key.Public().(*ecdsa.PublicKey)
	var mu sync.Mutex
	out := signOutcome{failures: map[codes.Code]int{}}
	sign := func() {
		started := time.Now()
		sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
		took := time.Since(started)
		mu.Lock()
		defer mu.Unlock()
		switch {
		case err != nil:
			out.failures[status.Code(err)]++
			if out.firstErr == nil {
				out.firstErr = err
			}
		case !ecdsa.VerifyASN1(public, digest[:], sig):
			out.failures[codes.DataLoss]++
			out.firstErr = fmt.Errorf("a signature that does not verify")
		default:
			out.ok++
			out.latencies = append(out.latencies, took)
		}
	}
	started := time.Now()
	end := started.Add(d.duration)
	var wg sync.WaitGroup
	for range d.callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ticks := time.NewTicker(d.period)
			defer ticks.Stop()
			for time.Now().Before(end) {
				sign()
				<-ticks.C
			}
		}()
	}
	if d.burstEvery > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for at := started.Add(d.burstEvery / 2); at.Before(end); at = at.Add(d.burstEvery) {
				time.Sleep(time.Until(at))
				for range d.burst {
					wg.Add(1)
					go func() { defer wg.Done(); sign() }()
				}
			}
		}()
	}
	wg.Wait()
	out.elapsed = time.Since(started)
	sort.Slice(out.latencies, func(i, j int) bool { return out.latencies[i] < out.latencies[j] })
	return out
}

// deadlineOutcome is what n simultaneous SignData calls with a deadline got.
type deadlineOutcome struct {
	ok       int
	refusals []time.Duration // ResourceExhausted, how long each took, sorted
	other    map[codes.Code]int
}

func (o deadlineOutcome) refusal(p int) time.Duration {
	if len(o.refusals) == 0 {
		return 0
	}
	return o.refusals[min(len(o.refusals)-1, len(o.refusals)*p/100)].Round(time.Millisecond)
}

func (o deadlineOutcome) String() string {
	return fmt.Sprintf("%d signed, %d refused with ResourceExhausted (p50 %v, slowest %v), other %v",
		o.ok, len(o.refusals), o.refusal(50), o.refusal(100), o.other)
}

// deadlineBurst sends n simultaneous SignData calls through SPIRE's plugin client, each with
// a gRPC deadline of `deadline`.
func deadlineBurst(t *testing.T, km keymanager.KeyManager, keyID string, n int, deadline time.Duration) deadlineOutcome {
	t.Helper()
	client := km.(*keymanager.V1).KeyManagerPluginClient
	digest := sha256.Sum256([]byte("deadline"))
	var mu sync.Mutex
	out := deadlineOutcome{other: map[codes.Code]int{}}
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), deadline)
			defer cancel()
			started := time.Now()
			_, err := client.SignData(ctx, &keymanagerv1.SignDataRequest{
				KeyId:      keyID,
				Data:       digest[:],
				SignerOpts: &keymanagerv1.SignDataRequest_HashAlgorithm{HashAlgorithm: keymanagerv1.HashAlgorithm_SHA256},
			})
			took := time.Since(started)
			mu.Lock()
			defer mu.Unlock()
			switch status.Code(err) {
			case codes.OK:
				out.ok++
			case codes.ResourceExhausted:
				out.refusals = append(out.refusals, took)
			default:
				out.other[status.Code(err)]++
			}
		}()
	}
	wg.Wait()
	sort.Slice(out.refusals, func(i, j int) bool { return out.refusals[i] < out.refusals[j] })
	return out
}

// throttledMoto starts moto behind a fault proxy whose Sign quota is perSecond with a
// burst, and a plugin on it with extra plugin_data; returns the plugin and the proxy.
func throttledMoto(t *testing.T, perSecond float64, burst int, extra string) (*loaded, *faultProxy) {
	t.Helper()
	proxy := newFaultProxy(t, startMoto(t))
	p := loadExternal(t, awsPluginData(proxy.URL, "throttled")+extra)
	proxy.quota("Sign", perSecond, burst)
	return p, proxy
}

// throttledGcpKms starts the Cloud KMS fake behind a fault proxy whose asymmetricSign quota
// is perSecond with a burst (answered 429 RESOURCE_EXHAUSTED, as Cloud KMS does), and a
// plugin on it with extra plugin_data; returns the plugin and the proxy.
func throttledGcpKms(t *testing.T, perSecond float64, burst int, extra string) (*loaded, *faultProxy) {
	t.Helper()
	env := newGcpEnv(t)
	proxy := newFaultProxy(t, env.fake.Endpoint)
	p := loadExternal(t, env.pluginDataVia(proxy.URL, "throttled")+extra)
	proxy.quota("asymmetricSign", perSecond, burst)
	return p, proxy
}

// TestAdaptiveRateUnderQuota: with a 50 Sign/s quota on the store and twice that demand
// (with a burst), SPIRE sees no SignData failure and the plugin gets at least 90 % of the
// quota without being told it (adaptive rate control is on by default); a burst that
// cannot be served before its callers' deadline is refused at once with ResourceExhausted,
// not left to time out. On aws_kms (moto, 400 ThrottlingException) and gcp_kms (the fake,
// 429 RESOURCE_EXHAUSTED).
func TestAdaptiveRateUnderQuota(t *testing.T) {
	t.Parallel()
	for _, store := range []struct {
		name, operation string
		start           func(t *testing.T, perSecond float64, burst int, extra string) (*loaded, *faultProxy)
	}{
		{"aws_kms", "Sign", throttledMoto},
		{"gcp_kms", "asymmetricSign", throttledGcpKms},
	} {
		t.Run(store.name, func(t *testing.T) {
			t.Parallel()
			adaptiveRateUnderQuota(t, store.operation, store.start)
		})
	}
}

func adaptiveRateUnderQuota(t *testing.T, operation string, start func(t *testing.T, perSecond float64, burst int, extra string) (*loaded, *faultProxy)) {
	const quota = 50.0
	p, proxy := start(t, quota, 10, "")
	key, err := p.KeyManager.GenerateKey(context.Background(), "JWT-Signer-A", keymanager.ECP256)
	require.NoError(t, err)

	demand := signDemand{callers: 18, period: 200 * time.Millisecond, burst: 50, burstEvery: 5 * time.Second, duration: 10 * time.Second}
	out := driveSignDemand(key, demand)
	throttled := proxy.throttles(operation)
	t.Logf("demand %.0f/s: goodput %.1f/s (%.0f%% of the quota), failures %v, p50 %v, p99 %v, throttled by the store %d",
		demand.perSecond(), out.goodput(), 100*out.goodput()/quota, out.failures, out.percentile(50), out.percentile(99), throttled)
	// The quota must have bitten, or the test proves nothing about throttling.
	require.Positive(t, throttled, "the store never throttled: is the quota on the right operation?")
	require.Zero(t, out.failed(), "SignData failures seen by SPIRE (first: %v)", out.firstErr)
	require.GreaterOrEqual(t, out.goodput(), 0.9*quota, "goodput")

	// 3 s deadlines, 300 calls at once: about 2.7 s of them fit at ~50/s; the rest must be
	// refused at once (a caller admitted to the queue may still be refused later if the
	// store throttles again and the rate is cut under it, but never left to time out).
	burst := deadlineBurst(t, p.KeyManager, "JWT-Signer-A", 300, 3*time.Second)
	t.Logf("300 calls with a 3 s deadline: %v", burst)
	require.Empty(t, burst.other, "no DeadlineExceeded or other failure")
	require.Greater(t, burst.ok, 50)
	require.Greater(t, len(burst.refusals), 50)
	require.Less(t, burst.refusal(50), 250*time.Millisecond, "refused at once, not after waiting")
}

// TestThrottlingGoodput is the benchmark behind docs/reliability.md ("Throttling and
// adaptive rate control"): a 50 Sign/s quota on moto (through the fault proxy), twice the
// quota of demand with bursts for 60 s (KMS_THROTTLE_SECONDS), through SPIRE's facade, for
// no limiter, a fixed limiter at the quota and adaptive rate control, then adaptive rate
// control on OpenBao's transit/sign behind the same quota, then no limiter and adaptive
// rate control on the Cloud KMS fake's asymmetricSign, in one run. It is a benchmark, not a
// test: it runs only with KMS_BENCH=1 (and needs BAO_BIN for the OpenBao row).
func TestThrottlingGoodput(t *testing.T) {
	if os.Getenv("KMS_BENCH") != "1" {
		t.Skip("benchmark; run with KMS_BENCH=1")
	}
	seconds := 60
	if s := os.Getenv("KMS_THROTTLE_SECONDS"); s != "" {
		_, err := fmt.Sscan(s, &seconds)
		require.NoError(t, err)
	}
	const quota = 50.0
	demand := signDemand{callers: 18, period: 200 * time.Millisecond, burst: 100, burstEvery: 10 * time.Second, duration: time.Duration(seconds) * time.Second}
	report := []string{
		fmt.Sprintf("quota %.0f Sign/s (burst 10) on moto (transit/sign on OpenBao, asymmetricSign on the Cloud KMS fake for the last rows); demand %.0f/s (%d callers every %v + %d at once every %v) for %v through SPIRE's facade",
			quota, demand.perSecond(), demand.callers, demand.period, demand.burst, demand.burstEvery, demand.duration),
		"",
		"| limiter | goodput (signs/s) | % of quota | SignData failures | p50 | p99 | store throttles | deadline burst (300 × 3 s): signed / refused ResourceExhausted (p50, slowest) / other |",
		"|---|---|---|---|---|---|---|---|",
	}
	onMoto := func(extra string) func() (*loaded, *faultProxy, string) {
		return func() (*loaded, *faultProxy, string) {
			p, proxy := throttledMoto(t, quota, 10, extra)
			return p, proxy, "Sign"
		}
	}
	onGcpKms := func(extra string) func() (*loaded, *faultProxy, string) {
		return func() (*loaded, *faultProxy, string) {
			p, proxy := throttledGcpKms(t, quota, 10, extra)
			return p, proxy, "asymmetricSign"
		}
	}
	for _, mode := range []struct {
		name  string
		start func() (*loaded, *faultProxy, string)
	}{
		{"none", onMoto("adaptive_rate_limit = false\n")},
		{"fixed (max_signs_per_second = 50)", onMoto("adaptive_rate_limit = false\nmax_signs_per_second = 50\n")},
		{"adaptive (default)", onMoto("")},
		// The same engine code on another backend: OpenBao's transit behind the same quota,
		// throttled with Vault's 429.
		{"adaptive (default), hashicorp_vault on OpenBao", func() (*loaded, *faultProxy, string) {
			clearVaultEnv(t)
			bao := startBao(t)
			bao.WritePolicy(t, "spire", vaultSpirePolicy)
			proxy := newFaultProxy(t, bao.Addr)
			p := loadExternal(t, vaultPluginData(proxy.URL, "throttled", tokenAuth(bao.CreateToken(t, "1h", "spire"))))
			proxy.quota("transit/sign", quota, 10)
			return p, proxy, "transit/sign"
		}},
		// And on Cloud KMS's REST API, throttled with 429 RESOURCE_EXHAUSTED.
		{"none, gcp_kms on the fake", onGcpKms("adaptive_rate_limit = false\n")},
		{"adaptive (default), gcp_kms on the fake", onGcpKms("")},
	} {
		p, proxy, operation := mode.start()
		key, err := p.KeyManager.GenerateKey(context.Background(), "JWT-Signer-A", keymanager.ECP256)
		require.NoError(t, err)
		proxy.throttles(operation)
		out := driveSignDemand(key, demand)
		throttles := proxy.throttles(operation)
		burst := deadlineBurst(t, p.KeyManager, "JWT-Signer-A", 300, 3*time.Second)
		failures := fmt.Sprint(out.failed())
		if out.failed() > 0 {
			failures += fmt.Sprintf(" %v", out.failures)
		}
		report = append(report, fmt.Sprintf("| %s | %.1f | %.0f%% | %s | %v | %v | %d | %d / %d (%v, %v) / %v |",
			mode.name, out.goodput(), 100*out.goodput()/quota, failures, out.percentile(50), out.percentile(99), throttles,
			burst.ok, len(burst.refusals), burst.refusal(50), burst.refusal(100), burst.other))
		require.NoError(t, p.catalog.Close())
	}
	fmt.Println(strings.Join(report, "\n"))
}
