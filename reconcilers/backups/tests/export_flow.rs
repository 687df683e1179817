//! An `exports` entry through the reconciler, against real borg and moto:
//! backup, export to moto, the presigned URL in the record downloads the same bytes as
//! `borg export-tar`; the export id never runs twice.

#[path = "export_support/mod.rs"]
mod export_support;

use chrono::{DateTime, Utc};
use converge_backups::plan::{RunStatus, State};
use converge_backups::{Backups, BackupsSpec, Host, HostConfig};
use converge_core::{Facts, Reconciler, SecretSource};
use serde_json::json;
use std::sync::{Arc, Mutex};

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

async fn pass(r: &Backups<Host>, s: &BackupsSpec) -> Vec<String> {
    let o = r.observe(s).await.unwrap();
    let p = r.plan(s, &o, &Facts::default());
    let c = p.changes.iter().map(|c| c.to_string()).collect();
    let out = r.apply(p).await;
    assert!(out.iter().all(|o| o.error.is_none()), "{out:?}");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_through_the_reconciler() {
    let moto = export_support::Moto::start();
    export_support::create_bucket(&moto, "exports");
    let dir = tempfile::tempdir().unwrap();
    let p = |r: &str| dir.path().join(r);
    std::fs::create_dir_all(p("secrets")).unwrap();
    std::fs::write(p("secrets/pass"), "pw").unwrap();
    std::fs::write(
        p("secrets/s3"),
        r#"{"accessKeyId": "test", "secretAccessKey": "test"}"#,
    )
    .unwrap();
    std::fs::create_dir_all(p("src")).unwrap();
    export_support::random_file(&p("src/big"), 12 << 20, 5);
    let clock = Arc::new(Mutex::new(t("2026-12-01T10:00:30Z")));
    let mut cfg = HostConfig::new(&p("data"), SecretSource::new(p("secrets")));
    let c = clock.clone();
    cfg.clock = Arc::new(move || *c.lock().unwrap());
    let r = Backups::new(Host::new(cfg), false);
    let mut v = json!({
        "repositories": [{"name": "local", "kind": "borg", "url": p("repo"), "passphraseSecret": "pass"}],
        "schedules": [{"name": "src", "repository": "local", "paths": [p("src")], "cron": "* * * * *"}]
    });
    let s: BackupsSpec = serde_json::from_value(v.clone()).unwrap();
    pass(&r, &s).await;
    *clock.lock().unwrap() = t("2026-12-01T10:01:00.5Z");
    assert_eq!(pass(&r, &s).await, ["+ archive src-20261201T1001Z"]);
    v["exports"] = json!([{"id": "e1", "repository": "local", "archive": "src-20261201T1001Z",
        "s3": {"endpoint": moto.endpoint(), "bucket": "exports", "key": "e1.tar", "credentialsSecret": "s3"},
        "urlTtl": "1h"}]);
    let s: BackupsSpec = serde_json::from_value(v).unwrap();
    assert_eq!(pass(&r, &s).await, ["+ export e1"]);
    let st: State =
        serde_json::from_slice(&std::fs::read(p("data/backups/state.json")).unwrap()).unwrap();
    let e = &st.exports["e1"];
    assert_eq!(e.status, RunStatus::Done, "{e:?}");
    let url = e.url.clone().unwrap();
    assert!(e.expires_at.unwrap() > Utc::now());
    let got = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    let want = std::process::Command::new("borg")
        .args([
            "export-tar",
            &format!("{}::src-20261201T1001Z", p("repo").display()),
            "-",
        ])
        .env("BORG_PASSPHRASE", "pw")
        .env("BORG_BASE_DIR", p("data/backups/borg"))
        .output()
        .unwrap()
        .stdout;
    assert_eq!(got.len(), want.len());
    assert!(
        got[..] == want[..],
        "downloaded tar differs from borg export-tar"
    );
    // Never twice.
    assert!(pass(&r, &s).await.is_empty());
    assert_eq!(export_support::open_uploads(&moto, "exports"), 0);
}
