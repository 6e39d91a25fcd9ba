#!/usr/bin/env bash
# The Go tests of tests/spire against SPIRE v1.14.5, the newest v1.14.x the Go module proxy
# serves (v1.15.3 is go.mod's release).
#
#   scripts/test-spire-v1.14.sh build      build and cache spire-server v1.14.5; print its path
#   scripts/test-spire-v1.14.sh ci         SPIRE v1.14.5's KeyManager conformance suite on disk (CI)
#   scripts/test-spire-v1.14.sh [-run RE]  every test: the tests/spire package compiled against
#                                          v1.14.5 (conformance suite, catalog, built-ins) and
#                                          every real spire-server test on the v1.14.5 binary
#
# The test modes need what scripts/test-all.sh exports (KMS_KEYMANAGER_BIN, MOTO_PYTHON,
# LOCALSTACK_PYTHON, GCP_FAKE_PYTHON, AZURE_FAKE_PYTHON, BAO_BIN, SOFTHSM2_CONF, KRYOPTIC_*).
# CI runs the v1.14.5 binary's basic real-server test per backend and the switch tests from
# the main module through SPIRE_SERVER_BIN_V114 (tests/spire/versions_test.go).
set -euo pipefail

cd "$(dirname "$0")/.."
SPIRE_V114_VERSION=v1.14.5
CACHE=${KMS_KEYMANAGER_CACHE:-$HOME/.cache/kms-keymanager}
BIN=$CACHE/bin/spire-server-$SPIRE_V114_VERSION
PKG=github.com/kms-keymanager/kms-keymanager/tests/spire

build() {
  if [[ ! -x $BIN ]]; then
    mkdir -p "$(dirname "$BIN")"
    # tests/spire-v1.14/server requires only SPIRE v1.14.5: the binary gets that release's
    # own dependency versions.
    (cd tests/spire-v1.14/server && go build -o "$BIN.tmp" github.com/spiffe/spire/cmd/spire-server)
    mv "$BIN.tmp" "$BIN"
  fi
}

case "${1:-}" in
  build)
    build >&2
    echo "$BIN"
    ;;
  ci)
    # The same package as tests/spire, compiled against v1.14.5 (tests/spire-v1.14/go.mod,
    # build tag spire_v1_14): the suite on disk, through v1.14.5's catalog and KeyManager
    # facade. v1.14.5's suite and facade are the same code as v1.15.3's, which CI runs on
    # every backend; the full run below runs it on every backend on v1.14.5.
    cd tests/spire-v1.14
    go test -tags spire_v1_14 -count=1 -v -timeout 10m -run '^TestConformanceDisk$' "$PKG"
    ;;
  *)
    build
    cd tests/spire-v1.14
    env -u SPIRE_SERVER_BIN_V114 SPIRE_SERVER_BIN="$BIN" \
      go test -tags spire_v1_14 -count=1 -v -timeout 40m "$@" "$PKG"
    ;;
esac
