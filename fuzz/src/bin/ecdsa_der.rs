//! AFL++ entry point of the `ecdsa_der` target (see `keymanager_fuzz::ecdsa_der`).

#[path = "../afl.rs"]
mod afl;

fn main() {
    afl::fuzz(keymanager_fuzz::ecdsa_der::run);
}
