//! The tag and label names every KMS backend writes on its keys. SPIRE's own KMS key
//! managers use the first four, so keys stay readable by (and compatible with) SPIRE's
//! built-ins; the rest are ours.

/// The trust domain (raw on AWS, hashed where labels cannot hold dots).
pub const TRUST_DOMAIN: &str = "spire-server-td";
/// The server id of the creator.
pub const SERVER_ID: &str = "spire-server-id";
/// Whether discovery may use the key (`true`/`false`).
pub const ACTIVE: &str = "spire-active";
/// The liveness stamp: Unix seconds of the last refresh (see `lifecycle::stamp`).
pub const LAST_UPDATE: &str = "spire-last-update";
/// The SPIRE key id (ours; SPIRE's built-ins keep it in the alias or the key name).
pub const KEY_ID: &str = "spire-key-id";
/// When the key was superseded: recorded before deletion is scheduled, so a crash in
/// between still ends with the key deleted by the next sweep (ours).
pub const DELETE_INTENT: &str = "spire-delete-intent";

/// Which key replaced this one under its SPIRE key id (its ARN): the rotation history,
/// written with the deletion intent (ours).
pub const REPLACED_BY: &str = "spire-replaced-by";
