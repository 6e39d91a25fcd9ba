package spire_test

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
)

// TestVaultSideBySide measures kms-keymanager's hashicorp_vault and SPIRE's built-in
// hashicorp_vault in one run, both called through SPIRE's own KeyManager facade, against one
// OpenBao dev server behind a loopback proxy that counts Vault calls per operation (and adds
// KMS_BENCH_VAULT_LATENCY to each, none by default). Start-up is measured with the mount
// holding no other keys and then KMS_BENCH_FOREIGN_KEYS (5,000) keys of other servers. It is
// a benchmark, not a test: it runs only with KMS_BENCH=1 (see docs/benchmarks.md).
func TestVaultSideBySide(t *testing.T) {
	if os.Getenv("KMS_BENCH") != "1" {
		t.Skip("benchmark; run with KMS_BENCH=1")
	}
	foreign := 5000
	if n, err := fmt.Sscan(os.Getenv("KMS_BENCH_FOREIGN_KEYS"), &foreign); n != 1 || err != nil {
		foreign = 5000
	}
	var latency time.Duration
	if d, err := time.ParseDuration(os.Getenv("KMS_BENCH_VAULT_LATENCY")); err == nil {
		latency = d
	}
	const (
		ownKeys  = 10
		duration = 3 * time.Second
	)
	clearVaultEnv(t) // SPIRE's built-in lets VAULT_* override plugin_data
	bao := startBao(t)
	version, err := exec.Command(baoBinary(t), "version").Output()
	require.NoError(t, err)
	admin := newBenchVaultAdmin(bao)
	proxy := newBenchVaultProxy(t, bao.Addr)

	type impl struct {
		name     string
		serverID string
		// load loads the implementation as serverID with extra plugin_data appended.
		load func(serverID, extra string) *loaded
		// ours: kms-keymanager, which also has a stamper and a sweeper to measure.
		ours bool
		// signing: measure SignData load (the liveness variant signs exactly as the plain one).
		signing bool
	}
	impls := []impl{
		{"kms-keymanager", "bench-ours", func(id, extra string) *loaded {
			return loadExternal(t, vaultPluginData(proxy.URL, id, tokenAuth(baoRootToken), extra))
		}, true, true},
		{"kms-keymanager, liveness_kv_mount = \"secret\"", "bench-live", func(id, extra string) *loaded {
			return loadExternal(t, vaultPluginData(proxy.URL, id, tokenAuth(baoRootToken), "liveness_kv_mount = \"secret\"\n", extra))
		}, true, false},
		{"SPIRE built-in hashicorp_vault", "bench-spire", func(id, extra string) *loaded {
			return loadBuiltInVault(t, vaultPluginData(proxy.URL, id, tokenAuth(baoRootToken), extra))
		}, false, true},
	}

	// The report: one row per measurement, one column per implementation.
	var rows []string
	cells := map[string]map[string]string{}
	set := func(row, name, format string, args ...any) {
		if cells[row] == nil {
			cells[row] = map[string]string{}
			rows = append(rows, row)
		}
		cells[row][name] = fmt.Sprintf(format, args...)
	}
	// startUp loads impl with its ownKeys keys present and reports the calls of load +
	// Configure + one GetPublicKeys, and of anything it starts in the next 500 ms.
	startUp := func(im impl, row string) *loaded {
		proxy.setLatency(0)
		first := im.load(im.serverID, "")
		for i := 0; i < ownKeys; i++ {
			_, err := first.KeyManager.GenerateKey(ctx, fmt.Sprintf("key-%d", i), keymanager.ECP256)
			require.NoError(t, err)
		}
		require.NoError(t, first.catalog.Close())
		proxy.setLatency(latency)
		time.Sleep(200 * time.Millisecond) // asynchronous deletion queues, if any
		proxy.snapshot()
		started := time.Now()
		l := im.load(im.serverID, "")
		keys, err := l.KeyManager.GetKeys(ctx)
		elapsed := time.Since(started)
		require.NoError(t, err)
		require.Len(t, keys, ownKeys)
		time.Sleep(500 * time.Millisecond)
		set(row, im.name, "%s, %v", describeCalls(proxy.snapshot()), elapsed.Round(time.Millisecond))
		return l
	}

	hashStarted := time.Now()
	sha256File(t, pluginBinary(t))
	hashing := time.Since(hashStarted)

	// Start-up: each implementation alone with its own keys in the mount, then among the
	// foreign keys; its keys are deleted after each measurement, so that no implementation
	// sees another's.
	startRow := fmt.Sprintf("start-up, %d own keys, no other keys in the mount", ownKeys)
	for _, im := range impls {
		require.NoError(t, startUp(im, startRow).catalog.Close())
		admin.deleteKeysOf(t, im.serverID)
	}
	seeded := time.Now()
	admin.seedForeignKeys(t, foreign)
	seeding := time.Since(seeded)
	startRow = fmt.Sprintf("start-up, %d own keys among %d other servers' keys", ownKeys, foreign)
	for _, im := range impls {
		require.NoError(t, startUp(im, startRow).catalog.Close())
		if im.ours {
			// One stamp round (a KV write per key with liveness_kv_mount, else nothing) and
			// one sweep round, from an instance whose stamper runs at 3 s and 6 s and its
			// sweeper at 5 s.
			l := im.load(im.serverID, "liveness_interval = \"3s\"\nsweep_interval = \"5s\"\n")
			loadedAt := time.Now()
			proxy.snapshot()
			time.Sleep(time.Until(loadedAt.Add(4500 * time.Millisecond)))
			set(fmt.Sprintf("liveness stamp round, %d keys (every liveness_interval, default 6h)", ownKeys), im.name, "%s", describeCalls(proxy.snapshot()))
			time.Sleep(time.Until(loadedAt.Add(5900 * time.Millisecond)))
			set(fmt.Sprintf("sweep round, %d own keys among %d (every sweep_interval, default 24h)", ownKeys, foreign), im.name, "%s", describeCalls(proxy.snapshot()))
			require.NoError(t, l.catalog.Close())
		}
		admin.deleteKeysOf(t, im.serverID)
	}

	// Calls per operation, one implementation at a time; all stay loaded for the load runs.
	proxy.setLatency(latency)
	digest := sha256.Sum256([]byte("bench"))
	type signers struct {
		km          keymanager.KeyManager
		ec, rsa2048 crypto.Signer
	}
	running := map[string]*signers{}
	for _, im := range impls {
		km := im.load(im.serverID, "").KeyManager
		proxy.snapshot()
		generate := func(row string) {
			started := time.Now()
			_, err := km.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
			elapsed := time.Since(started)
			require.NoError(t, err)
			time.Sleep(200 * time.Millisecond) // SPIRE deletes a replaced key from a queue
			set(row, im.name, "%s, %v", describeCalls(proxy.snapshot()), elapsed.Round(100*time.Microsecond))
		}
		generate("GenerateKey (ec-p256), new key id")
		generate("GenerateKey (ec-p256), rotation")
		key, err := km.GetKey(ctx, "x509-CA-A")
		require.NoError(t, err)
		set("GetPublicKey", im.name, "%s", describeCalls(proxy.snapshot()))
		_, err = km.GetKeys(ctx)
		require.NoError(t, err)
		set("GetPublicKeys", im.name, "%s", describeCalls(proxy.snapshot()))
		_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.NoError(t, err)
		set("SignData", im.name, "%s", describeCalls(proxy.snapshot()))
		if im.signing {
			rsaKey, err := km.GenerateKey(ctx, "rsa-signer", keymanager.RSA2048)
			require.NoError(t, err)
			running[im.name] = &signers{km: km, ec: key, rsa2048: rsaKey}
		}
	}

	// SignData load, the implementations taking turns cell by cell (and which goes first
	// alternating), so that a change in the machine's load falls on both.
	var signing []impl
	for _, im := range impls {
		if im.signing {
			signing = append(signing, im)
		}
	}
	turn := 0
	inTurn := func() []impl {
		turn++
		if turn%2 == 0 {
			return []impl{signing[1], signing[0]}
		}
		return signing
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
				proxy.snapshot()
				p50, p99, rate := signLoad(t, signer(im), digest[:], c, duration, nil)
				set(fmt.Sprintf("SignData %s c=%d", kt, c), im.name, "p50 %v, p99 %v, %.0f signs/s (%s)",
					p50, p99, rate, benchPerSecond(proxy.snapshot(), duration))
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
			time.Sleep(200 * time.Millisecond)
			proxy.snapshot()
			set(fmt.Sprintf("SignData %s c=16 p99 while GenerateKeys (ec-p256) run / without", kt), im.name,
				"%v / %v = %.2f×, %d GenerateKeys in %v", busyP99, quietP99, float64(busyP99)/float64(quietP99), generated.Load(), duration)
		}
	}

	var out []string
	header := "| measurement |"
	sep := "|---|"
	for _, im := range impls {
		header += " " + im.name + " |"
		sep += "---|"
	}
	out = append(out, header, sep)
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
	t.Logf("hashicorp_vault through SPIRE's KeyManager facade, %s, %d CPUs, %v added per Vault call:\n%s",
		strings.Join(strings.Fields(string(version))[:2], " "), runtime.NumCPU(), latency, strings.Join(out, "\n"))
	t.Logf("harness: hashing the plugin binary for plugin_checksum (part of each kms-keymanager start-up) took %v; seeding %d foreign keys took %v",
		hashing.Round(time.Millisecond), foreign, seeding.Round(time.Millisecond))
}

// benchPerSecond is the Vault calls made during a load of `d`, per second of it.
func benchPerSecond(calls map[string]int, d time.Duration) string {
	var parts []string
	for op, n := range calls {
		parts = append(parts, fmt.Sprintf("%s %.0f/s", op, float64(n)/d.Seconds()))
	}
	sort.Strings(parts)
	return "Vault: " + strings.Join(parts, ", ")
}

// benchVaultAdmin makes and removes keys in the dev server directly (not through the
// counting proxy), as root, from many goroutines.
type benchVaultAdmin struct {
	addr   string
	client *http.Client
}

func newBenchVaultAdmin(b *baoServer) *benchVaultAdmin {
	return &benchVaultAdmin{addr: b.Addr, client: &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}}
}

func (b *benchVaultAdmin) try(method, path string, body, out any) error {
	var reader io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return err
		}
		reader = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, b.addr+"/v1/"+path, reader)
	if err != nil {
		return err
	}
	req.Header.Set("X-Vault-Token", baoRootToken)
	resp, err := b.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, data)
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}

// parallel runs f(0..n-1) on 16 goroutines and fails the test with the first error.
func (b *benchVaultAdmin) parallel(t *testing.T, n int, f func(i int) error) {
	t.Helper()
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	require.NoError(t, first)
}

// seedForeignKeys creates n EC P-256 Transit keys named as another SPIRE server's
// (other<N>-<uuid>-x509-CA-A), as root, directly (not through the counting proxy).
func (b *benchVaultAdmin) seedForeignKeys(t *testing.T, n int) {
	t.Helper()
	b.parallel(t, n, func(i int) error {
		u := make([]byte, 16)
		if _, err := rand.Read(u); err != nil {
			return err
		}
		u[6] = u[6]&0x0f | 0x40
		u[8] = u[8]&0x3f | 0x80
		h := hex.EncodeToString(u)
		name := fmt.Sprintf("other%d-%s-%s-%s-%s-%s-x509-CA-A", i, h[:8], h[8:12], h[12:16], h[16:20], h[20:])
		return b.try(http.MethodPost, "transit/keys/"+name, map[string]any{"type": "ecdsa-p256"}, nil)
	})
}

// deleteKeysOf deletes every Transit key whose name starts with serverID + "-", directly.
func (b *benchVaultAdmin) deleteKeysOf(t *testing.T, serverID string) {
	t.Helper()
	var list struct {
		Data struct {
			Keys []string `json:"keys"`
		} `json:"data"`
	}
	require.NoError(t, b.try("LIST", "transit/keys", nil, &list))
	var names []string
	for _, name := range list.Data.Keys {
		if strings.HasPrefix(name, serverID+"-") {
			names = append(names, name)
		}
	}
	b.parallel(t, len(names), func(i int) error {
		if err := b.try(http.MethodPost, "transit/keys/"+names[i]+"/config", map[string]any{"deletion_allowed": true}, nil); err != nil {
			return err
		}
		return b.try(http.MethodDelete, "transit/keys/"+names[i], nil, nil)
	})
}

// benchVaultProxy sits on 127.0.0.1 between a plugin and OpenBao and counts the calls by
// Vault operation (benchVaultOperation); latency is added to each.
type benchVaultProxy struct {
	URL     string
	mu      sync.Mutex
	seen    map[string]int
	latency time.Duration
}

func newBenchVaultProxy(t *testing.T, target string) *benchVaultProxy {
	t.Helper()
	upstream, err := url.Parse(target)
	require.NoError(t, err)
	p := &benchVaultProxy{seen: map[string]int{}}
	forward := httputil.NewSingleHostReverseProxy(upstream)
	// Enough idle connections for 64 concurrent signers: no reconnect per call.
	forward.Transport = &http.Transport{MaxIdleConns: 256, MaxIdleConnsPerHost: 256}
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.seen[benchVaultOperation(r)]++
		latency := p.latency
		p.mu.Unlock()
		if latency > 0 {
			time.Sleep(latency)
		}
		forward.ServeHTTP(w, r)
	}))
	t.Cleanup(server.Close)
	p.URL = server.URL
	return p
}

func (p *benchVaultProxy) setLatency(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.latency = d
}

// snapshot returns and resets the per-operation call counts.
func (p *benchVaultProxy) snapshot() map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.seen
	p.seen = map[string]int{}
	return out
}

// benchVaultOperation names the Vault operation of r: the Transit and KV calls by what they
// do, anything else by method and path.
func benchVaultOperation(r *http.Request) string {
	path := strings.TrimPrefix(r.URL.Path, "/v1/")
	list := r.Method == "LIST" || r.URL.Query().Get("list") == "true"
	write := r.Method == http.MethodPost || r.Method == http.MethodPut
	parts := strings.Split(path, "/")
	switch {
	case path == "auth/token/lookup-self":
		return "lookup-self"
	case path == "auth/token/renew-self":
		return "renew-self"
	case len(parts) == 3 && parts[0] == "auth" && parts[2] == "login":
		return "login"
	case len(parts) == 2 && parts[0] == "transit" && parts[1] == "keys" && list:
		return "list keys"
	case len(parts) == 3 && parts[0] == "transit" && parts[1] == "keys" && r.Method == http.MethodGet:
		return "read key"
	case len(parts) == 3 && parts[0] == "transit" && parts[1] == "keys" && write:
		return "create key"
	case len(parts) == 3 && parts[0] == "transit" && parts[1] == "keys" && r.Method == http.MethodDelete:
		return "delete key"
	case len(parts) == 4 && parts[0] == "transit" && parts[1] == "keys" && parts[3] == "config" && write:
		return "key config"
	case len(parts) >= 3 && parts[0] == "transit" && parts[1] == "sign" && write:
		return "sign"
	case len(parts) >= 2 && parts[0] == "secret" && (parts[1] == "data" || parts[1] == "metadata"):
		op := strings.ToLower(r.Method)
		if list {
			op = "list"
		}
		return "kv " + parts[1] + " " + op
	}
	return r.Method + " " + path
}
