//! Health checks run by the driver itself: Podman schedules them with systemd timers,
//! which hosts without systemd never fire.

use super::*;

/// Health-check tickers by container id, for hosts where podman cannot schedule them.
#[derive(Default)]
pub(super) struct HealthTicks {
    tasks: Mutex<HashMap<String, (u64, tokio::task::AbortHandle)>>,
    next: AtomicU64,
}

impl HealthTicks {
    pub(super) fn tasks(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (u64, tokio::task::AbortHandle)>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn ensure(self: &Arc<Self>, api: podman_api::Podman, id: &str, interval: Duration) {
        // Outside a tokio runtime there is nothing to run a ticker on.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut tasks = self.tasks();
        if tasks.get(id).is_some_and(|(_, h)| !h.is_finished()) {
            return;
        }
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        let me = Arc::clone(self);
        let owned = id.to_string();
        let handle = rt.spawn(async move {
            run_health_checks(&api, &owned, interval).await;
            let mut tasks = me.tasks();
            if tasks.get(&owned).is_some_and(|(g, _)| *g == generation) {
                tasks.remove(&owned);
            }
        });
        debug!(
            container = id,
            ?interval,
            "podman: running health checks for it"
        );
        tasks.insert(id.to_string(), (generation, handle.abort_handle()));
    }

    pub(super) fn abort_all(&self) {
        for (_, (_, h)) in self.tasks().drain() {
            h.abort();
        }
    }
}

/// Runs the container's health check every `interval` until it stops or is removed
/// (podman answers 409 / 404); podman itself applies start period and retries.
pub(super) async fn run_health_checks(api: &podman_api::Podman, id: &str, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match api.containers().get(id).healthcheck().await {
            Ok(_) => {}
            Err(e) if matches!(status(&e), Some(404 | 409)) => {
                debug!(container = id, error = %e, "podman: health checks end");
                return;
            }
            // Service restarting or similar: try again next interval.
            Err(e) => debug!(container = id, error = %e, "podman: health check failed to run"),
        }
    }
}
