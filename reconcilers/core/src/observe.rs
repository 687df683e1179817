//! Process-wide hooks through which reconcilers report counters (metadata API requests
//! by status) without depending on the binary that exports them as metrics.

use std::sync::{Arc, OnceLock};

/// Receives request counts from the APIs converge serves; the agent installs one.
pub trait RequestObserver: Send + Sync {
    /// One request of `api` (e.g. `metadata`) answered with HTTP `status`.
    fn request(&self, api: &'static str, status: u16);
}

static REQUESTS: OnceLock<Arc<dyn RequestObserver>> = OnceLock::new();

/// Installs the process's request observer; returns false if one is installed already.
pub fn set_request_observer(observer: Arc<dyn RequestObserver>) -> bool {
    REQUESTS.set(observer).is_ok()
}

/// Counts one request (nothing without an observer).
pub fn request(api: &'static str, status: u16) {
    if let Some(o) = REQUESTS.get() {
        o.request(api, status);
    }
}
