//! Named crash points at every step of GenerateKey, retire, stamp and sweep, for the crash
//! matrix (`crates/kms-keymanager/tests/crash_matrix.rs`).
//!
//! [`failpoint!`](crate::failpoint!) marks a step. With the `failpoints` cargo feature off
//! (every release build) the macro expands to nothing: no code, no cost. With it on, the
//! environment variable [`ENV`] arms one point, `name` or `name@N` (the N-th hit, default
//! the first); when it is reached the process aborts on the spot — no destructors, no
//! flush, no reply: what a `kill -9` at that step would leave.

/// The environment variable that arms a failpoint (`generate.after_prepare`, `sweep.after_delete@2`).
pub const ENV: &str = "KMS_KEYMANAGER_FAILPOINT";

/// Every failpoint, in the order the steps run, with where it sits.
pub const POINTS: &[(&str, &str)] = &[
    (
        "generate.after_prepare",
        "GenerateKey: the new key exists in the store, discovery does not find it yet",
    ),
    (
        "publish.after_alias",
        "GenerateKey, aws_kms: the alias points at the new key, its `active` tag is not set yet",
    ),
    (
        "generate.after_publish",
        "GenerateKey: discovery finds the new key; the replaced key is not retired yet",
    ),
    (
        "delete.after_intent",
        "retire, abort or sweep deletion: the intent is recorded on the key, the deletion not done (aws_kms, hashicorp_vault, pkcs11)",
    ),
    (
        "generate.before_reply",
        "GenerateKey: published and the replaced key retired; SPIRE has no reply yet",
    ),
    (
        "stamp.before",
        "liveness stamp round: about to stamp the served keys",
    ),
    (
        "stamp.after_key",
        "liveness stamp round: after each key stamped (`@1`: half-way through a multi-key round)",
    ),
    (
        "sweep.after_list",
        "stale-key sweep: the trust domain's keys listed and the decisions made, nothing deleted",
    ),
    (
        "sweep.after_delete",
        "stale-key sweep: after each key put on the deletion path (`@1`: half-way)",
    ),
];

/// Marks a crash point named `$name` (one of [`POINTS`]). Expands to nothing unless the
/// `failpoints` feature is on.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        $crate::failpoint::hit($name)
    };
}

/// Marks a crash point named `$name` (one of [`POINTS`]). Expands to nothing unless the
/// `failpoints` feature is on.
#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {};
}

/// Whether this build has failpoints compiled in.
pub const COMPILED_IN: bool = cfg!(feature = "failpoints");

/// An armed failpoint: its name and which hit aborts (1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Armed {
    /// The point.
    pub name: &'static str,
    /// The hit that aborts.
    pub nth: u64,
}

/// Parses [`ENV`]'s value: `name` or `name@N` with `name` one of [`POINTS`] and `N >= 1`.
pub fn parse(value: &str) -> Result<Armed, String> {
    let (name, nth) = match value.split_once('@') {
        Some((name, n)) => (
            name,
            n.parse::<u64>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                format!("{ENV}={value:?}: the hit after '@' must be a whole number from 1")
            })?,
        ),
        None => (value, 1),
    };
    let name = POINTS
        .iter()
        .map(|(n, _)| *n)
        .find(|n| *n == name)
        .ok_or_else(|| {
            let names: Vec<&str> = POINTS.iter().map(|(n, _)| *n).collect();
            format!(
                "{ENV}={value:?}: no such failpoint; allowed: {} (optionally with @N)",
                names.join(", ")
            )
        })?;
    Ok(Armed { name, nth })
}

#[cfg(feature = "failpoints")]
mod live {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::{Armed, ENV, parse};

    static ARMED: OnceLock<Result<Option<Armed>, String>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    /// The armed point, read from the environment once.
    pub fn armed() -> Result<Option<Armed>, String> {
        ARMED
            .get_or_init(|| match std::env::var(ENV) {
                Ok(value) if !value.is_empty() => parse(&value).map(Some),
                _ => Ok(None),
            })
            .clone()
    }

    /// Called by [`failpoint!`](crate::failpoint!): aborts at the armed hit.
    pub fn hit(name: &'static str) {
        debug_assert!(
            super::POINTS.iter().any(|(n, _)| *n == name),
            "failpoint {name} is not listed in POINTS"
        );
        let Ok(Some(armed)) = armed() else {
            return;
        };
        if armed.name != name {
            return;
        }
        let hit = HITS.fetch_add(1, Ordering::SeqCst) + 1;
        if hit == armed.nth {
            // One line for the test to tell this abort from any other; stderr is unbuffered.
            eprintln!("failpoint {name}@{hit}: aborting");
            std::process::abort();
        }
    }
}

#[cfg(feature = "failpoints")]
pub use live::{armed, hit};

/// Environment variable (whole seconds) that replaces the sweep's one-hour grace for own
/// unpublished keys, so that a test sees the next sweep remove a crashed step's leftovers.
/// Read only with the `failpoints` feature.
pub const GRACE_ENV: &str = "KMS_KEYMANAGER_TEST_HALF_CREATED_GRACE";

/// The grace [`GRACE_ENV`] sets, in a build with failpoints.
pub fn half_created_grace() -> Option<std::time::Duration> {
    if !COMPILED_IN {
        return None;
    }
    std::env::var(GRACE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(std::time::Duration::from_secs)
}

/// Without the feature nothing can be armed.
#[cfg(not(feature = "failpoints"))]
pub fn armed() -> Result<Option<Armed>, String> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hits_parse_and_junk_names_the_allowed_values() {
        assert_eq!(
            parse("generate.after_prepare").unwrap(),
            Armed {
                name: "generate.after_prepare",
                nth: 1
            }
        );
        assert_eq!(parse("sweep.after_delete@3").unwrap().nth, 3);
        for junk in [
            "generate",
            "sweep.after_delete@0",
            "sweep.after_delete@",
            "x@1",
            "",
        ] {
            let err = parse(junk).unwrap_err();
            assert!(err.contains(ENV), "{err}");
        }
        assert!(parse("nope").unwrap_err().contains("stamp.after_key"));
    }

    #[test]
    fn every_point_is_placed_in_the_code() {
        // A point listed but never marked would leave a row of the crash matrix untested.
        let sources = [
            include_str!("engine.rs"),
            include_str!("lifecycle/mod.rs"),
            include_str!("../../keymanager-backend-aws/src/backend.rs"),
            include_str!("../../keymanager-backend-gcp/src/backend.rs"),
            include_str!("../../keymanager-backend-vault/src/backend.rs"),
            include_str!("../../keymanager-backend-azure/src/backend.rs"),
            include_str!("../../keymanager-backend-pkcs11/src/backend.rs"),
        ]
        .concat();
        for (name, _) in POINTS {
            assert!(
                sources.contains(&format!("failpoint!(\"{name}\")")),
                "{name} is listed but never marked"
            );
        }
    }

    /// Release builds never enable the feature: the macro is then empty and nothing can be
    /// armed, whatever the environment says.
    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn without_the_feature_failpoints_are_inert() {
        crate::failpoint!("generate.after_prepare");
        assert_eq!((COMPILED_IN, armed()), (false, Ok(None)));
        assert_eq!(half_created_grace(), None);
    }
}
