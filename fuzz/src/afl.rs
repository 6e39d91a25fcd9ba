//! AFL++'s persistent mode, against the runtime `afl-compiler-rt.o` that
//! `fuzz/rustc-wrapper.sh` links into the binaries: one process runs many inputs, each
//! read from stdin (afl-fuzz rewinds and rewrites the file behind it), and a panic becomes
//! an abort, which afl-fuzz records as a crash.

use std::io::Read;

/// afl-fuzz scans the binary for these markers to enable persistent mode and the deferred
/// fork server; they must be present, not merely referenced.
#[used]
static PERSISTENT_SIGNATURE: [u8; 23] = *b"##SIG_AFL_PERSISTENT##\0";
#[used]
static DEFERRED_SIGNATURE: [u8; 26] = *b"##SIG_AFL_DEFER_FORKSRV##\0";

unsafe extern "C" {
    fn __afl_manual_init();
    fn __afl_persistent_loop(max_count: u32) -> i32;
}

/// Inputs per process before AFL++ forks a fresh one (bounds leaks and drifting state).
const INPUTS_PER_PROCESS: u32 = 1000;

/// Runs `target` on every input afl-fuzz hands over.
pub fn fuzz(target: fn(&[u8])) {
    // Without afl-fuzz (a crash replayed by hand): one input from stdin.
    let under_afl = std::env::var_os("__AFL_SHM_ID").is_some();
    // SAFETY: both are plain C functions of the linked AFL++ runtime, called from the main
    // thread before anything else runs, as the runtime expects.
    unsafe { __afl_manual_init() };
    let mut input = Vec::new();
    loop {
        // SAFETY: as above.
        if under_afl && unsafe { __afl_persistent_loop(INPUTS_PER_PROCESS) } == 0 {
            break;
        }
        input.clear();
        if std::io::stdin().lock().read_to_end(&mut input).is_err() {
            std::process::abort();
        }
        if std::panic::catch_unwind(|| target(&input)).is_err() {
            std::process::abort();
        }
        if !under_afl {
            break;
        }
    }
}
