//! One conformance suite for every backend, as rustls runs one suite for every crypto
//! provider. A backend crate implements [`suite::Subject`] for each of its test peers and
//! invokes [`conformance_suite!`] in its `tests/conformance.rs`; every case then runs
//! against that peer:
//!
//! - create, sign, rotate (the replaced key leaves the store), restart (the same keys are
//!   found), and another server id sees none of them;
//! - every declared capability signs, checked with an independent library ([`verify`]);
//! - undeclared combinations are refused with zero backend calls;
//! - a failure (once, an outage, a lost response) or a crash before or after each store
//!   call of GenerateKey leaves, after a restart, the old key or the new one — never none,
//!   never one on its way out — and the next sweep leaves exactly that key;
//! - listing for the sweep only reads;
//! - liveness stamps round-trip, and junk stamps are no evidence;
//! - the operator CLI's view of the store agrees with the engine.
//!
//! [`peers`] starts the test peers; [`proxy`] is the fault-injecting proxy in front of them;
//! [`logs`] puts the tests' logs where the planted-secret scan reads them.

pub mod logs;
pub mod peers;
pub mod proxy;
pub mod suite;
pub mod verify;
