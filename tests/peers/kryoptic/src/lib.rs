//! Empty: this package only exists to make cargo build the `kryoptic` dependency's cdylib
//! (see Cargo.toml).
