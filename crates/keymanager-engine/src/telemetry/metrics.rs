//! The Prometheus metrics (names and labels are a documented, stable interface: README,
//! "Telemetry").
//!
//! Hot-path counters are resolved once per label set and then kept as plain handles (an
//! atomic each), so a SignData never hashes a label set or takes the family's lock.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::core::key::KeyType;
use crate::error::{EngineError, ErrorClass};
use crate::lifecycle::{StoreKeyState, SweepReport};
use crate::resilience::CallStats;

/// `Content-Type` of the Prometheus text format 0.0.4 (the default).
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// `Content-Type` of OpenMetrics text 1.0.0 (served when the scraper asks for it).
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels<const N: usize> = [(&'static str, &'static str); N];
type HistogramFamily = Family<Labels<1>, Histogram, fn() -> Histogram>;

/// Signing latency: from 50 µs (a software key) to 10 s (a store retrying under throttling).
const LATENCY_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];
/// Waits for a sign-rate permit: up to SPIRE's 30 s deadline.
const WAIT_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// Key-type slots: the four types and `unknown` (a SignData for a key that does not exist).
const KEY_TYPE_SLOTS: usize = KeyType::ALL.len() + 1;
/// Result slots: `ok` and every error class.
const RESULT_SLOTS: usize = ErrorClass::ALL.len() + 1;

/// Every metric of one engine, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    backend: &'static str,
    sign_total: Family<Labels<3>, Counter>,
    /// `sign_total` handles, resolved on first use per (key type, result).
    sign_slots: [[OnceLock<Counter>; RESULT_SLOTS]; KEY_TYPE_SLOTS],
    sign_duration: Histogram,
    rate_limited_wait: Histogram,
    adaptive_rate: Gauge<f64, AtomicU64>,
    adaptive_cuts: Counter,
    generate_total: Family<Labels<1>, Counter>,
    keys: Family<Labels<1>, Gauge>,
    migrate_from_keys: Family<Labels<1>, Gauge>,
    last_stamp: Gauge<f64, AtomicU64>,
    last_sweep: Gauge<f64, AtomicU64>,
    swept_keys: Counter,
    audit_failures: Family<Labels<1>, Counter>,
}

impl Metrics {
    /// The metrics of an engine over `backend`; backend calls are read from `stats` at
    /// each scrape.
    pub fn new(backend: &'static str, stats: Arc<CallStats>) -> Self {
        let mut registry = Registry::default();
        let sign_total = Family::<Labels<3>, Counter>::default();
        registry.register(
            "kms_keymanager_sign",
            "SignData requests that reached the engine, by backend, key type and result (ok or the gRPC code in snake case)",
            sign_total.clone(),
        );
        let sign_duration_family: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        registry.register(
            "kms_keymanager_sign_duration_seconds",
            "SignData latency inside the plugin (rate-limit wait, retries and store call included), by backend",
            sign_duration_family.clone(),
        );
        let sign_duration = sign_duration_family.get_or_create_owned(&[("backend", backend)]);
        let rate_limited_wait = Histogram::new(WAIT_BUCKETS);
        registry.register(
            "kms_keymanager_rate_limited_wait_seconds",
            "Time SignData requests waited for a sign permit: max_signs_per_second, or the adaptive rate once the store has throttled",
            rate_limited_wait.clone(),
        );
        let adaptive_rate = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kms_keymanager_adaptive_sign_rate",
            "Signing calls per second the adaptive rate control lets through, learned from the store's throttling (0: not pacing, no throttling seen)",
            adaptive_rate.clone(),
        );
        let adaptive_cuts = Counter::default();
        registry.register(
            "kms_keymanager_adaptive_rate_cuts",
            "Times the store's throttling made the adaptive rate control lower its sign rate",
            adaptive_cuts.clone(),
        );
        let generate_total = Family::<Labels<1>, Counter>::default();
        registry.register(
            "kms_keymanager_generate_key",
            "GenerateKey requests that reached the engine, by result (ok or the gRPC code in snake case)",
            generate_total.clone(),
        );
        let keys = Family::<Labels<1>, Gauge>::default();
        registry.register(
            "kms_keymanager_keys",
            "Keys by state: active = keys this server serves; enabled, disabled, pending_deletion = the trust domain's keys in the store as the last sweep listed them",
            keys.clone(),
        );
        let migrate_from_keys = Family::<Labels<1>, Gauge>::default();
        registry.register(
            "kms_keymanager_migrate_from_keys",
            "Hand-over mode only: keys still served from the migrate_from store, by its backend; 0 means every key has moved and the migrate_from block can be removed",
            migrate_from_keys.clone(),
        );
        let last_stamp = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kms_keymanager_last_stamp_timestamp_seconds",
            "Unix time of the last successful liveness stamp (0: none yet)",
            last_stamp.clone(),
        );
        let last_sweep = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kms_keymanager_last_sweep_timestamp_seconds",
            "Unix time of the last successful stale-key sweep (0: none yet)",
            last_sweep.clone(),
        );
        let swept_keys = Counter::default();
        registry.register(
            "kms_keymanager_swept_keys",
            "Stale or abandoned keys the sweep put on the deletion path",
            swept_keys.clone(),
        );
        let audit_failures = Family::<Labels<1>, Counter>::default();
        registry.register(
            "kms_keymanager_audit_failures",
            "Audit lines that could not be written, by reason (open, write, queue_full); signing went on",
            audit_failures.clone(),
        );
        registry.register_collector(Box::new(CallsCollector { backend, stats }));
        Self {
            registry,
            backend,
            sign_total,
            sign_slots: Default::default(),
            sign_duration,
            rate_limited_wait,
            adaptive_rate,
            adaptive_cuts,
            generate_total,
            keys,
            migrate_from_keys,
            last_stamp,
            last_sweep,
            swept_keys,
            audit_failures,
        }
    }

    /// The Prometheus text format 0.0.4.
    pub fn encode_prometheus(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// OpenMetrics text 1.0.0.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub(crate) fn sign_done(
        &self,
        key_type: Option<KeyType>,
        error: Option<&EngineError>,
        elapsed: Duration,
    ) {
        let type_slot = key_type
            .and_then(|t| KeyType::ALL.iter().position(|k| *k == t))
            .unwrap_or(KeyType::ALL.len());
        let class = error.map(EngineError::class);
        let result_slot = class.map_or(0, |c| c.index() + 1);
        self.sign_slots[type_slot][result_slot]
            .get_or_init(|| {
                self.sign_total.get_or_create_owned(&[
                    ("backend", self.backend),
                    ("key_type", key_type.map_or("unknown", KeyType::as_str)),
                    ("result", class.map_or("ok", ErrorClass::label)),
                ])
            })
            .inc();
        self.sign_duration.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn generate_done(&self, error: Option<&EngineError>) {
        let result = error.map_or("ok", |e| e.class().label());
        self.generate_total
            .get_or_create(&[("result", result)])
            .inc();
    }

    pub(crate) fn rate_limited_wait(&self, wait: Duration) {
        self.rate_limited_wait.observe(wait.as_secs_f64());
    }

    pub(crate) fn set_adaptive_rate(&self, per_second: f64) {
        self.adaptive_rate.set(per_second);
    }

    pub(crate) fn adaptive_cut(&self) {
        self.adaptive_cuts.inc();
    }

    pub(crate) fn set_keys(&self, state: &'static str, count: usize) {
        self.keys
            .get_or_create(&[("state", state)])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_migrate_from_keys(&self, backend: &'static str, count: usize) {
        self.migrate_from_keys
            .get_or_create(&[("backend", backend)])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_last_stamp(&self, at: SystemTime) {
        self.last_stamp.set(unix_seconds(at));
    }

    pub(crate) fn swept(&self, at: SystemTime, report: &SweepReport) {
        self.last_sweep.set(unix_seconds(at));
        self.swept_keys.inc_by(report.deleted() as u64);
        for (state, name) in [
            (StoreKeyState::Enabled, "enabled"),
            (StoreKeyState::Disabled, "disabled"),
            (StoreKeyState::Incomplete, "incomplete"),
            (StoreKeyState::PendingDeletion, "pending_deletion"),
        ] {
            let count = report.store_states.iter().filter(|s| **s == state).count();
            self.set_keys(name, count);
        }
    }

    /// The audit-failure counters, for the audit writer.
    pub(crate) fn audit_failures(&self) -> AuditFailures {
        AuditFailures {
            open: self
                .audit_failures
                .get_or_create_owned(&[("reason", "open")]),
            write: self
                .audit_failures
                .get_or_create_owned(&[("reason", "write")]),
            queue_full: self
                .audit_failures
                .get_or_create_owned(&[("reason", "queue_full")]),
        }
    }
}

/// Counters the audit log increments when a line is lost.
#[derive(Clone, Debug)]
pub(crate) struct AuditFailures {
    pub open: Counter,
    pub write: Counter,
    pub queue_full: Counter,
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// `backend_calls_total` and `retries_total`, read from the engine's call counts at scrape
/// time: the calls themselves pay nothing for them.
struct CallsCollector {
    backend: &'static str,
    stats: Arc<CallStats>,
}

impl std::fmt::Debug for CallsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallsCollector")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Collector for CallsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.stats.snapshot();
        {
            let mut calls = encoder.encode_descriptor(
                "kms_keymanager_backend_calls",
                "Calls the engine made to the key store, by backend, operation and result (ok, error, throttled); each retry is a call.",
                None,
                MetricType::Counter,
            )?;
            for (operation, stats) in &snapshot {
                let errors = stats.failures.saturating_sub(stats.throttles);
                for (result, value) in [
                    ("ok", stats.successes),
                    ("error", errors),
                    ("throttled", stats.throttles),
                ] {
                    let labels: Labels<3> = [
                        ("backend", self.backend),
                        ("operation", operation),
                        ("result", result),
                    ];
                    ConstCounter::new(value).encode(calls.encode_family(&labels)?)?;
                }
            }
        }
        let mut retries = encoder.encode_descriptor(
            "kms_keymanager_retries",
            "Retries of store calls after a transient failure (throttling, unavailability), by operation.",
            None,
            MetricType::Counter,
        )?;
        for (operation, stats) in &snapshot {
            let labels: Labels<1> = [("operation", operation)];
            ConstCounter::new(stats.retries).encode(retries.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendError, BackendErrorKind};
    use crate::core::key::KeyId;

    #[test]
    fn counters_appear_with_their_labels_in_both_formats() {
        let stats = Arc::new(CallStats::default());
        let metrics = Metrics::new("disk", stats.clone());
        metrics.sign_done(Some(KeyType::EcP256), None, Duration::from_micros(80));
        metrics.sign_done(Some(KeyType::EcP256), None, Duration::from_micros(90));
        let missing = EngineError::KeyNotFound(KeyId::new("nope").unwrap_or_else(|_| panic!()));
        metrics.sign_done(None, Some(&missing), Duration::from_micros(5));
        stats.record_call("sign");
        stats.record_success("sign");
        stats.record_call("sign");
        stats.record_failure("sign", BackendErrorKind::ResourceExhausted);
        stats.record_retry("sign");
        metrics.generate_done(Some(&EngineError::Backend(BackendError::new(
            BackendErrorKind::PermissionDenied,
            "denied",
        ))));
        let text = metrics.encode_prometheus();
        for line in [
            "kms_keymanager_sign_total{backend=\"disk\",key_type=\"ec-p256\",result=\"ok\"} 2",
            "kms_keymanager_sign_total{backend=\"disk\",key_type=\"unknown\",result=\"not_found\"} 1",
            "kms_keymanager_sign_duration_seconds_count{backend=\"disk\"} 3",
            "kms_keymanager_sign_duration_seconds_bucket{backend=\"disk\",le=\"0.0001\"} 3",
            "kms_keymanager_backend_calls_total{backend=\"disk\",operation=\"sign\",result=\"ok\"} 1",
            "kms_keymanager_backend_calls_total{backend=\"disk\",operation=\"sign\",result=\"throttled\"} 1",
            "kms_keymanager_backend_calls_total{backend=\"disk\",operation=\"sign\",result=\"error\"} 0",
            "kms_keymanager_retries_total{operation=\"sign\"} 1",
            "kms_keymanager_generate_key_total{result=\"permission_denied\"} 1",
            "# TYPE kms_keymanager_sign_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert!(
            text.lines()
                .filter(|l| l.starts_with("# HELP"))
                .all(|l| l.ends_with('.') && !l.ends_with("..")),
            "help texts end with one period:\n{text}"
        );
        let open = metrics.encode_openmetrics();
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(
            open.contains("# TYPE kms_keymanager_sign counter"),
            "{open}"
        );
    }

    #[test]
    fn sweeps_set_the_store_states_and_the_time() {
        let metrics = Metrics::new("aws_kms", Arc::new(CallStats::default()));
        let report = SweepReport {
            decisions: Vec::new(),
            failed: Vec::new(),
            store_states: vec![
                StoreKeyState::Enabled,
                StoreKeyState::Enabled,
                StoreKeyState::PendingDeletion,
            ],
        };
        metrics.swept(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            &report,
        );
        let text = metrics.encode_prometheus();
        assert!(
            text.contains("kms_keymanager_keys{state=\"enabled\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("kms_keymanager_keys{state=\"disabled\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("kms_keymanager_last_sweep_timestamp_seconds 1800000000"),
            "{text}"
        );
    }
}
