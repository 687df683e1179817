//! JSON Schema of the document: generated from the types, and used to validate input so
//! that every structural problem is reported at once with its JSON path.

use crate::document::Document;
use converge_core::{Problem, Problems};
use std::sync::OnceLock;

/// The document's JSON Schema (draft 2020-12) as pretty JSON, as checked in under
/// `schemas/desired-state.v1.json`.
pub fn json() -> String {
    let schema = schemars::schema_for!(Document);
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}

fn validator() -> Option<&'static jsonschema::Validator> {
    static V: OnceLock<Option<jsonschema::Validator>> = OnceLock::new();
    V.get_or_init(|| {
        let schema = serde_json::to_value(schemars::schema_for!(Document)).ok()?;
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .ok()
    })
    .as_ref()
}

/// Validates `value` against the schema, returning every violation.
pub fn check(value: &serde_json::Value) -> Problems {
    let Some(v) = validator() else {
        return Problems(vec![Problem {
            path: "$".into(),
            message: "internal error: the document schema does not compile".into(),
            hint: None,
        }]);
    };
    let mut problems: Vec<Problem> = v
        .iter_errors(value)
        .map(|e| Problem {
            path: pointer_to_path(&e.instance_path().to_string()),
            message: shorten(&e.to_string()),
            hint: None,
        })
        .collect();
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    problems.dedup();
    Problems(problems)
}

/// `/containers/3/ports/0/hostPort` → `$.containers[3].ports[0].hostPort`.
pub fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::from("$");
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.parse::<usize>().is_ok() {
            out.push_str(&format!("[{seg}]"));
        } else if seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push('.');
            out.push_str(&seg);
        } else {
            out.push_str(&format!("[{seg:?}]"));
        }
    }
    out
}

/// Keeps messages readable when the validator quotes a large value.
fn shorten(msg: &str) -> String {
    const MAX: usize = 200;
    if msg.len() <= MAX {
        return msg.to_string();
    }
    let cut = (0..=MAX)
        .rev()
        .find(|i| msg.is_char_boundary(*i))
        .unwrap_or(0);
    format!("{}…", &msg[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_become_json_paths() {
        assert_eq!(
            pointer_to_path("/containers/3/ports/0/hostPort"),
            "$.containers[3].ports[0].hostPort"
        );
        assert_eq!(pointer_to_path(""), "$");
        assert_eq!(pointer_to_path("/labels/a~1b"), "$.labels[\"a/b\"]");
    }

    /// Every property of every section carries a description (from its `///` doc).
    #[test]
    fn schema_documents_every_field() {
        fn walk(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
            if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
                for (k, p) in props {
                    if p.get("description").is_none() {
                        out.push(format!("{at}.{k}"));
                    }
                }
            }
            match v {
                serde_json::Value::Object(m) => m
                    .iter()
                    .for_each(|(k, v)| walk(v, &format!("{at}/{k}"), out)),
                serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, at, out)),
                _ => {}
            }
        }
        let schema: serde_json::Value = serde_json::from_str(&json()).unwrap_or_default();
        let mut undocumented = Vec::new();
        walk(&schema, "", &mut undocumented);
        assert_eq!(undocumented, Vec::<String>::new());
    }

    #[test]
    fn checked_in_schema_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/desired-state.v1.json");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == json(),
            "schemas/desired-state.v1.json is stale: run `cargo run -- schema > schemas/desired-state.v1.json`"
        );
    }
}
