#!/usr/bin/env bash
# The pkcs11 backend's signing path on one SoftHSM2 token, side by side in one run:
#   - the plugin through SPIRE's own KeyManager facade (Go benchmark), default session pool
#     and max_sessions = 1, every key type at concurrency 1 and 16;
#   - C_Sign in process with cryptoki on the same token (the floor; no plugin, no engine).
# Needs what scripts/test-all.sh installs (softhsm2, Go, the spire module cache).
# Usage: scripts/bench-pkcs11.sh [seconds per cell, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_CELL=${1:-3}
CACHE=${KMS_KEYMANAGER_CACHE:-$HOME/.cache/kms-keymanager}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

cargo build --release -q -p kms-keymanager
cargo build --release -q -p keymanager-backend-pkcs11 --example raw_sign_bench
mkdir -p "$WORK/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$WORK/tokens" >"$WORK/softhsm2.conf"
export SOFTHSM2_CONF=$WORK/softhsm2.conf
export PKCS11_BENCH_TOKEN=bench
softhsm2-util --init-token --free --label "$PKCS11_BENCH_TOKEN" --pin 1234 --so-pin 5678 >/dev/null

echo "== plugin through SPIRE's facade (SoftHSM2 $(softhsm2-util --version), $(nproc) cores)"
(cd tests/spire && KMS_KEYMANAGER_BIN=$CARGO_TARGET_DIR/release/kms-keymanager \
  go test -run '^$' -bench Pkcs11SignData -benchtime "${SECONDS_PER_CELL}s" ./... | grep -E '^Benchmark')
echo "== in-process cryptoki on the same token"
"$CARGO_TARGET_DIR/release/examples/raw_sign_bench" /usr/lib/softhsm/libsofthsm2.so "$PKCS11_BENCH_TOKEN" 1234 "$SECONDS_PER_CELL"
