//! The CLI as an operator uses it: validate the fixtures (every invalid one reports its
//! expected problems), schema output, diff/apply exit codes against a real sandbox node.

mod common;

use common::agent::{converge, data, dns_doc};
use common::sandbox::{converge_bin, require_tool, TestNode};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(converge_bin())
        .args(args)
        .output()
        .expect("run converge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn good_fixtures_validate() {
    for f in ["worker.json", "proxy.json", "sandbox.json"] {
        let p = root().join("fixtures").join(f);
        let (code, out, err) = run(&["validate", p.to_str().expect("path")]);
        assert_eq!(code, 0, "{f}: {out}{err}");
    }
}

#[test]
fn every_invalid_fixture_reports_its_expected_problems() {
    let dir = root().join("fixtures/invalid");
    let mut docs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures/invalid")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e != "expected"))
        .collect();
    docs.sort();
    assert!(
        docs.len() >= 20,
        "at least 20 invalid fixtures, found {}",
        docs.len()
    );
    let mut failures = Vec::new();
    for doc in &docs {
        let expected = std::fs::read_to_string(doc.with_extension("expected"))
            .unwrap_or_else(|_| panic!("{} has no .expected", doc.display()));
        let (code, out, err) = run(&["validate", doc.to_str().expect("path")]);
        if code != 1 {
            failures.push(format!("{}: exit {code}, want 1", doc.display()));
        }
        for want in expected.lines().filter(|l| !l.trim().is_empty()) {
            if !err.contains(want) {
                failures.push(format!("{}: missing {want:?} in:\n{err}{out}", name(doc)));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn json_output_of_validate_lists_problems() {
    let p = root().join("fixtures/invalid/26-many-problems.json");
    let (code, out, _) = run(&["validate", "--output", "json", p.to_str().expect("path")]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["valid"], false);
    assert!(v["problems"].as_array().expect("problems").len() >= 3);
    assert!(v["problems"][0]["path"]
        .as_str()
        .expect("path")
        .starts_with('$'));
}

#[test]
fn schema_command_prints_the_checked_in_schema() {
    let (code, out, _) = run(&["schema"]);
    assert_eq!(code, 0);
    let on_disk =
        std::fs::read_to_string(root().join("schemas/desired-state.v1.json")).expect("schema file");
    assert_eq!(out, on_disk);
}

#[test]
fn diff_and_apply_exit_codes_against_a_real_node() {
    require_tool("dnsmasq");
    let node = TestNode::new("cli");
    node.track_pidfile(data(&node).join("dns/dnsmasq.pid"));
    let doc = dns_doc(
        &node,
        1,
        json!([{"name": "web.internal", "type": "A", "values": ["10.88.0.10"]}]),
    );
    let file = node.data_dir().join("doc.yaml");
    std::fs::write(&file, serde_yaml_like(&doc)).expect("write yaml");
    let f = file.to_str().expect("path");

    let out = converge(&node, &["diff", f]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "changes pending: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("+ record web.internal A"), "{text}");
    assert!(text.contains("+ process dnsmasq"), "{text}");

    let out = converge(&node, &["apply", f]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = converge(&node, &["diff", f, "--output", "json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "converged: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["dns"]["changes"], json!([]));

    // Re-applying the same generation repairs drift; an older one is refused.
    assert_eq!(converge(&node, &["apply", f]).status.code(), Some(0));
    let mut older = doc.clone();
    older["generation"] = json!(0);
    std::fs::write(&file, serde_yaml_like(&older)).expect("write");
    assert_eq!(converge(&node, &["apply", f]).status.code(), Some(1));

    // Only the changed record shows in the next diff.
    let mut next = doc;
    next["generation"] = json!(2);
    next["dns"]["records"][0]["values"] = json!(["10.88.0.11"]);
    std::fs::write(&file, serde_yaml_like(&next)).expect("write");
    let out = converge(&node, &["diff", f, "--reconciler", "dns"]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("~ record web.internal A") && text.contains("10.88.0.10 -> 10.88.0.11"),
        "{text}"
    );
    assert!(
        text.contains("Plan: 0 to add, 1 to change, 0 to remove."),
        "{text}"
    );
    assert_eq!(
        converge(&node, &["diff", f, "--reconciler", "nope"])
            .status
            .code(),
        Some(1)
    );
}

/// JSON is valid YAML; writing it to a `.yaml` file exercises the YAML path.
fn serde_yaml_like(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).expect("serialise")
}
