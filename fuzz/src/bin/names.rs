//! AFL entry point of the `names` target (see `keymanager_fuzz::names`).

fn main() {
    afl::fuzz!(|data: &[u8]| keymanager_fuzz::names::run(data));
}
