package spire_test

// SPIRE in HA as production runs it: three real spire-servers of one trust domain on one
// PostgreSQL datastore, each with kms-keymanager and its own server identity, a CA TTL short
// enough that every server prepares and activates several X.509 CA and JWT keys, SVIDs minted
// from every server every second and verified against the bundle fetched from another
// server, and faults on the way: kill -9 of a server, kill -9 of a server's plugin child, a
// server stopped for longer than the stale age (the others sweep its keys, and only its), and
// a restart of the KMS peer. The figures (docs/reliability.md) come from t.Log lines that
// start with "HA figures". KMS_HA_LONG=1 (scripts/ha.sh) repeats the faults for
// KMS_HA_DURATION (default 15m); KMS_HA_LOG_DIR keeps the servers' logs there.

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	kmstypes "github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	bundlev1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/bundle/v1"
	svidv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/svid/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

const (
	// haCATTL: SPIRE prepares the next X.509 CA and JWT key at half of the current one's
	// life and activates it at 5/6, checking every 10 s. At 60 s the activation can land
	// after the current key's expiry (seen: a JWT key issued 40 ms after a tick was replaced
	// one tick late, and JWT-SVID minting failed with "already expired" in between), so 90 s:
	// a preparation every 45 s per server, 5 s of margin. SVID TTLs are a sixth of it.
	haCATTL   = 90 * time.Second
	haSVIDTTL = "15s"
	// haServers is how many spire-servers share the datastore.
	haServers = 3
	haAud     = "ha-test"
	// haInFlight: a key (version) younger than this that a live server does not serve yet
	// is a GenerateKey in progress, not a leak.
	haInFlight = time.Minute
)

// haBackend is what the HA run needs from one KMS backend.
type haBackend struct {
	name string
	// pluginData is the KeyManager's plugin_data body for a server id.
	pluginData func(serverID string) string
	// staleAfter is stale_key_age + clock_skew_allowance; sweepInterval the sweep's period.
	staleAfter, sweepInterval time.Duration
	// restartKMS restarts the peer with its state and returns how long it was down.
	restartKMS func() time.Duration
	// inventory reads what the KMS holds for the trust domain; live are the server ids
	// whose served keys count as in use.
	inventory func(t *testing.T, live []string) haInventory
	// shared: the JWT keys are shared (gcp_kms shared_keys).
	shared bool
	// sharedVersions lists the shared JWT key versions by name; a destroyed one has no key.
	sharedVersions func(t *testing.T) map[string]haSharedVersion
}

// haSharedVersion is one version of a shared JWT CryptoKey.
type haSharedVersion struct {
	der     string // the public key (PKIX DER); "" once destroyed
	created time.Time
}

// haInventory is the KMS's view of the trust domain's keys (aws_kms: keys; gcp_kms: key
// versions).
type haInventory struct {
	Total    int // every key or version ever created for the trust domain
	Enabled  int // able to sign
	InUse    int // served by a live server (the alias target; the newest enabled version)
	Grace    int // enabled, not in use, inside a documented grace period (superseded shared versions)
	Leaked   []string
	Deleting int // pending deletion / destroy scheduled / destroyed
	// EnabledBy lists, per server id, its enabled keys; InUseBy the ones it serves.
	EnabledBy, InUseBy map[string][]string
	Locks              int // gcp_kms: rotation lock CryptoKeys (no versions)
	// Seen: every key or version of the trust domain, whatever its state.
	Seen map[string]bool
}

func (inv haInventory) String() string {
	return fmt.Sprintf("total=%d enabled=%d in_use=%d grace=%d leaked=%d deleting=%d locks=%d",
		inv.Total, inv.Enabled, inv.InUse, inv.Grace, len(inv.Leaked), inv.Deleting, inv.Locks)
}

// haSettings are the run's lengths: the short CI form, or the long one (KMS_HA_LONG=1).
type haSettings struct {
	long     bool
	duration time.Duration // the long form repeats the fault cycle until then
	minRun   time.Duration // the short form runs at least this long (several rotations)
}

func haSettingsFromEnv(t *testing.T) haSettings {
	// Three preparations per server: at start-up, after ca_ttl/2 and after ca_ttl (SPIRE
	// checks every 10 s, so up to 10 s late each).
	s := haSettings{minRun: haCATTL + 30*time.Second}
	if os.Getenv("KMS_HA_LONG") == "1" {
		s.long = true
		s.duration = 15 * time.Minute
		if d := os.Getenv("KMS_HA_DURATION"); d != "" {
			parsed, err := time.ParseDuration(d)
			require.NoError(t, err, "KMS_HA_DURATION must be a Go duration like 30m")
			s.duration = parsed
		}
	}
	return s
}

// haRun is one HA run: the servers, the load, the counters.
type haRun struct {
	t       *testing.T
	backend *haBackend
	servers []*spireServer
	ids     []string
	runs    []int // per server, the start count (log file numbers)
	// staleStopped: the server was stopped past the stale age (it started afresh).
	staleStopped []bool

	mu sync.Mutex
	// window names the fault each server is in ("" when none); errors are counted per window.
	window      []string
	minted      []int // X.509- and JWT-SVIDs minted, per server
	verified    int
	failures    []haFailure    // SVIDs that did not verify
	mintErrors  map[string]int // "<window>/<server>" → errors (window "" must stay 0)
	firstErrors map[string]string
	lastOK      []time.Time
	bundleFails int
	// jwtKids: public key DER → kids it is published under (one per server that publishes it).
	jwtKids map[string]map[string]bool
	// tokenKeys: public key DER → servers whose JWT-SVIDs it signed.
	tokenKeys map[string]map[string]bool
	faults    []haFault
	// sharedSeen: every shared JWT version seen while sampling, by name (the key is kept
	// once the version is destroyed).
	sharedSeen map[string]haSharedVersion
	stop       chan struct{}
	wg         sync.WaitGroup
}

// haFailure is an SVID that did not verify against the bundle it was checked with.
type haFailure struct {
	window string // the minting server's fault window ("" outside faults)
	text   string
	// lag: it verified against every server's bundle 3 s later (a bundle that had not yet
	// caught up with a new authority), as opposed to an SVID that never verifies.
	lag bool
}

type haFault struct {
	Name     string
	Server   string
	Recovery time.Duration
	Note     string
}

func newHARun(t *testing.T, backend *haBackend, dataStore string) *haRun {
	h := &haRun{t: t, backend: backend, mintErrors: map[string]int{}, firstErrors: map[string]string{},
		jwtKids: map[string]map[string]bool{}, tokenKeys: map[string]map[string]bool{}, stop: make(chan struct{}),
		sharedSeen: map[string]haSharedVersion{}}
	extra := fmt.Sprintf("    ca_ttl = %q\n    default_x509_svid_ttl = %q\n    default_jwt_svid_ttl = %q",
		haCATTL.String(), haSVIDTTL, haSVIDTTL)
	for i := 0; i < haServers; i++ {
		id := fmt.Sprintf("ha-%c", 'a'+i)
		s := newSpireServerDS(t, extra, dataStore, func(*spireServer) string {
			return "plugin_data {\n" + backend.pluginData(id) + "}"
		})
		h.servers = append(h.servers, s)
		h.ids = append(h.ids, id)
	}
	h.runs = make([]int, haServers)
	h.staleStopped = make([]bool, haServers)
	h.window = make([]string, haServers)
	h.minted = make([]int, haServers)
	h.lastOK = make([]time.Time, haServers)
	return h
}

// startServer starts (or restarts) server i and waits until it is healthy.
func (h *haRun) startServer(i int) {
	h.runs[i]++
	h.servers[i].start(h.runs[i])
}

// endWindow ends server i's fault window once SPIRE's datastore cache (1 s) has had time
// to show a restarted server's new authorities to the others.
func (h *haRun) endWindow(i int) {
	time.Sleep(2 * time.Second)
	h.setWindow(i, "")
}

func (h *haRun) setWindow(i int, name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.window[i] = name
}

// load mints an X.509- and a JWT-SVID from every server every second until stopped.
func (h *haRun) load() {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(h.t, err)
	for i := range h.servers {
		h.wg.Add(1)
		go func(i int) {
			defer h.wg.Done()
			id := spiffeid.RequireFromString(fmt.Sprintf("spiffe://%s/ha/%s", trustDomain, h.ids[i]))
			csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
			if err != nil {
				panic(err)
			}
			tick := time.NewTicker(time.Second)
			defer tick.Stop()
			for n := 0; ; n++ {
				select {
				case <-h.stop:
					return
				case <-tick.C:
				}
				h.mintOnce(i, n, id, csr)
			}
		}(i)
	}
}

// sampleShared records the shared JWT versions the KMS holds now (test goroutine only).
func (h *haRun) sampleShared() {
	if !h.backend.shared {
		return
	}
	for name, v := range h.backend.sharedVersions(h.t) {
		if seen, ok := h.sharedSeen[name]; ok && v.der == "" {
			v.der = seen.der
		}
		h.sharedSeen[name] = v
	}
}

func (h *haRun) dial(i int) (*grpc.ClientConn, error) {
	return grpc.NewClient("unix://"+h.servers[i].socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
}

// mintOnce mints both SVIDs from server i and verifies them against the bundle of another
// server (the datastore is shared: any server's bundle must do).
func (h *haRun) mintOnce(i, n int, id spiffeid.ID, csr []byte) {
	h.mu.Lock()
	window := h.window[i]
	h.mu.Unlock()
	fail := func(err error) {
		h.mu.Lock()
		defer h.mu.Unlock()
		// A call in flight when a fault starts fails in that fault's window.
		if window == "" {
			window = h.window[i]
		}
		k := window + "/" + h.ids[i]
		h.mintErrors[k]++
		if _, ok := h.firstErrors[k]; !ok {
			h.firstErrors[k] = err.Error()
		}
	}
	conn, err := h.dial(i)
	if err != nil {
		fail(err)
		return
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client := svidv1.NewSVIDClient(conn)
	x509Resp, err := client.MintX509SVID(ctx, &svidv1.MintX509SVIDRequest{Csr: csr})
	if err != nil {
		fail(fmt.Errorf("MintX509SVID: %w", err))
		return
	}
	jwtResp, err := client.MintJWTSVID(ctx, &svidv1.MintJWTSVIDRequest{
		Id: &types.SPIFFEID{TrustDomain: trustDomain, Path: id.Path()}, Audience: []string{haAud},
	})
	if err != nil {
		fail(fmt.Errorf("MintJWTSVID: %w", err))
		return
	}
	mintedAt := time.Now()
	h.mu.Lock()
	h.minted[i] += 2
	h.mu.Unlock()

	// The bundle from the next servers in turn, skipping one that does not answer.
	var bundle *types.Bundle
	bundleFrom := 0
	for k := 1; k <= haServers && bundle == nil; k++ {
		bundleFrom = (i + n + k) % haServers
		if bconn, err := h.dial(bundleFrom); err == nil {
			bundle, _ = bundlev1.NewBundleClient(bconn).GetBundle(ctx, &bundlev1.GetBundleRequest{})
			bconn.Close()
		}
	}
	if bundle == nil {
		h.mu.Lock()
		h.bundleFails++
		h.mu.Unlock()
		return
	}
	verr := h.verify(i, id, x509Resp.Svid.CertChain, jwtResp.Svid.Token, bundle)
	if verr != nil {
		// Tell a bundle that lags (SPIRE's datastore cache) from one that never learns the
		// authority: the same SVIDs against every server's bundle a few seconds later.
		time.Sleep(3 * time.Second)
		later := map[string]string{}
		for j := range h.servers {
			if bconn, err := h.dial(j); err == nil {
				if b, err := bundlev1.NewBundleClient(bconn).GetBundle(ctx, &bundlev1.GetBundleRequest{}); err == nil {
					later[h.ids[j]] = fmt.Sprint(h.verify(i, id, x509Resp.Svid.CertChain, jwtResp.Svid.Token, b))
				}
				bconn.Close()
			}
		}
		issuer := ""
		if leaf, err := x509.ParseCertificate(x509Resp.Svid.CertChain[0]); err == nil {
			issuer = fmt.Sprintf("%x", leaf.AuthorityKeyId)
		}
		var skis []string
		for _, a := range bundle.X509Authorities {
			if c, err := x509.ParseCertificate(a.Asn1); err == nil {
				skis = append(skis, fmt.Sprintf("%x", c.SubjectKeyId))
			}
		}
		lag := len(later) == haServers
		for _, v := range later {
			lag = lag && v == "<nil>"
		}
		h.mu.Lock()
		h.failures = append(h.failures, haFailure{window: window, lag: lag, text: fmt.Sprintf(
			"%s %s (bundle from %s): %v [leaf issuer %s; bundle authorities %v; 3s later per server: %v]",
			mintedAt.Format(time.RFC3339Nano), h.ids[i], h.ids[bundleFrom], verr, issuer, skis, later)})
		h.mu.Unlock()
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.verified += 2
	if mintedAt.After(h.lastOK[i]) {
		h.lastOK[i] = mintedAt
	}
}

// verify checks both SVIDs with go-spiffe against bundle and records which JWT keys the
// bundle publishes under which kids.
func (h *haRun) verify(i int, id spiffeid.ID, chain [][]byte, token string, bundle *types.Bundle) error {
	td := spiffeid.RequireTrustDomainFromString(trustDomain)
	var roots []*x509.Certificate
	for _, a := range bundle.X509Authorities {
		cert, err := x509.ParseCertificate(a.Asn1)
		if err != nil {
			return fmt.Errorf("bundle X.509 authority: %w", err)
		}
		roots = append(roots, cert)
	}
	jwtKeys := map[string]crypto.PublicKey{}
	kidsByKey := map[string][]string{}
	for _, k := range bundle.JwtAuthorities {
		pub, err := x509.ParsePKIXPublicKey(k.PublicKey)
		if err != nil {
			return fmt.Errorf("bundle JWT authority %s: %w", k.KeyId, err)
		}
		jwtKeys[k.KeyId] = pub
		kidsByKey[string(k.PublicKey)] = append(kidsByKey[string(k.PublicKey)], k.KeyId)
	}
	var certs []*x509.Certificate
	for _, der := range chain {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("X.509-SVID: %w", err)
		}
		certs = append(certs, cert)
	}
	gotID, _, err := x509svid.Verify(certs, x509bundle.FromX509Authorities(td, roots))
	if err != nil {
		return fmt.Errorf("X.509-SVID does not verify against the bundle: %w", err)
	}
	if gotID != id {
		return fmt.Errorf("X.509-SVID names %s, want %s", gotID, id)
	}
	svid, err := jwtsvid.ParseAndValidate(token, jwtbundle.FromJWTAuthorities(td, jwtKeys), []string{haAud})
	if err != nil {
		return fmt.Errorf("JWT-SVID does not verify against the bundle: %w", err)
	}
	if svid.ID != id {
		return fmt.Errorf("JWT-SVID names %s, want %s", svid.ID, id)
	}
	kid, err := jwtKid(token)
	if err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for der, kids := range kidsByKey {
		if h.jwtKids[der] == nil {
			h.jwtKids[der] = map[string]bool{}
		}
		for _, k := range kids {
			h.jwtKids[der][k] = true
		}
	}
	for _, k := range bundle.JwtAuthorities {
		if k.KeyId == kid {
			der := string(k.PublicKey)
			if h.tokenKeys[der] == nil {
				h.tokenKeys[der] = map[string]bool{}
			}
			h.tokenKeys[der][h.ids[i]] = true
		}
	}
	return nil
}

func jwtKid(token string) (string, error) {
	header, err := base64.RawURLEncoding.DecodeString(strings.Split(token, ".")[0])
	if err != nil {
		return "", err
	}
	var h struct{ Kid string }
	if err := json.Unmarshal(header, &h); err != nil {
		return "", err
	}
	return h.Kid, nil
}

// waitMinted waits until server i (every server when i < 0) minted and verified SVIDs that
// it minted after since; returns the time from since.
func (h *haRun) waitMinted(i int, since time.Time, timeout time.Duration) time.Duration {
	h.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		h.mu.Lock()
		latest := time.Time{}
		all := true
		for j, ok := range h.lastOK {
			if i >= 0 && j != i {
				continue
			}
			if !ok.After(since) {
				all = false
			} else if ok.After(latest) {
				latest = ok
			}
		}
		errs := fmt.Sprint(h.firstErrors)
		h.mu.Unlock()
		if all {
			return latest.Sub(since)
		}
		if time.Now().After(deadline) {
			who := "every server"
			if i >= 0 {
				who = h.ids[i]
			}
			h.t.Fatalf("%s minted no verified SVID within %s of %s; first errors: %s", who, timeout, since.Format(time.RFC3339), errs)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// pluginPID is the pid of the kms-keymanager process spire-server started, or 0.
func (s *spireServer) pluginPID() int {
	plugin := pluginBinary(s.t)
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		var pid, ppid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err != nil || exe != plugin {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid …; comm may hold spaces, so read after the last ')'.
		fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
		if len(fields) > 1 {
			if _, err := fmt.Sscan(fields[1], &ppid); err == nil && ppid == s.cmd.Process.Pid {
				return pid
			}
		}
	}
	return 0
}

func processGone(pid int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if err := syscall.Kill(pid, 0); err == syscall.ESRCH {
			return true
		}
		// A zombie (exited, not yet reaped by its parent) has stopped too.
		if stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			if f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:])); len(f) > 0 && f[0] == "Z" {
				return true
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return false
}

// faultKillServer: kill -9 one spire-server, start it again; recovery is kill → its next
// verified SVIDs. Its plugin child must not outlive it (it notices the broken host
// connection).
func (h *haRun) faultKillServer(i int) {
	s := h.servers[i]
	h.setWindow(i, "kill-server")
	plugin := s.pluginPID()
	require.NotZero(h.t, plugin, "%s has a plugin child", h.ids[i])
	started := time.Now()
	require.NoError(h.t, s.cmd.Process.Kill())
	<-s.exited
	orphan := !processGone(plugin, 15*time.Second)
	h.startServer(i)
	recovery := h.waitMinted(i, started, 90*time.Second)
	h.endWindow(i)
	note := "its plugin exited with it"
	if orphan {
		note = "its plugin child OUTLIVED it by more than 15s"
	}
	require.False(h.t, orphan, "%s's plugin (pid %d) must exit when its spire-server is killed", h.ids[i], plugin)
	h.record(haFault{Name: "kill -9 spire-server, restart", Server: h.ids[i], Recovery: recovery, Note: note})
}

// faultKillPlugin: kill -9 one server's plugin child and see what SPIRE does: SPIRE v1.15.3
// does not restart an external plugin, and a KeyManager whose process is gone fails every
// signature; the test restarts the server once it is seen failing or exiting.
func (h *haRun) faultKillPlugin(i int) {
	s := h.servers[i]
	h.setWindow(i, "kill-plugin")
	plugin := s.pluginPID()
	require.NotZero(h.t, plugin, "%s has a plugin child", h.ids[i])
	started := time.Now()
	require.NoError(h.t, syscall.Kill(plugin, syscall.SIGKILL))
	// Watch for up to 10 s: does spire-server exit, or stay up and fail to sign?
	var note string
	exited := false
	for deadline := time.Now().Add(10 * time.Second); note == "" && time.Now().Before(deadline); {
		select {
		case err := <-s.exited:
			note = fmt.Sprintf("spire-server exited after %s (%v)", time.Since(started).Round(100*time.Millisecond), err)
			exited = true
			continue
		case <-time.After(300 * time.Millisecond):
		}
		if _, err := s.cli("x509", "mint", "-spiffeID", "spiffe://"+trustDomain+"/probe"); err != nil {
			note = fmt.Sprintf("spire-server stayed up and failed to sign %s after the kill (%s)",
				time.Since(started).Round(100*time.Millisecond), firstLine(err.Error()))
		}
	}
	if note == "" {
		note = "spire-server kept minting for 10s"
	}
	if !exited {
		if _, err := s.cli("healthcheck"); err == nil {
			note += "; its healthcheck still said healthy"
		} else {
			note += "; its healthcheck failed"
		}
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
			note += "; it stopped on SIGTERM"
		case <-time.After(30 * time.Second):
			_ = s.cmd.Process.Kill()
			<-s.exited
			note += "; it did not stop on SIGTERM within 30s and was killed"
		}
	}
	h.startServer(i)
	recovery := h.waitMinted(i, started, 90*time.Second)
	h.endWindow(i)
	h.record(haFault{Name: "kill -9 plugin child, restart spire-server", Server: h.ids[i], Recovery: recovery, Note: note})
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	if len(line) > 200 {
		line = line[:200] + "…"
	}
	return line
}

// faultStale: stop one server for longer than the stale age; the others' sweeps put its
// keys on the deletion path, and no key a live server serves; started again, it makes new
// keys and mints.
func (h *haRun) faultStale(i int) {
	s := h.servers[i]
	h.setWindow(i, "stopped-stale")
	h.staleStopped[i] = true
	var live []string
	for j, id := range h.ids {
		if j != i {
			live = append(live, id)
		}
	}
	before := h.backend.inventory(h.t, h.ids)
	mine := before.InUseBy[h.ids[i]]
	require.NotEmpty(h.t, mine, "%s serves keys before it stops", h.ids[i])
	requireCleanPluginExitOf(h.t, s.stop())
	stopped := time.Now()
	var swept time.Duration
	limit := h.backend.staleAfter + 3*h.backend.sweepInterval + 30*time.Second
	for {
		inv := h.backend.inventory(h.t, live)
		if len(inv.EnabledBy[h.ids[i]]) == 0 {
			swept = time.Since(stopped)
			// Only its keys: every key a live server serves is still able to sign.
			for _, id := range live {
				require.NotEmpty(h.t, inv.InUseBy[id], "%s still serves keys", id)
			}
			require.Empty(h.t, inv.Leaked, "no key of a live server may be left unused, none deleted: %s", inv)
			break
		}
		h.sampleShared()
		require.Less(h.t, time.Since(stopped), limit, "%s's keys %v were not swept within %s (stale after %s)",
			h.ids[i], inv.EnabledBy[h.ids[i]], limit, h.backend.staleAfter)
		time.Sleep(time.Second)
	}
	// Stale counts from the last stamp: up to one liveness interval (2 s) before the stop,
	// in whole seconds.
	require.GreaterOrEqual(h.t, swept, h.backend.staleAfter-4*time.Second, "swept only once stale")
	restarted := time.Now()
	h.startServer(i)
	recovery := h.waitMinted(i, restarted, 90*time.Second)
	h.endWindow(i)
	h.record(haFault{Name: "stopped past stale_key_age: swept by the others, restarted", Server: h.ids[i], Recovery: recovery,
		Note: fmt.Sprintf("%d keys swept %s after the stop (stale after %s); restart to first verified SVID", len(mine), swept.Round(time.Second), h.backend.staleAfter)})
}

// faultRestartKMS restarts the KMS peer (same state); recovery is the restart's start →
// every server's next verified SVIDs. Errors meanwhile are counted in the "kms-restart" window.
func (h *haRun) faultRestartKMS() {
	for i := range h.servers {
		h.setWindow(i, "kms-restart")
	}
	before := h.backend.inventory(h.t, h.ids)
	started := time.Now()
	down := h.backend.restartKMS()
	after := h.backend.inventory(h.t, h.ids)
	require.GreaterOrEqual(h.t, after.Total, before.Total, "the restarted KMS kept its keys: before %s, after %s", before, after)
	for id, keys := range before.InUseBy {
		for _, k := range keys {
			_, ok := after.Seen[k]
			require.True(h.t, ok, "%s's key %s is still there after the restart", id, k)
		}
	}
	recovery := h.waitMinted(-1, started, 90*time.Second)
	for i := range h.servers {
		h.setWindow(i, "")
	}
	h.record(haFault{Name: "restart the KMS peer (same state)", Server: "all", Recovery: recovery,
		Note: fmt.Sprintf("peer down %s", down.Round(100*time.Millisecond))})
}

func (h *haRun) record(f haFault) {
	h.sampleShared()
	h.t.Logf("HA figures %s: fault %q on %s: recovered in %s (%s)", h.backend.name, f.Name, f.Server, f.Recovery.Round(100*time.Millisecond), f.Note)
	h.mu.Lock()
	h.faults = append(h.faults, f)
	h.mu.Unlock()
}

// logCount counts a message over every log a server wrote (all its starts).
func (h *haRun) logCount(i int, message string) int {
	n := 0
	for run := 1; run <= h.runs[i]; run++ {
		data, _ := os.ReadFile(filepath.Join(h.servers[i].dir, fmt.Sprintf("server-%d.log", run)))
		n += strings.Count(string(data), message)
	}
	return n
}

// runHA runs the whole scenario on one backend.
func runHA(t *testing.T, backend *haBackend, dataStore string) {
	settings := haSettingsFromEnv(t)
	h := newHARun(t, backend, dataStore)
	begin := time.Now()
	// One at a time: the first runs the datastore's schema migration.
	for i := range h.servers {
		h.startServer(i)
	}
	h.t.Logf("HA figures %s: %d servers up in %s", backend.name, haServers, time.Since(begin).Round(100*time.Millisecond))
	h.load()
	stopped := false
	stopLoad := func() {
		if !stopped {
			close(h.stop)
			h.wg.Wait()
			stopped = true
		}
	}
	t.Cleanup(stopLoad)
	if dir := os.Getenv("KMS_HA_LOG_DIR"); dir != "" {
		// Keep the servers' logs (their directories go at cleanup).
		t.Cleanup(func() {
			for i, s := range h.servers {
				logs, _ := filepath.Glob(filepath.Join(s.dir, "server-*.log"))
				for _, l := range logs {
					data, _ := os.ReadFile(l)
					_ = os.WriteFile(filepath.Join(dir, fmt.Sprintf("%s-%s-%s", strings.Fields(backend.name)[0], h.ids[i], filepath.Base(l))), data, 0o600)
				}
			}
		})
	}
	h.waitMinted(-1, begin, 60*time.Second)

	for cycle := 0; ; cycle++ {
		h.faultKillServer(cycle % haServers)
		h.faultKillPlugin((cycle + 1) % haServers)
		h.faultStale((cycle + 2) % haServers)
		h.faultRestartKMS()
		if !settings.long || time.Since(begin) > settings.duration {
			break
		}
	}
	// A quiet tail with all servers up: at least one more rotation each.
	tail := 35 * time.Second
	if rest := settings.minRun - time.Since(begin); rest > tail {
		tail = rest
	}
	for end := time.Now().Add(tail); time.Now().Before(end); {
		time.Sleep(min(5*time.Second, time.Until(end)))
		h.sampleShared()
	}
	h.waitMinted(-1, time.Now().Add(-time.Second), 30*time.Second)
	stopLoad()
	elapsed := time.Since(begin)

	inv := backend.inventory(t, h.ids)
	h.mu.Lock()
	defer h.mu.Unlock()
	minted := 0
	for _, n := range h.minted {
		minted += n
	}
	var steady []string
	for k, n := range h.mintErrors {
		if strings.HasPrefix(k, "/") {
			steady = append(steady, fmt.Sprintf("%s: %d (%s)", k, n, h.firstErrors[k]))
		}
	}
	prepared := make([]string, haServers)
	for i := range h.servers {
		x509Prepared, jwtPrepared := h.logCount(i, "X509 CA prepared"), h.logCount(i, "JWT key prepared")
		x509Activated, jwtActivated := h.logCount(i, "X509 CA activated"), h.logCount(i, "JWT key activated")
		prepared[i] = fmt.Sprintf("%s: X.509 CA %d prepared/%d activated, JWT %d/%d", h.ids[i], x509Prepared, x509Activated, jwtPrepared, jwtActivated)
		// A server stopped past the stale age starts afresh late in a short run.
		want := 3
		if h.staleStopped[i] {
			want = 2
		}
		require.GreaterOrEqual(t, x509Prepared, want, "%s prepared several X.509 CAs", h.ids[i])
		require.GreaterOrEqual(t, jwtPrepared, want, "%s prepared several JWT keys", h.ids[i])
		require.GreaterOrEqual(t, x509Activated, 2, "%s activated several X.509 CAs", h.ids[i])
	}
	var wrong, steadyLag, faultLag []string
	for _, f := range h.failures {
		switch {
		case !f.lag:
			wrong = append(wrong, f.text)
		case f.window == "":
			steadyLag = append(steadyLag, f.text)
		default:
			faultLag = append(faultLag, f.window+": "+f.text)
		}
	}
	for _, f := range faultLag {
		t.Logf("verified only once the peer's bundle caught up: %s", f)
	}
	t.Logf("HA figures %s: run %s; SVIDs minted %d, verified %d, verification failures %d (bundle lag right after a fault: %d), mint errors outside faults %d, bundle fetches failed %d",
		backend.name, elapsed.Round(time.Second), minted, h.verified, len(wrong)+len(steadyLag), len(faultLag), len(steady), h.bundleFails)
	t.Logf("HA figures %s: mint errors per fault window: %v", backend.name, h.mintErrors)
	for k, e := range h.firstErrors {
		t.Logf("first mint error in window %q: %s", k, e)
	}
	t.Logf("HA figures %s: rotations: %s", backend.name, strings.Join(prepared, "; "))
	byFault := map[string][]time.Duration{}
	var names []string
	for _, f := range h.faults {
		if byFault[f.Name] == nil {
			names = append(names, f.Name)
		}
		byFault[f.Name] = append(byFault[f.Name], f.Recovery)
	}
	for _, name := range names {
		d := byFault[name]
		slices.Sort(d)
		t.Logf("HA figures %s: recovery after %q: %d times, median %s, max %s", backend.name, name, len(d),
			d[len(d)/2].Round(100*time.Millisecond), d[len(d)-1].Round(100*time.Millisecond))
	}
	t.Logf("HA figures %s: KMS at the end: %s", backend.name, inv)
	require.Empty(t, wrong, "every minted SVID verifies against the bundle")
	require.Empty(t, steadyLag, "outside faults every SVID verifies against any server's current bundle")
	require.Empty(t, steady, "no mint error outside a fault window")
	require.Zero(t, h.bundleFails, "some server always answers for the bundle")
	require.Empty(t, inv.Leaked, "no key left behind: %s", inv)
	for _, id := range h.ids {
		require.NotEmpty(t, inv.InUseBy[id], "%s serves keys from the KMS", id)
	}

	// JWT keys: published per server (aws_kms), or the same keys by all (gcp_kms shared).
	hist := map[int]int{}
	for _, kids := range h.jwtKids {
		hist[len(kids)]++
	}
	t.Logf("HA figures %s: distinct JWT public keys in the bundles %d; publishers per key (kids → keys): %v", backend.name, len(h.jwtKids), hist)
	if !backend.shared {
		for der, kids := range h.jwtKids {
			require.Len(t, kids, 1, "without shared keys each JWT key is one server's (%x…)", der[:8])
		}
		return
	}
	h.sampleShared()
	versions := h.sharedSeen
	sharedKeys := map[string]bool{}
	for _, v := range versions {
		sharedKeys[v.der] = true
	}
	for der := range h.jwtKids {
		require.True(t, sharedKeys[der], "every JWT key in the bundle is a shared version")
	}
	jwtPrepared := 0
	for i := range h.servers {
		jwtPrepared += h.logCount(i, "JWT key prepared")
	}
	all := 0
	for _, kids := range h.jwtKids {
		if len(kids) >= haServers {
			all++
		}
	}
	signedByAll := 0
	for _, servers := range h.tokenKeys {
		if len(servers) >= haServers {
			signedByAll++
		}
	}
	t.Logf("HA figures %s: shared JWT versions created %d for %d JWT key preparations by %d servers; published by all %d servers: %d keys; signed JWT-SVIDs of all %d servers: %d keys",
		backend.name, len(versions), jwtPrepared, haServers, haServers, all, haServers, signedByAll)
	// The first key, made while all three start, always is; later ones are unless a server
	// was down through the rotation (the stale fault stops one for ~2 rotations).
	require.GreaterOrEqual(t, all, 1, "a rotation's key was published by every server")
	require.Less(t, len(versions), jwtPrepared, "servers adopted each other's versions instead of making one each")
}

// --- aws_kms --------------------------------------------------------------------------

func awsHABackend(t *testing.T) *haBackend {
	endpoint, peer := startPersistentMoto(t)
	const lifecycle = "liveness_interval = \"2s\"\nsweep_interval = \"2s\"\nstale_key_age = \"20s\"\nclock_skew_allowance = \"1s\"\n"
	b := &haBackend{
		name:          "aws_kms",
		pluginData:    func(id string) string { return awsPluginData(endpoint, id) + lifecycle },
		staleAfter:    21 * time.Second,
		sweepInterval: 2 * time.Second,
		restartKMS:    peer.Restart,
	}
	b.inventory = func(t *testing.T, live []string) haInventory {
		return awsInventory(t, endpoint, live, b.staleAfter+3*b.sweepInterval)
	}
	return b
}

// awsKey is one KMS key of the trust domain as the HA checks need it.
type awsKey struct {
	id      string
	tag     map[string]string
	state   kmstypes.KeyState
	created time.Time
	// deletionScheduled: when ScheduleKeyDeletion was called (DeletionDate minus the
	// plugin's 7-day window); zero unless pending deletion.
	deletionScheduled time.Time
}

// shared: a key of the shared-keys mode (no server owns it).
func (k awsKey) shared() bool { return k.tag["spire-shared"] == "true" }

func (k awsKey) generation() int {
	n, _ := strconv.Atoi(k.tag["spire-shared-generation"])
	return n
}

func (k awsKey) stamp() time.Time {
	secs, err := strconv.ParseInt(k.tag["spire-last-update"], 10, 64)
	if err != nil {
		return time.Time{}
	}
	return time.Unix(secs, 0)
}

// lostFirstRace: a first-generation shared key whose creator lost the CreateAlias race and
// scheduled its deletion at once (never published).
func (k awsKey) lostFirstRace() bool {
	return k.shared() && k.state == kmstypes.KeyStatePendingDeletion &&
		k.deletionScheduled.Sub(k.created) < 15*time.Second
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// supersededAt: when the next generation under the key's shared alias was created (zero if
// none has been).
func (k awsKey) supersededAt(all []awsKey) time.Time {
	var at time.Time
	for _, o := range all {
		if o.shared() && o.tag["spire-shared-alias"] == k.tag["spire-shared-alias"] && o.generation() > k.generation() &&
			!o.lostFirstRace() && (at.IsZero() || o.created.Before(at)) {
			at = o.created
		}
	}
	return at
}

// awsKeys lists the trust domain's keys (state, tags, dates) and every alias's target key id.
func awsKeys(t *testing.T, client *kms.Client) ([]awsKey, map[string]string) {
	ctx := context.Background()
	targets := map[string]string{}
	aliases := kms.NewListAliasesPaginator(client, &kms.ListAliasesInput{})
	for aliases.HasMorePages() {
		page, err := aliases.NextPage(ctx)
		require.NoError(t, err)
		for _, a := range page.Aliases {
			if a.TargetKeyId != nil {
				targets[aws.ToString(a.AliasName)] = aws.ToString(a.TargetKeyId)
			}
		}
	}
	var out []awsKey
	keys := kms.NewListKeysPaginator(client, &kms.ListKeysInput{})
	for keys.HasMorePages() {
		page, err := keys.NextPage(ctx)
		require.NoError(t, err)
		for _, k := range page.Keys {
			tags, err := client.ListResourceTags(ctx, &kms.ListResourceTagsInput{KeyId: k.KeyId})
			require.NoError(t, err)
			tag := map[string]string{}
			for _, tg := range tags.Tags {
				tag[aws.ToString(tg.TagKey)] = aws.ToString(tg.TagValue)
			}
			if tag["spire-server-td"] != trustDomain {
				continue
			}
			desc, err := client.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: k.KeyId})
			require.NoError(t, err)
			key := awsKey{id: aws.ToString(k.KeyId), tag: tag, state: desc.KeyMetadata.KeyState,
				created: aws.ToTime(desc.KeyMetadata.CreationDate)}
			if d := desc.KeyMetadata.DeletionDate; d != nil {
				key.deletionScheduled = d.Add(-7 * 24 * time.Hour)
			}
			out = append(out, key)
		}
	}
	return out, targets
}

// awsInventory reads every key of the trust domain in KMS: its state, its tags and the
// aliases pointing at it. Shared keys (shared-keys mode): the shared alias's target is in
// use by every live server; a superseded generation is in grace while it was superseded or
// stamped less than grace ago (the sweep retires it after stale_key_age).
func awsInventory(t *testing.T, endpoint string, live []string, grace time.Duration) haInventory {
	keys, targets := awsKeys(t, kmsClient(endpoint))
	inv := haInventory{EnabledBy: map[string][]string{}, InUseBy: map[string][]string{}, Seen: map[string]bool{}}
	served := map[string]string{} // key id → server id whose alias points at it
	prefix := "alias/SPIRE_SERVER/example_org/"
	for name, target := range targets {
		if rest, ok := strings.CutPrefix(name, prefix); ok {
			server, _, _ := strings.Cut(rest, "/")
			if slices.Contains(live, server) {
				served[target] = server
			}
		}
		if strings.HasPrefix(name, "alias/SPIRE_SHARED_LOCK/") {
			inv.Locks++
		}
	}
	for _, k := range keys {
		inv.Total++
		server := k.tag["spire-server-id"]
		if k.shared() {
			server = "shared"
		}
		label := server + "/" + k.tag["spire-key-id"] + "/" + k.id
		inv.Seen[label] = true
		switch k.state {
		case kmstypes.KeyStateEnabled:
			inv.Enabled++
			inv.EnabledBy[server] = append(inv.EnabledBy[server], label)
			if k.shared() {
				superseded := k.supersededAt(keys)
				switch {
				case targets[k.tag["spire-shared-alias"]] == k.id:
					inv.InUse++
					inv.InUseBy[server] = append(inv.InUseBy[server], label)
				case !superseded.IsZero() && time.Since(later(superseded, k.stamp())) < grace:
					inv.Grace++ // others may still sign with it: retired after stale_key_age
				case superseded.IsZero() && time.Since(later(k.created, k.stamp())) < max(grace, haInFlight):
					inv.Grace++ // a rotation in progress (or a crashed holder's, swept when stale)
				default:
					inv.Leaked = append(inv.Leaked, label)
				}
				continue
			}
			owner, ok := served[k.id]
			switch {
			case ok:
				inv.InUse++
				inv.InUseBy[owner] = append(inv.InUseBy[owner], label)
			case slices.Contains(live, server) && time.Since(k.created) < haInFlight:
				inv.Grace++ // being created: not published yet
			case !slices.Contains(live, server) && time.Since(k.stamp()) < grace:
				inv.Grace++ // a stopped server's key, not stale yet
			default:
				inv.Leaked = append(inv.Leaked, label)
			}
		case kmstypes.KeyStatePendingDeletion:
			inv.Deleting++
		}
	}
	// The shared keys are served by every live server.
	if shared := inv.InUseBy["shared"]; len(shared) > 0 {
		for _, id := range live {
			inv.InUseBy[id] = append(inv.InUseBy[id], shared...)
		}
	}
	return inv
}

// TestSpireHAOnPostgresAwsKms: three spire-servers in HA on PostgreSQL with aws_kms (moto).
func TestSpireHAOnPostgresAwsKms(t *testing.T) {
	t.Parallel()
	pg := startPostgres(t)
	runHA(t, awsHABackend(t), pg.CreateDatabase(t, "spire_ha_aws"))
}

// --- aws_kms with shared JWT keys -------------------------------------------------------

// awsSharedHABackend: aws_kms (moto) with the JWT keys shared through one alias per key id;
// the lifecycle and shared_keys settings are gcp_kms's (see gcpHABackend for why).
func awsSharedHABackend(t *testing.T) (*haBackend, *awsSharedRetires) {
	endpoint, peer := startPersistentMoto(t)
	const staleKeyAge = 80 * time.Second
	lifecycle := fmt.Sprintf("liveness_interval = \"2s\"\nsweep_interval = \"2s\"\nstale_key_age = \"%ds\"\nclock_skew_allowance = \"1s\"\n", int(staleKeyAge.Seconds()))
	reuse := 45 * time.Second
	shared := fmt.Sprintf(`shared_keys {
    alias_template = "alias/SPIRE_SHARED/ha/{{ .KeyID }}"
    key_id_extraction_regex = "^alias/SPIRE_SHARED/ha/([^/]+)$"
    reuse_window = "%ds"
    lock_lease = "10s"
}
`, int(reuse.Seconds()))
	retires := &awsSharedRetires{}
	b := &haBackend{
		name:          "aws_kms shared_keys",
		pluginData:    func(id string) string { return awsPluginData(endpoint, id) + lifecycle + shared },
		staleAfter:    staleKeyAge + time.Second,
		sweepInterval: 2 * time.Second,
		restartKMS:    peer.Restart,
		shared:        true,
	}
	b.inventory = func(t *testing.T, live []string) haInventory {
		return awsInventory(t, endpoint, live, b.staleAfter+3*b.sweepInterval)
	}
	b.sharedVersions = func(t *testing.T) map[string]haSharedVersion {
		client := kmsClient(endpoint)
		keys, _ := awsKeys(t, client)
		out := map[string]haSharedVersion{}
		byAlias := map[string][]awsKey{}
		for _, k := range keys {
			if !k.shared() || k.lostFirstRace() {
				continue
			}
			sv := haSharedVersion{created: k.created}
			if k.state == kmstypes.KeyStateEnabled {
				pub, err := client.GetPublicKey(context.Background(), &kms.GetPublicKeyInput{KeyId: aws.String(k.id)})
				require.NoError(t, err)
				sv.der = string(pub.PublicKey)
			}
			out[k.id] = sv
			byAlias[k.tag["spire-shared-alias"]] = append(byAlias[k.tag["spire-shared-alias"]], k)
			// A superseded key is retired only once superseded (and unstamped) for stale_key_age.
			if k.state == kmstypes.KeyStatePendingDeletion {
				superseded := k.supersededAt(keys)
				require.False(t, superseded.IsZero(), "shared key %s (generation %d) was deleted while its alias still pointed at it", k.id, k.generation())
				after := k.deletionScheduled.Sub(superseded)
				require.GreaterOrEqual(t, after, staleKeyAge-time.Second, "shared key %s retired %s after it was superseded (stale_key_age %s)",
					k.id, after.Round(time.Second), staleKeyAge)
				retires.record(k.id, after)
			}
		}
		// Exactly one key per rotation: two generations of one shared alias closer than the
		// reuse window mean two servers rotated it for the same rotation.
		for alias, gens := range byAlias {
			slices.SortFunc(gens, func(a, b awsKey) int { return a.created.Compare(b.created) })
			for j := 1; j < len(gens); j++ {
				require.Greater(t, gens[j].generation(), gens[j-1].generation(), "%s: one key per generation", alias)
				gap := gens[j].created.Sub(gens[j-1].created)
				require.GreaterOrEqual(t, gap, reuse-2*time.Second, "%s: generations %d (%s) and %d (%s) only %s apart",
					alias, gens[j-1].generation(), gens[j-1].id, gens[j].generation(), gens[j].id, gap)
			}
		}
		return out
	}
	return b, retires
}

// awsSharedRetires: the superseded shared keys seen scheduled for deletion, and how long
// after they were superseded.
type awsSharedRetires struct {
	mu    sync.Mutex
	after map[string]time.Duration
}

func (r *awsSharedRetires) record(id string, after time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.after == nil {
		r.after = map[string]time.Duration{}
	}
	r.after[id] = after
}

// TestSpireHAOnPostgresAwsKmsShared: three spire-servers in HA on PostgreSQL with aws_kms
// (moto) and shared JWT keys (CreateAlias compare-and-swap).
func TestSpireHAOnPostgresAwsKmsShared(t *testing.T) {
	t.Parallel()
	pg := startPostgres(t)
	backend, retires := awsSharedHABackend(t)
	runHA(t, backend, pg.CreateDatabase(t, "spire_ha_aws_shared"))
	if t.Failed() {
		return
	}
	// The short run ends about when the first superseded shared key reaches stale_key_age:
	// wait (servers still up) until one is retired, so that the check above has a case.
	limit := time.Now().Add(backend.staleAfter + 3*backend.sweepInterval)
	var after []time.Duration
	for {
		backend.sharedVersions(t)
		retires.mu.Lock()
		after = after[:0]
		for _, d := range retires.after {
			after = append(after, d)
		}
		retires.mu.Unlock()
		if len(after) > 0 {
			break
		}
		require.True(t, time.Now().Before(limit), "no superseded shared key was retired")
		time.Sleep(2 * time.Second)
	}
	slices.Sort(after)
	t.Logf("HA figures %s: superseded shared keys retired %d, scheduled for deletion %s–%s after being superseded (stale_key_age 80s)",
		backend.name, len(after), after[0].Round(time.Second), after[len(after)-1].Round(time.Second))
}

// --- gcp_kms with shared JWT keys ------------------------------------------------------

func gcpHABackend(t *testing.T) *haBackend {
	fake, peer := startPersistentGcpKmsFake(t, "--require-auth", "--generation-delay", "0.05")
	env := newGcpEnvOn(t, fake, gcpDocumentedPermissions(t))
	// stale_key_age also retires superseded shared versions: a server may still sign with a
	// version for 5/6 of ca_ttl after adopting it, and another server (with another rotation
	// phase, e.g. after a fresh start) may supersede it right after, so stale_key_age must
	// exceed 5/6 of ca_ttl, as the 14d default exceeds the 24h default ca_ttl. The reuse
	// window covers the servers' phase spread and stays below ca_ttl (one slot's period).
	const lifecycle = "liveness_interval = \"2s\"\nsweep_interval = \"2s\"\nstale_key_age = \"80s\"\nclock_skew_allowance = \"1s\""
	reuse := 45 * time.Second
	shared := sharedKeys("ha", fmt.Sprintf("reuse_window = %q", reuse.String()), `lock_lease = "10s"`)
	b := &haBackend{
		name:          "gcp_kms shared_keys",
		pluginData:    func(id string) string { return env.pluginData(id, lifecycle, shared) },
		staleAfter:    81 * time.Second,
		sweepInterval: 2 * time.Second,
		restartKMS:    peer.Restart,
		shared:        true,
	}
	b.inventory = func(t *testing.T, live []string) haInventory {
		return gcpInventory(t, env, live, b.staleAfter+3*b.sweepInterval)
	}
	b.sharedVersions = func(t *testing.T) map[string]haSharedVersion {
		out := map[string]haSharedVersion{}
		for _, k := range env.fake.State(t, env.ring).CryptoKeys {
			if k.Labels["spire-shared"] != "true" {
				continue
			}
			for _, v := range k.Versions {
				sv := haSharedVersion{created: v.CreateTime}
				if v.State == "ENABLED" {
					der, err := x509.MarshalPKIXPublicKey(env.publicKey(t, v.Name))
					require.NoError(t, err)
					sv.der = string(der)
				}
				out[v.Name] = sv
			}
			// Exactly one version per rotation: two versions of one shared key closer than
			// the reuse window mean two servers rotated it for the same rotation.
			for j := 1; j < len(k.Versions); j++ {
				gap := k.Versions[j].CreateTime.Sub(k.Versions[j-1].CreateTime)
				require.GreaterOrEqual(t, gap, reuse-2*time.Second, "%s: versions %s and %s only %s apart",
					k.Name, k.Versions[j-1].Name, k.Versions[j].Name, gap)
			}
		}
		return out
	}
	return b
}

// gcpInventory reads the trust domain's CryptoKeys. In use: the newest enabled version of
// a live server's active CryptoKeys and of the shared ones. Grace: an older enabled shared
// version, superseded less than grace ago (the sweep retires it after stale_key_age).
func gcpInventory(t *testing.T, env *gcpEnv, live []string, grace time.Duration) haInventory {
	inv := haInventory{EnabledBy: map[string][]string{}, InUseBy: map[string][]string{}, Seen: map[string]bool{}}
	for _, k := range env.fake.State(t, env.ring).CryptoKeys {
		if k.Labels["spire-lock"] == "true" {
			inv.Locks++
			continue
		}
		if k.Labels["spire-server-td"] != tdHash() {
			continue
		}
		server := k.Labels["spire-server-id"]
		if k.Labels["spire-shared"] == "true" {
			server = "shared"
		}
		short := k.Name[strings.LastIndex(k.Name, "/")+1:]
		enabled := enabledVersions(&k)
		for _, v := range k.Versions {
			inv.Total++
			inv.Seen[fmt.Sprintf("%s/%s", short, v.Name[strings.LastIndex(v.Name, "/")+1:])] = true
			if v.State != "ENABLED" {
				inv.Deleting++
			}
		}
		// supersededAt: when the version after v was created (zero for the newest).
		supersededAt := func(v gcpFakeVersion) time.Time {
			for _, w := range k.Versions {
				if w.CreateTime.After(v.CreateTime) {
					return w.CreateTime
				}
			}
			return time.Time{}
		}
		shared, isLive := server == "shared", slices.Contains(live, server)
		for j, v := range enabled {
			inv.Enabled++
			label := fmt.Sprintf("%s/%s", short, v.Name[strings.LastIndex(v.Name, "/")+1:])
			inv.EnabledBy[server] = append(inv.EnabledBy[server], label)
			newest := j == len(enabled)-1
			switch {
			case newest && (shared || (isLive && k.Labels["spire-active"] == "true")):
				owner := server
				inv.InUse++
				inv.InUseBy[owner] = append(inv.InUseBy[owner], label)
			case shared && !newest && time.Since(supersededAt(v)) < grace:
				inv.Grace++ // others may still sign with it: retired after stale_key_age
			case isLive && !newest && time.Since(supersededAt(v)) < haInFlight:
				inv.Grace++ // a rotation in progress: destroyed once the new version is live
			case !isLive && !shared && time.Since(labelStamp(t, &k)) < grace:
				inv.Grace++ // a stopped server's key, not stale yet
			default:
				inv.Leaked = append(inv.Leaked, label)
			}
		}
	}
	// The shared keys are served by every live server.
	for _, id := range live {
		inv.InUseBy[id] = append(inv.InUseBy[id], inv.InUseBy["shared"]...)
	}
	return inv
}

// TestSpireHAOnPostgresGcpKmsShared: three spire-servers in HA on PostgreSQL with gcp_kms
// (the fake) and shared JWT keys.
func TestSpireHAOnPostgresGcpKmsShared(t *testing.T) {
	t.Parallel()
	pg := startPostgres(t)
	runHA(t, gcpHABackend(t), pg.CreateDatabase(t, "spire_ha_gcp"))
}

// TestPostgresFixture: the private cluster starts, takes a database and answers queries.
func TestPostgresFixture(t *testing.T) {
	pg := startPostgres(t)
	conf := pg.CreateDatabase(t, "fixture_check")
	require.Contains(t, conf, fmt.Sprintf("port=%d", pg.Port))
	out, err := pg.psql("fixture_check", "CREATE TABLE t (v int); INSERT INTO t VALUES (41), (1); SELECT sum(v) FROM t")
	require.NoError(t, err, out)
	require.Equal(t, "42", out)
}
