//! The `backups` section of the document: backup repositories and scheduled backup
//! jobs, and their semantic validation. The reconciler itself (timers, runs, pruning)
//! lands in a later issue.

use converge_core::problems::is_dns_name;
use converge_core::vocab::{is_name, is_secret_name, Unique};
use converge_core::Problems;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Backup repositories and the jobs writing to them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackupsSpec {
    /// Where backups are stored.
    #[serde(default)]
    pub repositories: Vec<BackupRepository>,
    /// What is backed up, when, and how long it is kept.
    #[serde(default)]
    pub jobs: Vec<BackupJob>,
}

/// Kind of backup repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RepositoryKind {
    /// A BorgBackup repository, local or over SSH.
    Borg,
    /// An S3-compatible object store bucket.
    S3,
}

/// One backup repository.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackupRepository {
    /// Repository name, unique in the section (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 63
    /// characters); jobs refer to it.
    pub name: String,
    /// Repository kind.
    pub kind: RepositoryKind,
    /// Location. borg: an absolute path or `ssh://[user@]host[:port]/path`;
    /// s3: `s3://bucket[/prefix]`.
    pub url: String,
    /// s3 only: endpoint URL of a non-AWS store, e.g. `https://s3.fr-par.scw.cloud`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// s3 only: bucket region, e.g. `eu-central-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Name of the local secret holding the repository's encryption passphrase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase_secret: Option<String>,
    /// Name of the local secret holding access credentials (s3 keys, or an SSH key for
    /// borg over SSH). Required for s3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// One scheduled backup job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackupJob {
    /// Job name, unique in the section (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 63
    /// characters).
    pub name: String,
    /// Name of the repository to write to.
    pub repository: String,
    /// Absolute host paths to back up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Named container volumes to back up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// When to run, as a 5-field cron expression in the node's local time
    /// (`minute hour day-of-month month day-of-week`), e.g. `30 2 * * *`.
    pub schedule: String,
    /// How many archives to keep after each run; absent: keep everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Command run before the backup (argv form), e.g. a database dump; a non-zero exit
    /// status fails the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_command: Option<Vec<String>>,
}

/// Archives to keep, per period.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retention {
    /// Number of daily archives to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily: Option<u32>,
    /// Number of weekly archives to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly: Option<u32>,
    /// Number of monthly archives to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly: Option<u32>,
}

/// Checks one cron field: a comma-separated list of `*`, `N`, `N-M`, each optionally
/// followed by `/step`, with numbers in `min..=max`.
fn cron_field_ok(field: &str, min: u32, max: u32) -> bool {
    let num = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
            .filter(|n| (min..=max).contains(n))
    };
    field.split(',').all(|item| {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (item, None),
        };
        let step_ok = step.is_none_or(|s| {
            s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u32>().is_ok_and(|n| n >= 1)
        });
        let range_ok = range == "*"
            || match range.split_once('-') {
                Some((a, b)) => matches!((num(a), num(b)), (Some(a), Some(b)) if a <= b),
                None => num(range).is_some(),
            };
        step_ok && range_ok
    })
}

/// Whether `s` is a 5-field cron expression (numeric fields only).
pub fn is_cron_schedule(s: &str) -> bool {
    let fields: Vec<&str> = s.split_whitespace().collect();
    let bounds = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];
    fields.len() == 5
        && fields
            .iter()
            .zip(bounds)
            .all(|(f, (min, max))| cron_field_ok(f, min, max))
}

fn check_borg_url(url: &str) -> bool {
    if url.starts_with('/') {
        return !url.contains('\0');
    }
    let Some(rest) = url.strip_prefix("ssh://") else {
        return false;
    };
    let Some((authority, path)) = rest.split_once('/') else {
        return false;
    };
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match host_port.strip_prefix('[') {
        Some(r) => match r.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => return false,
        },
        None => match host_port.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        },
    };
    let host_ok = host.parse::<std::net::IpAddr>().is_ok() || is_dns_name(host, false);
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0));
    host_ok && port_ok && !path.is_empty()
}

fn check_s3_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("s3://") else {
        return false;
    };
    let bucket = rest.split('/').next().unwrap_or_default();
    let b = bucket.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !rest.contains("//")
}

fn check_http_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return false;
    };
    let host_port = rest.split('/').next().unwrap_or_default();
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, Some(p)),
        _ => (host_port, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host.parse::<std::net::IpAddr>().is_ok() || is_dns_name(host, false))
        && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0))
}

/// Semantic checks of the section; `path` is its JSON path (`$.backups`).
pub fn validate(spec: &BackupsSpec, path: &str, problems: &mut Problems) {
    let mut repos = Unique::new("repository name", format!("{path}.repositories"));
    for (i, r) in spec.repositories.iter().enumerate() {
        let rp = format!("{path}.repositories[{i}]");
        if !is_name(&r.name) {
            problems.push_hint(
                format!("{rp}.name"),
                format!("invalid repository name {:?}", r.name),
                "use [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 63 characters",
            );
        } else {
            repos.check(&r.name, i, format!("{rp}.name"), problems);
        }
        match r.kind {
            RepositoryKind::Borg => {
                if !check_borg_url(&r.url) {
                    problems.push_hint(
                        format!("{rp}.url"),
                        format!("invalid borg repository url {:?}", r.url),
                        "an absolute path (/srv/backup/repo) or ssh://[user@]host[:port]/path",
                    );
                }
                for (field, v) in [("endpoint", &r.endpoint), ("region", &r.region)] {
                    if v.is_some() {
                        problems.push_hint(
                            format!("{rp}.{field}"),
                            format!("{field} applies to s3 repositories only"),
                            "remove it",
                        );
                    }
                }
            }
            RepositoryKind::S3 => {
                if !check_s3_url(&r.url) {
                    problems.push_hint(
                        format!("{rp}.url"),
                        format!("invalid s3 repository url {:?}", r.url),
                        "s3://bucket or s3://bucket/prefix (bucket: 3-63 of [a-z0-9.-])",
                    );
                }
                if let Some(e) = &r.endpoint {
                    if !check_http_url(e) {
                        problems.push_hint(
                            format!("{rp}.endpoint"),
                            format!("invalid endpoint URL {e:?}"),
                            "e.g. https://s3.eu-central-1.amazonaws.com",
                        );
                    }
                }
                if let Some(reg) = &r.region {
                    let ok = !reg.is_empty()
                        && reg
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                    if !ok {
                        problems.push(format!("{rp}.region"), format!("invalid region {reg:?}"));
                    }
                }
                if r.credentials_secret.is_none() {
                    problems.push_hint(
                        format!("{rp}.credentialsSecret"),
                        "s3 repositories need credentials",
                        "name the local secret holding the access key id and secret key",
                    );
                }
            }
        }
        for (field, v) in [
            ("passphraseSecret", &r.passphrase_secret),
            ("credentialsSecret", &r.credentials_secret),
        ] {
            if let Some(s) = v {
                if !is_secret_name(s) {
                    problems.push(
                        format!("{rp}.{field}"),
                        format!("invalid secret name {s:?}"),
                    );
                }
            }
        }
    }
    let mut jobs = Unique::new("job name", format!("{path}.jobs"));
    for (i, j) in spec.jobs.iter().enumerate() {
        let jp = format!("{path}.jobs[{i}]");
        if !is_name(&j.name) {
            problems.push_hint(
                format!("{jp}.name"),
                format!("invalid job name {:?}", j.name),
                "use [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 63 characters",
            );
        } else {
            jobs.check(&j.name, i, format!("{jp}.name"), problems);
        }
        if !spec.repositories.iter().any(|r| r.name == j.repository) {
            let available: Vec<&str> = spec.repositories.iter().map(|r| r.name.as_str()).collect();
            problems.push_hint(
                format!("{jp}.repository"),
                format!("no repository named {:?}", j.repository),
                if available.is_empty() {
                    format!("define it in {path}.repositories")
                } else {
                    format!("available: {}", available.join(", "))
                },
            );
        }
        if j.paths.is_empty() && j.volumes.is_empty() {
            problems.push_hint(
                jp.clone(),
                "job backs up nothing",
                "list at least one of paths and volumes",
            );
        }
        for (k, p) in j.paths.iter().enumerate() {
            if !p.starts_with('/') {
                problems.push_hint(
                    format!("{jp}.paths[{k}]"),
                    format!("path {p:?} is not absolute"),
                    "e.g. /srv/data",
                );
            }
        }
        for (k, v) in j.volumes.iter().enumerate() {
            if !is_name(v) {
                problems.push(
                    format!("{jp}.volumes[{k}]"),
                    format!("invalid volume name {v:?}"),
                );
            }
        }
        if !is_cron_schedule(&j.schedule) {
            problems.push_hint(
                format!("{jp}.schedule"),
                format!("invalid schedule {:?}", j.schedule),
                "5 cron fields: minute hour day-of-month month day-of-week, e.g. \"30 2 * * *\"",
            );
        }
        if let Some(r) = &j.retention {
            let keeps = [r.daily, r.weekly, r.monthly]
                .iter()
                .any(|n| n.is_some_and(|n| n > 0));
            if !keeps {
                problems.push_hint(
                    format!("{jp}.retention"),
                    "retention keeps no archives",
                    "set at least one of daily, weekly, monthly above 0, or omit retention to keep everything",
                );
            }
        }
        if let Some(c) = &j.pre_command {
            if c.first().is_none_or(String::is_empty) {
                problems.push(format!("{jp}.preCommand"), "preCommand must not be empty");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> BackupsSpec {
        serde_json::from_value(v).unwrap()
    }

    fn problems(spec: &BackupsSpec) -> Vec<String> {
        let mut p = Problems::default();
        validate(spec, "$.backups", &mut p);
        p.iter().map(|p| p.path.clone()).collect()
    }

    fn good() -> serde_json::Value {
        json!({
            "repositories": [
                {"name": "local", "kind": "borg", "url": "/srv/backup/borg", "passphraseSecret": "borg-pass"},
                {"name": "offsite", "kind": "borg", "url": "ssh://borg@backup.example.net:2222/./repo",
                 "credentialsSecret": "borg-ssh-key"},
                {"name": "s3", "kind": "s3", "url": "s3://acme-backups/fra1", "endpoint": "https://s3.fr-par.scw.cloud",
                 "region": "fr-par", "credentialsSecret": "s3-creds", "passphraseSecret": "restic-pass"}
            ],
            "jobs": [
                {"name": "pg", "repository": "s3", "volumes": ["pgdata"], "schedule": "*/15 * * * *",
                 "preCommand": ["pg_dumpall", "-f", "/srv/dump.sql"], "retention": {"daily": 7, "weekly": 4}},
                {"name": "etc", "repository": "local", "paths": ["/etc", "/srv/app"], "schedule": "30 2 * * 1-5,0",
                 "retention": {"monthly": 12}}
            ]
        })
    }

    #[test]
    fn good_spec_passes() {
        let s = spec(good());
        assert_eq!(problems(&s), Vec::<String>::new());
        let back: BackupsSpec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn repository_rules() {
        let s = spec(json!({"repositories": [
            {"name": "a", "kind": "borg", "url": "relative/path", "region": "x"},
            {"name": "a", "kind": "borg", "url": "ssh://host"},
            {"name": "b", "kind": "s3", "url": "s3://UPPER", "endpoint": "ftp://x", "region": "EU"},
            {"name": "c", "kind": "s3", "url": "https://bucket", "credentialsSecret": "bad secret"}
        ]}));
        assert_eq!(
            problems(&s),
            vec![
                "$.backups.repositories[0].url",
                "$.backups.repositories[0].region",
                "$.backups.repositories[1].name",
                "$.backups.repositories[1].url",
                "$.backups.repositories[2].url",
                "$.backups.repositories[2].endpoint",
                "$.backups.repositories[2].region",
                "$.backups.repositories[2].credentialsSecret",
                "$.backups.repositories[3].url",
                "$.backups.repositories[3].credentialsSecret",
            ]
        );
    }

    #[test]
    fn job_rules() {
        let mut v = good();
        v["jobs"] = json!([
            {"name": "x", "repository": "nope", "schedule": "0 3 * * *", "paths": ["etc"]},
            {"name": "x", "repository": "local", "schedule": "daily"},
            {"name": "y", "repository": "local", "schedule": "60 * * * *", "volumes": ["bad vol"],
             "retention": {"daily": 0}, "preCommand": []}
        ]);
        let s = spec(v);
        let mut p = Problems::default();
        validate(&s, "$.backups", &mut p);
        let got: Vec<_> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            got,
            vec![
                "$.backups.jobs[0].repository",
                "$.backups.jobs[0].paths[0]",
                "$.backups.jobs[1].name",
                "$.backups.jobs[1]",
                "$.backups.jobs[1].schedule",
                "$.backups.jobs[2].volumes[0]",
                "$.backups.jobs[2].schedule",
                "$.backups.jobs[2].retention",
                "$.backups.jobs[2].preCommand",
            ]
        );
        assert_eq!(
            p.0[0].hint.as_deref(),
            Some("available: local, offsite, s3")
        );
    }

    #[test]
    fn cron() {
        for good in [
            "* * * * *",
            "0 0 1 1 0",
            "*/5 0-6,22-23 * 1-12/2 7",
            "59 23 31 12 6",
        ] {
            assert!(is_cron_schedule(good), "{good}");
        }
        for bad in [
            "",
            "* * * *",
            "* * * * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "* * * * 8",
            "*/0 * * * *",
            "5-1 * * * *",
            "a * * * *",
            "1,,2 * * * *",
        ] {
            assert!(!is_cron_schedule(bad), "{bad}");
        }
    }
}
