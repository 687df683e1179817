//! Prometheus metrics of the agent (`converge agent --metrics-listen ADDR`, off by
//! default), served as OpenMetrics text at `GET /metrics` with `prometheus-client`.
//!
//! Two kinds of series: counted ones the engine and the metadata API feed as things
//! happen (pass durations, failures, drift repairs, metadata requests), and state read
//! at each scrape from the same store `converge status` answers from (generations,
//! per-reconciler state and owned objects, the control-plane connection, the backups
//! record), so the two never disagree.

use crate::control::transport::ControlState;
use crate::engine::PassResult;
use crate::status::{self, ReconcilerStatus, State};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The content type of the answer (OpenMetrics text, which Prometheus scrapes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcilerLabel {
    reconciler: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriftLabels {
    reconciler: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    reconciler: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScheduleLabel {
    schedule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    api: String,
    status: String,
}

type HistogramFamily = Family<ReconcilerLabel, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn pass_histogram() -> Histogram {
    // 1 ms to 65 s, ×4 per bucket.
    Histogram::new(exponential_buckets(0.001, 4.0, 9))
}

/// What a scrape reads from the agent's store (the status as `converge status` shows it).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub accepted: Option<u64>,
    pub statuses: Vec<ReconcilerStatus>,
    pub control: Option<ControlState>,
    /// Per backup schedule, from the backups record.
    pub backups: BTreeMap<String, BackupRuns>,
}

/// What the metrics show of one backup schedule.
#[derive(Debug, Default, PartialEq)]
pub struct BackupRuns {
    pub last_success: Option<chrono::DateTime<chrono::Utc>>,
    pub last_failed: bool,
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    pass_duration: HistogramFamily,
    pass_failures: Family<ReconcilerLabel, Counter>,
    drift_repairs: Family<DriftLabels, Counter>,
    accepted_generation: Gauge,
    converged_generation: Gauge,
    reconciler_state: Family<StateLabels, Gauge>,
    observed_generation: Family<ReconcilerLabel, Gauge>,
    objects_owned: Family<ReconcilerLabel, Gauge>,
    control_connected: Family<TransportLabel, Gauge>,
    backup_last_success: Family<ScheduleLabel, FloatGauge>,
    backup_last_failed: Family<ScheduleLabel, Gauge>,
    requests: Family<RequestLabels, Counter>,
    /// One scrape at a time refreshes and encodes the read-at-scrape series.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("converge");
        let m = Metrics {
            pass_duration: Family::new_with_constructor(pass_histogram),
            pass_failures: Family::default(),
            drift_repairs: Family::default(),
            accepted_generation: Gauge::default(),
            converged_generation: Gauge::default(),
            reconciler_state: Family::default(),
            observed_generation: Family::default(),
            objects_owned: Family::default(),
            control_connected: Family::default(),
            backup_last_success: Family::default(),
            backup_last_failed: Family::default(),
            requests: Family::default(),
            registry: Registry::default(),
            scrape: Mutex::new(()),
        };
        registry.register_with_unit(
            "pass_duration",
            "Duration of reconcile passes (observe, plan, apply)",
            prometheus_client::registry::Unit::Seconds,
            m.pass_duration.clone(),
        );
        registry.register(
            "pass_failures",
            "Passes that failed, or in which objects failed",
            m.pass_failures.clone(),
        );
        registry.register(
            "drift_repairs",
            "Changes applied by passes a resync or a host event started (the host had drifted) and the retries that finish them, by object kind",
            m.drift_repairs.clone(),
        );
        registry.register(
            "accepted_generation",
            "Generation of the document in force",
            m.accepted_generation.clone(),
        );
        registry.register(
            "converged_generation",
            "Lowest generation every managed reconciler's last pass worked from",
            m.converged_generation.clone(),
        );
        registry.register(
            "reconciler_state",
            "1 for each reconciler's current state (Pending, Converged, Progressing, Degraded, Unmanaged)",
            m.reconciler_state.clone(),
        );
        registry.register(
            "reconciler_observed_generation",
            "Generation each reconciler's last pass worked from",
            m.observed_generation.clone(),
        );
        registry.register(
            "objects_owned",
            "Objects each reconciler owns on the host, as its last pass observed",
            m.objects_owned.clone(),
        );
        registry.register(
            "control_connected",
            "1 while connected to the control plane, by transport",
            m.control_connected.clone(),
        );
        registry.register_with_unit(
            "backup_last_success_timestamp",
            "When the last successful backup of each schedule ended (Unix time)",
            prometheus_client::registry::Unit::Seconds,
            m.backup_last_success.clone(),
        );
        registry.register(
            "backup_last_run_failed",
            "1 when the last run of a backup schedule failed (a missing source, a borg error)",
            m.backup_last_failed.clone(),
        );
        registry.register(
            "api_requests",
            "Requests to the APIs the agent serves (metadata), by HTTP status",
            m.requests.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts one finished pass of `reconciler`; `drift`: the pass repairs drift (see
    /// `engine::repairs_drift`), so what it applied counts as drift repairs.
    pub fn pass(&self, reconciler: &str, took: Duration, drift: bool, result: &PassResult) {
        let label = ReconcilerLabel {
            reconciler: reconciler.to_string(),
        };
        self.pass_duration
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        let failed = match result {
            PassResult::Failed { .. } => true,
            PassResult::Ran { outcomes, .. } => outcomes.iter().any(|o| o.error.is_some()),
            PassResult::Unmanaged => false,
        };
        if failed {
            self.pass_failures.get_or_create(&label).inc();
        }
        if let (
            true,
            PassResult::Ran {
                changes, outcomes, ..
            },
        ) = (drift, result)
        {
            // Applied (not a dry run): outcomes exist; count the changes that did not fail.
            if outcomes.is_empty() {
                return;
            }
            for c in changes {
                let object = format!("{} {}", c.kind, c.id);
                if outcomes
                    .iter()
                    .any(|o| o.error.is_some() && o.object == object)
                {
                    continue;
                }
                self.drift_repairs
                    .get_or_create(&DriftLabels {
                        reconciler: reconciler.to_string(),
                        kind: c.kind.to_string(),
                    })
                    .inc();
            }
        }
    }

    /// Renders every series, the read-at-scrape ones from `snap`.
    pub fn render(&self, snap: &Snapshot) -> Result<String, std::fmt::Error> {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let g = |v: Option<u64>| v.and_then(|g| i64::try_from(g).ok()).unwrap_or(0);
        self.accepted_generation.set(g(snap.accepted));
        self.converged_generation
            .set(g(status::converged_generation(
                snap.accepted,
                &snap.statuses,
            )));
        self.reconciler_state.clear();
        self.observed_generation.clear();
        self.objects_owned.clear();
        for s in &snap.statuses {
            for state in [
                State::Pending,
                State::Converged,
                State::Progressing,
                State::Degraded,
                State::Unmanaged,
            ] {
                self.reconciler_state
                    .get_or_create(&StateLabels {
                        reconciler: s.reconciler.clone(),
                        state: format!("{state:?}"),
                    })
                    .set(i64::from(s.state == state));
            }
            let label = ReconcilerLabel {
                reconciler: s.reconciler.clone(),
            };
            self.observed_generation
                .get_or_create(&label)
                .set(g(s.observed_generation));
            if let Some(n) = s.owned {
                self.objects_owned
                    .get_or_create(&label)
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        self.control_connected.clear();
        if let Some(c) = &snap.control {
            self.control_connected
                .get_or_create(&TransportLabel {
                    transport: c.transport.clone(),
                })
                .set(i64::from(c.connected));
        }
        self.backup_last_success.clear();
        self.backup_last_failed.clear();
        for (schedule, runs) in &snap.backups {
            let label = ScheduleLabel {
                schedule: schedule.clone(),
            };
            if let Some(at) = runs.last_success {
                self.backup_last_success
                    .get_or_create(&label)
                    .set(at.timestamp_millis() as f64 / 1000.0);
            }
            self.backup_last_failed
                .get_or_create(&label)
                .set(i64::from(runs.last_failed));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl converge_core::observe::RequestObserver for Metrics {
    fn request(&self, api: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                api: api.to_string(),
                status: status.to_string(),
            })
            .inc();
    }
}

/// Each schedule's last success and whether its last run failed, from the backups record
/// (`<data-dir>/backups/`).
pub fn backups_record(data_dir: &std::path::Path) -> BTreeMap<String, BackupRuns> {
    use converge_backups::plan::RunStatus;
    let file = converge_backups::driver::state::StateFile::new(&data_dir.join("backups"));
    match file.read() {
        Ok(state) => state
            .schedules
            .into_iter()
            .map(|(name, s)| {
                let runs = BackupRuns {
                    last_success: s.last_success,
                    last_failed: s.last.is_some_and(|l| l.status == RunStatus::Failed),
                };
                (name, runs)
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "metrics: no backups record");
            BTreeMap::new()
        }
    }
}

/// Serves `GET /metrics` on `addr` until the process ends; `snapshot` reads the state
/// at each scrape. Binding happens before this returns, so a bad address fails the
/// agent's start.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    snapshot: Arc<dyn Fn() -> Snapshot + Send + Sync>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let (metrics, snapshot) = (metrics.clone(), snapshot.clone());
            async move {
                let rendered = tokio::task::spawn_blocking(move || metrics.render(&snapshot()))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                match rendered {
                    Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics: cannot render");
                        (StatusCode::INTERNAL_SERVER_ERROR, e).into_response()
                    }
                }
            }
        }),
    );
    tracing::info!(%addr, "metrics listening");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use converge_core::{Change, ObjectOutcome, Op};

    fn ran(changes: Vec<Change>, outcomes: Vec<ObjectOutcome>) -> PassResult {
        PassResult::Ran {
            changes,
            waiting: vec![],
            outcomes,
            facts: None,
            notes: vec![],
            requeue_after: None,
            owned: Some(2),
        }
    }

    #[test]
    fn passes_drift_and_state_are_rendered() {
        let m = Metrics::new();
        let change = Change::new(Op::Create, "record", "web.internal A");
        let applied = || vec![ObjectOutcome::ok("record web.internal A")];
        m.pass(
            "dns",
            Duration::from_millis(3),
            false,
            &ran(vec![change.clone()], applied()),
        );
        m.pass(
            "dns",
            Duration::from_millis(3),
            true,
            &ran(vec![change], applied()),
        );
        m.pass(
            "firewall",
            Duration::from_millis(1),
            true,
            &PassResult::Failed {
                error: "x".into(),
                transient: false,
            },
        );
        converge_core::observe::RequestObserver::request(&m, "metadata", 200);
        let mut dns = ReconcilerStatus::pending("dns");
        dns.state = State::Converged;
        dns.observed_generation = Some(4);
        dns.owned = Some(2);
        let snap = Snapshot {
            accepted: Some(4),
            statuses: vec![dns, ReconcilerStatus::pending("firewall")],
            control: None,
            backups: BTreeMap::from([(
                "etc".to_string(),
                BackupRuns {
                    last_success: chrono::DateTime::from_timestamp(1_700_000_000, 0),
                    last_failed: true,
                },
            )]),
        };
        let text = m.render(&snap).expect("render");
        for want in [
            "converge_accepted_generation 4",
            "converge_pass_duration_seconds_count{reconciler=\"dns\"} 2",
            "converge_pass_failures_total{reconciler=\"firewall\"} 1",
            "converge_drift_repairs_total{reconciler=\"dns\",kind=\"record\"} 1",
            "converge_reconciler_state{reconciler=\"dns\",state=\"Converged\"} 1",
            "converge_reconciler_state{reconciler=\"firewall\",state=\"Pending\"} 1",
            "converge_objects_owned{reconciler=\"dns\"} 2",
            "converge_backup_last_success_timestamp_seconds{schedule=\"etc\"} 1700000000",
            "converge_backup_last_run_failed{schedule=\"etc\"} 1",
            "converge_api_requests_total{api=\"metadata\",status=\"200\"} 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // A pending reconciler has no generation: nothing is converged yet.
        assert!(text.contains("converge_converged_generation 0"), "{text}");
    }

    #[test]
    fn last_backup_success_comes_from_the_backups_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(backups_record(dir.path()).is_empty(), "no record yet");
        std::fs::create_dir_all(dir.path().join("backups")).expect("mkdir");
        std::fs::write(
            dir.path().join("backups/state.json"),
            r#"{"schedules": {
                "etc": {"since": "2026-01-01T00:00:00Z", "lastSuccess": "2026-01-02T03:04:05Z"},
                "db": {"since": "2026-01-01T00:00:00Z", "last": {"status": "failed",
                       "started": "2026-01-02T00:00:00Z", "message": "source /x does not exist"}}
            }}"#,
        )
        .expect("write");
        let got = backups_record(dir.path());
        assert_eq!(got.len(), 2, "{got:?}");
        let etc = got["etc"].last_success.expect("etc succeeded");
        assert_eq!(etc.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        assert!(!got["etc"].last_failed);
        assert_eq!(got["db"].last_success, None);
        assert!(got["db"].last_failed);
    }
}
