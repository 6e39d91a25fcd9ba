#!/usr/bin/env bash
# Bounded soak (issue #14 §6): mixed SignData/GenerateKey through SPIRE's own KeyManager
# facade on the disk backend and on aws_kms (moto), both at once, with the plugin processes'
# RSS, open file descriptors and threads sampled from /proc (tests/spire/soak_test.go).
#
#   scripts/soak.sh [minutes]        # default 30: windows of 5 minutes
#   scripts/soak.sh 2                # the form CI runs: windows of 20 s
#
# It prints one table per backend (a row per window: SignData p50/p99, GenerateKey, RSS,
# fds, threads) and fails on any failed or unverifiable signature, on RSS growth after
# warm-up beyond the bound in soak_test.go, or on fds/threads that keep growing.
#
# Environment: KMS_KEYMANAGER_BIN (default: built here with cargo, debug profile, as CI's),
# MOTO_PYTHON (default: the venv scripts/test-all.sh installs), KMS_SOAK_REPORT (a file for
# the tables), KMS_SOAK_SIGNS_PER_SECOND (50), KMS_SOAK_GENERATE_EVERY (5s),
# KMS_SOAK_WINDOW (minutes/6), KMS_SOAK_SAMPLE (a few seconds). It runs under `nice`: the
# machine may be shared.
set -euo pipefail

cd "$(dirname "$0")/.."
minutes=${1:-30}
[[ $minutes =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [minutes] (a whole number, default 30)" >&2; exit 2; }
CACHE=${KMS_KEYMANAGER_CACHE:-$HOME/.cache/kms-keymanager}

if [[ -z ${KMS_KEYMANAGER_BIN:-} ]]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
  nice cargo build -q -p kms-keymanager
  KMS_KEYMANAGER_BIN=$CARGO_TARGET_DIR/debug/kms-keymanager
fi
export KMS_KEYMANAGER_BIN
export MOTO_PYTHON=${MOTO_PYTHON:-$CACHE/venv-moto-5.2.5/bin/python}
[[ -x $MOTO_PYTHON ]] || { echo "MOTO_PYTHON=$MOTO_PYTHON is missing: run scripts/test-all.sh once (it installs moto)" >&2; exit 1; }

cd tests/spire
KMS_SOAK_DURATION=${minutes}m nice go test -count=1 -v -run '^TestSoak$' -timeout "$((minutes + 10))m" ./...
