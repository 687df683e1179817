//! The CLI as an operator uses it: validate the fixtures (every invalid one reports its
//! expected problems), schema output, diff/apply exit codes against a real sandbox node,
//! input limits on files and on the agent socket.

mod common;

use common::agent::{converge, data, dns_doc, start_agent, status};
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
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e != "expected" && e != "args")
        })
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
        // `NN-name.args`: extra flags, e.g. a small limit instead of a huge fixture.
        let flags = std::fs::read_to_string(doc.with_extension("args")).unwrap_or_default();
        let mut args: Vec<&str> = flags.split_whitespace().collect();
        args.extend(["validate", doc.to_str().expect("path")]);
        let (code, out, err) = run(&args);
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

/// A valid document of exactly `bytes` bytes (at least its minimal size): annotations of
/// 60,000 bytes each (no string over its own limit), then spaces.
fn padded_document(node_id: &str, generation: u64, bytes: usize) -> Vec<u8> {
    let mut doc = json!({
        "apiVersion": "converge/v1",
        "node": {"id": node_id, "mode": "worker"},
        "generation": generation,
        "issuedAt": "2026-11-24T10:00:00Z",
        "metadata": {"annotations": {}}
    });
    let base = serde_json::to_vec(&doc).expect("serialise").len();
    // `"k0000000":"v…v",`
    let each = 10 + 1 + 60_002 + 1;
    let n = bytes.saturating_sub(base) / each;
    let notes: serde_json::Map<String, serde_json::Value> = (0..n)
        .map(|i| (format!("k{i:07}"), json!("v".repeat(60_000))))
        .collect();
    doc["metadata"]["annotations"] = serde_json::Value::Object(notes);
    let mut text = serde_json::to_vec(&doc).expect("serialise");
    let last = text.pop().expect("closing brace");
    let len = bytes.saturating_sub(1).max(text.len());
    text.resize(len, b' ');
    text.push(last);
    text
}

#[test]
fn a_byte_order_mark_is_accepted() {
    let bom = root().join("fixtures/bom.json");
    let raw = std::fs::read(&bom).expect("fixtures/bom.json");
    assert!(
        raw.starts_with(b"\xEF\xBB\xBF"),
        "the fixture starts with a BOM"
    );
    let (code, out, err) = run(&["validate", bom.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}{err}");
    // The YAML path too.
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = dir.path().join("bom.yaml");
    std::fs::write(&yaml, &raw).expect("write");
    let (code, out, err) = run(&["validate", yaml.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn an_oversized_file_is_refused_before_it_is_parsed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.json");
    // 17 MiB: over the 16 MiB default. Valid otherwise, as a raised limit shows.
    std::fs::write(&big, padded_document("worker-fra1-07", 1, 17 << 20)).expect("write");
    let f = big.to_str().expect("path");
    for cmd in ["validate", "diff", "apply"] {
        let (code, out, err) = run(&["--data-dir", dir.path().to_str().expect("path"), cmd, f]);
        assert_eq!(code, 1, "{cmd}: {out}{err}");
        assert!(
            err.contains("$: document is larger than 16777216 bytes"),
            "{cmd}: {out}{err}"
        );
    }
    let (code, out, err) = run(&["--max-document-bytes", "18000000", "validate", f]);
    assert_eq!(code, 0, "{out}{err}");
    // Not a regular file (no size to look at): read up to the limit + 1, then refused.
    let mut child = Command::new(converge_bin())
        .args(["validate", "/dev/stdin"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run converge");
    let mut stdin = child.stdin.take().expect("stdin");
    let body = std::fs::read(&big).expect("read");
    // converge stops reading after the limit: the rest of the write fails.
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &body));
    let out = child.wait_with_output().expect("wait");
    let _ = writer.join();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("$: document is larger than 16777216 bytes"),
        "{err}"
    );
    // The limits are also read from the environment.
    let out = Command::new(converge_bin())
        .args(["validate", f])
        .env("CONVERGE_MAX_DOCUMENT_BYTES", "18000000")
        .output()
        .expect("run converge");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_agent_refuses_an_oversized_push_and_keeps_serving() {
    let node = TestNode::new("limits");
    let _agent = start_agent(&node, &[]);
    let big = node.data_dir().join("big.json");
    std::fs::write(&big, padded_document(node.name(), 1, 17 << 20)).expect("write");
    let big = big.to_str().expect("path");

    // `push` refuses it on its own side first...
    let out = converge(&node, &["push", big]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("document is larger than 16777216 bytes"),
        "{err}"
    );

    // ...and the agent refuses it too, when the client's limit is higher.
    let out = converge(&node, &["--max-document-bytes", "100000000", "push", big]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("$: document is larger than 16777216 bytes") && err.contains("refused"),
        "{err}"
    );

    // The agent is still serving: a normal document is accepted.
    let ok = node.data_dir().join("ok.json");
    std::fs::write(&ok, padded_document(node.name(), 2, 4096)).expect("write");
    let out = converge(&node, &["push", ok.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status(&node)["generation"], 2);
}

#[test]
fn the_agent_applies_its_own_limits() {
    let node = TestNode::new("agentlim");
    let _agent = start_agent(&node, &["--max-document-bytes", "3000"]);
    let doc = node.data_dir().join("doc.json");
    std::fs::write(&doc, padded_document(node.name(), 1, 4000)).expect("write");
    let out = converge(&node, &["push", doc.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("$: document is larger than 3000 bytes"),
        "{err}"
    );
    // NUL, over the socket: refused with its path.
    let nul = node.data_dir().join("nul.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&padded_document(node.name(), 1, 100)).expect("json");
    v["metadata"]["motd"] = json!("hello\u{0}");
    std::fs::write(&nul, serde_json::to_vec(&v).expect("serialise")).expect("write");
    let out = converge(&node, &["push", nul.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("$.metadata.motd: string contains a NUL character"),
        "{err}"
    );
    std::fs::write(&doc, padded_document(node.name(), 1, 2000)).expect("write");
    let out = converge(&node, &["push", doc.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn node_settings_out_of_range_are_refused_by_name() {
    let (code, _, err) = run(&["--caddy-drain-ms", "600001", "schema"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--caddy-drain-ms"), "{err}");
    let (code, _, err) = run(&["--caddy-drain-ms", "2000", "schema"]);
    assert_eq!(code, 0, "{err}");
}
