//! AFL++ entry point of the `key_file` target (see `keymanager_fuzz::key_file`).

#[path = "../afl.rs"]
mod afl;

fn main() {
    afl::fuzz(keymanager_fuzz::key_file::run);
}
