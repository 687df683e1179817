//! The `backups` section of the document: repositories, schedules, restores and
//! exports, and their semantic validation (every problem with its JSON path).

use converge_core::problems::is_dns_name;
use converge_core::vocab::{is_name, is_secret_name, Unique};
use converge_core::Problems;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Backup repositories, scheduled backups, one-off restores and exports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackupsSpec {
    /// Where backups are stored.
    #[serde(default)]
    pub repositories: Vec<BackupRepository>,
    /// What is backed up, when, and how long it is kept.
    #[serde(default)]
    pub schedules: Vec<Schedule>,
    /// Restores of an archive into a volume or path; each `id` runs exactly once.
    #[serde(default)]
    pub restores: Vec<Restore>,
    /// Exports of an archive to S3 as a tar stream with a presigned download link; each
    /// `id` runs exactly once.
    #[serde(default)]
    pub exports: Vec<Export>,
}

/// Kind of backup repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RepositoryKind {
    /// A BorgBackup repository, local or over SSH.
    Borg,
    /// An S3-compatible object store bucket (typed, not a borg repository: the
    /// reconciler reports it as unsupported for schedules, restores and exports).
    S3,
}

/// borg's repository encryption mode (`borg init --encryption`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Encryption {
    /// No encryption, no authentication.
    None,
    /// Authenticated (HMAC-SHA256), not encrypted; needs a passphrase.
    Authenticated,
    /// Authenticated (BLAKE2b), not encrypted; needs a passphrase.
    AuthenticatedBlake2,
    /// AES-CTR + HMAC-SHA256, key in the repository; needs a passphrase.
    Repokey,
    /// AES-CTR + BLAKE2b, key in the repository; needs a passphrase.
    RepokeyBlake2,
}

impl Encryption {
    /// The `borg init --encryption` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Encryption::None => "none",
            Encryption::Authenticated => "authenticated",
            Encryption::AuthenticatedBlake2 => "authenticated-blake2",
            Encryption::Repokey => "repokey",
            Encryption::RepokeyBlake2 => "repokey-blake2",
        }
    }
}

/// One backup repository.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackupRepository {
    /// Repository name, unique in the section (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 63
    /// characters); schedules, restores and exports refer to it.
    pub name: String,
    /// Repository kind.
    pub kind: RepositoryKind,
    /// Location. borg: an absolute path or `ssh://[user@]host[:port]/path`;
    /// s3: `s3://bucket[/prefix]`. A missing borg repository is initialised; a
    /// repository is never deleted.
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
    /// borg only: encryption used when the repository is initialised (default
    /// `repokey-blake2` with a passphrase, `none` without). Never changes an existing
    /// repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

impl BackupRepository {
    /// The encryption mode `borg init` gets.
    pub fn encryption_mode(&self) -> Encryption {
        self.encryption
            .unwrap_or(if self.passphrase_secret.is_some() {
                Encryption::RepokeyBlake2
            } else {
                Encryption::None
            })
    }
}

/// What to do with slots missed while the node (or the agent) was down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Missed {
    /// Run one backup at start for the latest missed slot (default).
    #[default]
    RunOnce,
    /// Skip missed slots; wait for the next one.
    Skip,
}

/// A command run around a backup, on the host or inside a container.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Hook {
    /// The command (argv form, no shell); a non-zero exit status fails the run.
    pub command: Vec<String>,
    /// Run it inside this running container (`podman exec` / `docker exec`) instead of
    /// on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// A consistent dump streamed into the archive (`borg create --content-from-command`):
/// the archive holds the command's standard output as one file; a failing command
/// fails the backup, so a torn dump is never reported as success.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Dump {
    /// The dump command (argv form), e.g. `["pg_dumpall", "-U", "postgres"]`.
    pub command: Vec<String>,
    /// Run it inside this running container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Name of the file in the archive, e.g. `pgdata.sql`.
    pub file_name: String,
}

/// One scheduled backup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Schedule {
    /// Schedule name, unique in the section (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 63
    /// characters); archives are named `<name>-<slot, UTC, %Y%m%dT%H%MZ>`.
    pub name: String,
    /// Name of the repository to write to.
    pub repository: String,
    /// Absolute host paths to back up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Named container volumes to back up (resolved to their host mount points).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Instead of paths and volumes: a dump command whose output is the archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump: Option<Dump>,
    /// When to run: 5-field cron (`minute hour day-of-month month day-of-week`) in
    /// `timeZone`, e.g. `30 2 * * *`.
    pub cron: String,
    /// IANA time zone of `cron`, e.g. `Europe/Paris` (default `UTC`). A slot in a
    /// daylight-saving gap runs at the first minute after it; a slot in a repeated hour
    /// runs once, at its first occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Slots missed while the agent was not running.
    #[serde(default)]
    pub missed: Missed,
    /// How many archives to keep after each successful backup (`borg prune`); absent:
    /// keep everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Run `borg compact` after pruning (frees space; takes longer).
    #[serde(default)]
    pub compact: bool,
    /// Run before the backup (e.g. a dump into the volume, or flushing a database); a
    /// non-zero exit fails the run and nothing is archived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_hook: Option<Hook>,
    /// Run after the backup, whatever its outcome (e.g. resuming writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_hook: Option<Hook>,
    /// Pause the running containers that use `volumes` while they are archived (the
    /// documented freeze). Without it (and without a hook or dump), a volume in use by
    /// a running container is refused rather than archived torn.
    #[serde(default)]
    pub freeze: bool,
}

/// Archives to keep, per period (`borg prune --keep-*`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retention {
    /// Number of hourly archives to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// Number of daily archives to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// Number of weekly archives to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// Number of monthly archives to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
}

impl Retention {
    /// The `borg prune` arguments, in a fixed order.
    pub fn prune_args(&self) -> Vec<String> {
        [
            ("--keep-hourly", self.keep_hourly),
            ("--keep-daily", self.keep_daily),
            ("--keep-weekly", self.keep_weekly),
            ("--keep-monthly", self.keep_monthly),
        ]
        .into_iter()
        .filter_map(|(flag, n)| n.map(|n| format!("{flag}={n}")))
        .collect()
    }
}

/// How a restore lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMode {
    /// The target's content is replaced by the archive's (extracted next to it first,
    /// then swapped in; the target directory itself stays, so mounts keep working).
    Replace,
    /// The archive is extracted next to the target: a new volume
    /// `<targetVolume>-restore-<id>`, or the directory `<targetPath>.restore-<id>`.
    SideBySide,
}

/// One restore, run exactly once per `id`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Restore {
    /// Restore id, unique in the section; a done (or failed) id is never run again.
    pub id: String,
    /// Repository holding the archive.
    pub repository: String,
    /// Archive name, e.g. `pgdata-20261201T0230Z`.
    pub archive: String,
    /// Which source of the archive to restore: a volume name or an absolute path as
    /// the schedule listed it; default: the archive's only source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Named container volume to restore into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_volume: Option<String>,
    /// Absolute host path to restore into (instead of a volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_path: Option<String>,
    /// `replace` or `side-by-side`.
    pub mode: RestoreMode,
}

/// Where an export goes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct S3Destination {
    /// Endpoint URL, e.g. `https://s3.fr-par.scw.cloud` or `http://127.0.0.1:9000`.
    pub endpoint: String,
    /// Bucket name.
    pub bucket: String,
    /// Object key, e.g. `exports/pgdata-20261201.tar`.
    pub key: String,
    /// Region (default `us-east-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Name of the secret holding the credentials as JSON:
    /// `{"accessKeyId": "…", "secretAccessKey": "…"}`.
    pub credentials_secret: String,
}

/// One export of an archive to S3, run exactly once per `id`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Export {
    /// Export id, unique in the section; a done (or failed) id is never run again.
    pub id: String,
    /// Repository holding the archive.
    pub repository: String,
    /// Archive name.
    pub archive: String,
    /// Destination object.
    pub s3: S3Destination,
    /// Lifetime of the presigned GET URL, e.g. `1h`, `30m`, `24h` (at most 24 h).
    pub url_ttl: String,
}

/// Parses a duration such as `90s`, `30m`, `1h30m` (units `s`, `m`, `h`).
pub fn parse_ttl(s: &str) -> Option<std::time::Duration> {
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut any = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return None,
        };
        let n: u64 = num.parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        num.clear();
        any = true;
    }
    (any && num.is_empty() && total > 0).then(|| std::time::Duration::from_secs(total))
}

/// Whether `s` is a borg archive name converge accepts: 1-200 of `[A-Za-z0-9._+-]`.
pub fn is_archive_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
        && !s.starts_with('.')
}

/// Whether `user` may be the user part of an `ssh://` URL: a POSIX-style login name
/// (1-32 of `[A-Za-z0-9._-]`, not starting with `-`), so nothing in it reaches ssh as
/// an option (`ssh://-oProxyCommand=…@host/repo` would).
fn is_ssh_user(user: &str) -> bool {
    (1..=32).contains(&user.len())
        && !user.starts_with('-')
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `host` may be the host part of an `ssh://` URL: a DNS name (no wildcard,
/// no label starting with `-`), an IPv4 address, or a bracketed IPv6 address.
fn is_ssh_host(host: &str) -> bool {
    match host.strip_prefix('[') {
        Some(r) => r
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => {
            host.parse::<std::net::Ipv4Addr>().is_ok()
                || (is_dns_name(host, false) && !host.contains('*') && !host.ends_with('.'))
        }
    }
}

/// Checks a borg repository URL: an absolute path, or `ssh://[user@]host[:port]/path`
/// whose user and host are checked so that borg's `ssh … user@host borg serve` can
/// never be handed an option; `Err` says which part is wrong.
fn check_borg_url(url: &str) -> Result<(), &'static str> {
    if url.contains(|c: char| c.is_control()) {
        return Err("control characters are not allowed");
    }
    if url.starts_with('/') {
        return Ok(());
    }
    let Some(rest) = url.strip_prefix("ssh://") else {
        return Err("neither an absolute path nor ssh://");
    };
    let Some((authority, path)) = rest.split_once('/') else {
        return Err("no path after the host");
    };
    let host_port = match authority.split_once('@') {
        Some((user, host_port)) => {
            if !is_ssh_user(user) {
                return Err("invalid user (1-32 of [A-Za-z0-9._-], not starting with -)");
            }
            host_port
        }
        None => authority,
    };
    let (host, port) = match host_port.find(']') {
        Some(end) if host_port.starts_with('[') => {
            let (h, p) = host_port.split_at(end + 1);
            match p {
                "" => (h, None),
                p => match p.strip_prefix(':') {
                    Some(p) => (h, Some(p)),
                    None => return Err("invalid host"),
                },
            }
        }
        _ => match host_port.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        },
    };
    if !is_ssh_host(host) {
        return Err("invalid host (a DNS name, an IPv4 address or [IPv6])");
    }
    if !port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0) && !p.starts_with('+')) {
        return Err("invalid port");
    }
    if path.is_empty() {
        return Err("no path after the host");
    }
    Ok(())
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
    validate_repositories(spec, path, problems);
    validate_schedules(spec, path, problems);
    validate_restores(spec, path, problems);
    validate_exports(spec, path, problems);
}

fn validate_repositories(spec: &BackupsSpec, path: &str, problems: &mut Problems) {
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
                if let Err(why) = check_borg_url(&r.url) {
                    problems.push_hint(
                        format!("{rp}.url"),
                        format!("invalid borg repository url {:?}: {why}", r.url),
                        "an absolute path (/srv/backup/repo) or ssh://[user@]host[:port]/path",
                    );
                }
                if r.encryption.is_some_and(|e| e != Encryption::None)
                    && r.passphrase_secret.is_none()
                {
                    problems.push_hint(
                        format!("{rp}.passphraseSecret"),
                        "an encrypted or authenticated repository needs a passphrase",
                        "name the secret holding it, or set encryption to none",
                    );
                }
                if r.encryption == Some(Encryption::None) && r.passphrase_secret.is_some() {
                    problems.push_hint(
                        format!("{rp}.encryption"),
                        "encryption none takes no passphrase",
                        "remove passphraseSecret, or choose repokey-blake2",
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
                if r.encryption.is_some() {
                    problems.push_hint(
                        format!("{rp}.encryption"),
                        "encryption applies to borg repositories only",
                        "remove it",
                    );
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
}

/// `name` must be a borg repository of the section (schedules, restores and exports).
fn check_repo(spec: &BackupsSpec, path: &str, field: String, name: &str, problems: &mut Problems) {
    match spec.repositories.iter().find(|r| r.name == name) {
        None => {
            let available: Vec<&str> = spec.repositories.iter().map(|r| r.name.as_str()).collect();
            problems.push_hint(
                field,
                format!("no repository named {name:?}"),
                if available.is_empty() {
                    format!("define it in {path}.repositories")
                } else {
                    format!("available: {}", available.join(", "))
                },
            );
        }
        Some(r) if r.kind != RepositoryKind::Borg => problems.push_hint(
            field,
            format!("repository {name:?} is not a borg repository"),
            "schedules, restores and exports need a borg repository",
        ),
        Some(_) => {}
    }
}

fn validate_schedules(spec: &BackupsSpec, path: &str, problems: &mut Problems) {
    let mut schedules = Unique::new("schedule name", format!("{path}.schedules"));
    for (i, j) in spec.schedules.iter().enumerate() {
        let jp = format!("{path}.schedules[{i}]");
        if !is_name(&j.name) {
            problems.push_hint(
                format!("{jp}.name"),
                format!("invalid schedule name {:?}", j.name),
                "use [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 63 characters",
            );
        } else {
            schedules.check(&j.name, i, format!("{jp}.name"), problems);
        }
        check_repo(
            spec,
            path,
            format!("{jp}.repository"),
            &j.repository,
            problems,
        );
        match (&j.dump, j.paths.is_empty() && j.volumes.is_empty()) {
            (None, true) => problems.push_hint(
                jp.clone(),
                "schedule backs up nothing",
                "list at least one of paths and volumes, or a dump",
            ),
            (Some(_), false) => problems.push_hint(
                format!("{jp}.dump"),
                "a dump is the whole archive",
                "use a separate schedule for paths and volumes",
            ),
            _ => {}
        }
        for (k, p) in j.paths.iter().enumerate() {
            if !p.starts_with('/') || p.contains('\0') {
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
        if let Err(why) = crate::cron::Cron::parse(&j.cron) {
            problems.push_hint(
                format!("{jp}.cron"),
                format!("invalid cron {:?}: {why}", j.cron),
                "5 cron fields: minute hour day-of-month month day-of-week, e.g. \"30 2 * * *\"",
            );
        }
        if let Some(tz) = &j.time_zone {
            if tz.parse::<chrono_tz::Tz>().is_err() {
                problems.push_hint(
                    format!("{jp}.timeZone"),
                    format!("unknown time zone {tz:?}"),
                    "an IANA name such as Europe/Paris or UTC",
                );
            }
        }
        if let Some(r) = &j.retention {
            let keeps = [r.keep_hourly, r.keep_daily, r.keep_weekly, r.keep_monthly]
                .iter()
                .any(|n| n.is_some_and(|n| n > 0));
            if !keeps {
                problems.push_hint(
                    format!("{jp}.retention"),
                    "retention keeps no archives",
                    "set at least one of keepHourly, keepDaily, keepWeekly, keepMonthly above 0, or omit retention to keep everything",
                );
            }
        }
        for (field, hook) in [("preHook", &j.pre_hook), ("postHook", &j.post_hook)] {
            if let Some(h) = hook {
                check_command(&format!("{jp}.{field}"), &h.command, &h.container, problems);
            }
        }
        if let Some(d) = &j.dump {
            check_command(&format!("{jp}.dump"), &d.command, &d.container, problems);
            let f = &d.file_name;
            if f.is_empty() || f.contains('/') || f.contains('\0') || f == "." || f == ".." {
                problems.push_hint(
                    format!("{jp}.dump.fileName"),
                    format!("invalid file name {f:?}"),
                    "a plain file name such as db.sql",
                );
            }
        }
        if j.freeze && j.volumes.is_empty() {
            problems.push_hint(
                format!("{jp}.freeze"),
                "freeze applies to volumes only",
                "remove it, or list the volumes",
            );
        }
    }
}

fn validate_restores(spec: &BackupsSpec, path: &str, problems: &mut Problems) {
    let mut restores = Unique::new("restore id", format!("{path}.restores"));
    for (i, r) in spec.restores.iter().enumerate() {
        let rp = format!("{path}.restores[{i}]");
        check_id(&rp, &r.id, i, &mut restores, problems);
        check_repo(
            spec,
            path,
            format!("{rp}.repository"),
            &r.repository,
            problems,
        );
        check_archive(&rp, &r.archive, problems);
        match (&r.target_volume, &r.target_path) {
            (Some(v), None) => {
                if !is_name(v) {
                    problems.push(
                        format!("{rp}.targetVolume"),
                        format!("invalid volume name {v:?}"),
                    );
                }
            }
            (None, Some(p)) => {
                if !p.starts_with('/') || p.contains('\0') || p == "/" {
                    problems.push_hint(
                        format!("{rp}.targetPath"),
                        format!("path {p:?} is not an absolute path below /"),
                        "e.g. /srv/data",
                    );
                }
            }
            _ => problems.push_hint(
                rp.clone(),
                "a restore needs exactly one of targetVolume and targetPath",
                "name the volume or the host path to restore into",
            ),
        }
        if let Some(s) = &r.source {
            if !(is_name(s) || s.starts_with('/')) {
                problems.push_hint(
                    format!("{rp}.source"),
                    format!("invalid source {s:?}"),
                    "a volume name or an absolute path the schedule backed up",
                );
            }
        }
    }
}

fn validate_exports(spec: &BackupsSpec, path: &str, problems: &mut Problems) {
    let mut exports = Unique::new("export id", format!("{path}.exports"));
    for (i, e) in spec.exports.iter().enumerate() {
        let ep = format!("{path}.exports[{i}]");
        check_id(&ep, &e.id, i, &mut exports, problems);
        check_repo(
            spec,
            path,
            format!("{ep}.repository"),
            &e.repository,
            problems,
        );
        check_archive(&ep, &e.archive, problems);
        if !check_http_url(&e.s3.endpoint) {
            problems.push_hint(
                format!("{ep}.s3.endpoint"),
                format!("invalid endpoint URL {:?}", e.s3.endpoint),
                "e.g. https://s3.eu-central-1.amazonaws.com",
            );
        }
        if !check_s3_url(&format!("s3://{}", e.s3.bucket)) || e.s3.bucket.contains('/') {
            problems.push_hint(
                format!("{ep}.s3.bucket"),
                format!("invalid bucket {:?}", e.s3.bucket),
                "3-63 of [a-z0-9.-]",
            );
        }
        if e.s3.key.is_empty() || e.s3.key.len() > 1024 || e.s3.key.starts_with('/') {
            problems.push_hint(
                format!("{ep}.s3.key"),
                format!("invalid object key {:?}", e.s3.key),
                "1-1024 bytes, not starting with /",
            );
        }
        if let Some(reg) = &e.s3.region {
            if reg.is_empty()
                || !reg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                problems.push(format!("{ep}.s3.region"), format!("invalid region {reg:?}"));
            }
        }
        if !is_secret_name(&e.s3.credentials_secret) {
            problems.push(
                format!("{ep}.s3.credentialsSecret"),
                format!("invalid secret name {:?}", e.s3.credentials_secret),
            );
        }
        match parse_ttl(&e.url_ttl) {
            Some(d) if d <= MAX_URL_TTL => {}
            Some(_) => problems.push_hint(
                format!("{ep}.urlTtl"),
                format!("urlTtl {:?} is over 24 h", e.url_ttl),
                "at most 24h",
            ),
            None => problems.push_hint(
                format!("{ep}.urlTtl"),
                format!("invalid duration {:?}", e.url_ttl),
                "e.g. 30m, 1h, 24h",
            ),
        }
    }
}

/// The longest lifetime of an export's presigned URL.
pub const MAX_URL_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn check_id<'a>(p: &str, id: &'a str, i: usize, unique: &mut Unique<'a>, problems: &mut Problems) {
    if !is_name(id) {
        problems.push_hint(
            format!("{p}.id"),
            format!("invalid id {id:?}"),
            "use [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 63 characters",
        );
    } else {
        unique.check(id, i, format!("{p}.id"), problems);
    }
}

fn check_archive(p: &str, archive: &str, problems: &mut Problems) {
    if !is_archive_name(archive) {
        problems.push_hint(
            format!("{p}.archive"),
            format!("invalid archive name {archive:?}"),
            "1-200 of [A-Za-z0-9._+-], e.g. pgdata-20261201T0230Z",
        );
    }
}

fn check_command(p: &str, command: &[String], container: &Option<String>, problems: &mut Problems) {
    if command.first().is_none_or(String::is_empty) {
        problems.push(format!("{p}.command"), "command must not be empty");
    }
    if command.iter().any(|a| a.contains('\0')) {
        problems.push(format!("{p}.command"), "command contains a NUL byte");
    }
    if let Some(c) = container {
        if !is_name(c) {
            problems.push(
                format!("{p}.container"),
                format!("invalid container name {c:?}"),
            );
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
                 "credentialsSecret": "borg-ssh-key", "encryption": "none"},
                {"name": "s3", "kind": "s3", "url": "s3://acme-backups/fra1", "endpoint": "https://s3.fr-par.scw.cloud",
                 "region": "fr-par", "credentialsSecret": "s3-creds", "passphraseSecret": "restic-pass"}
            ],
            "schedules": [
                {"name": "pg", "repository": "local", "cron": "*/15 * * * *", "timeZone": "Europe/Paris",
                 "dump": {"command": ["pg_dumpall", "-U", "postgres"], "container": "postgres", "fileName": "pg.sql"},
                 "retention": {"keepDaily": 7, "keepWeekly": 4}, "missed": "skip"},
                {"name": "etc", "repository": "offsite", "paths": ["/etc", "/srv/app"], "volumes": ["app-data"],
                 "cron": "30 2 * * 1-5,0", "retention": {"keepMonthly": 12}, "compact": true, "freeze": true,
                 "preHook": {"command": ["sync"]}, "postHook": {"command": ["true"], "container": "app"}}
            ],
            "restores": [
                {"id": "r1", "repository": "local", "archive": "pg-20261201T0215Z", "targetVolume": "pgdata", "mode": "side-by-side"},
                {"id": "r2", "repository": "offsite", "archive": "etc-20261201T0130Z", "source": "/etc",
                 "targetPath": "/srv/restore/etc", "mode": "replace"}
            ],
            "exports": [
                {"id": "e1", "repository": "local", "archive": "pg-20261201T0215Z",
                 "s3": {"endpoint": "http://127.0.0.1:9000", "bucket": "exports", "key": "pg/1.tar",
                        "credentialsSecret": "s3-export"}, "urlTtl": "24h"}
            ]
        })
    }

    #[test]
    fn good_spec_passes() {
        let s = spec(good());
        assert_eq!(problems(&s), Vec::<String>::new());
        let back: BackupsSpec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            s.repositories[0].encryption_mode(),
            Encryption::RepokeyBlake2
        );
        assert_eq!(s.repositories[1].encryption_mode(), Encryption::None);
    }

    #[test]
    fn repository_rules() {
        let s = spec(json!({"repositories": [
            {"name": "a", "kind": "borg", "url": "relative/path", "region": "x"},
            {"name": "a", "kind": "borg", "url": "ssh://host"},
            {"name": "b", "kind": "s3", "url": "s3://UPPER", "endpoint": "ftp://x", "region": "EU"},
            {"name": "c", "kind": "s3", "url": "https://bucket", "credentialsSecret": "bad secret"},
            {"name": "d", "kind": "borg", "url": "/r", "encryption": "repokey"},
            {"name": "e", "kind": "borg", "url": "/r", "encryption": "none", "passphraseSecret": "p"}
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
                "$.backups.repositories[4].passphraseSecret",
                "$.backups.repositories[5].encryption",
            ]
        );
    }

    #[test]
    fn backups_ssh_url_user_and_host_validated() {
        for ok in [
            "/srv/backup/repo",
            "ssh://backup.example.net/./repo",
            "ssh://borg@backup.example.net:2222/./repo",
            "ssh://borg-1.x_y@10.0.0.9/srv/repo",
            "ssh://u@[fd00::9]:22/repo",
            "ssh://[fd00::9]/repo",
        ] {
            assert_eq!(check_borg_url(ok), Ok(()), "{ok}");
        }
        // Each would hand ssh an option or a second argument, or is no host at all.
        for bad in [
            "ssh://-oProxyCommand=touch%20x@host/repo",
            "ssh://-oProxyCommand=x/repo",
            "ssh://-host/repo",
            "ssh://user@-host/repo",
            "ssh://us er@host/repo",
            "ssh://user\t@host/repo",
            "ssh://a@b@host/repo",
            "ssh://@host/repo",
            "ssh://user@host name/repo",
            "ssh://user@host\n-oX/repo",
            "ssh://user@*.example.net/repo",
            "ssh://user@[not-ip]/repo",
            "ssh://user@[fd00::9]x/repo",
            "ssh://user@fd00::9/repo",
            "ssh://user@host:+22/repo",
            "ssh://user@host:0/repo",
            "ssh://user@host/",
            "/srv/repo\n",
        ] {
            assert!(check_borg_url(bad).is_err(), "{bad:?}");
        }
        let s = spec(json!({"repositories": [
            {"name": "a", "kind": "borg", "url": "ssh://-oProxyCommand=sh@host/repo"},
            {"name": "b", "kind": "borg", "url": "ssh://borg@-oProxyCommand=sh/repo"}
        ]}));
        assert_eq!(
            problems(&s),
            vec![
                "$.backups.repositories[0].url",
                "$.backups.repositories[1].url"
            ]
        );
    }

    #[test]
    fn schedule_rules() {
        let mut v = good();
        v["schedules"] = json!([
            {"name": "x", "repository": "nope", "cron": "0 3 * * *", "paths": ["etc"]},
            {"name": "x", "repository": "local", "cron": "daily"},
            {"name": "y", "repository": "s3", "cron": "60 * * * *", "volumes": ["bad vol"], "timeZone": "Mars/Olympus",
             "retention": {"keepDaily": 0}, "preHook": {"command": []}, "postHook": {"command": ["x"], "container": "a b"}},
            {"name": "z", "repository": "local", "cron": "* * * * *", "paths": ["/a"], "freeze": true,
             "dump": {"command": ["d"], "fileName": "a/b"}}
        ]);
        let s = spec(v);
        let mut p = Problems::default();
        validate(&s, "$.backups", &mut p);
        let got: Vec<_> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            got,
            vec![
                "$.backups.schedules[0].repository",
                "$.backups.schedules[0].paths[0]",
                "$.backups.schedules[1].name",
                "$.backups.schedules[1]",
                "$.backups.schedules[1].cron",
                "$.backups.schedules[2].repository",
                "$.backups.schedules[2].volumes[0]",
                "$.backups.schedules[2].cron",
                "$.backups.schedules[2].timeZone",
                "$.backups.schedules[2].retention",
                "$.backups.schedules[2].preHook.command",
                "$.backups.schedules[2].postHook.container",
                "$.backups.schedules[3].dump",
                "$.backups.schedules[3].dump.fileName",
                "$.backups.schedules[3].freeze",
            ]
        );
        assert_eq!(
            p.0[0].hint.as_deref(),
            Some("available: local, offsite, s3")
        );
    }

    #[test]
    fn restore_and_export_rules() {
        let mut v = good();
        v["restores"] = json!([
            {"id": "r1", "repository": "local", "archive": "a b", "mode": "replace"},
            {"id": "r1", "repository": "local", "archive": "a", "targetVolume": "v", "targetPath": "/x", "mode": "replace"},
            {"id": "r3", "repository": "local", "archive": "a", "targetPath": "/", "source": "rel/path", "mode": "side-by-side"}
        ]);
        v["exports"] = json!([
            {"id": "bad id", "repository": "nope", "archive": "a",
             "s3": {"endpoint": "ftp://x", "bucket": "B", "key": "/k", "region": "EU", "credentialsSecret": "a b"},
             "urlTtl": "25h"},
            {"id": "e2", "repository": "local", "archive": "a",
             "s3": {"endpoint": "http://127.0.0.1:9000", "bucket": "b-1", "key": "k", "credentialsSecret": "c"},
             "urlTtl": "soon"}
        ]);
        let s = spec(v);
        assert_eq!(
            problems(&s),
            vec![
                "$.backups.restores[0].archive",
                "$.backups.restores[0]",
                "$.backups.restores[1].id",
                "$.backups.restores[1]",
                "$.backups.restores[2].targetPath",
                "$.backups.restores[2].source",
                "$.backups.exports[0].id",
                "$.backups.exports[0].repository",
                "$.backups.exports[0].s3.endpoint",
                "$.backups.exports[0].s3.bucket",
                "$.backups.exports[0].s3.key",
                "$.backups.exports[0].s3.region",
                "$.backups.exports[0].s3.credentialsSecret",
                "$.backups.exports[0].urlTtl",
                "$.backups.exports[1].urlTtl",
            ]
        );
    }

    #[test]
    fn ttl_and_retention_args() {
        assert_eq!(
            parse_ttl("1h30m"),
            Some(std::time::Duration::from_secs(5400))
        );
        assert_eq!(parse_ttl("24h"), Some(MAX_URL_TTL));
        for bad in ["", "h", "10", "1d", "0s", "-1h"] {
            assert_eq!(parse_ttl(bad), None, "{bad}");
        }
        let r = Retention {
            keep_hourly: Some(24),
            keep_daily: None,
            keep_weekly: Some(4),
            keep_monthly: Some(0),
        };
        assert_eq!(
            r.prune_args(),
            ["--keep-hourly=24", "--keep-weekly=4", "--keep-monthly=0"]
        );
    }
}
