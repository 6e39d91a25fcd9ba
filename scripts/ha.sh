#!/usr/bin/env bash
# SPIRE in HA on PostgreSQL (tests/spire/ha_test.go): three real spire-servers of one trust
# domain on one PostgreSQL datastore, on aws_kms (moto) and on gcp_kms with shared JWT keys
# (the Cloud KMS fake), both at once, SVIDs minted from every server every second and
# verified, with faults. CI runs the short form (one round of faults, ~3 min) inside
# scripts/test-all.sh; this script runs the long form: the faults repeated for MINUTES.
#
#   scripts/ha.sh [MINUTES]       long form for MINUTES (default 15)
#   scripts/ha.sh --short         the CI form alone
#
# The peers' installs come from scripts/test-all.sh's cache (run it once first). The figures
# are the test's "HA figures" lines; the full log is kept in $KMS_HA_OUT (default a
# temporary directory, printed at the end) with the servers' logs.
set -euo pipefail

cd "$(dirname "$0")/.."
CACHE=${KMS_KEYMANAGER_CACHE:-$HOME/.cache/kms-keymanager}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
export SPIRE_SERVER_BIN=${SPIRE_SERVER_BIN:-$CACHE/bin/spire-server-v1.15.3}
export MOTO_PYTHON=${MOTO_PYTHON:-$CACHE/venv-moto-5.2.5/bin/python}
export GCP_FAKE_PYTHON=${GCP_FAKE_PYTHON:-$CACHE/venv-gcp-$(sha256sum tests/peers/requirements-gcp.txt | cut -c1-12)/bin/python}
for f in "$SPIRE_SERVER_BIN" "$MOTO_PYTHON" "$GCP_FAKE_PYTHON"; do
  [[ -x $f ]] || { echo "missing $f: run scripts/test-all.sh once to install the peers" >&2; exit 1; }
done

timeout=15m
if [[ ${1:-} == --short ]]; then
  unset KMS_HA_LONG
else
  minutes=${1:-15}
  [[ $minutes =~ ^[0-9]+$ ]] || { echo "usage: scripts/ha.sh [MINUTES] | --short" >&2; exit 2; }
  export KMS_HA_LONG=1 KMS_HA_DURATION=${minutes}m
  # The last round of faults starts before the end and takes up to ~3 min, plus set-up.
  timeout=$((minutes + 10))m
fi

cargo build -q -p kms-keymanager
export KMS_KEYMANAGER_BIN=$CARGO_TARGET_DIR/debug/kms-keymanager
OUT=${KMS_HA_OUT:-$(mktemp -d)}
mkdir -p "$OUT/logs"
export KMS_HA_LOG_DIR=$OUT/logs
echo "HA run: ${KMS_HA_DURATION:-short form}; output in $OUT"
status=0
(cd tests/spire && go test -count=1 -v -timeout "$timeout" -run 'TestSpireHAOnPostgres' ./... 2>&1) >"$OUT/go-test.log" || status=$?
grep -E 'HA figures|verified only once|^\s*--- (PASS|FAIL)|^(ok|FAIL)' "$OUT/go-test.log" | sed 's/^ *//'
echo "full log: $OUT/go-test.log"
exit $status
