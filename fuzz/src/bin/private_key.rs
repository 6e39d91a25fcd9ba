//! AFL entry point of the `private_key` target (see `keymanager_fuzz::private_key`).

fn main() {
    afl::fuzz!(|data: &[u8]| keymanager_fuzz::private_key::run(data));
}
