package spire_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/kms"
	kmstypes "github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// The soak's bounds (stated in docs/reliability.md, "Soak and resources").
const (
	// soakRSSGrowthBound: how far the plugin's RSS may rise after warm-up (the first window):
	// peak of the last window over peak of the first half after warm-up.
	soakRSSGrowthBound = 8 << 20
	// soakCountSlack: how many more file descriptors or threads than in the first half after
	// warm-up the last window may show (a connection or blocking-pool thread more or less is not a leak).
	soakCountSlack = 8
	// soakMaxInFlight caps concurrent SignData calls per backend; a tick that finds them all
	// busy is counted as missed (the plugin fell behind the offered rate).
	soakMaxInFlight = 32
)

// soakKinds are the keys a soak signs with, in A/B slots as SPIRE's CA and JWT key managers
// keep them: each GenerateKey prepares the slot not in use, which then becomes the one signed
// with (SPIRE never regenerates the key it is signing with). RSA keeps RSA signing in the mix.
var soakKinds = []struct {
	slots [2]string
	kt    keymanager.KeyType
}{
	{[2]string{"x509-CA-A", "x509-CA-B"}, keymanager.ECP256},
	{[2]string{"JWT-Signer-A", "JWT-Signer-B"}, keymanager.RSA2048},
}

// TestSoak drives a steady mix of SignData and GenerateKey through SPIRE's own KeyManager
// facade on the disk backend and on aws_kms (moto), both at once, for KMS_SOAK_DURATION, and
// samples each plugin process's RSS, open file descriptors and threads from /proc. It fails
// on any SignData/GenerateKey error or signature that does not verify (Go's crypto), on RSS
// growth beyond soakRSSGrowthBound after warm-up, and on file descriptors or threads that
// keep growing. It runs only through scripts/soak.sh (KMS_SOAK_DURATION set): 30 minutes by
// default, 2 in CI.
func TestSoak(t *testing.T) {
	spec := os.Getenv("KMS_SOAK_DURATION")
	if spec == "" {
		t.Skip("soak: run scripts/soak.sh [minutes] (sets KMS_SOAK_DURATION)")
	}
	duration, err := time.ParseDuration(spec)
	require.NoError(t, err, "KMS_SOAK_DURATION")
	cfg := soakConfig{
		duration:      duration,
		window:        envDuration(t, "KMS_SOAK_WINDOW", duration/6),
		sample:        envDuration(t, "KMS_SOAK_SAMPLE", min(max(duration/60, time.Second), 5*time.Second)),
		signsPerSec:   envInt(t, "KMS_SOAK_SIGNS_PER_SECOND", 50),
		generateEvery: envDuration(t, "KMS_SOAK_GENERATE_EVERY", 5*time.Second),
	}
	require.Greater(t, int(cfg.duration/cfg.window), 2, "a soak needs at least three windows (warm-up and two to compare)")

	endpoint := startMoto(t)
	dir := t.TempDir()
	targets := []struct{ name, pluginData string }{
		{"disk", fmt.Sprintf("keys_path = %q\n", filepath.Join(dir, "keys.json"))},
		{"aws_kms (moto)", awsPluginData(endpoint, "soak")},
	}
	results := make([]*soakResult, len(targets))
	plugins := make([]*loaded, len(targets))
	for i, target := range targets {
		plugins[i] = loadExternal(t, target.pluginData)
	}
	var wg sync.WaitGroup
	for i, target := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = runSoak(target.name, plugins[i], cfg)
		}()
	}
	wg.Wait()

	report := soakReport(cfg, results)
	fmt.Println(report)
	if path := os.Getenv("KMS_SOAK_REPORT"); path != "" {
		require.NoError(t, os.WriteFile(path, []byte(report), 0o644))
	}
	for _, r := range results {
		for _, problem := range r.problems() {
			t.Errorf("%s: %s", r.name, problem)
		}
	}

	// What a user would check in the store: the keys SPIRE holds are the ones the plugin
	// serves, and moto holds no enabled key beyond them (replaced keys are scheduled for
	// deletion, not leaked).
	for i, p := range plugins {
		keys, err := p.KeyManager.GetKeys(ctx)
		require.NoError(t, err, results[i].name)
		served := map[string]bool{}
		for _, k := range keys {
			served[k.ID()] = true
		}
		for _, kind := range soakKinds {
			for _, id := range kind.slots {
				require.True(t, served[id], "%s: %s is not served after the soak", results[i].name, id)
			}
		}
	}
	inUse := 2 * len(soakKinds)
	require.Equal(t, inUse, enabledKmsKeys(t, endpoint), "enabled keys in moto after the soak (keys in use: %d)", inUse)
}

type soakConfig struct {
	duration, window, sample, generateEvery time.Duration
	signsPerSec                             int
}

func (c soakConfig) windows() int { return int((c.duration + c.window - 1) / c.window) }

type soakWindow struct {
	signs, generates                   []time.Duration
	signErrors, generateErrors, misses int
	firstError                         string
}

type soakSample struct {
	at           time.Duration
	rss          int64
	fds, threads int
	err          error
}

type soakResult struct {
	name    string
	cfg     soakConfig
	pid     int
	windows []soakWindow
	samples []soakSample
	setup   error
}

// runSoak loads nothing itself: it drives the already loaded plugin for cfg.duration.
func runSoak(name string, p *loaded, cfg soakConfig) *soakResult {
	r := &soakResult{name: name, cfg: cfg, windows: make([]soakWindow, cfg.windows())}
	r.pid, r.setup = pluginPID(p)
	if r.setup != nil {
		return r
	}
	// current[kind] is the key signed with; active[kind] its slot.
	current := make([]atomic.Pointer[keymanager.Key], len(soakKinds))
	active := make([]int, len(soakKinds))
	for i, kind := range soakKinds {
		for slot := 1; slot >= 0; slot-- {
			key, err := p.KeyManager.GenerateKey(ctx, kind.slots[slot], kind.kt)
			if err != nil {
				r.setup = fmt.Errorf("GenerateKey %s: %w", kind.slots[slot], err)
				return r
			}
			current[i].Store(&key)
		}
	}

	var mu sync.Mutex
	start := time.Now()
	record := func(began time.Time, generate bool, latency time.Duration, err error) {
		mu.Lock()
		defer mu.Unlock()
		w := &r.windows[min(int(began.Sub(start)/cfg.window), len(r.windows)-1)]
		switch {
		case err != nil && generate:
			w.generateErrors++
		case err != nil:
			w.signErrors++
		case generate:
			w.generates = append(w.generates, latency)
		default:
			w.signs = append(w.signs, latency)
		}
		if err != nil && w.firstError == "" {
			w.firstError = err.Error()
		}
	}

	done := make(chan struct{})
	var workers sync.WaitGroup
	workers.Add(2)
	go func() { // the resource sampler
		defer workers.Done()
		ticker := time.NewTicker(cfg.sample)
		defer ticker.Stop()
		for {
			s := sampleProc(r.pid)
			s.at = time.Since(start)
			mu.Lock()
			r.samples = append(r.samples, s)
			mu.Unlock()
			select {
			case <-done:
				return
			case <-ticker.C:
			}
		}
	}()
	go func() { // rotations: one GenerateKey per tick, the kinds in turn
		defer workers.Done()
		ticker := time.NewTicker(cfg.generateEvery)
		defer ticker.Stop()
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			case <-ticker.C:
			}
			kind := i % len(soakKinds)
			next := 1 - active[kind]
			began := time.Now()
			key, err := p.KeyManager.GenerateKey(ctx, soakKinds[kind].slots[next], soakKinds[kind].kt)
			record(began, true, time.Since(began), err)
			if err == nil {
				current[kind].Store(&key)
				active[kind] = next
			}
		}
	}()

	// SignData at a steady rate, each call on its own goroutine (SPIRE signs concurrently),
	// round robin over the current keys; every signature is verified with Go's crypto.
	slots := make(chan struct{}, soakMaxInFlight)
	var signs sync.WaitGroup
	ticker := time.NewTicker(time.Second / time.Duration(cfg.signsPerSec))
	deadline := time.After(cfg.duration)
	for n := uint64(0); ; n++ {
		select {
		case <-deadline:
			ticker.Stop()
			signs.Wait()
			close(done)
			workers.Wait()
			return r
		case <-ticker.C:
		}
		select {
		case slots <- struct{}{}:
		default:
			mu.Lock()
			r.windows[min(int(time.Since(start)/cfg.window), len(r.windows)-1)].misses++
			mu.Unlock()
			continue
		}
		key := *current[n%uint64(len(current))].Load()
		signs.Add(1)
		go func() {
			defer signs.Done()
			defer func() { <-slots }()
			var msg [8]byte
			binary.BigEndian.PutUint64(msg[:], n)
			digest := sha256.Sum256(msg[:])
			began := time.Now()
			sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
			latency := time.Since(began)
			if err == nil {
				err = verifySoakSignature(key, digest[:], sig)
			}
			record(began, false, latency, err)
		}()
	}
}

func verifySoakSignature(key keymanager.Key, digest, sig []byte) error {
	switch pub := key.Public().(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, digest, sig) {
			return fmt.Errorf("%s: ECDSA signature does not verify", key.ID())
		}
	case *rsa.PublicKey:
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest, sig); err != nil {
			return fmt.Errorf("%s: %w", key.ID(), err)
		}
	default:
		return fmt.Errorf("%s: unexpected public key type %T", key.ID(), pub)
	}
	return nil
}

// pluginPID is the plugin process's id, from go-plugin's "plugin started" debug line as
// SPIRE's catalog logs it.
func pluginPID(p *loaded) (int, error) {
	entry := p.Logs.find("plugin started")
	if entry == nil {
		return 0, errors.New(`go-plugin logged no "plugin started" line with the plugin's pid`)
	}
	pid, err := strconv.Atoi(fmt.Sprint(entry.Data["pid"]))
	if err != nil {
		return 0, fmt.Errorf("plugin pid %v: %w", entry.Data["pid"], err)
	}
	return pid, nil
}

// sampleProc reads a process's resident set (VmRSS), threads and open file descriptors.
func sampleProc(pid int) soakSample {
	var s soakSample
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		s.err = err
		return s
	}
	for _, line := range strings.Split(string(status), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 2 {
			continue
		}
		n, _ := strconv.ParseInt(fields[1], 10, 64)
		switch fields[0] {
		case "VmRSS:":
			s.rss = n << 10 // kB
		case "Threads:":
			s.threads = int(n)
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		s.err = err
		return s
	}
	s.fds = len(fds)
	return s
}

// windowSamples are the samples taken during window i.
func (r *soakResult) windowSamples(i int) []soakSample {
	var out []soakSample
	for _, s := range r.samples {
		if s.err == nil && int(s.at/r.cfg.window) == i {
			out = append(out, s)
		}
	}
	return out
}

func peak(samples []soakSample, value func(soakSample) int64) int64 {
	var m int64
	for _, s := range samples {
		m = max(m, value(s))
	}
	return m
}

func rssOf(s soakSample) int64     { return s.rss }
func fdsOf(s soakSample) int64     { return int64(s.fds) }
func threadsOf(s soakSample) int64 { return int64(s.threads) }

// problems lists every way this run failed its bounds.
func (r *soakResult) problems() []string {
	if r.setup != nil {
		return []string{r.setup.Error()}
	}
	var out []string
	for i, w := range r.windows {
		if w.signErrors+w.generateErrors > 0 {
			out = append(out, fmt.Sprintf("window %d: %d SignData and %d GenerateKey failures (first: %s)", i+1, w.signErrors, w.generateErrors, w.firstError))
		}
		offered := len(w.signs) + w.signErrors + w.misses
		if w.misses*100 > offered {
			out = append(out, fmt.Sprintf("window %d: %d of %d SignData ticks found %d calls in flight (fell behind the offered rate)", i+1, w.misses, offered, soakMaxInFlight))
		}
	}
	for _, s := range r.samples {
		if s.err != nil {
			out = append(out, fmt.Sprintf("sampling /proc/%d at %v: %v", r.pid, s.at.Round(time.Second), s.err))
			break
		}
	}
	// Warm-up is the first window; the reference the last window is held to is the first
	// half after it (the allocator settles within it; a leak shows as the last window
	// above it, by at least half of what it leaked over the run).
	n := len(r.windows)
	if n < 3 {
		return append(out, "fewer than three windows")
	}
	last := r.windowSamples(n - 1)
	var ref []soakSample
	for i := 1; i <= max(1, n/2-1); i++ {
		ref = append(ref, r.windowSamples(i)...)
	}
	if len(last) == 0 || len(ref) == 0 {
		return append(out, "no /proc samples after warm-up or in the last window")
	}
	if grew := peak(last, rssOf) - peak(ref, rssOf); grew > soakRSSGrowthBound {
		out = append(out, fmt.Sprintf("RSS grew %.1f MiB after warm-up (bound %d MiB): %s", float64(grew)/(1<<20), soakRSSGrowthBound>>20, r.rssSeries()))
	}
	for _, c := range []struct {
		what  string
		value func(soakSample) int64
	}{{"open file descriptors", fdsOf}, {"threads", threadsOf}} {
		if grew := peak(last, c.value) - peak(ref, c.value); grew > soakCountSlack {
			out = append(out, fmt.Sprintf("%s grew by %d after warm-up (slack %d)", c.what, grew, soakCountSlack))
		}
		// Monotonic growth: every window after warm-up peaks higher than the one before.
		rising := true
		for i := 2; i < n; i++ {
			if peak(r.windowSamples(i), c.value) <= peak(r.windowSamples(i-1), c.value) {
				rising = false
			}
		}
		if rising && n >= 4 {
			out = append(out, fmt.Sprintf("%s rose in every window after warm-up", c.what))
		}
	}
	return out
}

func (r *soakResult) rssSeries() string {
	var parts []string
	for i := range r.windows {
		parts = append(parts, fmt.Sprintf("%.1f", float64(peak(r.windowSamples(i), rssOf))/(1<<20)))
	}
	return strings.Join(parts, " → ") + " MiB"
}

func percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)*p/100, len(sorted)-1)]
}

func fmtLatency(d time.Duration) string {
	if d >= 10*time.Millisecond {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(10 * time.Microsecond).String()
}

// soakReport renders one markdown table per backend: a row per window.
func soakReport(cfg soakConfig, results []*soakResult) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Soak: %v, %d SignData/s per backend (EC P-256 and RSA-2048 keys, each signature verified), one GenerateKey every %v, windows of %v, /proc sampled every %v.\n",
		cfg.duration, cfg.signsPerSec, cfg.generateEvery, cfg.window, cfg.sample)
	for _, r := range results {
		fmt.Fprintf(&b, "\n%s (plugin pid %d)\n\n", r.name, r.pid)
		if r.setup != nil {
			fmt.Fprintf(&b, "setup failed: %v\n", r.setup)
			continue
		}
		b.WriteString("| window | SignData ok / failed | p50 | p99 | max | GenerateKey ok / failed, p99 | RSS min–max (MiB) | open fds (max) | threads (max) |\n")
		b.WriteString("|---|---|---|---|---|---|---|---|---|\n")
		for i, w := range r.windows {
			sort.Slice(w.signs, func(a, b int) bool { return w.signs[a] < w.signs[b] })
			sort.Slice(w.generates, func(a, b int) bool { return w.generates[a] < w.generates[b] })
			samples := r.windowSamples(i)
			lowest := int64(0)
			for j, s := range samples {
				if j == 0 || s.rss < lowest {
					lowest = s.rss
				}
			}
			from, to := time.Duration(i)*cfg.window, min(time.Duration(i+1)*cfg.window, cfg.duration)
			label := fmt.Sprintf("%v–%v", from, to)
			if i == 0 {
				label += " (warm-up)"
			}
			var maxSign time.Duration
			if len(w.signs) > 0 {
				maxSign = w.signs[len(w.signs)-1]
			}
			fmt.Fprintf(&b, "| %s | %d / %d | %s | %s | %s | %d / %d, %s | %.1f–%.1f | %d | %d |\n",
				label, len(w.signs), w.signErrors, fmtLatency(percentile(w.signs, 50)), fmtLatency(percentile(w.signs, 99)), fmtLatency(maxSign),
				len(w.generates), w.generateErrors, fmtLatency(percentile(w.generates, 99)),
				float64(lowest)/(1<<20), float64(peak(samples, rssOf))/(1<<20), peak(samples, fdsOf), peak(samples, threadsOf))
		}
		problems := r.problems()
		if len(problems) == 0 {
			fmt.Fprintf(&b, "\nRSS peak per window: %s; within bounds (RSS growth after warm-up ≤ %d MiB, fds and threads ≤ +%d and not rising every window).\n", r.rssSeries(), soakRSSGrowthBound>>20, soakCountSlack)
		} else {
			fmt.Fprintf(&b, "\nFAILED: %s\n", strings.Join(problems, "; "))
		}
	}
	return b.String()
}

// enabledKmsKeys counts the keys in moto that are enabled (not scheduled for deletion).
func enabledKmsKeys(t *testing.T, endpoint string) int {
	client := kmsClient(endpoint)
	enabled := 0
	var marker *string
	for {
		page, err := client.ListKeys(context.Background(), &kms.ListKeysInput{Marker: marker})
		require.NoError(t, err)
		for _, k := range page.Keys {
			d, err := client.DescribeKey(context.Background(), &kms.DescribeKeyInput{KeyId: k.KeyId})
			require.NoError(t, err)
			if d.KeyMetadata.KeyState == kmstypes.KeyStateEnabled {
				enabled++
			}
		}
		if !page.Truncated {
			return enabled
		}
		marker = page.NextMarker
	}
}

func envDuration(t *testing.T, name string, fallback time.Duration) time.Duration {
	v := os.Getenv(name)
	if v == "" {
		return fallback
	}
	d, err := time.ParseDuration(v)
	require.NoError(t, err, name)
	return d
}

func envInt(t *testing.T, name string, fallback int) int {
	v := os.Getenv(name)
	if v == "" {
		return fallback
	}
	n, err := strconv.Atoi(v)
	require.NoError(t, err, name)
	return n
}

// TestSoakBoundsCatchGrowth checks the soak's verdicts on synthetic /proc samples: a flat run
// passes, and RSS that keeps growing, fds that rise in every window, a failed signature or
// a plugin that falls behind each fail it.
func TestSoakBoundsCatchGrowth(t *testing.T) {
	cfg := soakConfig{duration: 60 * time.Second, window: 10 * time.Second, sample: time.Second}
	run := func(rss func(s int) int64, fds func(s int) int) *soakResult {
		r := &soakResult{name: "synthetic", cfg: cfg, windows: make([]soakWindow, cfg.windows())}
		for i := range r.windows {
			r.windows[i].signs = make([]time.Duration, 500)
		}
		for s := 0; s < 60; s++ {
			r.samples = append(r.samples, soakSample{at: time.Duration(s) * time.Second, rss: rss(s), fds: fds(s), threads: 6})
		}
		return r
	}
	flat := func(int) int64 { return 30 << 20 }
	steady := func(int) int { return 13 }
	require.Empty(t, run(flat, steady).problems(), "a flat run passes")
	// Warm-up growth (the first window) is allowed.
	require.Empty(t, run(func(s int) int64 { return int64(20+min(s, 9)) << 20 }, steady).problems())

	leaking := run(func(s int) int64 { return (30 << 20) + int64(s)*(300<<10) }, steady).problems()
	require.Len(t, leaking, 1)
	require.Contains(t, leaking[0], "RSS grew")

	rising := run(flat, func(s int) int { return 13 + s/10 }).problems()
	require.Len(t, rising, 1)
	require.Contains(t, rising[0], "open file descriptors rose in every window")

	failed := run(flat, steady)
	failed.windows[3].signErrors, failed.windows[3].firstError = 1, "does not verify"
	require.Contains(t, strings.Join(failed.problems(), "; "), "1 SignData and 0 GenerateKey failures")

	behind := run(flat, steady)
	behind.windows[2].misses = 50
	require.Contains(t, strings.Join(behind.problems(), "; "), "fell behind the offered rate")
}
