//! The plugin's configured state: which engine serves requests, and how Configure changes
//! it. A re-Configure (SPIRE's SIGUSR1 with `plugin_data_file`) never silently ignores a
//! setting: each change is applied at once, refused naming the setting, or applied at the
//! next start with a warning naming it.

use std::sync::{Arc, PoisonError, RwLock};

use keymanager_engine::handover::HandOver;
use keymanager_engine::lifecycle::{LifecycleTasks, spawn_tasks};
use keymanager_engine::telemetry::http::{MetricsServer, bind};
use keymanager_engine::{
    BackendFactory, CoreConfig, EngineError, KeyService, OnChange, SettingState,
};
use tonic::Status;

use crate::logging::LogControl;
use crate::plugin_config::{MigrateFrom, PluginConfig, parse_plugin_config};
use crate::status::{RequestError, engine_error_to_status, settings_error_to_status};

struct Active {
    service: Arc<dyn KeyService>,
    /// The configuration applied last, for the next re-Configure's comparison.
    config: PluginConfig,
    /// Stamper and sweeper, for backends with a lifecycle; dropped with the state.
    tasks: Option<LifecycleTasks>,
    /// The `/metrics` endpoint, where `metrics_listen` is set; dropping it frees the port.
    metrics: Option<MetricsServer>,
}

/// Shared by every service: the backends on offer and the active engine.
pub struct PluginState {
    backends: &'static [&'static dyn BackendFactory],
    log_control: LogControl,
    active: RwLock<Option<Arc<dyn KeyService>>>,
    /// The configuration and tasks; only Configure and close touch them.
    configured: tokio::sync::Mutex<Option<Active>>,
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
            configured: tokio::sync::Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The engine for a KeyManager call, or FailedPrecondition before Configure. Never
    /// waits for a Configure in progress.
    pub fn service(&self) -> Result<Arc<dyn KeyService>, RequestError> {
        self.active
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(RequestError::NotConfigured)
    }

    /// Applies a configuration. The first call opens the backend and loads its keys. A
    /// later call keeps the engine, its keys and in-flight signatures, and applies what may
    /// change at run time; a change of key store, trust domain or server identity, or of a
    /// setting that would change which keys exist, is refused.
    pub async fn configure(&self, core: Option<CoreConfig>, hcl_text: &str) -> Result<(), Status> {
        let config = parse_plugin_config(self.backends, core, hcl_text)
            .map_err(|e| settings_error_to_status(&e))?;
        let mut configured = self.configured.lock().await;
        match configured.as_mut() {
            Some(active) => self.reconfigure(active, config).await,
            None => {
                *configured = Some(self.start(config).await?);
                Ok(())
            }
        }
    }

    async fn start(&self, config: PluginConfig) -> Result<Active, Status> {
        for warning in config.backend.warnings() {
            tracing::warn!("{warning}");
        }
        // Bound first: a port in use fails Configure before any key store is touched.
        let listener = match config.metrics_listen {
            Some(address) => Some(bind_metrics(address).await?),
            None => None,
        };
        let opened = config
            .backend
            .open()
            .await
            .map_err(|e| engine_error_to_status(&e.into()))?;
        let service = opened
            .start(config.engine_options())
            .await
            .map_err(|e| engine_error_to_status(&e))?;
        let service = match &config.migrate_from {
            Some(old) => hand_over(service, old, config.engine_options()).await?,
            None => service,
        };
        self.log_control.set_level(config.log_level);
        let identity = config.backend.identity();
        tracing::info!(
            backend = config.backend_name,
            store = %identity,
            backend_config = ?config.backend,
            migrate_from = ?config.migrate_from.as_ref().map(|m| &m.backend),
            "configured"
        );
        let tasks = match config.backend.lifecycle() {
            Some(schedule) if service.has_lifecycle() => {
                Some(spawn_tasks(service.clone(), schedule))
            }
            _ => None,
        };
        service
            .telemetry()
            .set_audit_log(config.audit_log.as_deref());
        let metrics = listener
            .map(|listener| serve_metrics(listener, &service))
            .transpose()?;
        service.telemetry().set_counting(metrics.is_some());
        *self.active.write().unwrap_or_else(PoisonError::into_inner) = Some(service.clone());
        Ok(Active {
            service,
            config,
            tasks,
            metrics,
        })
    }

    async fn reconfigure(&self, active: &mut Active, config: PluginConfig) -> Result<(), Status> {
        let running = active.config.backend.identity();
        let wanted = config.backend.identity();
        if let Some(difference) = running.difference(&wanted) {
            return Err(Status::invalid_argument(format!(
                "cannot switch the key store at run time ({difference}); restart spire-server to use a different key store"
            )));
        }
        let changes = changed_settings(&active.config.settings(), &config.settings());
        let refused: Vec<&str> = changes
            .iter()
            .filter(|c| c.on_change == OnChange::Refused)
            .map(|c| c.key)
            .collect();
        if !refused.is_empty() {
            return Err(Status::invalid_argument(format!(
                "cannot change {} at run time: it decides which keys this server uses; restart spire-server to apply it",
                refused.join(", ")
            )));
        }
        let next_start: Vec<&str> = changes
            .iter()
            .filter(|c| c.on_change == OnChange::NextStart)
            .map(|c| c.key)
            .collect();
        let backend_changed = changes.iter().any(|c| {
            c.on_change == OnChange::Runtime
                && !matches!(
                    c.key,
                    "log_level"
                        | "max_keys"
                        | "max_signs_per_second"
                        | "adaptive_rate_limit"
                        | "metrics_listen"
                        | "audit_log"
                )
        });
        // A new address is bound before anything else changes, so that a port in use
        // refuses the whole re-Configure; the same address keeps the running endpoint.
        let new_listener = match config.metrics_listen {
            Some(address) if active.config.metrics_listen != Some(address) => {
                Some(bind_metrics(address).await?)
            }
            _ => None,
        };
        if backend_changed {
            active
                .service
                .reconfigure_backend(config.backend.as_ref())
                .await
                .map_err(|e| engine_error_to_status(&e))?;
        }
        for warning in config.backend.warnings() {
            tracing::warn!("{warning}");
        }
        self.log_control.set_level(config.log_level);
        active.service.set_options(&config.engine_options());
        active
            .service
            .telemetry()
            .set_audit_log(config.audit_log.as_deref());
        if let Some(listener) = new_listener {
            // The old endpoint (if any) stops here, the new one serves from now on.
            active.metrics = Some(serve_metrics(listener, &active.service)?);
        } else if config.metrics_listen.is_none() {
            active.metrics = None;
        }
        // Requests are counted while an endpoint serves them; a rebind keeps the counts.
        active
            .service
            .telemetry()
            .set_counting(active.metrics.is_some());
        if let (Some(tasks), Some(schedule)) = (&active.tasks, config.backend.lifecycle()) {
            tasks.set_schedule(schedule);
        }
        if !next_start.is_empty() {
            tracing::warn!(
                settings = %next_start.join(", "),
                "changed settings take effect at the next start of spire-server"
            );
        }
        let applied: Vec<&str> = changes
            .iter()
            .filter(|c| c.on_change == OnChange::Runtime)
            .map(|c| c.key)
            .collect();
        tracing::info!(
            backend = config.backend_name,
            store = %wanted,
            applied = %if applied.is_empty() { "nothing changed".to_string() } else { applied.join(", ") },
            "configuration reloaded; keys kept"
        );
        active.config = config;
        Ok(())
    }

    /// Checks a configuration without side effects, for `spire-server validate`. SPIRE
    /// prints every note as an error, so notes are problems only.
    pub fn validate(&self, core: Option<CoreConfig>, hcl_text: &str) -> (bool, Vec<String>) {
        match parse_plugin_config(self.backends, core, hcl_text) {
            Ok(config) => {
                let problems = config.problems();
                tracing::info!(
                    backend = config.backend_name,
                    store = %config.backend.identity(),
                    problems = problems.len(),
                    "validated configuration"
                );
                (problems.is_empty(), problems)
            }
            Err(error) => (false, vec![error.to_string()]),
        }
    }

    /// Called at Deinit and exit: stops the background tasks and reports the backend
    /// calls made since start.
    pub async fn close(&self) {
        if self.closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut configured = self.configured.lock().await;
        if let Some(active) = configured.as_mut() {
            active.tasks = None;
            active.metrics = None;
            active.service.telemetry().close_audit_log();
            for (operation, stats) in active.service.call_stats() {
                tracing::info!(
                    backend = active.service.backend_name(),
                    operation,
                    calls = stats.calls,
                    failures = stats.failures,
                    throttles = stats.throttles,
                    "backend calls since start"
                );
            }
        }
    }
}

/// Hand-over mode: the old store opened read-only behind the target's engine. A store that
/// cannot be opened fails Configure: the keys of the current bundle may live only there.
async fn hand_over(
    target: Arc<dyn KeyService>,
    old: &MigrateFrom,
    options: keymanager_engine::EngineOptions,
) -> Result<Arc<dyn KeyService>, Status> {
    let store = old.backend.identity().to_string();
    let opened = old.backend.open().await.map_err(|e| {
        engine_error_to_status(&EngineError::from(
            e.context(format!("opening the migrate_from store ({store})")),
        ))
    })?;
    let read_only = opened
        .start_read_only(options, target.telemetry().clone())
        .await
        .map_err(|e| engine_error_to_status(&e))?;
    Ok(Arc::new(HandOver::new(target, read_only, store)))
}

async fn bind_metrics(address: std::net::SocketAddr) -> Result<tokio::net::TcpListener, Status> {
    bind(address).await.map_err(|error| {
        Status::invalid_argument(format!(
            "invalid \"metrics_listen\": cannot listen on {address}: {error}"
        ))
    })
}

fn serve_metrics(
    listener: tokio::net::TcpListener,
    service: &Arc<dyn KeyService>,
) -> Result<MetricsServer, Status> {
    MetricsServer::serve(listener, service.telemetry().clone())
        .map_err(|error| Status::internal(format!("cannot serve the metrics endpoint: {error}")))
}

/// Settings whose value differs between two configurations (a key present in only one
/// counts as changed), with the classification of the new configuration.
fn changed_settings(old: &[SettingState], new: &[SettingState]) -> Vec<SettingState> {
    let mut changed: Vec<SettingState> = new
        .iter()
        .filter(|n| old.iter().find(|o| o.key == n.key) != Some(*n))
        .cloned()
        .collect();
    for o in old {
        if !new.iter().any(|n| n.key == o.key) {
            changed.push(o.clone());
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_found_by_key_and_value() {
        let old = vec![
            SettingState::new("a", 1, OnChange::Runtime),
            SettingState::new("b", 1, OnChange::Refused),
            SettingState::new("gone", 1, OnChange::NextStart),
        ];
        let new = vec![
            SettingState::new("a", 1, OnChange::Runtime),
            SettingState::new("b", 2, OnChange::Refused),
            SettingState::new("added", 1, OnChange::Runtime),
        ];
        let keys: Vec<&str> = changed_settings(&old, &new).iter().map(|c| c.key).collect();
        assert_eq!(keys, ["b", "added", "gone"]);
    }
}
