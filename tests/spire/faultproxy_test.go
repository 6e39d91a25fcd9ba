package spire_test

import (
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
	faultThrottle  fault = iota // 400 ThrottlingException
	faultServer500              // 500 KMSInternalException
	faultDrop                   // the connection is closed without a response
	faultSlow                   // the response comes after the plugin's per-attempt timeout
)

// faultProxy sits on 127.0.0.1 between the plugin and the emulator and fails the next
// queued requests of an operation (by X-Amz-Target, e.g. "TrentService.Sign").
type faultProxy struct {
	URL   string
	mu    sync.Mutex
	queue map[string][]fault
	seen  map[string]int
	// latency is added to every request (benchmarks: a KMS round trip).
	latency time.Duration
}

func newFaultProxy(t *testing.T, target string) *faultProxy {
	t.Helper()
	upstream, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{queue: map[string][]fault{}, seen: map[string]int{}}
	forward := httputil.NewSingleHostReverseProxy(upstream)
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		operation := strings.TrimPrefix(r.Header.Get("X-Amz-Target"), "TrentService.")
		p.mu.Lock()
		p.seen[operation]++
		var next *fault
		if queued := p.queue[operation]; len(queued) > 0 {
			next = &queued[0]
			p.queue[operation] = queued[1:]
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
		switch *next {
		case faultThrottle:
			w.Header().Set("Content-Type", "application/x-amz-json-1.1")
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte(`{"__type":"ThrottlingException","message":"Rate exceeded"}`))
		case faultServer500:
			w.Header().Set("Content-Type", "application/x-amz-json-1.1")
			w.WriteHeader(http.StatusInternalServerError)
			_, _ = w.Write([]byte(`{"__type":"KMSInternalException","message":"injected"}`))
		case faultDrop:
			conn, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				_ = conn.Close()
			}
		case faultSlow:
			time.Sleep(9 * time.Second) // longer than the plugin's 8 s attempt timeout
			forward.ServeHTTP(w, r)
		}
	}))
	t.Cleanup(server.Close)
	p.URL = server.URL
	return p
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
