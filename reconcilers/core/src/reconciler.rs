//! The `Reconciler` trait: observe (I/O) → plan (pure) → apply (I/O through a driver).

use crate::{Facts, FactsUpdate, ObjectNote, ObjectOutcome, Plan, Retry};
use futures::stream::BoxStream;
use std::future::Future;
use std::time::Duration;

/// Failure talking to the host (a driver), as opposed to a problem with one object.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{op} timed out after {after:?}")]
    Timeout { op: String, after: Duration },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
    /// Expected to clear by itself within moments (a concurrent change raced ours, a
    /// daemon restarting): retried soon, not reported as Degraded.
    #[error("{0}")]
    Transient(String),
    /// This object must wait before it is tried again (crash-loop back-off).
    #[error("{message}")]
    RetryAfter { message: String, after: Duration },
}

impl DriverError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        DriverError::Io {
            context: context.into(),
            source,
        }
    }

    /// How the engine retries what failed with this error.
    pub fn retry(&self) -> Retry {
        match self {
            DriverError::Transient(_) => Retry::Soon,
            DriverError::RetryAfter { after, .. } => Retry::After(*after),
            DriverError::Timeout { .. } | DriverError::Io { .. } | DriverError::Failed(_) => {
                Retry::Backoff
            }
        }
    }
}

/// A host event that should trigger a pass, naming what changed (for the pass's
/// reason in logs and status), e.g. `container web died`, `table inet converge`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostEvent(pub String);

/// Runs `fut` with a deadline, naming the operation in the timeout error.
pub async fn with_timeout<T>(
    op: &str,
    after: Duration,
    fut: impl Future<Output = Result<T, DriverError>>,
) -> Result<T, DriverError> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r,
        Err(_) => Err(DriverError::Timeout {
            op: op.to_string(),
            after,
        }),
    }
}

/// Runs blocking host work (netlink, files) on tokio's blocking threads; `what` names it
/// if the thread fails.
pub async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, DriverError> + Send + 'static,
) -> Result<T, DriverError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DriverError::Failed(format!("{what}: {e}")))?
}

/// One reconciler: owns one section of the document and the host objects it created.
///
/// Implementations must keep `plan` pure (no I/O, no clock, no writes to `self`,
/// deterministic order) and return an empty plan when `observed` already matches
/// `spec`; `apply` performs exactly the plan's actions, continues past a failing action,
/// and reports one outcome per action, classed by how it should be retried. A pass says
/// when it wants to run again through `Plan::requeue_after` and `Plan::waiting`.
pub trait Reconciler: Send + Sync + 'static {
    /// The reconciler's section of the document.
    type Spec: Send + Sync + 'static;
    /// What `observe` read from the host.
    type Observed: Send + Sync + 'static;
    /// One driver operation.
    type Action: Send + Sync + 'static;

    fn name(&self) -> &'static str;

    /// Whether a change in the shared [`Facts`] should trigger a pass.
    fn watches_facts(&self) -> bool {
        false
    }

    /// Reads the real host state relevant to `spec` (never only a cache). An error
    /// fails the whole pass; `DriverError::Transient` retries soon without Degraded.
    fn observe(
        &self,
        spec: &Self::Spec,
    ) -> impl Future<Output = Result<Self::Observed, DriverError>> + Send;

    /// Pure diff of desired against observed (what `converge diff` prints).
    fn plan(
        &self,
        spec: &Self::Spec,
        observed: &Self::Observed,
        facts: &Facts,
    ) -> Plan<Self::Action>;

    /// Performs the plan's actions through the driver.
    fn apply(&self, plan: Plan<Self::Action>) -> impl Future<Output = Vec<ObjectOutcome>> + Send;

    /// Facts this reconciler publishes for others, taken from what it observed.
    fn publish(&self, _observed: &Self::Observed) -> Option<FactsUpdate> {
        None
    }

    /// Per-object notes for the status (restarts, health), from what was observed.
    fn notes(&self, _observed: &Self::Observed) -> Vec<ObjectNote> {
        Vec::new()
    }

    /// How many objects this reconciler owns on the host, as observed (containers and
    /// networks, peers, table elements, records, projects, schedules, routes), for the
    /// status and the metrics; `None` when it does not count them.
    fn owned(&self, _observed: &Self::Observed) -> Option<u64> {
        None
    }

    /// Host events that should trigger a pass (runtime events, netlink, inotify).
    fn host_events(&self) -> Option<BoxStream<'static, HostEvent>> {
        None
    }
}
