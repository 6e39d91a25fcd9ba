#!/usr/bin/env bash
# Coverage-guided fuzzing campaign (AFL++ through cargo-afl, stable Rust, no LLVM plugins):
# each target of crates/keymanager-fuzz for SECONDS, FUZZ_JOBS at a time, at the lowest CPU
# priority. Every run starts from the seed corpus in fuzz/corpus/<target> plus the queues
# earlier runs built, so repeated runs add up; a ledger sums their executions.
#
# Usage: scripts/fuzz.sh [seconds-per-target, default 600] [target ...]
#   FUZZ_OUT   campaign directory (default ~/.cache/kms-keymanager/fuzz-campaign)
#   FUZZ_JOBS  targets fuzzed at once (default 1)
#   CARGO_TARGET_DIR  the workspace's target directory: the dependencies its dev build
#              compiled are reused, only this project's crates are built instrumented
#              (fuzz/rustc-wrapper.sh)
# Needs `cargo install cargo-afl` (which builds AFL++). Exits non-zero if a run of this
# invocation saved a crash; the inputs are listed (fix, then add them to fuzz/corpus/<target>).
# CI does not run this; it runs the corpus regression test (cargo test -p keymanager-fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_PER_TARGET=${1:-600}
shift || true
ALL_TARGETS=(plugin_data key_file private_key names request ecdsa_der)
[ $# -gt 0 ] && TARGETS=("$@") || TARGETS=("${ALL_TARGETS[@]}")
CACHE=${KMS_KEYMANAGER_CACHE:-$HOME/.cache/kms-keymanager}
OUT=${FUZZ_OUT:-$CACHE/fuzz-campaign}
JOBS=${FUZZ_JOBS:-1}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

command -v cargo-afl >/dev/null || { echo "cargo-afl is missing: cargo install cargo-afl" >&2; exit 2; }
AFL_COMPILER_RT=$(ls "${XDG_DATA_HOME:-$HOME/.local/share}"/afl.rs/rustc-"$(rustc --version | awk '{print $2}')"-*/afl.rs-*/afl-llvm/afl-compiler-rt.o 2>/dev/null | head -1)
[ -f "$AFL_COMPILER_RT" ] || { echo "AFL++ runtime missing: cargo afl config --build --force" >&2; exit 2; }
export AFL_COMPILER_RT
echo "== building the AFL targets (instrumented: this project's crates) into $CARGO_TARGET_DIR"
(cd fuzz && RUSTC_WRAPPER="$ROOT/fuzz/rustc-wrapper.sh" cargo build --locked --bins 2>&1 | grep -Ev '^\s+(Compiling|Checking)' || true)
BIN=$CARGO_TARGET_DIR/debug
for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || { echo "no binary for target $t" >&2; exit 2; }; done

# A shared machine: no CPU pinning, no frequency check, no core-dump-handler check, no UI.
export AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1

fuzz_one() {
    local t=$1 dir=$OUT/$1 run input
    mkdir -p "$dir"
    run=$(printf 'run-%03d' "$(find "$dir" -maxdepth 1 -type d -name 'run-???' | wc -l)")
    input=$dir/$run.in
    mkdir -p "$input"
    cp "$ROOT/fuzz/corpus/$t"/* "$input/"
    # The queue of every earlier run (AFL names files uniquely per run; prefix the run).
    for q in "$dir"/run-???/default/queue; do
        [ -d "$q" ] || continue
        local prev; prev=$(basename "$(dirname "$(dirname "$q")")")
        find "$q" -maxdepth 1 -type f -name 'id:*' -exec sh -c 'into=$1 run=$2; shift 2; for f; do cp "$f" "$into/$run-$(basename "$f" | cut -d, -f1 | tr : _)"; done' sh "$input" "$prev" {} +
    done
    local dict=()
    [ -f "$ROOT/fuzz/dict/$t.dict" ] && dict=(-x "$ROOT/fuzz/dict/$t.dict")
    nice -n 19 cargo afl fuzz -V "$SECONDS_PER_TARGET" -t 5000 "${dict[@]}" \
        -i "$input" -o "$dir/$run" -- "$BIN/$t" >"$dir/$run.log" 2>&1 || true
    rm -rf "$input"
    local stats=$dir/$run/default/fuzzer_stats
    if [ ! -f "$stats" ]; then
        echo "$t: AFL did not start, see $dir/$run.log" >&2
        tail -20 "$dir/$run.log" >&2
        return 1
    fi
    local execs corpus crashes hangs secs
    execs=$(awk -F': *' '$1 ~ /^execs_done/ {print $2}' "$stats")
    corpus=$(awk -F': *' '$1 ~ /^corpus_count/ {print $2}' "$stats")
    crashes=$(awk -F': *' '$1 ~ /^saved_crashes/ {print $2}' "$stats")
    hangs=$(awk -F': *' '$1 ~ /^saved_hangs/ {print $2}' "$stats")
    secs=$(awk -F': *' '$1 ~ /^run_time/ {print $2}' "$stats")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$run" "$execs" "$secs" "$corpus" "$crashes" "$hangs" >>"$OUT/ledger.tsv"
    echo "$dir/$run" >>"$RUNS"
    echo "$t $run: $execs execs in ${secs}s, corpus $corpus, crashes $crashes, hangs $hangs"
}

mkdir -p "$OUT"
RUNS=$(mktemp)
trap 'rm -f "$RUNS"' EXIT
running=0
for t in "${TARGETS[@]}"; do
    fuzz_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n || true; running=$((running - 1)); fi
done
wait

echo "== campaign totals ($OUT/ledger.tsv: target run execs seconds corpus crashes hangs)"
awk -F'\t' '{e[$1]+=$3; s[$1]+=$4; c[$1]=$5; x[$1]+=$6; h[$1]+=$7}
    END {for (t in e) printf "%-12s %12d execs %8d s  corpus %5d  crashes %d  hangs %d\n", t, e[t], s[t], c[t], x[t], h[t]}' \
    "$OUT/ledger.tsv" | sort
crashes=$(while read -r run; do find "$run/default/crashes" -name 'id:*' -type f 2>/dev/null; done <"$RUNS")
if [ -n "$crashes" ]; then
    echo "== crashing inputs:"; echo "$crashes"; exit 1
fi
