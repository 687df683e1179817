//! JSON Schema of the document: generated from the types, and used to validate input so
//! that every structural problem is reported at once with its JSON path.

use crate::document::Document;
use converge_core::{Problem, Problems};
use jsonschema::ValidationError;
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
    let mut problems = Vec::new();
    for e in v.iter_errors(value) {
        deepest(&e, &mut problems);
    }
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    problems.dedup();
    Problems(problems)
}

/// Reports `e` at the deepest place it can name. An optional section or field is
/// `anyOf: [{$ref: T}, {type: null}]` in the schema, and the validator reports a bad `T`
/// as "not valid under any of the schemas listed in the 'anyOf' keyword" at the
/// section; when the value is not null, the null branch is irrelevant, so the errors of
/// the one remaining branch are reported instead (recursively: options nest). A value
/// that matches none of a list of constants (documented enums) lists them.
fn deepest(e: &ValidationError<'_>, out: &mut Vec<Problem>) {
    use jsonschema::error::ValidationErrorKind as Kind;
    let here = || pointer_to_path(e.instance_path().as_str());
    if let Kind::AnyOf { context } | Kind::OneOfNotValid { context } = e.kind() {
        let live: Vec<&Vec<ValidationError<'static>>> = context
            .iter()
            .filter(|branch| !only_not_null(branch, e))
            .collect();
        if let [branch] = live.as_slice() {
            if !e.instance().is_null() && !branch.is_empty() {
                branch.iter().for_each(|sub| deepest(sub, out));
                return;
            }
        }
        if let Some(allowed) = constants(context) {
            out.push(Problem {
                path: here(),
                message: shorten(&format!("{} is not one of {allowed}", e.instance())),
                hint: None,
            });
            return;
        }
    }
    out.push(Problem {
        path: here(),
        message: shorten(&e.to_string()),
        hint: None,
    });
}

/// The branch failed only because the value at the same place is not `null`.
fn only_not_null(branch: &[ValidationError<'_>], parent: &ValidationError<'_>) -> bool {
    use jsonschema::error::{TypeKind, ValidationErrorKind as Kind};
    match branch {
        [only] => {
            matches!(
                only.kind(),
                Kind::Type {
                    kind: TypeKind::Single(jsonschema::JsonType::Null)
                }
            ) && only.instance_path() == parent.instance_path()
        }
        _ => false,
    }
}

/// `"a", "b" or "c"` when every branch is a `const` (and maybe its `type`) that failed.
fn constants(context: &[Vec<ValidationError<'_>>]) -> Option<String> {
    use jsonschema::error::ValidationErrorKind as Kind;
    let values: Option<Vec<String>> = context
        .iter()
        .map(|branch| {
            let mut value = None;
            for e in branch {
                match e.kind() {
                    Kind::Constant { expected_value } => value = Some(expected_value.to_string()),
                    Kind::Type { .. } => {}
                    _ => return None,
                }
            }
            value
        })
        .collect();
    let values = values.filter(|v| !v.is_empty())?;
    // The validator's own wording for `enum`: "a", "b" or "c".
    Some(match values.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => values.join(""),
    })
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
