//! The `metadata` section of the document: node labels and annotations, hostname and
//! message of the day, the projects whose metadata the node serves to its containers
//! (entries by path, each project reached with its own bearer token), the read API's
//! listen addresses, and their semantic validation.

use converge_core::problems::is_dns_name;
use converge_core::vocab::key_path;
use converge_core::Problems;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// Descriptive data about the node and the few host settings that go with it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetadataSpec {
    /// Node labels, reported back in status and usable for selection by the control
    /// plane. Keys: `[a-z0-9]([a-z0-9._/-]*)?`, at most 63 characters; values at most
    /// 253 characters on one line.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form annotations (not used for selection). Keys at most 253 characters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Host name to set (a DNS name, at most 64 characters); absent: left as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Message of the day shown at login (written to `/etc/motd`); absent: left as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub motd: Option<String>,
    /// Projects whose metadata this node serves on its read API
    /// (`GET /v1/metadata/{path}`); each bearer token reads its own project only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub projects: Vec<Project>,
    /// Addresses (`ip:port`) the read API listens on. Absent: when there are projects,
    /// `127.0.0.1:8500` plus port 8500 on the gateway address of every container
    /// network of the document (where containers reach the node, as
    /// `metadata.internal:8500` with a DNS record). An empty list serves nothing over TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<Vec<String>>,
}

/// One project's metadata and the hash of the token that reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Project {
    /// Project id: `[a-z0-9]([a-z0-9-]*[a-z0-9])?`, at most 63 characters.
    pub id: String,
    /// Lower-case hex SHA-256 of the project's bearer token (64 characters). The token
    /// itself never travels in the document; containers are given it by the control
    /// plane. Unique across projects.
    pub token_sha256: String,
    /// Requests per second one token may make (a token bucket holding one second's
    /// worth); default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    /// Entries by path: segments of `[A-Za-z0-9._-]` separated by `/` (no empty, `.` or
    /// `..` segment), at most 256 bytes; any JSON value of at most 64 KiB serialised.
    /// At most 10,000 entries and 8 MiB per project.
    #[serde(default)]
    pub entries: BTreeMap<String, serde_json::Value>,
}

/// Port of the read API when `listen` is absent.
pub const DEFAULT_PORT: u16 = 8500;
/// Default `rateLimit`.
pub const DEFAULT_RATE_LIMIT: u32 = 100;
/// Longest entry path, in bytes.
pub const MAX_PATH_LEN: usize = 256;
/// Largest entry value, serialised.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most entries in one project.
pub const MAX_ENTRIES: usize = 10_000;
/// Largest project, all serialised values together.
pub const MAX_PROJECT_BYTES: usize = 8 << 20;
/// Most projects on one node.
pub const MAX_PROJECTS: usize = 1_000;

/// Whether `id` is a valid project id.
pub fn is_project_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Whether `s` is a lower-case hex SHA-256.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Whether `path` is a valid entry path.
pub fn is_entry_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= MAX_PATH_LEN
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        })
}

/// Semantic checks of the projects and listen addresses.
fn validate_projects(spec: &MetadataSpec, path: &str, problems: &mut Problems) {
    if spec.projects.len() > MAX_PROJECTS {
        problems.push(
            format!("{path}.projects"),
            format!("{} projects, at most {MAX_PROJECTS}", spec.projects.len()),
        );
    }
    let mut ids = BTreeSet::new();
    let mut hashes = BTreeSet::new();
    for (i, p) in spec.projects.iter().enumerate() {
        let pp = format!("{path}.projects[{i}]");
        if !is_project_id(&p.id) {
            problems.push_hint(
                format!("{pp}.id"),
                format!("invalid project id {:?}", p.id),
                "[a-z0-9]([a-z0-9-]*[a-z0-9])?, at most 63 characters, e.g. storefront",
            );
        } else if !ids.insert(p.id.as_str()) {
            problems.push(
                format!("{pp}.id"),
                format!("duplicate project id {:?}", p.id),
            );
        }
        if !is_sha256_hex(&p.token_sha256) {
            // Never echo the value: a token pasted here by mistake must not reach logs.
            problems.push_hint(
                format!("{pp}.tokenSha256"),
                "not a lower-case hex SHA-256 (64 characters of 0-9a-f)",
                "the hash of the token, e.g. `printf %s \"$TOKEN\" | sha256sum`, never the token itself",
            );
        } else if !hashes.insert(p.token_sha256.as_str()) {
            problems.push(
                format!("{pp}.tokenSha256"),
                "the same token hash as another project: a token reads one project only",
            );
        }
        if p.rate_limit == Some(0) {
            problems.push(
                format!("{pp}.rateLimit"),
                "must be at least 1 request per second",
            );
        }
        if p.entries.len() > MAX_ENTRIES {
            problems.push(
                format!("{pp}.entries"),
                format!("{} entries, at most {MAX_ENTRIES}", p.entries.len()),
            );
        }
        let mut total = 0usize;
        for (k, v) in &p.entries {
            let ep = key_path(&format!("{pp}.entries"), k);
            if !is_entry_path(k) {
                problems.push_hint(
                    ep.clone(),
                    format!("invalid entry path {k:?}"),
                    "segments of [A-Za-z0-9._-] separated by /, no empty, . or .. segment, at most 256 bytes, e.g. db/primary/host",
                );
            }
            let size = serde_json::to_string(v)
                .map(|s| s.len())
                .unwrap_or(usize::MAX);
            total = total.saturating_add(size);
            if size > MAX_VALUE_BYTES {
                problems.push(
                    ep,
                    format!("value is {size} bytes serialised, at most 64 KiB"),
                );
            }
        }
        if total > MAX_PROJECT_BYTES {
            problems.push(
                format!("{pp}.entries"),
                format!("values total {total} bytes serialised, at most 8 MiB"),
            );
        }
    }
    let mut seen = BTreeSet::new();
    for (i, a) in spec.listen.iter().flatten().enumerate() {
        let lp = format!("{path}.listen[{i}]");
        match a.parse::<SocketAddr>() {
            Err(_) => problems.push_hint(
                lp,
                format!("not an address with a port: {a:?}"),
                "ip:port, e.g. 127.0.0.1:8500 or [fd00::1]:8500",
            ),
            Ok(sa) if sa.port() == 0 => problems.push(lp, "port 0 is not a fixed port"),
            Ok(sa) if !seen.insert(sa) => problems.push(lp, format!("duplicate address {sa}")),
            Ok(_) => {}
        }
    }
}

/// Maximum length of `motd`, in bytes.
pub const MAX_MOTD_LEN: usize = 64 * 1024;

/// Whether `key` is a valid node label key.
pub fn is_label_key(key: &str) -> bool {
    let b = key.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'/' | b'-')
        })
}

/// Semantic checks of the section; `path` is its JSON path (`$.metadata`).
pub fn validate(spec: &MetadataSpec, path: &str, problems: &mut Problems) {
    for (k, v) in &spec.labels {
        let lp = key_path(&format!("{path}.labels"), k);
        if !is_label_key(k) {
            problems.push_hint(
                lp,
                format!("invalid label key {k:?}"),
                "[a-z0-9]([a-z0-9._/-]*)?, at most 63 characters, e.g. topology/region",
            );
        } else if v.len() > 253 || v.contains(|c: char| c.is_control()) {
            problems.push(lp, "label value must be one line of at most 253 characters");
        }
    }
    for k in spec.annotations.keys() {
        if k.is_empty()
            || k.len() > 253
            || k.contains(|c: char| c.is_control() || c.is_whitespace())
        {
            problems.push(
                key_path(&format!("{path}.annotations"), k),
                format!("invalid annotation key {k:?}"),
            );
        }
    }
    if let Some(h) = &spec.hostname {
        if !is_dns_name(h, false) || h.contains('*') || h.ends_with('.') {
            problems.push_hint(
                format!("{path}.hostname"),
                format!("not a valid host name: {h:?}"),
                "letters, digits and hyphens in dot-separated labels, e.g. worker-fra1-07",
            );
        } else if h.len() > 64 {
            problems.push_hint(
                format!("{path}.hostname"),
                format!("host name is {} characters long", h.len()),
                "Linux host names are at most 64 characters",
            );
        }
    }
    if let Some(m) = &spec.motd {
        if m.len() > MAX_MOTD_LEN || m.contains('\0') {
            problems.push(
                format!("{path}.motd"),
                "motd must be at most 64 KiB and contain no NUL",
            );
        }
    }
    validate_projects(spec, path, problems);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(spec: &MetadataSpec) -> Vec<String> {
        let mut p = Problems::default();
        validate(spec, "$.metadata", &mut p);
        p.iter().map(|p| p.path.clone()).collect()
    }

    #[test]
    fn good_spec_passes() {
        let s: MetadataSpec = serde_json::from_value(json!({
            "labels": {"region": "eu-central", "topology/zone": "fra1", "tier": "worker"},
            "annotations": {"owner.example.com/team": "platform", "note": "multi\nline ok"},
            "hostname": "worker-fra1-07.nodes.example.net",
            "motd": "Managed by converge. Changes will be overwritten.\n"
        }))
        .unwrap();
        assert_eq!(problems(&s), Vec::<String>::new());
        let back: MetadataSpec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(problems(&MetadataSpec::default()), Vec::<String>::new());
    }

    #[test]
    fn each_rule_reports_its_path() {
        let s: MetadataSpec = serde_json::from_value(json!({
            "labels": {"Region": "x", "-a": "y", "ok": "line\nbreak", "k".repeat(64): "z"},
            "annotations": {"": "x", "sp ace": "y"},
            "hostname": "bad_host",
            "motd": "nul\u{0}"
        }))
        .unwrap();
        assert_eq!(
            problems(&s),
            vec![
                "$.metadata.labels[\"-a\"]",
                "$.metadata.labels.Region",
                format!("$.metadata.labels.{}", "k".repeat(64)).as_str(),
                "$.metadata.labels.ok",
                "$.metadata.annotations[\"\"]",
                "$.metadata.annotations[\"sp ace\"]",
                "$.metadata.hostname",
                "$.metadata.motd",
            ]
        );
        let long: MetadataSpec = serde_json::from_value(
            json!({"hostname": format!("{}.{}", "a".repeat(40), "b".repeat(40))}),
        )
        .unwrap();
        assert_eq!(problems(&long), vec!["$.metadata.hostname"]);
    }

    const H1: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const H2: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    #[test]
    fn projects_are_checked_with_their_paths() {
        let s: MetadataSpec = serde_json::from_value(json!({
            "projects": [
                {"id": "shop", "tokenSha256": H1, "entries": {"db/host": "10.0.0.1", "flags": {"a": true}}},
                {"id": "shop", "tokenSha256": H1, "rateLimit": 0},
                {"id": "-bad", "tokenSha256": "ABC", "entries": {"a//b": 1, "../x": 2, "ok": "x".repeat(70_000)}},
                {"id": "other", "tokenSha256": H2}
            ],
            "listen": ["127.0.0.1:8500", "nope", "127.0.0.1:8500", "10.0.0.1:0"]
        }))
        .unwrap();
        assert_eq!(
            problems(&s),
            vec![
                "$.metadata.projects[1].id",
                "$.metadata.projects[1].tokenSha256",
                "$.metadata.projects[1].rateLimit",
                "$.metadata.projects[2].id",
                "$.metadata.projects[2].tokenSha256",
                "$.metadata.projects[2].entries[\"../x\"]",
                "$.metadata.projects[2].entries[\"a//b\"]",
                "$.metadata.projects[2].entries.ok",
                "$.metadata.listen[1]",
                "$.metadata.listen[2]",
                "$.metadata.listen[3]",
            ]
        );
    }

    #[test]
    fn entry_paths() {
        for ok in ["a", "db/primary/host", "a.b_c-d/E9", "x/.hidden"] {
            assert!(is_entry_path(ok), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "./a",
            "a/..",
            "a b",
            "ä",
            &"a".repeat(257),
        ] {
            assert!(!is_entry_path(bad), "{bad}");
        }
        assert!(is_project_id("a") && is_project_id("shop-1") && !is_project_id("Shop"));
        assert!(is_sha256_hex(H1) && !is_sha256_hex(&H1.to_uppercase()));
    }
}
