//! AFL entry point of the `key_file` target (see `keymanager_fuzz::key_file`).

fn main() {
    afl::fuzz!(|data: &[u8]| keymanager_fuzz::key_file::run(data));
}
