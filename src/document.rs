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

/// Parses and fully validates a document. On failure returns every problem found,
/// each with its JSON path; nothing about the host is read or changed.
///
/// Limits first (items, string length, NUL): for JSON one pass over the text before
/// anything is allocated per value; YAML is parsed into a value and that is checked.
/// Then the fast path: a typed parse, then the semantic rules (which also enforce the
/// few schema constraints serde does not: generation range, node id pattern). Only when
/// the typed parse fails is the JSON Schema run, to report every structural problem at
/// once rather than serde's first one.
pub fn parse_with(text: &str, format: Format, limits: &Limits) -> Result<Document, Problems> {
    let mut value = None;
    let over = match format {
        Format::Json => limits::check_json(text, limits),
        Format::Yaml => {
            let v = parse_value(text, format)?;
            let p = limits::check_value(&v, limits);
            value = Some(v);
            p
        }
    };
    if !over.is_empty() {
        return Err(over);
    }
    let typed = match format {
        Format::Json => serde_json::from_str::<Document>(text).map_err(|e| e.to_string()),
        Format::Yaml => serde_yaml::from_str::<Document>(text).map_err(|e| e.to_string()),
    };
    let doc = match typed {
        Ok(doc) => doc,
        Err(first) => {
            let value = match value {
                Some(v) => v,
                None => parse_value(text, format)?,
            };
            let problems = crate::schema::check(&value);
            return Err(if problems.is_empty() {
                Problems(vec![Problem {
                    path: "$".into(),
                    message: first,
                    hint: None,
                }])
            } else {
                problems
            });
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

fn parse_value(text: &str, format: Format) -> Result<serde_json::Value, Problems> {
    let syntax = |message: String| {
        Problems(vec![Problem {
            path: "$".into(),
            message,
            hint: None,
        }])
    };
    match format {
        // serde_json's message ends with "at line L column C".
        Format::Json => {
            serde_json::from_str(text).map_err(|e| syntax(format!("invalid JSON: {e}")))
        }
        Format::Yaml => serde_yaml::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(" at line {} column {}", l.line(), l.column()))
                .unwrap_or_default();
            syntax(format!("invalid YAML{at}: {e}"))
        }),
    }
}

/// Reads (at most the size limit + 1 bytes) and parses a document file, choosing the
/// format by extension. `Err` is an I/O error; `Ok(Err)` lists the document's problems.
pub fn load(path: &std::path::Path, limits: &Limits) -> anyhow::Result<Result<Document, Problems>> {
    let bytes = std::fs::File::open(path)
        .and_then(|f| limits::read_document(f, limits))
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    Ok(parse_bytes(&bytes, Format::from_path(path), limits))
}
