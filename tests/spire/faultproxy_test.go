package spire_test

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

// fault is one injected failure for one KMS operation.
type fault int

const (
	faultThrottle    fault = iota // 400 ThrottlingException (Vault: 429; Cloud KMS: 429 RESOURCE_EXHAUSTED)
	faultServer500                // 500 KMSInternalException (Vault: 500)
	faultDrop                     // the connection is closed without a response
	faultSlow                     // the response comes after the plugin's per-attempt timeout
	faultUnavailable              // 503 (Vault: "injected: service unavailable")
)

// faultProxy sits on 127.0.0.1 between the plugin and the emulator and fails the next
// queued requests of an operation: a JSON-protocol call by its X-Amz-Target ("Sign" for
// "TrentService.Sign"), a query-protocol call (STS) by the Action of its form body
// ("GetCallerIdentity", "AssumeRole"), a Vault API call by the first two segments of its
// path after /v1/ ("transit/sign", "transit/keys", "auth/approle"), a Cloud KMS REST call
// by its custom verb or else its collection ("asymmetricSign", "cryptoKeyVersions").
// Query-protocol faults are answered in that protocol's XML error shape, Vault faults in
// Vault's {"errors": [...]} shape, Cloud KMS faults in Google's {"error": {...}} shape, so
// that clients read them as they would the real service's.
type faultProxy struct {
	URL   string
	mu    sync.Mutex
	queue map[string][]fault
	seen  map[string]int
	// quotas are the store's per-operation request quotas (token buckets); a request
	// beyond its quota is answered with the store's throttling reply (faultThrottle).
	quotas    map[string]*tokenBucket
	throttled map[string]int
	// latency is added to every request (benchmarks: a KMS round trip).
	latency time.Duration
}

func newFaultProxy(t *testing.T, target string) *faultProxy {
	t.Helper()
	upstream, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{queue: map[string][]fault{}, seen: map[string]int{}, quotas: map[string]*tokenBucket{}, throttled: map[string]int{}}
	forward := httputil.NewSingleHostReverseProxy(upstream)
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		operation, query := requestOperation(t, r)
		p.mu.Lock()
		p.seen[operation]++
		var next *fault
		if queued := p.queue[operation]; len(queued) > 0 {
			next = &queued[0]
			p.queue[operation] = queued[1:]
		} else if bucket := p.quotas[operation]; bucket != nil && !bucket.take(time.Now()) {
			throttle := faultThrottle
			next = &throttle
			p.throttled[operation]++
		}
		latency := p.latency
		p.mu.Unlock()
		if latency > 0 {
			time.Sleep(latency)
		}
		if next == nil {
			forward.ServeHTTP(w, r)
			return
		}
		if *next == faultSlow {
			time.Sleep(9 * time.Second) // longer than the plugin's 8 s attempt timeout
			forward.ServeHTTP(w, r)
			return
		}
		if query {
			writeQueryFault(w, *next)
			return
		}
		if strings.HasPrefix(r.URL.Path, cloudKmsPathPrefix) {
			writeCloudKmsFault(w, *next)
			return
		}
		if strings.HasPrefix(r.URL.Path, "/v1/") {
			writeVaultFault(w, *next)
			return
		}
		switch *next {
		case faultThrottle:
			w.Header().Set("Content-Type", "application/x-amz-json-1.1")
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte(`{"__type":"ThrottlingException","message":"Rate exceeded"}`))
		case faultServer500:
			w.Header().Set("Content-Type", "application/x-amz-json-1.1")
			w.WriteHeader(http.StatusInternalServerError)
			_, _ = w.Write([]byte(`{"__type":"KMSInternalException","message":"injected"}`))
		case faultUnavailable:
			w.Header().Set("Content-Type", "application/x-amz-json-1.1")
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte(`{"__type":"ServiceUnavailableException","message":"injected"}`))
		case faultDrop:
			dropConnection(w)
		}
	}))
	t.Cleanup(server.Close)
	p.URL = server.URL
	return p
}

// requestOperation names the AWS operation of r: the X-Amz-Target of a JSON-protocol call
// (the service prefix dropped), else the Action of a query-protocol form body (query is then
// true). The body is read and put back for forwarding.
func requestOperation(t *testing.T, r *http.Request) (operation string, query bool) {
	if rest, found := strings.CutPrefix(r.URL.Path, cloudKmsPathPrefix); found {
		segments := strings.Split(rest, "/")
		last := segments[len(segments)-1]
		if _, verb, custom := strings.Cut(last, ":"); custom {
			return verb, false
		}
		if len(segments)%2 == 1 {
			return last, false // a collection: list or create
		}
		return segments[len(segments)-2], false
	}
	if rest, found := strings.CutPrefix(r.URL.Path, "/v1/"); found {
		segments := strings.SplitN(rest, "/", 3)
		return strings.Join(segments[:min(2, len(segments))], "/"), false
	}
	if target := r.Header.Get("X-Amz-Target"); target != "" {
		_, op, found := strings.Cut(target, ".")
		if !found {
			op = target
		}
		return op, false
	}
	if !strings.HasPrefix(r.Header.Get("Content-Type"), "application/x-www-form-urlencoded") || r.Body == nil {
		return "", false
	}
	body, err := io.ReadAll(r.Body)
	r.Body.Close()
	if err != nil {
		t.Errorf("fault proxy: reading a query-protocol body: %v", err)
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	form, err := url.ParseQuery(string(body))
	if err != nil {
		t.Errorf("fault proxy: a form body that does not parse: %v: %q", err, body)
		return "", true
	}
	return form.Get("Action"), true
}

// dropConnection closes the client's connection without a response.
func dropConnection(w http.ResponseWriter) {
	conn, _, err := w.(http.Hijacker).Hijack()
	if err == nil {
		_ = conn.Close()
	}
}

// writeQueryFault answers a query-protocol (STS) call with the fault, in the XML error shape
// of that protocol.
func writeQueryFault(w http.ResponseWriter, f fault) {
	queryError := func(status int, kind, code string) {
		w.Header().Set("Content-Type", "text/xml")
		w.WriteHeader(status)
		_, _ = w.Write([]byte(`<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>` + kind +
			`</Type><Code>` + code + `</Code><Message>injected</Message></Error><RequestId>fault-proxy</RequestId></ErrorResponse>`))
	}
	switch f {
	case faultThrottle:
		queryError(http.StatusBadRequest, "Sender", "Throttling")
	case faultServer500:
		queryError(http.StatusInternalServerError, "Receiver", "InternalFailure")
	case faultDrop:
		dropConnection(w)
	}
}

// cloudKmsPathPrefix starts every Cloud KMS REST resource path (Vault's API is under /v1/ too).
const cloudKmsPathPrefix = "/v1/projects/"

// writeCloudKmsFault answers a Cloud KMS REST call with the fault, in Google's JSON error
// shape (the HTTP status and the canonical code name, as Cloud KMS answers).
func writeCloudKmsFault(w http.ResponseWriter, f fault) {
	googleError := func(status int, code, message string) {
		w.Header().Set("Content-Type", "application/json; charset=UTF-8")
		w.WriteHeader(status)
		_, _ = fmt.Fprintf(w, `{"error":{"code":%d,"message":%q,"status":%q}}`, status, message, code)
	}
	switch f {
	case faultThrottle:
		googleError(http.StatusTooManyRequests, "RESOURCE_EXHAUSTED",
			"Quota exceeded for quota metric 'Cryptographic requests' (injected by the fault proxy).")
	case faultServer500:
		googleError(http.StatusInternalServerError, "INTERNAL", "Internal error encountered (injected).")
	case faultUnavailable:
		googleError(http.StatusServiceUnavailable, "UNAVAILABLE", "The service is currently unavailable (injected).")
	case faultDrop:
		dropConnection(w)
	}
}

// writeVaultFault answers a Vault API call with the fault, in Vault's error shape.
func writeVaultFault(w http.ResponseWriter, f fault) {
	vaultError := func(status int, message string) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_, _ = w.Write([]byte(`{"errors":["` + message + `"]}`))
	}
	switch f {
	case faultThrottle:
		vaultError(http.StatusTooManyRequests, "injected: rate limit quota exceeded")
	case faultServer500:
		vaultError(http.StatusInternalServerError, "injected: internal error")
	case faultUnavailable:
		vaultError(http.StatusServiceUnavailable, "injected: service unavailable")
	case faultDrop:
		dropConnection(w)
	}
}

// tokenBucket is a request quota as KMS services enforce them: perSecond requests a second,
// up to burst at once.
type tokenBucket struct {
	perSecond, burst, tokens float64
	last                     time.Time
}

func (b *tokenBucket) take(now time.Time) bool {
	b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.perSecond)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// quota limits operation to perSecond requests a second with bursts of burst (a full
// bucket to start); beyond it the proxy answers with the store's throttling reply (AWS:
// 400 ThrottlingException; Vault API paths: 429). perSecond 0 removes the quota.
func (p *faultProxy) quota(operation string, perSecond float64, burst int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if perSecond <= 0 {
		delete(p.quotas, operation)
		return
	}
	p.quotas[operation] = &tokenBucket{perSecond: perSecond, burst: float64(burst), tokens: float64(burst), last: time.Now()}
}

// throttles returns and resets how many requests of operation the quota turned away.
func (p *faultProxy) throttles(operation string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := p.throttled[operation]
	p.throttled[operation] = 0
	return n
}

func (p *faultProxy) inject(operation string, faults ...fault) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.queue[operation] = append(p.queue[operation], faults...)
}

// clear drops the faults still queued for operation.
func (p *faultProxy) clear(operation string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.queue[operation] = nil
}

// snapshot returns and resets the per-operation call counts.
func (p *faultProxy) snapshot() map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.seen
	p.seen = map[string]int{}
	return out
}

func (p *faultProxy) calls(operation string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seen[operation]
}
