//! The node's control-plane client, independent of the transport: receives envelopes and
//! hands them to the agent's accept path, reports refusals, sends status on change
//! (coalesced) and every heartbeat, and records whether it is connected.

use super::protocol::{NodeMessage, StatusMessage};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{info, warn};

/// What a transport reports to the client loop.
#[derive(Debug)]
pub enum Event {
    /// Connected and watching for documents.
    Connected,
    /// Lost the connection; the transport reconnects by itself.
    Disconnected(String),
    /// An envelope (JSON bytes), not yet verified. A transport that polls from a cursor
    /// (HTTPS) passes a reply channel and waits: the client answers with the generation
    /// the cursor may move to once the envelope verified (or the node is past it), or
    /// `None` when it did not verify — an unauthenticated envelope never moves it.
    Envelope(Vec<u8>, Option<oneshot::Sender<Option<u64>>>),
    /// A dry-run request (JSON bytes, not yet verified): the node plans the candidate
    /// and answers with a `planned` message; nothing is applied.
    DryRun(Vec<u8>),
}

/// Transport failures.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("not connected: {0}")]
    Disconnected(String),
    #[error("{0}")]
    Failed(String),
}

/// One way of talking to the control plane (NATS JetStream, HTTPS).
pub trait Transport: Clone + Send + Sync + 'static {
    /// Starts receiving documents newer than `after` in the background, reconnecting
    /// with jittered backoff; events go to `events` until it closes.
    fn start(&self, events: mpsc::Sender<Event>, after: u64);
    /// Sends one message (status or refusal) to the control plane.
    fn send(&self, msg: &NodeMessage) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// What it connects to, for status (no credentials).
    fn describe(&self) -> String;
}

/// The outcome of an envelope at the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    Accepted(u64),
    /// The very document already applied (e.g. re-delivered after a reconnect).
    AlreadyApplied,
    Refused {
        generation: Option<u64>,
        error: String,
        /// The envelope verified (signed by the pinned key, for this node): the refusal
        /// is about its document.
        verified: bool,
    },
}

/// The connection state shown by `converge status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlState {
    pub transport: String,
    pub connected: bool,
    pub since: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The agent side the client drives.
pub trait Node: Send + Sync + 'static {
    fn accept_envelope(&self, bytes: &[u8]) -> Accepted;
    fn status(&self) -> StatusMessage;
    fn applied(&self) -> Option<u64>;
    fn set_control_state(&self, state: &ControlState);
    /// Notified whenever a reconciler's status is saved.
    fn status_changed(&self) -> Arc<Notify>;
    /// Verifies a dry-run request and plans its document against the host without
    /// changing anything; `None` when there is nothing to answer (unparseable).
    fn dry_run(
        &self,
        bytes: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<super::dryrun::PlanAnswer>> + Send>>;
}

/// Jittered exponential backoff: 250 ms doubling to 15 s, times a random factor in
/// [0.5, 1] so that a fleet does not reconnect in lock-step after a server restart.
pub fn backoff(attempt: usize) -> Duration {
    backoff_capped(attempt, Duration::from_secs(15))
}

/// [`backoff`] capped at `max`: the control plane, one client, retries within 2 s so
/// it never lags its nodes long after a NATS restart.
pub fn backoff_capped(attempt: usize, max: Duration) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1u32 << attempt.min(6));
    base.min(max).mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// Status changes within this window go out as one message.
const COALESCE: Duration = Duration::from_millis(200);

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Runs the client until the transport's event channel closes (never, in the agent).
pub async fn run_client<T: Transport>(transport: T, node: Arc<dyn Node>, heartbeat: Duration) {
    let (tx, mut rx) = mpsc::channel(16);
    transport.start(tx, node.applied().unwrap_or(0));
    let mut state = ControlState {
        transport: transport.describe(),
        connected: false,
        since: now(),
        error: Some("connecting".into()),
    };
    node.set_control_state(&state);
    let changed = node.status_changed();
    // One dry run at a time: each observes the whole host; more wait their turn.
    let planning = Arc::new(tokio::sync::Semaphore::new(1));
    // Dry-run requests waiting or being planned, by request id: the plane sends a request
    // again to a node that has not answered yet, and a repeat of one under way is dropped.
    let in_flight: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
    let mut tick = tokio::time::interval(heartbeat.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due: Option<tokio::time::Instant> = None;
    // Status messages not delivered in a row.
    let mut failures = 0usize;
    loop {
        let send_now = tokio::select! {
            ev = rx.recv() => match ev {
                None => break,
                Some(Event::Connected) => {
                    info!(transport = %state.transport, "connected to the control plane");
                    state = ControlState { connected: true, since: now(), error: None, ..state };
                    node.set_control_state(&state);
                    // At least once per (re)connection: the control plane learns where we are.
                    true
                }
                Some(Event::Disconnected(why)) => {
                    if state.connected {
                        warn!(error = %why, "disconnected from the control plane; the last good document stays in force");
                        state = ControlState { connected: false, since: now(), error: Some(why), ..state };
                    } else {
                        state.error = Some(why);
                    }
                    node.set_control_state(&state);
                    false
                }
                Some(Event::Envelope(bytes, reply)) => {
                    let outcome = node.accept_envelope(&bytes);
                    let past = match &outcome {
                        Accepted::Accepted(g) => Some(*g),
                        Accepted::Refused { generation, verified: true, .. } => *generation,
                        Accepted::AlreadyApplied | Accepted::Refused { .. } => None,
                    };
                    if let Some(reply) = reply {
                        // The node is past what it applied in any case.
                        let _ = reply.send(past.max(node.applied()));
                    }
                    match outcome {
                        Accepted::Accepted(g) => info!(generation = g, "accepted a document from the control plane"),
                        Accepted::AlreadyApplied => {}
                        Accepted::Refused { generation, error, .. } => {
                            warn!(?generation, %error, "refused a document from the control plane; nothing changed");
                            let msg = NodeMessage::Refused {
                                node_id: node.status().node_id,
                                sent_at: now(),
                                generation,
                                error,
                            };
                            if let Err(e) = transport.send(&msg).await {
                                warn!(error = %e, "cannot report the refusal");
                            }
                        }
                    }
                    true
                }
                Some(Event::DryRun(bytes)) => {
                    let id = crate::control::dryrun::request_id_of(&bytes);
                    let repeat = id.as_ref().is_some_and(|id| {
                        !in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone())
                    });
                    if !repeat {
                        // Planned off the loop: envelopes and status go on meanwhile.
                        let (node, transport, planning, in_flight) =
                            (node.clone(), transport.clone(), planning.clone(), in_flight.clone());
                        tokio::spawn(async move {
                            if let Ok(_turn) = planning.acquire_owned().await {
                                if let Some(answer) = node.dry_run(bytes).await {
                                    info!(request = %answer.request_id, outcome = ?answer.outcome, "answered a dry run");
                                    if let Err(e) = transport.send(&NodeMessage::Planned(Box::new(answer))).await {
                                        warn!(error = %e, "cannot send the dry-run answer");
                                    }
                                }
                            }
                            if let Some(id) = id {
                                in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                            }
                        });
                    }
                    false
                }
            },
            _ = changed.notified() => {
                due.get_or_insert_with(|| tokio::time::Instant::now() + COALESCE);
                false
            }
            _ = async { match due { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => true,
            _ = tick.tick() => true,
        };
        if send_now {
            due = None;
            let msg = NodeMessage::Status(Box::new(node.status()));
            match transport.send(&msg).await {
                Ok(()) if failures > 0 => {
                    info!(
                        after = failures,
                        "status delivered to the control plane again"
                    );
                    failures = 0;
                    if state.connected {
                        state.error = None;
                        node.set_control_state(&state);
                    }
                }
                Ok(()) => {}
                Err(e) => {
                    // At least once: the newest status goes out again after a backoff,
                    // not only at the next heartbeat. Reported once per streak.
                    if failures == 0 {
                        warn!(error = %e, "status not delivered to the control plane; retrying");
                    }
                    if state.connected && state.error.is_none() {
                        state.error = Some(format!("status not delivered: {e}"));
                        node.set_control_state(&state);
                    }
                    failures += 1;
                    due = Some(tokio::time::Instant::now() + backoff(failures));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::Facts;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Refuses the first `fail` sends; records when each send was tried.
    #[derive(Clone)]
    struct Flaky {
        fail: Arc<AtomicUsize>,
        tries: Arc<Mutex<Vec<tokio::time::Instant>>>,
        delivered: Arc<AtomicUsize>,
        events: Arc<Mutex<Option<mpsc::Sender<Event>>>>,
    }

    impl Transport for Flaky {
        fn start(&self, events: mpsc::Sender<Event>, _after: u64) {
            *self.events.lock().unwrap() = Some(events);
        }
        async fn send(&self, _msg: &NodeMessage) -> Result<(), TransportError> {
            self.tries.lock().unwrap().push(tokio::time::Instant::now());
            if self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(TransportError::Disconnected("connection timed out".into()));
            }
            self.delivered.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    #[derive(Default)]
    struct Quiet {
        states: Mutex<Vec<ControlState>>,
        changed: Arc<Notify>,
        /// Dry runs begun; each takes 5 s.
        plans: Arc<AtomicUsize>,
    }

    impl Node for Quiet {
        fn accept_envelope(&self, _bytes: &[u8]) -> Accepted {
            Accepted::AlreadyApplied
        }
        fn status(&self) -> StatusMessage {
            StatusMessage {
                node_id: "n".into(),
                sent_at: now(),
                accepted_generation: Some(1),
                reconcilers: Vec::new(),
                facts: Facts::default(),
                heartbeat_secs: 60,
            }
        }
        fn applied(&self) -> Option<u64> {
            Some(1)
        }
        fn set_control_state(&self, state: &ControlState) {
            self.states.lock().unwrap().push(state.clone());
        }
        fn status_changed(&self) -> Arc<Notify> {
            self.changed.clone()
        }
        fn dry_run(
            &self,
            _bytes: Vec<u8>,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Option<crate::control::dryrun::PlanAnswer>> + Send>,
        > {
            let plans = self.plans.clone();
            Box::pin(async move {
                plans.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(5)).await;
                None
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_dry_run_request_is_planned_once_while_under_way() {
        let t = Flaky {
            fail: Arc::default(),
            tries: Arc::default(),
            delivered: Arc::default(),
            events: Arc::default(),
        };
        let node = Arc::new(Quiet::default());
        tokio::spawn(run_client(t.clone(), node.clone(), Duration::from_secs(60)));
        tokio::task::yield_now().await;
        let tx = t.events.lock().unwrap().clone().expect("started");
        let request = |id: &str| Event::DryRun(format!(r#"{{"requestId":"{id}"}}"#).into_bytes());
        for _ in 0..3 {
            tx.send(request("r1")).await.expect("client running");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tx.send(request("r2")).await.expect("client running");
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(node.plans.load(Ordering::SeqCst), 2, "r1 once, r2 once");
        // Once answered, a repeat is planned again: the answer may have been lost.
        tx.send(request("r1")).await.expect("client running");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(node.plans.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn undelivered_status_is_retried_before_the_heartbeat_and_shown() {
        let t = Flaky {
            fail: Arc::new(AtomicUsize::new(3)),
            tries: Arc::default(),
            delivered: Arc::default(),
            events: Arc::default(),
        };
        let node = Arc::new(Quiet::default());
        let start = tokio::time::Instant::now();
        tokio::spawn(run_client(t.clone(), node.clone(), Duration::from_secs(60)));
        tokio::task::yield_now().await;
        let tx = t.events.lock().unwrap().clone().expect("started");
        tx.send(Event::Connected).await.expect("client running");
        // Three failures with backoff (at most 0.5 + 1 + 2 s), then delivered: well
        // before the 60 s heartbeat.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(t.delivered.load(Ordering::SeqCst), 1);
        let tries = t.tries.lock().unwrap().clone();
        assert_eq!(tries.len(), 4, "3 failures, then 1 delivery");
        assert!(tries[3] - start < Duration::from_secs(5));
        let states = node.states.lock().unwrap().clone();
        let errors: Vec<Option<String>> = states.iter().map(|s| s.error.clone()).collect();
        assert!(
            errors.contains(&Some(
                "status not delivered: not connected: connection timed out".into()
            )),
            "{errors:?}"
        );
        assert_eq!(
            states.last().and_then(|s| s.error.clone()),
            None,
            "cleared once delivered"
        );
    }
}
