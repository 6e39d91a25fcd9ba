package spire_test

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
	keymanagertest "github.com/spiffe/spire/pkg/server/plugin/keymanager/test"
)

// TestConformanceDisk runs SPIRE's own KeyManager conformance suite against kms-keymanager
// on the disk backend, loaded as an external plugin. Like SPIRE's disk plugin, no
// (key type, signature algorithm) pair is excluded.
func TestConformanceDisk(t *testing.T) {
	keymanagertest.Test(t, keymanagertest.Config{
		Create: func(t *testing.T) keymanager.KeyManager {
			keysPath := filepath.Join(t.TempDir(), "keys.json")
			return loadExternal(t, fmt.Sprintf("keys_path = %q", keysPath)).KeyManager
		},
	})
}
