//! AFL++ entry point of the `request` target (see `keymanager_fuzz::request`).

#[path = "../afl.rs"]
mod afl;

fn main() {
    afl::fuzz(keymanager_fuzz::request::run);
}
