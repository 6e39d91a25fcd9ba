//! AFL++ entry point of the `private_key` target (see `keymanager_fuzz::private_key`).

#[path = "../afl.rs"]
mod afl;

fn main() {
    afl::fuzz(keymanager_fuzz::private_key::run);
}
