//go:build tools

// Package tools pins the spire-server command at this module's SPIRE version, so
// `go build github.com/spiffe/spire/cmd/spire-server` here builds exactly v1.14.5.
package tools

import _ "github.com/spiffe/spire/cmd/spire-server"
