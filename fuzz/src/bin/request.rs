//! AFL entry point of the `request` target (see `keymanager_fuzz::request`).

fn main() {
    afl::fuzz!(|data: &[u8]| keymanager_fuzz::request::run(data));
}
