//! Plan tests: exactly-once slots under compressed time, missed-slot policies, killed
//! runs, one operation per repository, restores and exports run once.

use super::*;
use serde_json::json;

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn spec(missed: &str) -> BackupsSpec {
    serde_json::from_value(json!({
        "repositories": [{"name": "local", "kind": "borg", "url": "/srv/borg"},
                         {"name": "other", "kind": "borg", "url": "/srv/borg2"}],
        "schedules": [
            {"name": "a", "repository": "local", "paths": ["/srv/a"], "cron": "* * * * *", "missed": missed},
            {"name": "b", "repository": "other", "paths": ["/srv/b"], "cron": "0 3 * * *", "timeZone": "Europe/Paris"}
        ]
    }))
    .unwrap()
}

fn observed(now: &str, state: State) -> Observed {
    Observed {
        now: t(now),
        agent_start: t("2026-12-01T10:00:00Z"),
        state,
        repositories: ["local", "other"]
            .into_iter()
            .map(|n| {
                (
                    n.to_string(),
                    RepoObserved {
                        initialised: true,
                        foreign_borg: None,
                        unusable: None,
                    },
                )
            })
            .collect(),
        running: BTreeMap::new(),
        init_failures: BTreeMap::new(),
        journaled_restores: Vec::new(),
    }
}

fn sched(since: &str, last: Option<&str>) -> ScheduleState {
    ScheduleState {
        since: t(since),
        last_slot: last.map(t),
        started: None,
        last: None,
        last_success: None,
    }
}

fn state(a: ScheduleState) -> State {
    let mut s = State::default();
    s.schedules.insert("a".into(), a);
    s.schedules
        .insert("b".into(), sched("2026-12-01T09:00:00Z", None));
    s
}

fn backups(p: &Plan<Action>) -> Vec<(String, String, u32)> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::Backup(r) => Some((r.schedule.name.clone(), r.archive.clone(), r.attempt)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_new_schedule_is_baselined_and_wakes_at_its_next_slot() {
    let o = observed("2026-12-01T10:00:30Z", State::default());
    let p = plan(&spec("run-once"), &o, &Facts::default());
    assert!(matches!(&p.actions[0], Action::Baseline { schedule, .. } if schedule == "a"));
    assert!(matches!(&p.actions[1], Action::Baseline { schedule, .. } if schedule == "b"));
    // Next slot of `* * * * *` is 10:01:00, 30 s away.
    let r = p.requeue_after.unwrap();
    assert!(
        r >= Duration::from_secs(30) && r < Duration::from_secs(31),
        "{r:?}"
    );
}

#[test]
fn a_due_slot_runs_once_then_the_plan_is_empty() {
    let s = spec("run-once");
    let o = observed(
        "2026-12-01T10:01:00.010Z",
        state(sched("2026-12-01T10:00:30Z", None)),
    );
    let p = plan(&s, &o, &Facts::default());
    assert_eq!(backups(&p), [("a".into(), "a-20261201T1001Z".into(), 1)]);
    // Recorded: the same instant plans nothing more, and wakes for 10:02.
    let o = observed(
        "2026-12-01T10:01:00.500Z",
        state(sched("2026-12-01T10:00:30Z", Some("2026-12-01T10:01:00Z"))),
    );
    let p = plan(&s, &o, &Facts::default());
    assert!(p.is_empty(), "{:?}", p.actions);
    let r = p.requeue_after.unwrap();
    assert!(
        r > Duration::from_millis(59_400) && r < Duration::from_secs(60),
        "{r:?}"
    );
}

#[test]
fn compressed_time_fires_each_slot_exactly_once() {
    // Passes at random-ish moments over 30 minutes; each pass records what it ran.
    let s = spec("run-once");
    let mut st = state(sched("2026-12-01T10:00:00Z", None));
    let mut archives = Vec::new();
    let mut now = t("2026-12-01T10:00:00Z");
    for i in 0..400u32 {
        now += chrono::Duration::milliseconds(4_000 + i64::from(i % 7) * 517);
        let mut o = observed("2026-12-01T10:00:00Z", st.clone());
        o.now = now;
        let p = plan(&s, &o, &Facts::default());
        for a in &p.actions {
            if let Action::Backup(r) = a {
                archives.push(r.archive.clone());
                let e = st.schedules.get_mut("a").unwrap();
                e.last_slot = Some(r.slot);
            }
        }
    }
    let mut dedup = archives.clone();
    dedup.dedup();
    assert_eq!(dedup, archives, "no slot twice");
    // Every minute from 10:01 up to the last pass's minute.
    let minutes = (now - t("2026-12-01T10:00:00Z")).num_minutes() as usize;
    assert_eq!(archives.len(), minutes);
}

#[test]
fn slots_missed_while_down_run_once_or_are_skipped() {
    // Last slot 09:50; the agent started at 10:00; now 10:00:05: 10 slots were missed.
    let st = state(sched("2026-12-01T09:00:00Z", Some("2026-12-01T09:50:00Z")));
    let p = plan(
        &spec("run-once"),
        &observed("2026-12-01T10:00:05Z", st.clone()),
        &Facts::default(),
    );
    // One run, for the latest missed slot (10:00 is before the start at 10:00:00? equal:
    // not missed, on time) — either way one run.
    assert_eq!(backups(&p), [("a".into(), "a-20261201T1000Z".into(), 1)]);
    let mut o = observed("2026-12-01T10:00:05Z", st.clone());
    o.agent_start = t("2026-12-01T10:00:02Z");
    let p = plan(&spec("skip"), &o, &Facts::default());
    assert!(backups(&p).is_empty());
    assert!(
        matches!(&p.actions[0], Action::Skip { slot, .. } if *slot == t("2026-12-01T10:00:00Z"))
    );
}

#[test]
fn a_killed_run_is_retried_for_its_own_slot_a_bounded_number_of_times() {
    let mut a = sched("2026-12-01T09:00:00Z", Some("2026-12-01T10:00:00Z"));
    a.started = Some(Started {
        slot: t("2026-12-01T10:01:00Z"),
        at: t("2026-12-01T10:01:00Z"),
        attempt: 1,
    });
    let p = plan(
        &spec("run-once"),
        &observed("2026-12-01T10:03:10Z", state(a.clone())),
        &Facts::default(),
    );
    assert_eq!(backups(&p), [("a".into(), "a-20261201T1001Z".into(), 2)]);
    a.started.as_mut().unwrap().attempt = MAX_ATTEMPTS;
    let p = plan(
        &spec("run-once"),
        &observed("2026-12-01T10:03:10Z", state(a)),
        &Facts::default(),
    );
    assert!(backups(&p).is_empty());
    assert!(
        matches!(&p.actions[0], Action::Skip { slot, .. } if *slot == t("2026-12-01T10:01:00Z"))
    );
}

#[test]
fn one_operation_per_repository() {
    let mut s = spec("run-once");
    s.schedules[1].repository = "local".into();
    s.schedules[1].cron = "* * * * *".into();
    let mut st = state(sched("2026-12-01T10:00:00Z", None));
    st.schedules
        .insert("b".into(), sched("2026-12-01T10:00:00Z", None));
    let o = observed("2026-12-01T10:01:01Z", st.clone());
    let p = plan(&s, &o, &Facts::default());
    assert_eq!(backups(&p).len(), 1, "one of the two waits");
    assert_eq!(p.waiting.len(), 1);
    assert!(
        p.waiting[0].reason.contains("busy with schedule a"),
        "{}",
        p.waiting[0].reason
    );
    // While a runs, b waits; a shows its progress, in progress.
    let mut o = observed("2026-12-01T10:01:01Z", st);
    o.running.insert(
        "schedule a".into(),
        Running {
            repository: "local".into(),
            progress: "1.0 MB".into(),
        },
    );
    let p = plan(&s, &o, &Facts::default());
    assert!(backups(&p).is_empty());
    assert!(p
        .waiting
        .iter()
        .any(|w| w.id == "a" && w.in_progress && w.reason.contains("1.0 MB")));
    assert!(p.waiting.iter().any(|w| w.id == "b" && !w.in_progress));
    assert!(p.is_empty());
}

#[test]
fn restores_and_exports_run_exactly_once() {
    let mut s = spec("run-once");
    s.schedules.clear();
    s.restores = serde_json::from_value(json!([
        {"id": "r1", "repository": "local", "archive": "a-20261201T1001Z", "targetPath": "/srv/a", "mode": "replace"},
        {"id": "r2", "repository": "other", "archive": "b-20261201T0200Z", "targetPath": "/srv/b", "mode": "side-by-side"}
    ])).unwrap();
    s.exports = serde_json::from_value(json!([
        {"id": "e1", "repository": "local", "archive": "a-20261201T1001Z",
         "s3": {"endpoint": "http://127.0.0.1:9000", "bucket": "exp", "key": "a.tar", "credentialsSecret": "c"}, "urlTtl": "1h"}
    ])).unwrap();
    let o = observed("2026-12-01T10:05:00Z", State::default());
    let p = plan(&s, &o, &Facts::default());
    let kinds: Vec<&str> = p
        .actions
        .iter()
        .map(|a| match a {
            Action::Restore(r, _) => r.id.as_str(),
            Action::Export(e, _) => e.id.as_str(),
            _ => "other",
        })
        .collect();
    // e1 waits: r1 holds repository local.
    assert_eq!(kinds, ["r1", "r2"]);
    assert!(p.waiting.iter().any(|w| w.id == "e1"));
    let done = |status| RunRecord {
        status,
        started: t("2026-12-01T10:05:00Z"),
        finished: None,
        message: String::new(),
        url: None,
        expires_at: None,
    };
    let mut st = State::default();
    st.restores.insert("r1".into(), done(RunStatus::Done));
    st.restores.insert("r2".into(), done(RunStatus::Failed));
    st.exports.insert("e1".into(), done(RunStatus::Started));
    let p = plan(
        &s,
        &observed("2026-12-01T10:06:00Z", st.clone()),
        &Facts::default(),
    );
    // Done and failed ids never run again; a started export not running here was killed.
    assert_eq!(
        p.actions,
        [Action::Interrupted {
            kind: "export",
            id: "e1".into()
        }]
    );
    let mut o = observed("2026-12-01T10:06:00Z", st);
    o.running.insert(
        "export e1".into(),
        Running {
            repository: "local".into(),
            progress: "10 MB".into(),
        },
    );
    assert!(plan(&s, &o, &Facts::default()).is_empty());
}

#[test]
fn missing_repositories_are_initialised_and_s3_ones_reported() {
    let mut s = spec("run-once");
    s.repositories.push(
        serde_json::from_value(json!(
        {"name": "s3", "kind": "s3", "url": "s3://bucket-x", "credentialsSecret": "c"}))
        .unwrap(),
    );
    let mut o = observed(
        "2026-12-01T10:00:30Z",
        state(sched("2026-12-01T10:00:00Z", Some("2026-12-01T10:00:00Z"))),
    );
    o.repositories.get_mut("other").unwrap().initialised = false;
    let p = plan(&s, &o, &Facts::default());
    assert!(matches!(&p.actions[0], Action::Init(r) if r.name == "other"));
    assert_eq!(p.changes[0].to_string(), "+ repository other");
    assert!(p
        .waiting
        .iter()
        .any(|w| w.id == "s3" && w.reason.contains("not borg")));
}

#[test]
fn archive_names_and_prune_glob() {
    assert_eq!(
        archive_name("etc", t("2026-12-01T02:30:00Z")),
        "etc-20261201T0230Z"
    );
    let g = crate::driver::schedule_glob("etc");
    assert!(g.starts_with("etc-[0-9]"));
}

#[test]
fn a_directory_that_is_not_a_repository_is_failed_not_initialised() {
    let mut o = observed(
        "2026-12-01T10:05:30Z",
        state(sched("2026-12-01T10:00:00Z", Some("2026-12-01T10:04:00Z"))),
    );
    let local = o.repositories.get_mut("local").unwrap();
    local.initialised = false;
    local.unusable = Some("/srv/borg is not empty and is not a borg repository".into());
    let p = plan(&spec("run-once"), &o, &Facts::default());
    // No `borg init`, and no backup into it: the repository and the schedule say why.
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::Init(_) | Action::Backup(_))),
        "{:?}",
        p.actions
    );
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    let repo = p.waiting.iter().find(|w| w.kind == "repository").unwrap();
    assert!(
        repo.failed && repo.reason.contains("not a borg repository"),
        "{repo:?}"
    );
    assert_eq!(repo.retry_after, Some(RECHECK));
    let sched = p.waiting.iter().find(|w| w.kind == "schedule").unwrap();
    assert!(
        sched.reason.contains("repository local cannot be used"),
        "{sched:?}"
    );
}

#[test]
fn a_failed_init_is_retried_on_its_own_doubling_delay() {
    let mut o = observed("2026-12-01T10:00:10Z", State::default());
    o.repositories.get_mut("local").unwrap().initialised = false;
    o.init_failures.insert(
        "local".into(),
        InitFailure {
            message: "borg init failed (exit 2): Permission denied".into(),
            at: t("2026-12-01T10:00:00Z"),
            attempts: 2,
        },
    );
    // Two failures: 60 s before the third try.
    let p = plan(&spec("run-once"), &o, &Facts::default());
    assert!(!p.actions.iter().any(|a| matches!(a, Action::Init(_))));
    let w = p.waiting.iter().find(|w| w.kind == "repository").unwrap();
    assert!(
        w.failed && w.reason.contains("Permission denied") && w.reason.contains("2 tries"),
        "{w:?}"
    );
    assert_eq!(w.retry_after, Some(Duration::from_millis(50_020)));
    o.now = t("2026-12-01T10:01:00Z");
    let p = plan(&spec("run-once"), &o, &Facts::default());
    assert!(p
        .actions
        .iter()
        .any(|a| matches!(a, Action::Init(r) if r.name == "local")));
    let f = |attempts| {
        InitFailure {
            message: String::new(),
            at: o.now,
            attempts,
        }
        .delay()
    };
    assert_eq!(
        (f(1), f(2), f(3)),
        (INIT_RETRY, INIT_RETRY * 2, INIT_RETRY * 4)
    );
    assert_eq!(f(40), INIT_RETRY_MAX);
}

#[test]
fn a_schedule_whose_last_run_failed_is_failed_until_a_run_succeeds() {
    let mut a = sched("2026-12-01T10:00:00Z", Some("2026-12-01T10:05:00Z"));
    a.last = Some(RunRecord {
        status: RunStatus::Failed,
        started: t("2026-12-01T10:05:00Z"),
        finished: Some(t("2026-12-01T10:05:01Z")),
        message: "source /srv/typo does not exist: nothing archived".into(),
        url: None,
        expires_at: None,
    });
    let o = observed("2026-12-01T10:05:30Z", state(a.clone()));
    let p = plan(&spec("run-once"), &o, &Facts::default());
    let w = p.waiting.iter().find(|w| w.id == "a").unwrap();
    assert!(w.failed, "{w:?}");
    assert!(
        w.reason.contains("/srv/typo does not exist")
            && w.reason.contains("next slot 2026-12-01T10:06Z"),
        "{w:?}"
    );
    // The next slot runs anyway (a failed run is not retried, the schedule goes on).
    let o = observed("2026-12-01T10:06:01Z", state(a));
    let p = plan(&spec("run-once"), &o, &Facts::default());
    assert_eq!(
        backups(&p),
        vec![("a".into(), "a-20261201T1006Z".into(), 1)]
    );
    assert!(!p.waiting.iter().any(|w| w.failed));
}

#[test]
fn a_cron_that_matches_no_date_is_shown_as_never_running() {
    let mut s = spec("run-once");
    s.schedules[0].cron = "0 0 30 2 *".into();
    let o = observed(
        "2026-12-01T10:05:30Z",
        state(sched("2026-12-01T10:00:00Z", None)),
    );
    let p = plan(&s, &o, &Facts::default());
    let w = p.waiting.iter().find(|w| w.id == "a").unwrap();
    assert!(!w.failed && w.reason.contains("never runs"), "{w:?}");
    assert!(backups(&p).is_empty());
}

#[test]
fn an_orphaned_borg_is_named_with_the_archive_it_writes() {
    let mut st = sched("2026-12-01T10:00:00Z", Some("2026-12-01T10:04:00Z"));
    st.started = Some(Started {
        slot: t("2026-12-01T10:05:00Z"),
        at: t("2026-12-01T10:05:00Z"),
        attempt: 1,
    });
    let mut o = observed("2026-12-01T10:05:30Z", state(st));
    o.repositories.get_mut("local").unwrap().foreign_borg = Some(ForeignBorg {
        pid: 4242,
        archive: Some("a-20261201T1005Z".into()),
    });
    let p = plan(&spec("run-once"), &o, &Facts::default());
    assert!(backups(&p).is_empty());
    let w = p.waiting.iter().find(|w| w.id == "a").unwrap();
    assert!(
        w.reason.contains("borg pid 4242") && w.reason.contains("a-20261201T1005Z"),
        "{w:?}"
    );
    // Finishing this schedule's own archive: a change under way, not a lasting wait.
    assert!(w.in_progress);
}

#[test]
fn restores_cut_short_are_cleaned_unless_running_here() {
    let mut o = observed(
        "2026-12-01T10:05:30Z",
        state(sched("2026-12-01T10:00:00Z", None)),
    );
    o.journaled_restores = vec!["r1".into(), "r2".into()];
    o.running.insert(
        key("restore", "r2"),
        Running {
            repository: "local".into(),
            progress: "1 %".into(),
        },
    );
    let p = plan(&spec("run-once"), &o, &Facts::default());
    let cleans: Vec<&Action> = p
        .actions
        .iter()
        .filter(|a| matches!(a, Action::CleanRestore(_)))
        .collect();
    assert_eq!(cleans, vec![&Action::CleanRestore("r1".into())]);
    assert!(p
        .changes
        .iter()
        .any(|c| c.kind == "restore-staging" && c.id == "r1" && c.op == Op::Delete));
}
