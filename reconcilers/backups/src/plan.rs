//! The pure plan: which repositories to initialise, which schedule slot to run or skip,
//! which restores and exports to start. "Now" and the agent's start time come in
//! through `Observed` (no clock here), so tests run compressed time.
//!
//! Exactly once: the durable `State` (see `driver/state.rs`) records, per schedule, the
//! last slot decided and the slot started but not finished; per restore/export id, that
//! it started and how it ended. A slot or id recorded is never planned again, except a
//! backup slot whose run was killed (started, not finished, not running now): that slot
//! is retried (at most `MAX_ATTEMPTS` times), and the archive name, fixed by the slot,
//! makes the retry idempotent (an archive that already exists is not created again).

use crate::cron::Cron;
use crate::spec::{
    BackupRepository, BackupsSpec, Export, Missed, RepositoryKind, Restore, Schedule,
};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use converge_core::{Change, Facts, FieldChange, Op, Plan, Waiting};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How many times a slot whose run was killed is tried again before it is recorded failed.
pub const MAX_ATTEMPTS: u32 = 3;

/// How often a pass looks at a running operation (its progress in the status notes);
/// the end of a run triggers a pass by itself.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The archive name of slot `slot` of schedule `schedule`.
pub fn archive_name(schedule: &str, slot: DateTime<Utc>) -> String {
    format!("{schedule}-{}", slot.format("%Y%m%dT%H%MZ"))
}

/// The durable record of what ran (`<data-dir>/backups/state.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    #[serde(default)]
    pub schedules: BTreeMap<String, ScheduleState>,
    #[serde(default)]
    pub restores: BTreeMap<String, RunRecord>,
    #[serde(default)]
    pub exports: BTreeMap<String, RunRecord>,
    /// Repositories converge initialised (remote ones cannot be looked at cheaply).
    #[serde(default)]
    pub initialised: BTreeSet<String>,
}

/// One schedule's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleState {
    /// When converge first saw the schedule: earlier slots are not owed.
    pub since: DateTime<Utc>,
    /// The latest slot decided (run, failed or skipped): never run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_slot: Option<DateTime<Utc>>,
    /// A slot started and not recorded finished (the agent was killed meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<Started>,
    /// How the last run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<RunRecord>,
    /// When the last successful run ended (the metrics' last backup success time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<DateTime<Utc>>,
}

/// A slot under way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    pub slot: DateTime<Utc>,
    pub at: DateTime<Utc>,
    pub attempt: u32,
}

/// How a run (backup, restore, export) went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    pub status: RunStatus,
    /// When it started.
    pub started: DateTime<Utc>,
    /// When it ended (absent while running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<DateTime<Utc>>,
    /// What happened, e.g. `archive etc-20261201T0230Z: 1,204 files, 52.1 MB` or the error.
    #[serde(default)]
    pub message: String,
    /// Exports: the presigned URL and when it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// State of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Started,
    Done,
    Failed,
    Skipped,
}

/// One repository as observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepoObserved {
    /// A borg repository exists at its location (or converge initialised it).
    pub initialised: bool,
    /// A borg process converge did not start (e.g. one left by a killed agent) uses it.
    pub foreign_borg: Option<ForeignBorg>,
    /// Why converge will not initialise it (a local path holding something else).
    pub unusable: Option<String>,
}

/// A borg process on this host that this agent did not start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignBorg {
    pub pid: u32,
    /// The archive it names (`REPO::ARCHIVE`), if any.
    pub archive: Option<String>,
}

/// A failed `borg init`, retried on its own delay (doubling from
/// [`INIT_RETRY`] up to [`INIT_RETRY_MAX`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitFailure {
    pub message: String,
    pub at: DateTime<Utc>,
    pub attempts: u32,
}

/// First delay before `borg init` is tried again after a failure.
pub const INIT_RETRY: Duration = Duration::from_secs(30);
/// Longest delay between two tries of `borg init`.
pub const INIT_RETRY_MAX: Duration = Duration::from_secs(30 * 60);
/// How often a repository converge will not use is looked at again.
pub const RECHECK: Duration = Duration::from_secs(60);

impl InitFailure {
    /// The delay after this failure before the next try.
    pub fn delay(&self) -> Duration {
        let doubling = 2u32.saturating_pow(self.attempts.saturating_sub(1).min(16));
        INIT_RETRY.saturating_mul(doubling).min(INIT_RETRY_MAX)
    }
}

/// A run in progress in this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    pub repository: String,
    /// Progress for the status, e.g. `1.2 GB, 3,400 files, 85 MB/s`.
    pub progress: String,
}

/// What `observe` read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The current time (the driver's clock; tests compress it).
    pub now: DateTime<Utc>,
    /// When this agent started: a slot before it was missed while the agent was down.
    pub agent_start: DateTime<Utc>,
    pub state: State,
    /// Borg repositories by name.
    pub repositories: BTreeMap<String, RepoObserved>,
    /// Runs in progress in this process, keyed by object (`schedule etc`, `restore r1`).
    pub running: BTreeMap<String, Running>,
    /// Failed `borg init`s, by repository.
    pub init_failures: BTreeMap<String, InitFailure>,
    /// Restores with a journal (see `driver/restore.rs`): cut short unless running.
    pub journaled_restores: Vec<String>,
}

/// A backup run to start.
#[derive(Clone, Debug, PartialEq)]
pub struct BackupRun {
    pub schedule: Schedule,
    pub repository: BackupRepository,
    pub slot: DateTime<Utc>,
    pub archive: String,
    pub attempt: u32,
}

/// One driver operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// `borg init` (quick; done in the pass).
    Init(BackupRepository),
    /// Records when a schedule was first seen.
    Baseline {
        schedule: String,
        since: DateTime<Utc>,
    },
    /// Starts a backup in the background; recorded started before it starts.
    Backup(BackupRun),
    /// Records a slot as decided without running it (missed, `skip`; or killed too often).
    Skip {
        schedule: String,
        slot: DateTime<Utc>,
        why: String,
    },
    /// Starts a restore in the background; recorded started before it starts.
    Restore(Restore, BackupRepository),
    /// Starts an export in the background; recorded started before it starts.
    Export(Export, BackupRepository),
    /// Records a restore or export whose run was killed as failed (never run twice).
    Interrupted { kind: &'static str, id: String },
    /// Finishes or undoes a restore cut short (its staging directories, see
    /// `driver/restore.rs`).
    CleanRestore(String),
}

fn tz_of(s: &Schedule) -> Tz {
    s.time_zone
        .as_deref()
        .and_then(|t| t.parse().ok())
        .unwrap_or(Tz::UTC)
}

/// Object key of a run in `Observed::running`.
pub fn key(kind: &str, id: &str) -> String {
    format!("{kind} {id}")
}

fn until(now: DateTime<Utc>, at: DateTime<Utc>) -> Duration {
    // A wake-up a little after the slot, so the pass then sees it due.
    (at - now).to_std().unwrap_or_default() + Duration::from_millis(20)
}

/// The plan. Order: repository initialisations, then per schedule (document order),
/// then restores, then exports; at most one operation per repository starts in a
/// pass, and none on a repository busy with another.
pub fn plan(spec: &BackupsSpec, observed: &Observed, _facts: &Facts) -> Plan<Action> {
    let mut p = Plan::default();
    let now = observed.now;
    let repo = |name: &str| spec.repositories.iter().find(|r| r.name == name);
    // Repositories busy with a run, or claimed by an action of this plan.
    let mut busy: BTreeMap<String, String> = observed
        .running
        .iter()
        .map(|(k, r)| (r.repository.clone(), format!("busy with {k}")))
        .collect();
    for (name, o) in &observed.repositories {
        if let Some(b) = &o.foreign_borg {
            busy.entry(name.clone()).or_insert_with(|| foreign(b));
        }
    }
    for r in &spec.repositories {
        if r.kind != RepositoryKind::Borg {
            p.waiting.push(Waiting::new(
                "repository",
                &r.name,
                "s3 repositories are not borg repositories: nothing to do (not supported yet)",
            ));
            continue;
        }
        let o = observed
            .repositories
            .get(&r.name)
            .cloned()
            .unwrap_or_default();
        if let Some(why) = &o.unusable {
            p.waiting.push(
                Waiting::new("repository", &r.name, why)
                    .retry_after(RECHECK)
                    .failed(),
            );
            busy.insert(r.name.clone(), "cannot be used (see the repository)".into());
            continue;
        }
        let failed_init = observed
            .init_failures
            .get(&r.name)
            .filter(|_| !o.initialised)
            .and_then(|f| {
                let next = f.at + chrono::Duration::from_std(f.delay()).ok()?;
                (now < next).then_some((f, next))
            });
        if let Some((f, next)) = failed_init {
            let reason = format!(
                "borg init failed ({} tries): {}; next try at {}",
                f.attempts,
                f.message,
                next.format("%Y-%m-%dT%H:%M:%SZ")
            );
            p.waiting.push(
                Waiting::new("repository", &r.name, reason)
                    .retry_after(until(now, next))
                    .failed(),
            );
            busy.insert(
                r.name.clone(),
                "is not initialised (see the repository)".into(),
            );
            continue;
        }
        if !o.initialised && !busy.contains_key(&r.name) {
            p.changes
                .push(
                    Change::new(Op::Create, "repository", &r.name).with_field(FieldChange::new(
                        "encryption",
                        None,
                        Some(r.encryption_mode().as_str().to_string()),
                    )),
                );
            p.actions.push(Action::Init(r.clone()));
        }
    }
    let mut claim =
        |repo: &str, busy: &mut BTreeMap<String, String>, what: String| -> Result<(), String> {
            match busy.get(repo) {
                Some(why) => Err(why.clone()),
                None => {
                    busy.insert(repo.to_string(), format!("busy with {what}"));
                    Ok(())
                }
            }
        };
    let mut wake: Vec<Duration> = Vec::new();
    for s in &spec.schedules {
        let k = key("schedule", &s.name);
        let (Some(cron), Some(r)) = (Cron::parse(&s.cron).ok(), repo(&s.repository)) else {
            continue;
        };
        if r.kind != RepositoryKind::Borg {
            continue;
        }
        let tz = tz_of(s);
        if cron.next_after(now, tz).is_none() {
            // Validation cannot know every impossible date (`0 0 30 2 *`): shown, not refused.
            p.waiting.push(Waiting::new(
                "schedule",
                &s.name,
                format!(
                    "cron {:?} matches no date: this schedule never runs",
                    s.cron
                ),
            ));
            continue;
        }
        if let Some(run) = observed.running.get(&k) {
            p.waiting.push(
                Waiting::new("schedule", &s.name, format!("backing up: {}", run.progress))
                    .retry_after(PROGRESS_EVERY)
                    .in_progress(),
            );
            continue;
        }
        let Some(st) = observed.state.schedules.get(&s.name) else {
            p.changes.push(Change::new(Op::Create, "schedule", &s.name));
            p.actions.push(Action::Baseline {
                schedule: s.name.clone(),
                since: now,
            });
            if let Some(n) = cron.next_after(now, tz) {
                wake.push(until(now, n));
            }
            continue;
        };
        // A slot started by a run that was killed: retried, idempotently.
        let due = if let Some(started) = &st.started {
            if started.attempt >= MAX_ATTEMPTS {
                p.changes.push(Change::new(Op::Update, "schedule", &s.name));
                p.actions.push(Action::Skip {
                    schedule: s.name.clone(),
                    slot: started.slot,
                    why: format!("interrupted {} times; not tried again", started.attempt),
                });
                None
            } else {
                Some((started.slot, started.attempt + 1))
            }
        } else {
            let floor = st.last_slot.map_or(st.since, |l| l.max(st.since));
            cron.last_at_or_before(now, tz)
                .filter(|slot| *slot > floor)
                .and_then(|slot| {
                    if slot < observed.agent_start && s.missed == Missed::Skip {
                        p.changes.push(Change::new(Op::Update, "schedule", &s.name));
                        p.actions.push(Action::Skip {
                            schedule: s.name.clone(),
                            slot,
                            why: "missed while the agent was down (missed: skip)".into(),
                        });
                        None
                    } else {
                        Some((slot, 1))
                    }
                })
        };
        let mut after = st.last_slot.unwrap_or(st.since).max(now);
        let mut failed_last = None;
        if let Some((slot, attempt)) = due {
            let archive = archive_name(&s.name, slot);
            match claim(&s.repository, &mut busy, k.clone()) {
                Ok(()) => {
                    p.changes
                        .push(Change::new(Op::Create, "archive", &archive).with_field(
                            FieldChange::new("repository", None, Some(s.repository.clone())),
                        ));
                    p.actions.push(Action::Backup(BackupRun {
                        schedule: s.clone(),
                        repository: r.clone(),
                        slot,
                        archive,
                        attempt,
                    }));
                }
                Err(why) => {
                    let mut w = Waiting::new(
                        "schedule",
                        &s.name,
                        format!("slot {slot}: repository {} {why}", s.repository),
                    )
                    .retry_after(PROGRESS_EVERY);
                    // A borg left by a killed agent finishing this very archive.
                    let finishing = observed.repositories.get(&s.repository).is_some_and(|o| {
                        o.foreign_borg.as_ref().and_then(|b| b.archive.as_deref())
                            == Some(archive.as_str())
                    });
                    if finishing {
                        w = w.in_progress();
                    }
                    p.waiting.push(w);
                }
            }
            after = after.max(slot);
        } else {
            failed_last = st.last.as_ref().filter(|l| l.status == RunStatus::Failed);
        }
        let next = cron.next_after(after, tz);
        if let Some(last) = failed_last {
            // Until a run succeeds, the schedule is failed (the reconciler Degraded).
            let mut reason = format!(
                "last run failed at {}: {}",
                last.finished
                    .unwrap_or(last.started)
                    .format("%Y-%m-%dT%H:%M:%SZ"),
                last.message
            );
            if let Some(n) = next {
                reason.push_str(&format!("; next slot {}", n.format("%Y-%m-%dT%H:%MZ")));
            }
            p.waiting
                .push(Waiting::new("schedule", &s.name, reason).failed());
        }
        if let Some(n) = next {
            wake.push(until(now, n));
        }
    }
    for r in &spec.restores {
        let k = key("restore", &r.id);
        runs(
            &mut p,
            &mut busy,
            &mut claim,
            observed,
            "restore",
            &r.id,
            &r.repository,
            observed.state.restores.get(&r.id),
            &k,
            || repo(&r.repository).map(|rp| Action::Restore(r.clone(), rp.clone())),
        );
    }
    for e in &spec.exports {
        let k = key("export", &e.id);
        runs(
            &mut p,
            &mut busy,
            &mut claim,
            observed,
            "export",
            &e.id,
            &e.repository,
            observed.state.exports.get(&e.id),
            &k,
            || repo(&e.repository).map(|rp| Action::Export(e.clone(), rp.clone())),
        );
    }
    // Restores cut short: finished or undone (those running here have a journal too).
    for id in &observed.journaled_restores {
        if !observed.running.contains_key(&key("restore", id)) {
            p.changes
                .push(Change::new(Op::Delete, "restore-staging", id));
            p.actions.push(Action::CleanRestore(id.clone()));
        }
    }
    p.requeue_after = wake.into_iter().min();
    p
}

/// Why a repository is busy with a borg this agent did not start.
fn foreign(b: &ForeignBorg) -> String {
    match &b.archive {
        Some(a) => format!(
            "busy: borg pid {} (not started by this agent) is writing archive {a}",
            b.pid
        ),
        None => format!(
            "busy: borg pid {} (not started by this agent) uses it",
            b.pid
        ),
    }
}

/// The plan of one restore or export: never run twice.
#[allow(clippy::too_many_arguments)]
fn runs(
    p: &mut Plan<Action>,
    busy: &mut BTreeMap<String, String>,
    claim: &mut impl FnMut(&str, &mut BTreeMap<String, String>, String) -> Result<(), String>,
    observed: &Observed,
    kind: &'static str,
    id: &str,
    repository: &str,
    record: Option<&RunRecord>,
    k: &str,
    action: impl FnOnce() -> Option<Action>,
) {
    if let Some(run) = observed.running.get(k) {
        p.waiting.push(
            Waiting::new(kind, id, format!("running: {}", run.progress))
                .retry_after(PROGRESS_EVERY)
                .in_progress(),
        );
        return;
    }
    match record {
        Some(r) if r.status == RunStatus::Started => {
            p.changes.push(Change::new(Op::Update, kind, id));
            p.actions.push(Action::Interrupted {
                kind,
                id: id.to_string(),
            });
        }
        Some(_) => {}
        None => match claim(repository, busy, k.to_string()) {
            Ok(()) => {
                if let Some(a) = action() {
                    p.changes.push(Change::new(Op::Create, kind, id));
                    p.actions.push(a);
                }
            }
            Err(why) => p.waiting.push(
                Waiting::new(kind, id, format!("repository {repository} {why}"))
                    .retry_after(PROGRESS_EVERY),
            ),
        },
    }
}

#[cfg(test)]
mod tests;
