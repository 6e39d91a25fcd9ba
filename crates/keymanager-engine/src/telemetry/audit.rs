//! The audit log: one JSON line per SignData and GenerateKey (schema: README, "Telemetry").
//!
//! - Off the signing path: a request hands its record to a bounded queue
//!   ([`QUEUE_CAPACITY`] lines) and goes on; one writer thread formats and appends. A full
//!   queue (the disk stalled) drops the line and counts it (`queue_full`): signing never
//!   waits for the audit file.
//! - Whole lines only per `write(2)` (one line, or the lines queued meanwhile, up to 64 KiB)
//!   on a file opened with `O_APPEND`: concurrent requests (and other appenders) never
//!   interleave inside a line. Created `0600`.
//! - Log rotation: at most every [`ROTATION_CHECK`] the writer compares the path's inode
//!   with the open file's; a file renamed away (or deleted) is closed and the path created
//!   again.
//! - A path that cannot be opened or written: the line is dropped and counted (`open`,
//!   `write`), a warning is logged at most once a minute, the open is retried at most once a
//!   second, and signing goes on.
//! - Never written: digests, signatures, key material, credentials.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::metrics::AuditFailures;
use crate::core::key::{Fingerprint, KeyType};
use crate::error::ErrorClass;

/// Lines waiting for the writer before new ones are dropped.
pub const QUEUE_CAPACITY: usize = 16 * 1024;
/// How often the writer checks whether the file was renamed away.
pub const ROTATION_CHECK: Duration = Duration::from_millis(200);
/// How long the writer stays awake after a write before it parks.
const LINGER: Duration = Duration::from_millis(1);
/// Largest single write.
const MAX_BATCH: usize = 64 * 1024;
/// Retry interval for a path that cannot be opened.
const REOPEN_BACKOFF: Duration = Duration::from_secs(1);
/// At most one warning per interval about lost lines.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The audited operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum AuditOperation {
    /// A signature.
    SignData,
    /// A key creation.
    GenerateKey,
}

/// One audited request, as the engine hands it over.
#[derive(Clone, Debug)]
pub struct AuditRecord {
    /// When the request reached the engine.
    pub time: SystemTime,
    /// What was asked.
    pub operation: AuditOperation,
    /// The backend.
    pub backend: &'static str,
    /// The SPIRE key id.
    pub key_id: String,
    /// This server's id in the store, for backends that tag keys with one.
    pub server_id: Option<Arc<str>>,
    /// The key that signed, or the key created.
    pub fingerprint: Option<Fingerprint>,
    /// The key's type, when known.
    pub key_type: Option<KeyType>,
    /// The signature scheme family (`ECDSA`, `RSA-PSS`).
    pub scheme: Option<&'static str>,
    /// The hash (`SHA-256`).
    pub hash: Option<&'static str>,
    /// The failure: class and message.
    pub error: Option<(ErrorClass, String)>,
    /// Time spent in the engine.
    pub latency: Duration,
    /// The store's id for the call, where it returns one (AWS's `x-amzn-RequestId`).
    pub request_id: Option<String>,
}

/// The line format, field by field (the order is the documented one).
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    operation: AuditOperation,
    backend: &'static str,
    key_id: &'a str,
    server_id: Option<&'a str>,
    fingerprint: Option<&'a str>,
    key_type: Option<&'static str>,
    scheme: Option<&'static str>,
    hash: Option<&'static str>,
    result: &'static str,
    error_code: Option<&'static str>,
    error: Option<&'a str>,
    latency_us: u64,
    request_id: Option<&'a str>,
}

impl AuditRecord {
    /// The record as one JSON line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(512);
        self.write_line(&mut bytes);
        bytes
    }

    fn write_line(&self, out: &mut Vec<u8>) {
        let line = Line {
            time: rfc3339_millis(self.time),
            operation: self.operation,
            backend: self.backend,
            key_id: &self.key_id,
            server_id: self.server_id.as_deref(),
            fingerprint: self.fingerprint.as_ref().map(Fingerprint::as_str),
            key_type: self.key_type.map(KeyType::as_str),
            scheme: self.scheme,
            hash: self.hash,
            result: if self.error.is_some() { "error" } else { "ok" },
            error_code: self.error.as_ref().map(|(class, _)| class.name()),
            error: self.error.as_ref().map(|(_, message)| message.as_str()),
            latency_us: u64::try_from(self.latency.as_micros()).unwrap_or(u64::MAX),
            request_id: self.request_id.as_deref(),
        };
        // Serialising plain strings and numbers into memory cannot fail.
        let _ = serde_json::to_writer(&mut *out, &line);
        out.push(b'\n');
    }
}

/// `2026-12-01T13:12:04.123Z`.
fn rfc3339_millis(at: SystemTime) -> String {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A running audit log: the queue's sending end and the writer thread.
pub struct AuditLog {
    path: PathBuf,
    sender: Option<SyncSender<AuditRecord>>,
    /// Signalled when the writer has drained its queue and stopped.
    done: std::sync::Mutex<Receiver<()>>,
    failures: AuditFailures,
    warned: std::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Starts the writer for `path`; opens the file at once so that a bad path is reported
    /// at Configure time (as a warning: signing does not depend on it).
    pub(crate) fn open(path: PathBuf, failures: AuditFailures) -> Self {
        let (sender, receiver) = sync_channel(QUEUE_CAPACITY);
        let (done_tx, done) = sync_channel(1);
        let mut writer = Writer {
            path: path.clone(),
            file: None,
            checked: Instant::now(),
            failed_open: None,
            failures: failures.clone(),
            lost_since_warning: 0,
            warned: None,
        };
        writer.ensure_open();
        if writer.file.is_some() {
            tracing::info!(path = %path.display(), "audit log open");
        }
        let spawned = std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || {
                writer.run(receiver);
                let _ = done_tx.send(());
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the audit log writer; audit lines are dropped and counted");
        }
        Self {
            path,
            sender: Some(sender),
            done: std::sync::Mutex::new(done),
            failures,
            warned: std::sync::Mutex::new(None),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a record; a full queue drops it and counts it.
    pub(crate) fn submit(&self, record: AuditRecord) {
        let Some(sender) = &self.sender else {
            return;
        };
        match sender.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.failures.queue_full.inc();
                let mut warned = self
                    .warned
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    *warned = Some(Instant::now());
                    tracing::warn!(
                        path = %self.path.display(),
                        "the audit log writer is behind; audit lines are being dropped (kms_keymanager_audit_failures_total{{reason=\"queue_full\"}}); signing goes on"
                    );
                }
            }
        }
    }

    /// Stops accepting lines and waits up to `wait` for the queued ones to be written.
    pub(crate) fn close(mut self, wait: Duration) {
        self.sender = None;
        let done = self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = done.recv_timeout(wait);
    }
}

/// Whole lines waiting for one write.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
}

impl Batch {
    fn push(&mut self, record: &AuditRecord) {
        record.write_line(&mut self.bytes);
        self.lines += 1;
    }

    /// Keeps the buffer's allocation for the next batch.
    fn reuse(&mut self, mut bytes: Vec<u8>) {
        bytes.clear();
        self.bytes = bytes;
    }
}

/// The writer thread's state.
struct Writer {
    path: PathBuf,
    /// The open file and its (device, inode).
    file: Option<(File, (u64, u64))>,
    checked: Instant,
    failed_open: Option<Instant>,
    failures: AuditFailures,
    lost_since_warning: u64,
    warned: Option<Instant>,
}

impl Writer {
    /// Writes what is queued, then lingers [`LINGER`] before looking again: under load the
    /// next lines are already queued and the requests never pay for waking this thread
    /// (a futex wake per line measurably slowed a 15 µs in-process signature). Idle, it parks.
    fn run(&mut self, receiver: Receiver<AuditRecord>) {
        let mut batch = Batch::default();
        'idle: while let Ok(record) = receiver.recv() {
            batch.push(&record);
            loop {
                loop {
                    match receiver.try_recv() {
                        Ok(record) => {
                            batch.push(&record);
                            if batch.bytes.len() >= MAX_BATCH {
                                self.write(&mut batch);
                            }
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            self.write(&mut batch);
                            break 'idle;
                        }
                    }
                }
                self.write(&mut batch);
                std::thread::sleep(LINGER);
                match receiver.try_recv() {
                    Ok(record) => batch.push(&record),
                    Err(TryRecvError::Empty) => continue 'idle,
                    Err(TryRecvError::Disconnected) => break 'idle,
                }
            }
        }
    }

    /// Appends the batch's whole lines with one `write(2)` and empties it.
    fn write(&mut self, batch: &mut Batch) {
        if batch.lines == 0 {
            return;
        }
        let lines = batch.lines;
        let bytes = std::mem::take(&mut batch.bytes);
        batch.lines = 0;
        if self.file.is_some() && self.checked.elapsed() >= ROTATION_CHECK {
            self.checked = Instant::now();
            let current = std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino()));
            if current.ok() != self.file.as_ref().map(|(_, id)| *id) {
                tracing::info!(path = %self.path.display(), "audit log was renamed or removed; opening a new file");
                self.file = None;
            }
        }
        if !self.ensure_open() {
            self.failures.open.inc_by(lines);
            self.lost(lines, "cannot open the audit log");
            batch.reuse(bytes);
            return;
        }
        let Some((file, _)) = self.file.as_mut() else {
            return;
        };
        // One write(2) of whole lines: O_APPEND puts them at the end of the file in one
        // piece, so lines never interleave with other writers. A short write (a full disk)
        // is not completed: the lines it did not carry are counted as lost.
        match file.write(&bytes) {
            Ok(n) if n == bytes.len() => {}
            Ok(n) => {
                let written = bytes[..n].iter().filter(|b| **b == b'\n').count() as u64;
                self.failures.write.inc_by(lines - written);
                self.lost(lines - written, "short write to the audit log (disk full?)");
            }
            Err(error) => {
                self.failures.write.inc_by(lines);
                self.file = None;
                self.lost(lines, &format!("cannot write the audit log: {error}"));
            }
        }
        batch.reuse(bytes);
    }

    /// Opens the file if it is not open (at most once per [`REOPEN_BACKOFF`] after a
    /// failure); true when it is open.
    fn ensure_open(&mut self) -> bool {
        if self.file.is_some() {
            return true;
        }
        if self
            .failed_open
            .is_some_and(|at| at.elapsed() < REOPEN_BACKOFF)
        {
            return false;
        }
        let opened = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .and_then(|file| {
                let meta = file.metadata()?;
                Ok((file, (meta.dev(), meta.ino())))
            });
        match opened {
            Ok(file) => {
                self.file = Some(file);
                self.failed_open = None;
                self.checked = Instant::now();
                true
            }
            Err(error) => {
                self.failed_open = Some(Instant::now());
                tracing::debug!(path = %self.path.display(), %error, "cannot open the audit log");
                if self.warned.is_none() {
                    // At Configure time: say why at once.
                    tracing::warn!(path = %self.path.display(), %error, "cannot open the audit log; audit lines are dropped and counted (kms_keymanager_audit_failures_total), signing goes on");
                    self.warned = Some(Instant::now());
                }
                false
            }
        }
    }

    /// Logs lost lines at most once per [`WARN_EVERY`].
    fn lost(&mut self, lines: u64, why: &str) {
        self.lost_since_warning += lines;
        if self.warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            tracing::warn!(
                path = %self.path.display(),
                lost = self.lost_since_warning,
                "{why}; audit lines are dropped and counted (kms_keymanager_audit_failures_total), signing goes on"
            );
            self.warned = Some(Instant::now());
            self.lost_since_warning = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use prometheus_client::metrics::counter::Counter;

    use super::*;

    fn failures() -> AuditFailures {
        AuditFailures {
            open: Counter::default(),
            write: Counter::default(),
            queue_full: Counter::default(),
        }
    }

    fn record(n: usize) -> AuditRecord {
        AuditRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_450_839_123),
            operation: AuditOperation::SignData,
            backend: "disk",
            key_id: format!("key-{n}"),
            server_id: None,
            fingerprint: None,
            key_type: Some(KeyType::EcP256),
            scheme: Some("ECDSA"),
            hash: Some("SHA-256"),
            error: None,
            latency: Duration::from_micros(42),
            request_id: None,
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(
            rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_450_839_123)),
            "2026-11-23T16:20:39.123Z"
        );
        assert_eq!(
            rfc3339_millis(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn a_line_is_one_json_object_with_the_documented_fields() {
        let mut failed = record(1);
        failed.error = Some((ErrorClass::NotFound, "key \"x\" not found".into()));
        let line = failed.to_line();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
        let text = String::from_utf8_lossy(&line);
        let mut keys: Vec<(usize, &str)> = value
            .as_object()
            .map(|o| {
                o.keys()
                    .map(|k| {
                        (
                            text.find(&format!("\"{k}\":")).unwrap_or(usize::MAX),
                            k.as_str(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        keys.sort();
        let keys: Vec<&str> = keys.into_iter().map(|(_, k)| k).collect();
        assert_eq!(
            keys,
            [
                "time",
                "operation",
                "backend",
                "key_id",
                "server_id",
                "fingerprint",
                "key_type",
                "scheme",
                "hash",
                "result",
                "error_code",
                "error",
                "latency_us",
                "request_id"
            ]
        );
        assert_eq!(value["result"], "error");
        assert_eq!(value["error_code"], "NotFound");
        assert_eq!(value["latency_us"], 42);
        assert_eq!(value["time"], "2026-11-23T16:20:39.123Z");
    }

    #[test]
    fn lines_are_appended_0600_and_a_renamed_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(path.clone(), failures());
        assert_eq!(
            std::fs::metadata(&path)
                .map(|m| m.permissions().mode() & 0o777)
                .ok(),
            Some(0o600)
        );
        for n in 0..10 {
            log.submit(record(n));
        }
        std::thread::sleep(Duration::from_millis(100));
        let rotated = dir.path().join("audit.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(ROTATION_CHECK + Duration::from_millis(50));
        for n in 10..15 {
            log.submit(record(n));
        }
        log.close(Duration::from_secs(5));
        let lines = |p: &Path| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .count()
        };
        assert_eq!(lines(&rotated), 10);
        assert_eq!(lines(&path), 5);
    }

    #[test]
    fn an_unwritable_path_counts_failures() {
        let failures = failures();
        let log = AuditLog::open(
            PathBuf::from("/nonexistent-dir/for/audit.jsonl"),
            failures.clone(),
        );
        for n in 0..3 {
            log.submit(record(n));
        }
        log.close(Duration::from_secs(5));
        assert_eq!(failures.open.get(), 3);
    }
}
