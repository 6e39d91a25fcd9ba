//! The stamper and the sweeper: background loops that never die. Each round runs as a task
//! of its own, so an error or even a panic in one round is logged with its cause and the
//! next round runs on schedule. A schedule change takes effect at once.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::LifecycleSchedule;
use crate::service::KeyService;

/// The running loops; dropping this stops them.
pub struct LifecycleTasks {
    schedule: watch::Sender<LifecycleSchedule>,
    handles: Vec<JoinHandle<()>>,
}

impl LifecycleTasks {
    /// Applies a new schedule; a loop waiting on the old interval restarts its wait.
    pub fn set_schedule(&self, schedule: LifecycleSchedule) {
        self.schedule.send_replace(schedule);
    }

    /// The current schedule.
    pub fn schedule(&self) -> LifecycleSchedule {
        *self.schedule.borrow()
    }
}

impl Drop for LifecycleTasks {
    fn drop(&mut self) {
        for handle in &self.handles {
            handle.abort();
        }
    }
}

/// Starts the stamper and the sweeper for `service`. Each first runs one interval after
/// start, like SPIRE's KMS key managers.
pub fn spawn_tasks(service: Arc<dyn KeyService>, schedule: LifecycleSchedule) -> LifecycleTasks {
    let (sender, receiver) = watch::channel(schedule);
    let stamper = tokio::spawn(run_loop(
        receiver.clone(),
        |s| s.stamp_every,
        service.clone(),
        "liveness stamp",
        |service, _| async move {
            match service.stamp_keys().await {
                Ok(_) => tracing::debug!("liveness stamps refreshed"),
                Err(error) => tracing::warn!(
                    %error,
                    "liveness stamp failed; retrying at the next interval"
                ),
            }
        },
    ));
    let sweeper = tokio::spawn(run_loop(
        receiver,
        |s| s.sweep_every,
        service,
        "stale-key sweep",
        |service, schedule| async move {
            match service.sweep(schedule.policy).await {
                Ok(Some(report)) => tracing::info!(
                    examined = report.decisions.len(),
                    deleted = report.deleted(),
                    failed = report.failed.len(),
                    "stale-key sweep finished"
                ),
                Ok(None) => {}
                Err(error) => tracing::warn!(
                    %error,
                    "stale-key sweep failed; retrying at the next interval"
                ),
            }
        },
    ));
    LifecycleTasks {
        schedule: sender,
        handles: vec![stamper, sweeper],
    }
}

async fn run_loop<F, Fut>(
    mut schedule: watch::Receiver<LifecycleSchedule>,
    interval: fn(&LifecycleSchedule) -> std::time::Duration,
    service: Arc<dyn KeyService>,
    what: &'static str,
    round: F,
) where
    F: Fn(Arc<dyn KeyService>, LifecycleSchedule) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let current = *schedule.borrow_and_update();
        tokio::select! {
            () = tokio::time::sleep(interval(&current)) => {}
            changed = schedule.changed() => {
                if changed.is_err() {
                    return; // the owner is gone
                }
                continue;
            }
        }
        let outcome = tokio::spawn(round(service.clone(), current)).await;
        if let Err(join) = outcome {
            if join.is_cancelled() {
                return;
            }
            let panic = join.into_panic();
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_string());
            tracing::error!(
                round = what,
                cause = %message,
                "a lifecycle round panicked; the next round runs on schedule"
            );
        }
    }
}
