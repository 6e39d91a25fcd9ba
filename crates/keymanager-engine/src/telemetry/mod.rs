//! Telemetry from the engine itself, written once for every backend: Prometheus metrics
//! ([`metrics`]), served over HTTP where configured ([`http`]), and the audit log
//! ([`audit`]).
//!
//! The engine reports to its [`Telemetry`] on every SignData and GenerateKey, and the
//! lifecycle loops report stamps and sweeps through the engine; backends do nothing special.
//! Backend calls, failures and retries are read at scrape time from the engine's
//! [`CallStats`](crate::resilience::CallStats), so they cost the calls nothing more.
//!
//! Cost on the signing path: a few relaxed atomic increments on pre-resolved counters, one
//! histogram observation (a short uncontended mutex), and, with the audit log on, one record
//! handed to the writer thread through a bounded queue (never a file write).

pub mod audit;
pub mod http;
pub mod metrics;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::backend::SchemeFamily;
use crate::core::algorithm::SignatureScheme;
use crate::core::key::{Fingerprint, KeyId, KeyType};
use crate::error::EngineError;
use crate::lifecycle::SweepReport;
use crate::resilience::CallStats;

pub use audit::{AuditLog, AuditOperation, AuditRecord};
pub use metrics::Metrics;

/// The engine's metrics and audit log.
pub struct Telemetry {
    metrics: Metrics,
    /// Whether requests are counted (`metrics_listen` is set): off, a request pays nothing.
    counting: AtomicBool,
    audit: RwLock<Option<Arc<AuditLog>>>,
    backend: &'static str,
    server_id: Option<Arc<str>>,
}

/// What the engine knows about a finished SignData, for metrics and the audit line.
pub(crate) struct SignOutcome<'a> {
    /// The backend that signed (in a hand-over, the old store's for the keys it serves).
    pub backend: &'static str,
    pub id: &'a KeyId,
    pub key_type: Option<KeyType>,
    pub fingerprint: Option<&'a Fingerprint>,
    pub scheme: Option<SignatureScheme>,
    pub request_id: Option<String>,
    pub result: Result<(), &'a EngineError>,
}

impl Telemetry {
    /// Telemetry for an engine over `backend`; `stats` are the engine's backend-call counts.
    pub fn new(backend: &'static str, server_id: Option<String>, stats: Arc<CallStats>) -> Self {
        Self {
            metrics: Metrics::new(backend, stats),
            counting: AtomicBool::new(false),
            audit: RwLock::new(None),
            backend,
            server_id: server_id.map(Arc::from),
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Starts or stops counting requests (SignData, GenerateKey, rate-limit waits). Backend
    /// calls, keys, stamps and sweeps are always counted: they cost nothing per request.
    pub fn set_counting(&self, on: bool) {
        self.counting.store(on, Ordering::Relaxed);
    }

    fn counting(&self) -> bool {
        self.counting.load(Ordering::Relaxed)
    }

    /// Starts, keeps, or stops the audit log. The same path keeps the open log (and its
    /// queue); another path opens a new one; `None` stops it. Never fails: a path that
    /// cannot be written is reported and counted line by line, and signing goes on.
    pub fn set_audit_log(&self, path: Option<&Path>) {
        let mut audit = self.audit.write().unwrap_or_else(PoisonError::into_inner);
        if audit.as_ref().map(|a| a.path()) == path {
            return;
        }
        // The old log (if any) drains its queue in the background once the last in-flight
        // signature has handed over its record.
        *audit = path.map(|path| {
            Arc::new(AuditLog::open(
                path.to_path_buf(),
                self.metrics.audit_failures(),
            ))
        });
    }

    /// Stops the audit log and waits (boundedly) for its queued lines to be written.
    pub fn close_audit_log(&self) {
        let log = self
            .audit
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(log) = log.and_then(|log| Arc::try_unwrap(log).ok()) {
            // Short: this runs inside the plugin's shutdown grace, and the writer is normally idle.
            log.close(Duration::from_millis(300));
        }
    }

    /// Hands a record to the audit log, if one is on. The record is built only then.
    fn audit(&self, record: impl FnOnce() -> AuditRecord) {
        // The read guard is held only for a non-blocking queue push.
        if let Some(log) = self
            .audit
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            log.submit(record());
        }
    }

    /// Wall-clock time of an operation's start, only when an audit line will need it.
    pub(crate) fn audit_clock(&self) -> Option<SystemTime> {
        self.audit
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
            .then(SystemTime::now)
    }

    pub(crate) fn sign_finished(
        &self,
        outcome: SignOutcome<'_>,
        started: Instant,
        at: Option<SystemTime>,
    ) {
        let elapsed = started.elapsed();
        if self.counting() {
            self.metrics
                .sign_done(outcome.key_type, outcome.result.err(), elapsed);
        }
        self.audit(|| AuditRecord {
            time: at.unwrap_or_else(SystemTime::now),
            operation: AuditOperation::SignData,
            backend: outcome.backend,
            key_id: outcome.id.as_str().to_string(),
            server_id: self.server_id.clone(),
            fingerprint: outcome.fingerprint.cloned(),
            key_type: outcome.key_type,
            scheme: outcome.scheme.map(|s| SchemeFamily::of(s).name()),
            hash: outcome.scheme.map(|s| s.hash().name()),
            error: outcome.result.err().map(|e| (e.class(), e.to_string())),
            latency: elapsed,
            request_id: outcome.request_id,
        });
    }

    pub(crate) fn generate_finished(
        &self,
        id: &KeyId,
        key_type: KeyType,
        result: Result<&Fingerprint, &EngineError>,
        started: Instant,
        at: Option<SystemTime>,
    ) {
        if self.counting() {
            self.metrics.generate_done(result.err());
        }
        self.audit(|| AuditRecord {
            time: at.unwrap_or_else(SystemTime::now),
            operation: AuditOperation::GenerateKey,
            backend: self.backend,
            key_id: id.as_str().to_string(),
            server_id: self.server_id.clone(),
            fingerprint: result.ok().cloned(),
            key_type: Some(key_type),
            scheme: None,
            hash: None,
            error: result.err().map(|e| (e.class(), e.to_string())),
            latency: started.elapsed(),
            request_id: None,
        });
    }

    pub(crate) fn rate_limit_waited(&self, wait: Duration) {
        if self.counting() {
            self.metrics.rate_limited_wait(wait);
        }
    }

    /// The adaptive sign rate changed (learned, raised, cut, dropped).
    pub(crate) fn adaptive_rate_changed(&self, change: crate::resilience::RateChange) {
        use crate::resilience::RateChange;
        match change {
            RateChange::Cut(rate) => {
                self.metrics.adaptive_cut();
                self.adaptive_rate(Some(rate));
            }
            RateChange::Raised(rate) => self.adaptive_rate(Some(rate)),
            RateChange::Released => self.adaptive_rate(None),
        }
    }

    /// The learned sign rate (`None`: not pacing).
    pub(crate) fn adaptive_rate(&self, rate: Option<f64>) {
        self.metrics.set_adaptive_rate(rate.unwrap_or(0.0));
    }

    pub(crate) fn keys_served(&self, count: usize) {
        self.metrics.set_keys("active", count);
    }

    pub(crate) fn migrate_from_keys(&self, backend: &'static str, count: usize) {
        self.metrics.set_migrate_from_keys(backend, count);
    }

    pub(crate) fn stamped(&self, at: SystemTime) {
        self.metrics.set_last_stamp(at);
    }

    pub(crate) fn swept(&self, at: SystemTime, report: &SweepReport) {
        self.metrics.swept(at, report);
    }
}
