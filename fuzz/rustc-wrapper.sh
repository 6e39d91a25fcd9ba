#!/usr/bin/env bash
# RUSTC_WRAPPER of the AFL build (scripts/fuzz.sh). cargo-afl's own build instruments and
# re-optimises every crate (`-C codegen-units=1 -C opt-level=3`), the cloud SDKs included,
# which takes over an hour on a shared two-core machine. This wrapper adds AFL's coverage
# instrumentation (the flags cargo-afl uses on stable, without the LLVM plugins) only to the
# code the targets exercise: this project's crates (path dependencies here, so their
# artifacts never collide with the workspace's). Every other crate is compiled exactly as
# the workspace's dev build compiles it, so those artifacts are reused from the same target
# directory (and must stay uninstrumented: the workspace's tests link them too).
rustc="$1"; shift
crate=""
prev=""
for arg in "$@"; do
    if [ "$prev" = "--crate-name" ]; then crate="$arg"; break; fi
    prev="$arg"
done
# The fuzz binaries (src/bin/<target>.rs) are crates named after their targets.
targets="plugin_data key_file private_key names request ecdsa_der"
case "$crate" in
    keymanager_*) ;;
    *) [[ " $targets " == *" $crate "* ]] || exec "$rustc" "$@" ;;
esac
flags=(
    -C passes=sancov-module
    -C llvm-args=-sanitizer-coverage-level=3
    -C llvm-args=-sanitizer-coverage-trace-pc-guard
    -C llvm-args=-sanitizer-coverage-prune-blocks=0
    -C llvm-args=-sanitizer-coverage-trace-compares
    --cfg fuzzing
)
# The AFL runtime goes into the binaries only.
if [[ " $targets " == *" $crate "* ]]; then
    flags+=("-Clink-arg=$AFL_COMPILER_RT")
fi
exec "$rustc" "$@" "${flags[@]}"
