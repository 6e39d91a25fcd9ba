//go:build !spire_v1_14

package spire_test

import (
	"github.com/spiffe/spire/pkg/common/catalog"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager/awskms"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager/azurekeyvault"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager/disk"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager/hashicorpvault"
)

// spireModuleRelease is the SPIRE release whose Go packages (catalog, built-ins, KeyManager
// conformance suite) this package is compiled against: go.mod's. The tests/spire-v1.14
// module compiles the same files against v1.14.5 with the build tag spire_v1_14.
const spireModuleRelease = "v1.15.3"

// spireBuiltIns are the built-in KeyManagers the tests load through SPIRE's catalog: disk,
// aws_kms, hashicorp_vault (new in v1.15) and azure_key_vault.
func spireBuiltIns() []catalog.BuiltIn {
	return []catalog.BuiltIn{disk.BuiltIn(), awskms.BuiltIn(), hashicorpvault.BuiltIn(), azurekeyvault.BuiltIn()}
}

// spireAzureAnswersClaimsChallenge: whether SPIRE's built-in azure_key_vault gets a new token
// when Key Vault revokes one with a continuous access evaluation claims challenge.
const spireAzureAnswersClaimsChallenge = true
