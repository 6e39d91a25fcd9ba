package spire_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
)

// BenchmarkSignDataAsSpireSeesIt measures SignData through SPIRE's own KeyManager facade
// (the code path SPIRE's CA uses), side by side in one run:
//   - kms-keymanager as an external plugin (unix socket, go-plugin), disk backend;
//   - SPIRE's built-in disk KeyManager (SPIRE runs built-ins over in-memory gRPC);
//   - Go's crypto signing in process with a key of the same type (the floor).
//
// Run: go test -run '^$' -bench SignData -benchtime 3s ./... (see docs/benchmarks.md).
func BenchmarkSignDataAsSpireSeesIt(b *testing.B) {
	digest := sha256.Sum256([]byte("benchmark"))
	for _, kt := range []keymanager.KeyType{keymanager.ECP256, keymanager.RSA2048} {
		signers := map[string]crypto.Signer{}
		dir := b.TempDir()
		ours := loadExternal(b, fmt.Sprintf("keys_path = %q", filepath.Join(dir, "ours.json")))
		k, err := ours.KeyManager.GenerateKey(ctx, "k", kt)
		if err != nil {
			b.Fatal(err)
		}
		signers["kms-keymanager"] = k
		builtin := loadBuiltInDisk(b, filepath.Join(dir, "spire.json"))
		k, err = builtin.KeyManager.GenerateKey(ctx, "k", kt)
		if err != nil {
			b.Fatal(err)
		}
		signers["spire-builtin-disk"] = k
		signers["go-in-process"] = goKey(b, kt)

		for _, name := range []string{"kms-keymanager", "spire-builtin-disk", "go-in-process"} {
			signer := signers[name]
			for _, concurrency := range []int{1, 16} {
				b.Run(fmt.Sprintf("%s/%s/c%d", kt, name, concurrency), func(b *testing.B) {
					benchSign(b, signer, digest[:], concurrency)
				})
			}
		}
	}
}

func goKey(b *testing.B, kt keymanager.KeyType) crypto.Signer {
	var key crypto.Signer
	var err error
	if kt == keymanager.ECP256 {
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	} else {
		key, err = rsa.GenerateKey(rand.Reader, 2048)
	}
	if err != nil {
		b.Fatal(err)
	}
	return key
}

// benchSign runs b.N SHA-256 signatures over `concurrency` goroutines and reports
// p50/p99 latency and signatures per second next to Go's ns/op (see benchSignHash).
func benchSign(b *testing.B, signer crypto.Signer, digest []byte, concurrency int) {
	benchSignHash(b, signer, digest, crypto.SHA256, concurrency)
}
