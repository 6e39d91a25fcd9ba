//! AFL++ entry point of the `plugin_data` target (see `keymanager_fuzz::plugin_data`).

#[path = "../afl.rs"]
mod afl;

fn main() {
    afl::fuzz(keymanager_fuzz::plugin_data::run);
}
