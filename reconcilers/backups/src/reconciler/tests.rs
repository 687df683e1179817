//! Reconciler tests over the fake driver: passes under compressed time across an agent
//! restart (a new reconciler on the same record) give one archive per slot.

use super::*;
use crate::driver::fake::Fake;
use serde_json::json;

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn spec() -> BackupsSpec {
    serde_json::from_value(json!({
        "repositories": [{"name": "local", "kind": "borg", "url": "/srv/borg"}],
        "schedules": [{"name": "a", "repository": "local", "paths": ["/srv/a"], "cron": "* * * * *"}],
        "restores": [{"id": "r1", "repository": "local", "archive": "a-20261201T1001Z", "targetPath": "/srv/a", "mode": "replace"}]
    }))
    .unwrap()
}

async fn pass(r: &Backups<Fake>, s: &BackupsSpec) -> Plan<Action> {
    let o = r.observe(s).await.unwrap();
    let p = r.plan(s, &o, &Facts::default());
    let shown = p.clone();
    let out = r.apply(p).await;
    assert!(out.iter().all(|o| o.error.is_none()), "{out:?}");
    shown
}

#[tokio::test]
async fn one_archive_per_slot_across_a_restart() {
    let s = spec();
    let r = Backups::new(Fake::at(t("2026-12-01T10:00:20Z")), false);
    pass(&r, &s).await; // init + baseline + restore r1
    let mut now = t("2026-12-01T10:00:20Z");
    for _ in 0..20 {
        now += chrono::Duration::seconds(17);
        r.driver().set_now(now);
        pass(&r, &s).await;
    }
    // "Restart" at 10:06:00, down until 10:09:30: a new reconciler and driver on the
    // same record; the slots missed meanwhile run once (run-once).
    let old = r.driver();
    let state = old.state.lock().unwrap().clone();
    let mut archives = old.archives.lock().unwrap().clone();
    let mut fake = Fake::at(t("2026-12-01T10:09:30Z"));
    *fake.state.get_mut().unwrap() = state;
    fake.repos.get_mut().unwrap().insert("local".into());
    let r2 = Backups::new(fake, false);
    now = t("2026-12-01T10:09:30Z");
    for _ in 0..10 {
        pass(&r2, &s).await;
        now += chrono::Duration::seconds(13);
        r2.driver().set_now(now);
    }
    archives.extend(r2.driver().archives.lock().unwrap().iter().cloned());
    let want: Vec<String> = [
        "1001", "1002", "1003", "1004", "1005", "1006", "1009", "1010", "1011",
    ]
    .iter()
    .map(|m| format!("a-20261201T{m}Z"))
    .collect();
    assert_eq!(archives, want);
    // The restore ran once, in the first agent only.
    assert_eq!(*r.driver().restores.lock().unwrap(), ["r1"]);
    assert!(r2.driver().restores.lock().unwrap().is_empty());
    let st = r2.driver().state.lock().unwrap().clone();
    assert_eq!(st.restores["r1"].status, RunStatus::Done);
    let notes = r2.notes(&r2.observe(&s).await.unwrap());
    assert!(
        notes
            .iter()
            .any(|n| n.object == "schedule a" && n.note.starts_with("last run done")),
        "{notes:?}"
    );
}

#[tokio::test]
async fn a_failed_backup_is_recorded_and_not_repeated() {
    let s = spec();
    let r = Backups::new(Fake::at(t("2026-12-01T10:00:20Z")), false);
    pass(&r, &s).await;
    *r.driver().fail.lock().unwrap() = true;
    r.driver().set_now(t("2026-12-01T10:01:05Z"));
    pass(&r, &s).await;
    r.driver().set_now(t("2026-12-01T10:01:30Z"));
    let p = pass(&r, &s).await;
    assert!(p.is_empty());
    let st = r.driver().state.lock().unwrap().clone();
    let a = &st.schedules["a"];
    assert_eq!(a.last_slot, Some(t("2026-12-01T10:01:00Z")));
    assert_eq!(a.last.as_ref().unwrap().status, RunStatus::Failed);
}

#[tokio::test]
async fn background_runs_report_their_end_through_host_events() {
    let s = spec();
    let r = Backups::new(Fake::at(t("2026-12-01T10:00:20Z")), true);
    let mut events = r.host_events().unwrap();
    pass(&r, &s).await;
    let e = tokio::time::timeout(std::time::Duration::from_secs(5), events.next())
        .await
        .unwrap();
    assert_eq!(e.unwrap().0, "restore r1 finished");
    assert!(!r.busy());
}

#[tokio::test]
async fn a_failed_init_backs_off_and_a_removed_schedule_leaves_the_status() {
    let s = spec();
    let fake = Fake::at(t("2026-12-01T10:00:20Z"));
    *fake.init_error.lock().unwrap() = Some("borg init failed (exit 2): Permission denied".into());
    let r = Backups::new(fake, false);
    let o = r.observe(&s).await.unwrap();
    let out = r.apply(r.plan(&s, &o, &Facts::default())).await;
    let failed = out.iter().find(|o| o.object == "repository local").unwrap();
    assert_eq!(
        failed.retry,
        Retry::After(crate::plan::INIT_RETRY),
        "{failed:?}"
    );
    // The next pass does not try again before the delay: it shows the failure.
    let o = r.observe(&s).await.unwrap();
    let p = r.plan(&s, &o, &Facts::default());
    assert!(!p.actions.iter().any(|a| matches!(a, Action::Init(_))));
    assert!(p
        .waiting
        .iter()
        .any(|w| w.failed && w.reason.contains("Permission denied")));
    // After the delay, a good init clears it.
    *r.driver().init_error.lock().unwrap() = None;
    r.driver().set_now(t("2026-12-01T10:00:51Z"));
    pass(&r, &s).await;
    let o = r.observe(&s).await.unwrap();
    assert!(o.init_failures.is_empty());
    // A schedule with a record, then removed from the document: no line in the status.
    r.driver().set_now(t("2026-12-01T10:01:01Z"));
    pass(&r, &s).await;
    let o = r.observe(&s).await.unwrap();
    assert!(
        r.notes(&o).iter().any(|n| n.object == "schedule a"),
        "{:?}",
        r.notes(&o)
    );
    let mut without = s.clone();
    without.schedules.clear();
    without.restores.clear();
    let o = r.observe(&without).await.unwrap();
    assert!(r.notes(&o).is_empty(), "{:?}", r.notes(&o));
    // The record keeps it (a slot is never run twice if it comes back).
    assert!(r.driver().state.lock().unwrap().schedules.contains_key("a"));
}

#[tokio::test]
async fn a_restore_cut_short_is_cleaned_and_recorded() {
    let s = spec();
    let fake = Fake::at(t("2026-12-01T10:00:20Z"));
    fake.repos.lock().unwrap().insert("local".into());
    fake.state
        .lock()
        .unwrap()
        .restores
        .insert("r1".into(), record(t("2026-12-01T10:00:00Z")));
    fake.journaled.lock().unwrap().push("r1".into());
    let r = Backups::new(fake, false);
    pass(&r, &s).await;
    assert!(r.driver().journaled.lock().unwrap().is_empty());
    let rec = r.driver().state.lock().unwrap().restores["r1"].clone();
    assert_eq!(rec.status, RunStatus::Failed);
    assert!(
        rec.message.contains("partial extraction removed") && rec.message.contains("use a new id"),
        "{rec:?}"
    );
    assert!(
        r.driver().restores.lock().unwrap().is_empty(),
        "never run twice"
    );
}
