//! systemd service notifications (`Type=notify`): READY=1 once the store is open, the
//! socket listens and every reconciler finished its first pass; STATUS= a one-line
//! summary, updated as statuses change; WATCHDOG=1 only while the engine's workers beat
//! (see [`crate::engine::Heartbeat`]). Without `NOTIFY_SOCKET` (not started by systemd)
//! every call does nothing.

use crate::engine::Heartbeat;
use crate::status::{ReconcilerStatus, State};
use sd_notify::NotifyState;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// Sends notifications to the service manager, if one listens.
#[derive(Debug, Default)]
pub struct Notifier {
    /// The last STATUS= sent (sent again only when it changes).
    last_status: Mutex<String>,
}

impl Notifier {
    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            warn!(error = %e, "cannot notify systemd");
        }
    }

    /// READY=1 with the status line.
    pub fn ready(&self, status: &str) {
        info!(status, "ready: every reconciler finished its first pass");
        self.remember(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// STATUS=, when it differs from the last one sent.
    pub fn status(&self, status: &str) {
        if self.remember(status) {
            self.send(&[NotifyState::Status(status)]);
        }
    }

    fn remember(&self, status: &str) -> bool {
        let mut last = match self.last_status.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if *last == status {
            return false;
        }
        status.clone_into(&mut last);
        true
    }

    /// STOPPING=1, at shutdown.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }
}

/// The one-line summary systemd shows (`systemctl status`): the generation in force and
/// how many reconcilers are in each state, naming those that are not fine.
pub fn summary(generation: Option<u64>, statuses: &[ReconcilerStatus]) -> String {
    let Some(g) = generation else {
        return "no document yet: waiting for one (converge push, or the control plane)".into();
    };
    let count = |state| statuses.iter().filter(|s| s.state == state).count();
    let names = |state| {
        statuses
            .iter()
            .filter(|s| s.state == state)
            .map(|s| s.reconciler.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut parts = vec![format!("{} converged", count(State::Converged))];
    for (state, label) in [
        (State::Degraded, "degraded"),
        (State::Progressing, "progressing"),
        (State::Pending, "pending"),
    ] {
        if count(state) > 0 {
            parts.push(format!("{} {label} ({})", count(state), names(state)));
        }
    }
    if count(State::Unmanaged) > 0 {
        parts.push(format!("{} unmanaged", count(State::Unmanaged)));
    }
    format!("generation {g}: {}", parts.join(", "))
}

/// Feeds systemd's watchdog (when `WatchdogSec=` is set) for as long as the engine beats:
/// every third of the watchdog period, WATCHDOG=1 if no worker has been silent for more
/// than two thirds of it. Runs until the process ends.
pub async fn watchdog(notifier: Arc<Notifier>, heartbeat: Arc<Heartbeat>) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (period / 3).max(Duration::from_millis(100));
    let silence = period * 2 / 3;
    info!(
        ?period,
        "feeding the systemd watchdog from the engine's heartbeat"
    );
    let mut warned = false;
    loop {
        tokio::time::sleep(every).await;
        let stalest = heartbeat.stalest();
        if stalest <= silence {
            notifier.send(&[NotifyState::Watchdog]);
            warned = false;
        } else if !warned {
            // The watchdog then fires: systemd kills and restarts the agent.
            warn!(silent_for = ?stalest, "an engine worker stopped beating: not feeding the watchdog");
            warned = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, state: State) -> ReconcilerStatus {
        ReconcilerStatus {
            state,
            ..ReconcilerStatus::pending(name)
        }
    }

    #[test]
    fn summary_names_what_is_not_fine() {
        assert!(summary(None, &[]).starts_with("no document yet"));
        let s = [
            status("dns", State::Converged),
            status("firewall", State::Degraded),
            status("routes", State::Unmanaged),
            status("wireguard", State::Converged),
        ];
        assert_eq!(
            summary(Some(4), &s),
            "generation 4: 2 converged, 1 degraded (firewall), 1 unmanaged"
        );
    }
}
