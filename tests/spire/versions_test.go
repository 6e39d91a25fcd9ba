package spire_test

import (
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
)

// spireServerRelease is one spire-server binary the real-server tests run.
type spireServerRelease struct {
	// Name is the release, "v1.15.3", from `spire-server --version`.
	Name string
	Bin  string
}

// hasBuiltIn reports whether this release of spire-server has the built-in KeyManager name.
func (r spireServerRelease) hasBuiltIn(name string) bool {
	// hashicorp_vault came with v1.15.0; the other KeyManagers are older than v1.14.
	return name != "hashicorp_vault" || !strings.HasPrefix(r.Name, "v1.14.")
}

// spireHasBuiltIn reports whether the SPIRE packages this test binary is compiled against
// have the built-in KeyManager name (catalog-level tests load it in process).
func spireHasBuiltIn(name string) bool {
	for _, builtIn := range spireBuiltIns() {
		if builtIn.Name == name {
			return true
		}
	}
	return false
}

var (
	releasesOnce sync.Once
	releases     []spireServerRelease
	releasesErr  string
	// releaseOfTest maps the name of a forEachSpireServer subtest to its release.
	releaseOfTest sync.Map
)

var releaseVersion = regexp.MustCompile(`^\d+\.\d+\.\d+`)

// spireServerReleases lists the spire-server binaries to test: SPIRE_SERVER_BIN (required; the
// release go.mod pins, v1.15.3) and SPIRE_SERVER_BIN_V114 (optional; v1.14.5, which
// scripts/test-all.sh builds in tests/spire-v1.14/server).
func spireServerReleases(t testing.TB) []spireServerRelease {
	t.Helper()
	releasesOnce.Do(func() {
		seen := map[string]bool{}
		for _, variable := range []string{"SPIRE_SERVER_BIN", "SPIRE_SERVER_BIN_V114"} {
			bin := os.Getenv(variable)
			if bin == "" || seen[bin] {
				if variable == "SPIRE_SERVER_BIN" {
					releasesErr = "SPIRE_SERVER_BIN must point at the spire-server binary"
					return
				}
				continue
			}
			seen[bin] = true
			out, err := exec.Command(bin, "--version").CombinedOutput()
			version := releaseVersion.FindString(strings.TrimSpace(string(out)))
			if err != nil || version == "" {
				releasesErr = variable + "=" + bin + ": `--version` gave no release: " + string(out)
				return
			}
			releases = append(releases, spireServerRelease{Name: "v" + version, Bin: bin})
		}
	})
	if releasesErr != "" {
		t.Fatal(releasesErr)
	}
	return releases
}

// forEachSpireServer runs test once per spire-server release, as subtests named
// "spire-<release>"; the servers a subtest starts (newSpireServer…) run that release's binary.
// parallel runs the releases side by side: only for tests that do not set the environment.
func forEachSpireServer(t *testing.T, parallel bool, test func(t *testing.T, release spireServerRelease)) {
	t.Helper()
	for _, release := range spireServerReleases(t) {
		t.Run("spire-"+release.Name, func(t *testing.T) {
			if parallel {
				t.Parallel()
			}
			releaseOfTest.Store(t.Name(), release)
			test(t, release)
		})
	}
}

// spireServerOf is the release a test's servers run: that of its enclosing forEachSpireServer
// subtest, else SPIRE_SERVER_BIN's.
func spireServerOf(t testing.TB) spireServerRelease {
	t.Helper()
	for name := t.Name(); ; {
		if release, ok := releaseOfTest.Load(name); ok {
			return release.(spireServerRelease)
		}
		i := strings.LastIndex(name, "/")
		if i < 0 {
			break
		}
		name = name[:i]
	}
	return spireServerReleases(t)[0]
}

func spireServerBin(t testing.TB) string {
	t.Helper()
	return spireServerOf(t).Bin
}
