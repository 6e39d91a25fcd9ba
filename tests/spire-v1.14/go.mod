// This module runs the tests of ../spire (the same package, not a copy) against SPIRE
// v1.14.5, the newest v1.14.x the Go module proxy serves: its KeyManager conformance suite,
// its catalog and built-in plugins. It also pins the spire-server v1.14.5 that
// scripts/test-all.sh builds here. go.sum was filled by `go test -mod=mod` (go mod tidy would
// drop the requirement on ../spire, whose package has only test files).
module github.com/kms-keymanager/kms-keymanager/tests/spire-v1.14

go 1.26.6

require (
	github.com/kms-keymanager/kms-keymanager/tests/spire v0.0.0
	github.com/spiffe/spire v1.15.3
)

replace (
	// As in ../spire/go.mod: the proxy refuses ejbca-go-client-sdk v1.1.0.
	github.com/Keyfactor/ejbca-go-client-sdk => github.com/Keyfactor/ejbca-go-client-sdk v1.0.2
	github.com/kms-keymanager/kms-keymanager/tests/spire => ../spire
	// Every version of SPIRE in the build (../spire requires v1.15.3) is v1.14.5.
	github.com/spiffe/spire => github.com/spiffe/spire v1.14.5
)
