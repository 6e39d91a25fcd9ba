// Package spire_test runs kms-keymanager against the real SPIRE: its catalog loader for
// external plugins, its KeyManager conformance suite, and a real spire-server.
package spire_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/spire/pkg/common/catalog"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager"
)

const trustDomain = "example.org"

// pluginBinary is the kms-keymanager binary under test (set by scripts/test-all.sh).
func pluginBinary(t testing.TB) string {
	t.Helper()
	path := os.Getenv("KMS_KEYMANAGER_BIN")
	if path == "" {
		t.Fatal("KMS_KEYMANAGER_BIN must point at the kms-keymanager binary")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		t.Fatal(err)
	}
	return abs
}

func sha256File(t testing.TB, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

// keyManagerRepo is the KeyManager repository SPIRE's server catalog uses, rebuilt from
// exported parts: exactly one KeyManager, facade version v1, the built-ins of the SPIRE release
// this package is compiled against (spireBuiltIns).
type keyManagerRepo struct {
	keymanager.Repository
}

func (r *keyManagerRepo) Binder() any                      { return r.SetKeyManager }
func (r *keyManagerRepo) Constraints() catalog.Constraints { return catalog.ExactlyOne() }
func (r *keyManagerRepo) Versions() []catalog.Version      { return []catalog.Version{v1{}} }
func (r *keyManagerRepo) BuiltIns() []catalog.BuiltIn {
	return spireBuiltIns()
}

type v1 struct{}

func (v1) New() catalog.Facade { return new(keymanager.V1) }
func (v1) Deprecated() bool    { return false }

type repository struct{ km keyManagerRepo }

func (r *repository) Plugins() map[string]catalog.PluginRepo {
	return map[string]catalog.PluginRepo{"KeyManager": &r.km}
}
func (r *repository) Services() []catalog.ServiceRepo { return nil }

// logCapture records what SPIRE's catalog logged, including the plugin's own lines as the
// go-plugin host parsed them.
type logCapture struct {
	mu      sync.Mutex
	entries []*logrus.Entry
}

func (c *logCapture) Levels() []logrus.Level { return logrus.AllLevels }
func (c *logCapture) Fire(e *logrus.Entry) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.entries = append(c.entries, e)
	return nil
}
func (c *logCapture) find(message string) *logrus.Entry {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.entries {
		if e.Message == message {
			return e
		}
	}
	return nil
}

type loaded struct {
	KeyManager keymanager.KeyManager
	Logs       *logCapture
	catalog    *catalog.Catalog
}

// loadExternal loads kms-keymanager through SPIRE's catalog exactly as spire-server does
// for `plugin_cmd`, with `plugin_checksum` set, and unloads it at test cleanup.
func loadExternal(t testing.TB, pluginData string) *loaded {
	t.Helper()
	return load(t, catalog.PluginConfig{
		Type:       "KeyManager",
		Name:       "kms",
		Path:       pluginBinary(t),
		Checksum:   sha256File(t, pluginBinary(t)),
		DataSource: catalog.FixedData(pluginData),
	})
}

// loadBuiltInDisk loads SPIRE's own disk KeyManager.
func loadBuiltInDisk(t testing.TB, keysPath string) *loaded {
	t.Helper()
	return load(t, catalog.PluginConfig{
		Type:       "KeyManager",
		Name:       "disk",
		DataSource: catalog.FixedData(`keys_path = "` + keysPath + `"`),
	})
}

func load(t testing.TB, config catalog.PluginConfig) *loaded {
	t.Helper()
	l, err := tryLoad(config)
	if err != nil {
		t.Fatalf("loading %s failed: %v", config.Name, err)
	}
	t.Cleanup(func() { _ = l.catalog.Close() })
	return l
}

func tryLoad(config catalog.PluginConfig) (*loaded, error) {
	capture := &logCapture{}
	log := logrus.New()
	// Everything the catalog logs, the plugin's own stderr lines included, goes to the test
	// log dir for the planted-secret scan (testlogs_test.go).
	log.SetOutput(testLogWriter("catalog-" + config.Name))
	log.SetLevel(logrus.DebugLevel)
	log.AddHook(capture)
	repo := &repository{}
	cat, err := catalog.Load(context.Background(), catalog.Config{
		Log:           log,
		PluginConfigs: []catalog.PluginConfig{config},
		CoreConfig:    catalog.CoreConfig{TrustDomain: spiffeid.RequireTrustDomainFromString(trustDomain)},
	}, repo)
	if err != nil {
		return nil, err
	}
	return &loaded{KeyManager: repo.km.GetKeyManager(), Logs: capture, catalog: cat}, nil
}

func catalogConfig(t *testing.T, pluginData string) catalog.PluginConfig {
	return catalog.PluginConfig{
		Type:       "KeyManager",
		Name:       "kms",
		Path:       pluginBinary(t),
		DataSource: catalog.FixedData(pluginData),
	}
}
