//! The `metadata` section of the document: node labels and annotations, hostname and
//! message of the day, and their semantic validation. The reconciler itself lands in a
//! later issue.

use converge_core::problems::is_dns_name;
use converge_core::vocab::key_path;
use converge_core::Problems;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
}
