package spire_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var ctx = context.Background()

func diskPlugin(t *testing.T) (*loaded, string) {
	keysPath := filepath.Join(t.TempDir(), "keys.json")
	return loadExternal(t, fmt.Sprintf("keys_path = %q\nlog_level = \"debug\"", keysPath)), keysPath
}

// What the conformance suite leaves out: PSS salts other than -1, SHA-224, digests longer
// than the curve, and values outside the hash enum. Verified with Go's crypto.
func TestSigningEdgeCases(t *testing.T) {
	p, _ := diskPlugin(t)
	rsaKey, err := p.KeyManager.GenerateKey(ctx, "rsa", keymanager.RSA2048)
	require.NoError(t, err)
	rsaPub := rsaKey.Public().(*rsa.PublicKey)
	digest := sha256.Sum256([]byte("edge cases"))

	for _, salt := range []int{rsa.PSSSaltLengthEqualsHash, rsa.PSSSaltLengthAuto, 20, 1} {
		t.Run(fmt.Sprintf("PSS salt %d", salt), func(t *testing.T) {
			sig, err := rsaKey.Sign(rand.Reader, digest[:], &rsa.PSSOptions{SaltLength: salt, Hash: crypto.SHA256})
			require.NoError(t, err)
			expect := salt
			if salt == rsa.PSSSaltLengthAuto {
				expect = (rsaPub.N.BitLen()-1+7)/8 - 32 - 2
			}
			if salt == rsa.PSSSaltLengthEqualsHash {
				expect = 32
			}
			require.NoError(t, rsa.VerifyPSS(rsaPub, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: expect}),
				"signature must use exactly %d salt bytes", expect)
		})
	}

	t.Run("PSS salt too long", func(t *testing.T) {
		_, err := rsaKey.Sign(rand.Reader, digest[:], &rsa.PSSOptions{SaltLength: 300, Hash: crypto.SHA256})
		requireStatus(t, err, codes.InvalidArgument, "PSS salt length 300 is too long")
	})

	t.Run("PKCS1v15 SHA-224", func(t *testing.T) {
		d := sha256.Sum224([]byte("sha-224"))
		sig, err := rsaKey.Sign(rand.Reader, d[:], crypto.SHA224)
		require.NoError(t, err)
		require.NoError(t, rsa.VerifyPKCS1v15(rsaPub, crypto.SHA224, d[:], sig))
	})

	ecKey, err := p.KeyManager.GenerateKey(ctx, "ec", keymanager.ECP256)
	require.NoError(t, err)
	t.Run("P-256 with a SHA-512 digest is truncated as ECDSA specifies", func(t *testing.T) {
		d := sha512.Sum512([]byte("long digest"))
		sig, err := ecKey.Sign(rand.Reader, d[:], crypto.SHA512)
		require.NoError(t, err)
		require.True(t, ecdsa.VerifyASN1(ecKey.Public().(*ecdsa.PublicKey), d[:], sig))
	})
	t.Run("SHA-1 (3, outside the enum) is refused", func(t *testing.T) {
		_, err := ecKey.Sign(rand.Reader, make([]byte, 20), crypto.SHA1)
		requireStatus(t, err, codes.InvalidArgument, "unsupported hash algorithm 3")
	})
	t.Run("digest length must match the hash", func(t *testing.T) {
		_, err := ecKey.Sign(rand.Reader, make([]byte, 31), crypto.SHA256)
		requireStatus(t, err, codes.InvalidArgument, "digest is 31 bytes but SHA-256 digests are 32 bytes")
	})
	t.Run("PSS on an EC key is refused", func(t *testing.T) {
		_, err := ecKey.Sign(rand.Reader, digest[:], &rsa.PSSOptions{SaltLength: -1, Hash: crypto.SHA256})
		requireStatus(t, err, codes.InvalidArgument, "RSA-PSS options cannot be used with ec-p256 key")
	})
	t.Run("unknown key", func(t *testing.T) {
		_, err := p.KeyManager.GetKey(ctx, "nope")
		requireStatus(t, err, codes.NotFound, `keymanager(kms): key "nope" not found`)
	})
}

func requireStatus(t *testing.T, err error, code codes.Code, contains string) {
	t.Helper()
	require.Error(t, err)
	st := status.Convert(err)
	require.Equal(t, code, st.Code(), st.Message())
	require.Contains(t, st.Message(), contains)
}

// The plugin's stderr reaches SPIRE's log as structured entries at the right level.
func TestPluginLogsAreParsedBySpire(t *testing.T) {
	p, _ := diskPlugin(t)
	_, err := p.KeyManager.GenerateKey(ctx, "x509-CA-A", keymanager.ECP256)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return p.Logs.find("generated key") != nil }, 5e9, 1e7)
	entry := p.Logs.find("generated key")
	require.Equal(t, "info", entry.Level.String())
	require.Equal(t, "x509-CA-A", entry.Data["key_id"])
	require.Equal(t, "ec-p256", entry.Data["key_type"])
	require.NotNil(t, p.Logs.find("configured"), "debug+info lines arrive parsed, not as raw text")

	// At unload the plugin reports its backend calls per operation.
	require.NoError(t, p.catalog.Close())
	require.Eventually(t, func() bool { return p.Logs.find("backend calls since start") != nil }, 5e9, 1e7)
	require.Equal(t, "disk", p.Logs.find("backend calls since start").Data["backend"])
}

// Keys written by SPIRE's built-in disk KeyManager load in kms-keymanager with the same
// public keys, and the reverse: the disk backend is a drop-in for SPIRE's.
func TestDiskFileInteropWithSpiresBuiltIn(t *testing.T) {
	keysPath := filepath.Join(t.TempDir(), "keys.json")
	builtin := loadBuiltInDisk(t, keysPath)
	fromSpire := map[string]crypto.PublicKey{}
	for _, kt := range []keymanager.KeyType{keymanager.ECP256, keymanager.ECP384, keymanager.RSA2048} {
		k, err := builtin.KeyManager.GenerateKey(ctx, "spire-"+kt.String(), kt)
		require.NoError(t, err)
		fromSpire[k.ID()] = k.Public()
	}

	ours := loadExternal(t, fmt.Sprintf("keys_path = %q", keysPath))
	keys, err := ours.KeyManager.GetKeys(ctx)
	require.NoError(t, err)
	require.Len(t, keys, len(fromSpire))
	for _, k := range keys {
		require.True(t, k.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(fromSpire[k.ID()]), k.ID())
	}
	ourKey, err := ours.KeyManager.GenerateKey(ctx, "ours", keymanager.ECP256)
	require.NoError(t, err)
	require.NoError(t, ours.catalog.Close())

	again := loadBuiltInDisk(t, keysPath)
	k, err := again.KeyManager.GetKey(ctx, "ours")
	require.NoError(t, err)
	require.True(t, k.Public().(*ecdsa.PublicKey).Equal(ourKey.Public()))
}

// Bad configuration reaches SPIRE as InvalidArgument naming the key and the allowed values.
func TestBadConfigurationIsRejected(t *testing.T) {
	for _, tc := range []struct{ data, want string }{
		{``, `"keys_path" is required`},
		{`keys_path = "/tmp/k.json"` + "\n" + `keys_pth = "x"`, `unknown key "keys_pth" in plugin_data; allowed keys: backend, log_level, max_keys, max_signs_per_second, adaptive_rate_limit, metrics_listen, audit_log, migrate_from, keys_path`},
		{`keys_path = 42`, `"keys_path" must be a string, got a number`},
		{`keys_path = "/tmp/k.json"` + "\n" + `log_level = "loud"`, `"loud" is not one of trace, debug, info, warn, error`},
		{`backend = "aws"`, `unknown backend "aws"; available: `},
	} {
		_, err := tryLoad(catalogConfig(t, tc.data))
		require.Error(t, err, tc.data)
		require.Contains(t, err.Error(), "InvalidArgument", tc.data)
		require.Contains(t, err.Error(), tc.want, tc.data)
	}

	// The list of backends is exactly the five this binary has, in this order: nothing
	// missing and nothing extra after them.
	_, err := tryLoad(catalogConfig(t, `backend = "aws"`))
	require.Error(t, err)
	_, list, found := strings.Cut(err.Error(), "; available: ")
	require.True(t, found, err.Error())
	require.Equal(t, "disk, aws_kms, gcp_kms, hashicorp_vault, azure_key_vault, pkcs11", list, err.Error())

	// A keys file in a directory that does not exist is refused at Configure, naming the
	// directory, not at the first GenerateKey.
	missing := filepath.Join(t.TempDir(), "no-such-dir")
	_, err = tryLoad(catalogConfig(t, fmt.Sprintf("keys_path = %q", filepath.Join(missing, "keys.json"))))
	require.Error(t, err)
	require.Contains(t, err.Error(), "InvalidArgument")
	require.Contains(t, err.Error(), fmt.Sprintf("its directory %q does not exist", missing), err.Error())
	_, statErr := os.Stat(missing)
	require.True(t, os.IsNotExist(statErr), "Configure must not create the directory")
}

// SPIRE's HCL v1 printer output of a JSON server config quotes every key.
func TestHCL1PrinterOutputIsAccepted(t *testing.T) {
	keysPath := filepath.Join(t.TempDir(), "keys.json")
	p := loadExternal(t, fmt.Sprintf("%q = %q", "keys_path", keysPath))
	_, err := p.KeyManager.GenerateKey(ctx, "k", keymanager.ECP256)
	require.NoError(t, err)
	// The quoted key was read: the key landed in that file.
	data, err := os.ReadFile(keysPath)
	require.NoError(t, err)
	require.Contains(t, string(data), `"k"`)
}

// What SPIRE shows of plugin_data and of the plugin's logs: `spire-server validate` names
// the key and the place of a syntax error or a non-literal value but never a secret on
// that line, and at log_level = "debug" the server log carries the plugin's own events,
// not the HTTP/2 frame traces of its gRPC transport.
func TestSpireShowsNeitherPluginDataSecretsNorFrameTraces(t *testing.T) {
	const secret = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"
	var dataFile string
	s := newSpireServerWith(t, func(s *spireServer) string {
		dataFile = filepath.Join(s.dir, "kms.hcl")
		return fmt.Sprintf("plugin_data_file = %q", dataFile)
	})
	keysPath := fmt.Sprintf("keys_path = %q\n", s.keysPath())
	for _, tc := range []struct {
		data string
		want []string
	}{
		// Two strings on a line, an unterminated string on the last line, a quoted key
		// followed by junk, a secret in a nested block.
		{keysPath + `secret_access_key = "` + secret + `" "other"` + "\n", []string{"line 2, column ", `in "secret_access_key"`}},
		{keysPath + `secret_access_key = "` + secret, []string{"line 2, column 1, ", `in "secret_access_key"`}},
		{keysPath + `"external_id" = "` + secret + `" junk` + "\n", []string{"line 2, column ", `in "external_id"`}},
		{keysPath + "aws {\n  external_id = \"" + secret + "\" x\n}\n", []string{"line 3, column ", `in "external_id"`}},
		// An unquoted value is a variable reference; a template would be evaluated.
		{keysPath + "secret_access_key = " + secret + "\n", []string{`invalid "secret_access_key": must be a quoted string literal`}},
		{keysPath + `external_id = "${` + secret + `}"` + "\n", []string{`invalid "external_id": must be a quoted string literal`}},
	} {
		require.NoError(t, os.WriteFile(dataFile, []byte(tc.data), 0o600))
		out, err := s.validate()
		require.Error(t, err, tc.data)
		for _, want := range tc.want {
			require.Contains(t, out, want, tc.data)
		}
		require.NotContains(t, out, secret[:8], tc.data)
		require.NotContains(t, out, secret[len(secret)-8:], tc.data)
	}

	require.NoError(t, os.WriteFile(dataFile, []byte(keysPath+"log_level = \"debug\"\n"), 0o600))
	s.start(1)
	s.mintAndVerify(t)
	log := s.stop()
	var own, transport []string
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, "plugin_name=kms") || !strings.Contains(line, "level=debug") {
			continue
		}
		if strings.Contains(line, "frame=") || strings.Contains(line, "stream_id") {
			transport = append(transport, line)
		} else {
			own = append(own, line)
		}
	}
	require.NotEmpty(t, own, "the plugin's own debug events reach SPIRE")
	if len(transport) > 0 {
		t.Fatalf("%d of %d debug lines from the plugin are transport traces, e.g.\n%s",
			len(transport), len(own)+len(transport), transport[0])
	}
	requireCleanPluginExit(t, log)
}
