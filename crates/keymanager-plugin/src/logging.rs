//! Logs in the exact JSON form go-plugin's host parses from a plugin's stderr (hclog):
//! one object per line with string `@level` (trace|debug|info|warn|error), `@message` and
//! `@timestamp` (six fractional digits, `Z`), plus the event's fields as top-level keys.
//! A non-string value in those three keys would crash the SPIRE server, so they are
//! always strings.
//!
//! The level applies to this workspace's own events (targets `keymanager_*` and
//! `kms_keymanager`). Dependencies (h2, hyper, tonic, rustls, the AWS and Google clients…)
//! trace every HTTP/2 frame at debug, which would bury the plugin's events, so theirs show
//! from `warn` up at every level but `trace`, where everything shows.

use std::fmt;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

/// A field value longer than this is cut, keeping every line far below the host's 64 KiB.
const MAX_FIELD_LEN: usize = 8 * 1024;

/// Log levels, named as hclog names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Everything (SPIRE drops trace lines).
    Trace = 0,
    /// Debugging detail.
    Debug = 1,
    /// Normal operation.
    Info = 2,
    /// Something needs attention.
    Warn = 3,
    /// Failures.
    Error = 4,
}

impl LogLevel {
    /// The allowed spellings, for error messages.
    pub const NAMES: &'static str = "trace, debug, info, warn, error";

    /// Parses a level name (case-insensitive).
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "trace" => Some(Self::Trace),
            "debug" => Some(Self::Debug),
            "info" => Some(Self::Info),
            "warn" => Some(Self::Warn),
            "error" => Some(Self::Error),
            _ => None,
        }
    }

    fn of(level: &Level) -> Self {
        match *level {
            Level::TRACE => Self::Trace,
            Level::DEBUG => Self::Debug,
            Level::INFO => Self::Info,
            Level::WARN => Self::Warn,
            Level::ERROR => Self::Error,
        }
    }

    /// hclog's spelling (never `warning`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

/// Changes the log level at run time (from `plugin_data`'s `log_level`).
#[derive(Clone)]
pub struct LogControl {
    level: Arc<AtomicU8>,
}

impl LogControl {
    fn new(level: LogLevel) -> Self {
        Self {
            level: Arc::new(AtomicU8::new(level as u8)),
        }
    }

    /// A control that is not connected to any subscriber (tests).
    pub fn detached() -> Self {
        Self::new(LogLevel::Info)
    }

    /// Sets the level for every later event.
    pub fn set_level(&self, level: LogLevel) {
        self.level.store(level as u8, Ordering::Relaxed);
    }

    /// Whether an event at `level` from `target` is logged: the plugin's own at the set
    /// level and above; a dependency's from `warn` up, or all of them at `trace`.
    fn allows(&self, level: LogLevel, target: &str) -> bool {
        let threshold = self.level.load(Ordering::Relaxed);
        // Cheapest test first: most callsites the transport libraries hit per request
        // (h2 frames, hyper) are below the threshold and need no look at their target.
        if (level as u8) < threshold {
            return false;
        }
        level >= LogLevel::Warn || threshold == LogLevel::Trace as u8 || is_own_target(target)
    }
}

/// True for events of this workspace's crates (`keymanager_engine::engine`,
/// `kms_keymanager`, …), whose targets are their module paths.
fn is_own_target(target: &str) -> bool {
    // The crate name is what comes before the first `::` (no allocation, no split).
    let crate_ends = |rest: &str| rest.is_empty() || rest.starts_with("::");
    target
        .strip_prefix("kms_keymanager")
        .is_some_and(crate_ends)
        || target.strip_prefix("keymanager_").is_some_and(|rest| {
            let name_len = rest.find("::").unwrap_or(rest.len());
            name_len > 0
        })
}

/// Installs the hclog JSON logger on stderr; `info` until Configure says otherwise.
pub fn init_plugin_logging() -> LogControl {
    let control = LogControl::new(LogLevel::Info);
    let layer = HclogJsonLayer {
        control: control.clone(),
        sink: Sink::Stderr,
    };
    // Fails only if a subscriber is already set (tests); then that one keeps logging.
    let _ = tracing_subscriber::registry().with(layer).try_init();
    control
}

/// Where the lines go.
enum Sink {
    Stderr,
    #[cfg(test)]
    Capture(Arc<std::sync::Mutex<Vec<String>>>),
}

/// Formats events as hclog JSON lines.
struct HclogJsonLayer {
    control: LogControl,
    sink: Sink,
}

impl<S: Subscriber> Layer<S> for HclogJsonLayer {
    fn register_callsite(&self, _metadata: &'static Metadata<'static>) -> Interest {
        // The level can change at run time (and with it whether a dependency's debug
        // events show), so every callsite is re-checked; `allows` keeps that check to a
        // load and a compare for the callsites below the level.
        Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        self.control
            .allows(LogLevel::of(metadata.level()), metadata.target())
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let line = format_line(event, time::OffsetDateTime::now_utc());
        match &self.sink {
            Sink::Stderr => {
                let mut stderr = std::io::stderr().lock();
                let _ = stderr.write_all(line.as_bytes());
            }
            #[cfg(test)]
            Sink::Capture(lines) => lines.lock().expect("not poisoned").push(line),
        }
    }
}

fn format_line(event: &Event<'_>, now: time::OffsetDateTime) -> String {
    let mut visitor = JsonVisitor::default();
    event.record(&mut visitor);
    let mut object = Map::new();
    object.insert(
        "@level".into(),
        Value::String(LogLevel::of(event.metadata().level()).as_str().into()),
    );
    object.insert(
        "@message".into(),
        Value::String(visitor.message.unwrap_or_default()),
    );
    object.insert("@timestamp".into(), Value::String(format_timestamp(now)));
    object.insert("@module".into(), Value::String("kms-keymanager".into()));
    object.extend(visitor.fields);
    let mut line = Value::Object(object).to_string();
    line.push('\n');
    line
}

/// `2006-01-02T15:04:05.000000Z`: exactly six fractional digits, as the host requires.
pub fn format_timestamp(now: time::OffsetDateTime) -> String {
    let now = now.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    )
}

#[derive(Default)]
struct JsonVisitor {
    message: Option<String>,
    fields: Map<String, Value>,
}

impl JsonVisitor {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        if name == "message" {
            let text = match value {
                Value::String(s) => s,
                other => other.to_string(),
            };
            self.message = Some(text);
        } else if !name.starts_with('@') {
            self.fields.insert(name.to_string(), value);
        }
    }
}

fn truncated(mut s: String) -> String {
    if s.len() > MAX_FIELD_LEN {
        let mut cut = MAX_FIELD_LEN;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

impl Visit for JsonVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(truncated(value.to_string())));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(truncated(value.to_string())));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(truncated(format!("{value:?}"))));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Captures formatted lines instead of writing them to stderr.
    struct Capture(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Capture {
        fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
            let at = time::macros::datetime!(2026-11-23 13:45:06.000042 UTC);
            self.0.lock().unwrap().push(format_line(event, at));
        }
    }

    /// Callsite interest is process-global: tests that install subscribers run one at a
    /// time, so that one test's level changes cannot decide another's callsites.
    static SUBSCRIBER_TESTS: Mutex<()> = Mutex::new(());

    #[test]
    fn lines_have_hclog_keys_as_strings_and_six_digit_timestamps() {
        let _one_at_a_time = SUBSCRIBER_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Capture(lines.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                key_id = "x509-CA-A",
                count = 3,
                ok = true,
                "generated \"key\""
            );
            tracing::info!(answer = 42);
        });
        let lines = lines.lock().unwrap();
        let first: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["@level"], "warn");
        assert_eq!(first["@message"], "generated \"key\"");
        assert_eq!(first["@timestamp"], "2026-11-23T13:45:06.000042Z");
        assert_eq!(first["key_id"], "x509-CA-A");
        assert_eq!(first["count"], 3);
        assert_eq!(first["ok"], true);
        assert!(lines[0].ends_with("}\n") && !lines[0][..lines[0].len() - 1].contains('\n'));
        let second: Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["@message"], "", "@message is always a string");
    }

    #[test]
    fn level_names_are_hclogs() {
        for name in ["trace", "debug", "info", "warn", "error"] {
            assert_eq!(LogLevel::parse(name).unwrap().as_str(), name);
        }
        assert_eq!(LogLevel::parse("WARN"), Some(LogLevel::Warn));
        assert_eq!(LogLevel::parse("warning"), None);
        let control = LogControl::detached();
        control.set_level(LogLevel::Warn);
        assert!(!control.allows(LogLevel::Info, "keymanager_plugin"));
        assert!(control.allows(LogLevel::Error, "keymanager_plugin"));
    }

    #[test]
    fn own_targets_are_this_workspaces_crates() {
        for own in [
            "keymanager_engine::engine",
            "keymanager_backend_aws",
            "kms_keymanager",
            "kms_keymanager::cli",
        ] {
            assert!(is_own_target(own), "{own}");
        }
        for foreign in [
            "h2::codec::framed_write",
            "hyper_util::client::legacy::pool",
            "aws_smithy_runtime::client::orchestrator",
            "kms_keymanager_other",
            "keymanager",
            "my_keymanager_engine",
            "",
        ] {
            assert!(!is_own_target(foreign), "{foreign}");
        }
    }

    /// Emits one event at each level from a dependency (h2's frame traces) and from the
    /// engine.
    fn emit_each_level_from_both() {
        tracing::trace!(target: "h2::codec::framed_write", "foreign trace");
        tracing::debug!(target: "h2::codec::framed_write", "foreign debug");
        tracing::info!(target: "h2::codec::framed_write", "foreign info");
        tracing::warn!(target: "h2::codec::framed_write", "foreign warn");
        tracing::error!(target: "h2::codec::framed_write", "foreign error");
        tracing::trace!(target: "keymanager_engine::engine", "own trace");
        tracing::debug!(target: "keymanager_engine::engine", "own debug");
        tracing::info!(target: "keymanager_engine::engine", "own info");
        tracing::warn!(target: "keymanager_engine::engine", "own warn");
        tracing::error!(target: "keymanager_engine::engine", "own error");
    }

    #[test]
    fn dependencies_log_from_warn_up_except_at_trace() {
        let _one_at_a_time = SUBSCRIBER_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let control = LogControl::detached();
        let layer = HclogJsonLayer {
            control: control.clone(),
            sink: Sink::Capture(lines.clone()),
        };
        let expected: [(LogLevel, &[&str]); 5] = [
            (
                LogLevel::Trace,
                &[
                    "foreign trace",
                    "foreign debug",
                    "foreign info",
                    "foreign warn",
                    "foreign error",
                    "own trace",
                    "own debug",
                    "own info",
                    "own warn",
                    "own error",
                ],
            ),
            (
                LogLevel::Debug,
                &[
                    "foreign warn",
                    "foreign error",
                    "own debug",
                    "own info",
                    "own warn",
                    "own error",
                ],
            ),
            (
                LogLevel::Info,
                &[
                    "foreign warn",
                    "foreign error",
                    "own info",
                    "own warn",
                    "own error",
                ],
            ),
            (
                LogLevel::Warn,
                &["foreign warn", "foreign error", "own warn", "own error"],
            ),
            (LogLevel::Error, &["foreign error", "own error"]),
        ];
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            // Down and back up again: the level changes at run time under one subscriber.
            for (level, shown) in expected.iter().chain(expected.iter().rev()) {
                control.set_level(*level);
                emit_each_level_from_both();
                let messages: Vec<String> = std::mem::take(&mut *lines.lock().unwrap())
                    .iter()
                    .map(|line| {
                        let line: Value = serde_json::from_str(line).unwrap();
                        line["@message"].as_str().unwrap().to_string()
                    })
                    .collect();
                assert_eq!(messages, *shown, "at {}", level.as_str());
            }
        });
    }
}
