//! The shared-keys mode, written once for every KMS backend that offers it: several servers
//! (in several regions too) sign with the same store keys for some key ids (SPIRE's JWT
//! keys by default), so that a trust domain's bundle carries one key per rotation, not one
//! per server.
//!
//! - [`config`]: the `shared_keys` block (template, extraction regex, `shared_key_ids`,
//!   `reuse_window`, `lock_lease`);
//! - [`template`]: the name template;
//! - [`rotation`]: rotation under a lock that is a store creation (compare-and-swap), with
//!   a lease and the clock-skew allowance.
//!
//! A backend provides the names and the store calls ([`SharedOps`]); discovery, stamps and
//! the sweep of shared keys stay in the backend, which knows where it records them.

pub mod config;
pub mod rotation;
pub mod template;

pub use config::{
    DEFAULT_LOCK_LEASE, DEFAULT_REUSE_WINDOW, DEFAULT_SHARED_KEY_IDS, SHARED_MODE_IDENTITY_HINT,
    SharedKeys, SharedKeysSpec, extract_key_id, parse_shared_keys,
};
pub use rotation::{
    Generation, LockLease, LockRequest, LockSightings, SharedOps, SharedRotation, SystemClock,
    WallClock,
};
pub use template::{KEY_ID_FIELD, NameTemplate};
