//go:build spire_v1_14

package spire_test

import (
	"github.com/spiffe/spire/pkg/common/catalog"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager/awskms"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager/azurekeyvault"
	"github.com/spiffe/spire/pkg/server/plugin/keymanager/disk"
)

// spireModuleRelease: compiled by tests/spire-v1.14 against SPIRE v1.14.5 (see release_v115_test.go).
const spireModuleRelease = "v1.14.5"

// spireBuiltIns: v1.14 has no hashicorp_vault KeyManager (it came with v1.15).
func spireBuiltIns() []catalog.BuiltIn {
	return []catalog.BuiltIn{disk.BuiltIn(), awskms.BuiltIn(), azurekeyvault.BuiltIn()}
}

// spireAzureAnswersClaimsChallenge: whether SPIRE's built-in azure_key_vault gets a new token
// when Key Vault revokes one with a continuous access evaluation claims challenge.
const spireAzureAnswersClaimsChallenge = false
