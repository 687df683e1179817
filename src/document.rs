//! The desired-state document (v1): the envelope, composed from each reconciler's section.
//!
//! Section semantics, the same for every reconciler:
//! - absent (key missing or `null`): the reconciler does not manage this node for now;
//!   it plans nothing and leaves every object it created earlier in place;
//! - present: the section is the complete desired set; objects the reconciler owns but
//!   the section does not list are removed, so an empty section (`[]`, or `{"records": []}`)
//!   removes everything that reconciler owns.

use crate::limits::{self, Limits};
use chrono::{DateTime, Utc};
use converge_core::{Problem, Problems};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The only document version this agent understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ApiVersion {
    #[serde(rename = "converge/v1")]
    V1,
}

/// How this node serves: a plain worker, or a proxy that also terminates TLS and routes
/// public traffic into the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Worker,
    Proxy,
}

/// The node this document is for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Node {
    /// Stable node id assigned by the control plane.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub id: String,
    /// `worker` or `proxy`.
    pub mode: Mode,
}

/// A desired-state document, version `converge/v1`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "converge desired-state document v1")]
pub struct Document {
    /// Must be `converge/v1`.
    pub api_version: ApiVersion,
    /// The node this document is for.
    pub node: Node,
    /// Monotonic document number from the control plane, from 1 to 2^53 − 1
    /// (9007199254740991, the largest integer every JSON implementation reads exactly).
    /// An agent refuses a document whose generation is not greater than the last one it
    /// accepted.
    #[schemars(range(min = 1, max = MAX_GENERATION))]
    pub generation: u64,
    /// When the control plane issued this document (RFC 3339).
    pub issued_at: DateTime<Utc>,
    /// Containers to run (Podman or Docker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<converge_containers::ContainersSpec>,
    /// Container networks converge creates and owns (bridges with fixed subnets, e.g. the
    /// node's slice of the mesh's container address space).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<converge_containers::NetworksSpec>,
    /// Credentials for the container registries images are pulled from (per registry
    /// server; images from others are pulled anonymously).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registries: Option<converge_containers::RegistriesSpec>,
    /// Images pulled ahead of need, and image garbage collection when the image
    /// store's disk fills up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<converge_containers::ImagesSpec>,
    /// WireGuard interface and peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<converge_wireguard::WireguardSpec>,
    /// Published ports and forwarding (nftables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<converge_firewall::FirewallSpec>,
    /// Service-discovery DNS (dnsmasq).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<converge_dns::DnsSpec>,
    /// Public HTTP(S) routes (Caddy); proxy nodes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<converge_routes::RoutesSpec>,
    /// Backup repositories and jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backups: Option<converge_backups::BackupsSpec>,
    /// Node metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<converge_metadata::MetadataSpec>,
    /// The converge build this node runs (self-update with rollback; needs systemd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<converge_selfupdate::AgentSpec>,
    /// Secret values sealed to this node: secret name → base64 of an X25519 sealed box
    /// (libsodium `crypto_box_seal`) made with the node's sealing key. Opened only in the
    /// agent's memory; the store keeps them sealed. A local file `<secrets dir>/<name>`
    /// overrides a value. See docs/protocol.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<std::collections::BTreeMap<String, String>>,
}

/// The largest generation: 2^53 − 1, exact in every JSON implementation.
pub const MAX_GENERATION: u64 = (1 << 53) - 1;

/// Input syntax of a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    /// YAML for `.yaml`/`.yml` files, JSON otherwise.
    pub fn from_path(path: &std::path::Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => Format::Yaml,
            _ => Format::Json,
        }
    }
}

/// Parses and fully validates a document under the default [`Limits`].
pub fn parse(text: &str, format: Format) -> Result<Document, Problems> {
    parse_with(text, format, &Limits::default())
}

/// Checks a document's bytes (size, byte-order mark, UTF-8; see
/// [`limits::document_text`]), then parses and validates it: the one entry point for
/// input from outside (files, the agent socket, the control plane).
pub fn parse_bytes(bytes: &[u8], format: Format, limits: &Limits) -> Result<Document, Problems> {
    let text = limits::document_text(bytes, limits).map_err(|p| Problems(vec![p]))?;
    parse_with(text, format, limits)
}

/// Above this many values, a document that fails the typed parse reports only the
/// typed parser's first problem instead of running the schema pass: the validator keeps
/// every error in memory at once (16 MiB of `[0,0,…]` in a string list is 8 million of
/// them, 4.5 GB), and the value it checks costs 30+ bytes per value on its own.
pub const SCHEMA_PASS_MAX_VALUES: usize = 200_000;

/// Parses and fully validates a document. On failure returns every problem found,
/// each with its JSON path; nothing about the host is read or changed.
///
/// Limits first (items, string length, NUL): for JSON one pass over the text before
/// anything is allocated per value; YAML is parsed into a value and that is checked.
/// Then the fast path: a typed parse, then the semantic rules (which also enforce the
/// few schema constraints serde does not: generation range, node id pattern). Only when
/// the typed parse fails is the JSON Schema run, to report every structural problem at
/// once rather than serde's first one (for documents of at most
/// [`SCHEMA_PASS_MAX_VALUES`] values; larger ones report serde's first problem).
pub fn parse_with(text: &str, format: Format, limits: &Limits) -> Result<Document, Problems> {
    let doc = match format {
        Format::Json => {
            let over = limits::check_json(text, limits);
            if !over.is_empty() {
                return Err(over);
            }
            serde_json::from_str::<Document>(text).map_err(|e| json_problems(text, &e))?
        }
        Format::Yaml => {
            let value = parse_yaml_value(text)?;
            let over = limits::check_value(&value, limits);
            if !over.is_empty() {
                return Err(over);
            }
            serde_yaml::from_str::<Document>(text).map_err(|e| yaml_problems(value, &e))?
        }
    };
    let mut problems = Problems::default();
    crate::validate::semantic(&doc, &mut problems);
    if problems.is_empty() {
        Ok(doc)
    } else {
        Err(problems)
    }
}

/// The problems of JSON text that failed the typed parse with `e`.
fn json_problems(text: &str, e: &serde_json::Error) -> Problems {
    let one = |path: String, message: String, hint: Option<String>| {
        Problems(vec![Problem {
            path,
            message,
            hint,
        }])
    };
    // serde_json's message ends with "at line L column C".
    if e.is_syntax() || e.is_eof() {
        return one("$".into(), format!("invalid JSON: {e}"), None);
    }
    let values = limits::json_values(text);
    if values <= SCHEMA_PASS_MAX_VALUES {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value) => {
                let problems = crate::schema::check(&value);
                if !problems.is_empty() {
                    return problems;
                }
            }
            Err(e) => return one("$".into(), format!("invalid JSON: {e}"), None),
        }
    }
    // serde's problem, at the path where it stopped reading.
    let path = limits::json_path_at(text, offset(text, e.line(), e.column()));
    let hint = (values > SCHEMA_PASS_MAX_VALUES).then(|| {
        format!(
            "a document of more than {SCHEMA_PASS_MAX_VALUES} values reports only its first structural problem"
        )
    });
    one(path, e.to_string(), hint)
}

/// The byte offset of serde_json's 1-based line and (byte) column.
fn offset(text: &str, line: usize, column: usize) -> usize {
    let start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    (start + column).min(text.len())
}

/// The problems of YAML (already parsed into `value`) that failed the typed parse.
fn yaml_problems(value: serde_json::Value, e: &serde_yaml::Error) -> Problems {
    let values = limits::value_count(&value);
    if values <= SCHEMA_PASS_MAX_VALUES {
        let problems = crate::schema::check(&value);
        if !problems.is_empty() {
            return problems;
        }
    }
    drop(value);
    Problems(vec![Problem {
        path: "$".into(),
        message: e.to_string(),
        hint: (values > SCHEMA_PASS_MAX_VALUES).then(|| {
            format!(
                "a document of more than {SCHEMA_PASS_MAX_VALUES} values reports only its first structural problem"
            )
        }),
    }])
}

fn parse_yaml_value(text: &str) -> Result<serde_json::Value, Problems> {
    serde_yaml::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(" at line {} column {}", l.line(), l.column()))
            .unwrap_or_default();
        Problems(vec![Problem {
            path: "$".into(),
            message: format!("invalid YAML{at}: {e}"),
            hint: None,
        }])
    })
}

/// Reads (see [`limits::read_file`]: never more than the size limit + 1 bytes) and
/// parses a document file, choosing the format by extension. `Err` is an I/O error;
/// `Ok(Err)` lists the document's problems.
pub fn load(path: &std::path::Path, limits: &Limits) -> anyhow::Result<Result<Document, Problems>> {
    let read = limits::read_file(path, limits)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    Ok(match read {
        Ok(bytes) => parse_bytes(&bytes, Format::from_path(path), limits),
        Err(p) => Err(Problems(vec![p])),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(containers: serde_json::Value) -> String {
        json!({
            "apiVersion": "converge/v1",
            "node": {"id": "n1", "mode": "worker"},
            "generation": 1,
            "issuedAt": "2026-11-24T10:00:00Z",
            "containers": containers
        })
        .to_string()
    }

    fn problems(text: &str, format: Format) -> Vec<String> {
        match parse(text, format) {
            Ok(_) => vec![],
            Err(p) => p
                .iter()
                .map(|p| format!("{}: {}", p.path, p.message))
                .collect(),
        }
    }

    /// Three containers with 70,000 arguments each: over the schema pass's size.
    fn padding() -> Vec<serde_json::Value> {
        (0..3)
            .map(|i| json!({"name": format!("pad{i}"), "image": "b:1", "args": vec!["x"; 70_000]}))
            .collect()
    }

    #[test]
    fn a_large_document_reports_the_first_problem_at_its_path() {
        for (bad, path, message) in [
            (
                json!({"name": "a", "image": "b:1", "command": ["sh", "-c", 0]}),
                "$.containers[3].command[2]",
                "invalid type: integer `0`, expected a string",
            ),
            (
                json!({"name": "a", "imagee": "b:1"}),
                "$.containers[3].imagee",
                "unknown field `imagee`",
            ),
            (
                json!({"name": "a"}),
                "$.containers[3]",
                "missing field `image`",
            ),
        ] {
            let mut cs = padding();
            cs.push(bad);
            let got = problems(&doc(json!(cs)), Format::Json);
            assert_eq!(got.len(), 1, "{got:?}");
            assert!(
                got[0].starts_with(&format!("{path}: {message}")),
                "{got:?} want {path}: {message}"
            );
        }
    }

    #[test]
    fn a_small_document_reports_every_problem() {
        let text = doc(json!([
            {"name": "a", "image": "b:1", "command": ["sh", 0]},
            {"name": "c", "imagee": "b:1"}
        ]));
        let got = problems(&text, Format::Json);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].starts_with("$.containers[0].command[1]: 0 is not of type"));
    }

    #[test]
    fn a_large_yaml_document_reports_the_first_problem() {
        let mut cs = padding();
        cs.push(json!({"name": "a", "image": "b:1", "command": ["sh", {"x": 1}]}));
        let text = doc(json!(cs));
        let got = problems(&text, Format::Yaml);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("invalid type: map"), "{got:?}");
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let got = problems(
            "{\n  \"apiVersion\": \"converge/v1\",\n  x\n}",
            Format::Json,
        );
        assert_eq!(
            got,
            vec!["$: invalid JSON: key must be a string at line 3 column 3"]
        );
    }

    #[test]
    fn bytes_go_through_the_limits_first() {
        let limits = Limits::default();
        let text = doc(json!([]));
        let mut with_bom = b"\xEF\xBB\xBF".to_vec();
        with_bom.extend_from_slice(text.as_bytes());
        assert!(parse_bytes(&with_bom, Format::Json, &limits).is_ok());
        assert!(parse_bytes(&with_bom, Format::Yaml, &limits).is_ok());
        let small = Limits {
            max_document_bytes: 10,
            ..limits
        };
        let err = parse_bytes(text.as_bytes(), Format::Json, &small).err();
        assert_eq!(
            err.map(|p| p.0[0].message.clone()),
            Some("document is larger than 10 bytes".into())
        );
    }

    #[test]
    fn generations_are_bounded() {
        for (generation, ok) in [
            (0u64, false),
            (1, true),
            (MAX_GENERATION, true),
            (MAX_GENERATION + 1, false),
            (u64::MAX, false),
        ] {
            let text =
                doc(json!([])).replace("\"generation\":1", &format!("\"generation\":{generation}"));
            assert_eq!(parse(&text, Format::Json).is_ok(), ok, "{generation}");
        }
    }

    #[test]
    fn the_images_section_is_validated_with_its_paths() {
        let with = |images: serde_json::Value| {
            let mut v: serde_json::Value = serde_json::from_str(&doc(json!([]))).unwrap();
            v["images"] = images;
            problems(&v.to_string(), Format::Json)
        };
        assert!(with(json!({"prefetch": ["r:5000/a:1"], "gc": {"keep": ["nginx"]}})).is_empty());
        assert_eq!(
            with(json!({"prefetch": ["nginx"], "gc": {"highPercent": 80, "lowPercent": 90}})),
            [
                "$.images.prefetch[0]: image \"nginx\" has neither a tag nor a digest",
                "$.images.gc.lowPercent: lowPercent 90 must be below highPercent 80"
            ]
        );
        // Out of a percentage's type: the schema pass names it.
        let p = with(json!({"gc": {"highPercent": 300}}));
        assert!(
            p.iter().any(|p| p.starts_with("$.images.gc.highPercent")),
            "{p:?}"
        );
    }
}
