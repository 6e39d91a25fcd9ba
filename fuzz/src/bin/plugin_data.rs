//! AFL entry point of the `plugin_data` target (see `keymanager_fuzz::plugin_data`).

fn main() {
    afl::fuzz!(|data: &[u8]| keymanager_fuzz::plugin_data::run(data));
}
