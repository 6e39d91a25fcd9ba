//! AFL++ entry point of the `names` target (see `keymanager_fuzz::names`).

#[path = "../afl.rs"]
mod afl;

fn main() {
    afl::fuzz(keymanager_fuzz::names::run);
}
