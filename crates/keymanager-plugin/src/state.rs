//! The plugin's configured state: which engine serves requests, and how Configure swaps it.

use std::sync::{Arc, PoisonError, RwLock};

use keymanager_engine::{BackendFactory, CoreConfig, Engine, EngineError, EngineOptions};
use tonic::Status;

use keymanager_engine::lifecycle::LifecycleSchedule;

use crate::logging::LogControl;
use crate::plugin_config::{PluginConfig, parse_plugin_config};
use crate::status::{engine_error_to_status, settings_error_to_status};

struct Active {
    engine: Arc<Engine>,
    store_identity: String,
    trust_domain: String,
    /// Read by the background tasks at every turn, so a re-Configure applies to them.
    schedule: Arc<RwLock<LifecycleSchedule>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Shared by every service: the backends on offer and the active engine.
pub struct PluginState {
    backends: &'static [&'static dyn BackendFactory],
    log_control: LogControl,
    active: RwLock<Option<Arc<Active>>>,
    /// Configure calls run one at a time; KeyManager calls never wait for this.
    configuring: tokio::sync::Mutex<()>,
    /// Deinit and process exit both close; the report is made once.
    closed: std::sync::atomic::AtomicBool,
}

impl PluginState {
    /// A state with nothing configured yet.
    pub fn new(backends: &'static [&'static dyn BackendFactory], log_control: LogControl) -> Self {
        Self {
            backends,
            log_control,
            active: RwLock::new(None),
            configuring: tokio::sync::Mutex::new(()),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The engine for a KeyManager call, or FailedPrecondition before Configure.
    pub fn engine(&self) -> Result<Arc<Engine>, EngineError> {
        self.active
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|a| a.engine.clone())
            .ok_or(EngineError::NotConfigured)
    }

    /// Applies a configuration. The first call opens the backend and loads its keys. A
    /// later call (SPIRE re-Configures on SIGUSR1 with `plugin_data_file`) keeps the engine,
    /// its keys and any in-flight signatures, and applies the new log level and key cap; a
    /// change of key store or trust domain is refused, because it would drop keys in use.
    pub async fn configure(&self, core: Option<CoreConfig>, hcl_text: &str) -> Result<(), Status> {
        let config = parse_plugin_config(self.backends, core, hcl_text)
            .map_err(|e| settings_error_to_status(&e))?;
        let _one_at_a_time = self.configuring.lock().await;
        let current = self
            .active
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let identity = config.backend.store_identity();
        if let Some(current) = current {
            if current.store_identity != identity
                || current.trust_domain != config.core.trust_domain
            {
                return Err(Status::invalid_argument(format!(
                    "cannot switch the key store at run time (from {} in trust domain {:?} to {} in {:?}); \
                     restart spire-server to use a different key store",
                    current.store_identity,
                    current.trust_domain,
                    identity,
                    config.core.trust_domain
                )));
            }
            self.apply_runtime_settings(&config, &current.engine);
            *current
                .schedule
                .write()
                .unwrap_or_else(PoisonError::into_inner) = config.lifecycle;
            tracing::info!(backend = config.backend_name, store = %identity, "configuration reloaded; keys kept");
            return Ok(());
        }
        let backend = config
            .backend
            .open()
            .await
            .map_err(|e| engine_error_to_status(&EngineError::Backend(e)))?;
        let options = EngineOptions {
            max_keys: config.max_keys,
            max_signs_per_second: config.max_signs_per_second,
            ..EngineOptions::default()
        };
        let engine = Engine::start(backend, options)
            .await
            .map_err(|e| engine_error_to_status(&e))?;
        self.apply_runtime_settings(&config, &engine);
        tracing::info!(
            backend = config.backend_name,
            store = %identity,
            trust_domain = %config.core.trust_domain,
            backend_config = ?config.backend,
            "configured"
        );
        let engine = Arc::new(engine);
        let schedule = Arc::new(RwLock::new(config.lifecycle));
        let tasks = if engine.has_lifecycle() {
            spawn_lifecycle_tasks(engine.clone(), schedule.clone())
        } else {
            Vec::new()
        };
        *self.active.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(Active {
            engine,
            store_identity: identity,
            trust_domain: config.core.trust_domain,
            schedule,
            tasks,
        }));
        Ok(())
    }

    /// Checks a configuration without side effects, for `spire-server validate`. SPIRE
    /// prints every note as a validation error, so notes are problems only.
    pub fn validate(&self, core: Option<CoreConfig>, hcl_text: &str) -> (bool, Vec<String>) {
        match parse_plugin_config(self.backends, core, hcl_text) {
            Ok(config) => {
                let problems = config.backend.problems();
                tracing::info!(
                    backend = config.backend_name,
                    store = %config.backend.store_identity(),
                    problems = problems.len(),
                    "validated configuration"
                );
                (problems.is_empty(), problems)
            }
            Err(error) => (false, vec![error.to_string()]),
        }
    }

    /// Called at Deinit and exit: reports the backend calls made since start.
    pub async fn close(&self) {
        if self.closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let active = self
            .active
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(active) = active {
            for task in &active.tasks {
                task.abort();
            }
            for (operation, stats) in active.engine.call_stats() {
                tracing::info!(
                    backend = active.engine.backend_name(),
                    operation,
                    calls = stats.calls,
                    failures = stats.failures,
                    throttles = stats.throttles,
                    "backend calls since start"
                );
            }
        }
    }

    fn apply_runtime_settings(&self, config: &PluginConfig, engine: &Engine) {
        self.log_control.set_level(config.log_level);
        engine.set_max_keys(config.max_keys);
        engine.set_max_signs_per_second(config.max_signs_per_second);
    }
}

/// Stamps this server's keys and sweeps the trust domain on the configured schedule. Each
/// task first runs one interval after start, like SPIRE's KMS key managers.
fn spawn_lifecycle_tasks(
    engine: Arc<Engine>,
    schedule: Arc<RwLock<LifecycleSchedule>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let read = |schedule: &Arc<RwLock<LifecycleSchedule>>| {
        *schedule.read().unwrap_or_else(PoisonError::into_inner)
    };
    let stamper = {
        let engine = engine.clone();
        let schedule = schedule.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(read(&schedule).stamp_every).await;
                if let Err(error) = engine.stamp_keys().await {
                    tracing::warn!(%error, "liveness stamp failed; retrying at the next interval");
                }
            }
        })
    };
    let sweeper = tokio::spawn(async move {
        loop {
            let current = read(&schedule);
            tokio::time::sleep(current.sweep_every).await;
            match engine.sweep(current.policy).await {
                Ok(Some(report)) => tracing::info!(
                    examined = report.decisions.len(),
                    deleted = report.decisions.iter().filter(|d| d.is_delete()).count()
                        - report.failed.len(),
                    failed = report.failed.len(),
                    "stale-key sweep finished"
                ),
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%error, "stale-key sweep failed; retrying at the next interval")
                }
            }
        }
    });
    vec![stamper, sweeper]
}
