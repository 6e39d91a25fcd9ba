//! AFL entry point of the `ecdsa_der` target (see `keymanager_fuzz::ecdsa_der`).

fn main() {
    afl::fuzz!(|data: &[u8]| keymanager_fuzz::ecdsa_der::run(data));
}
