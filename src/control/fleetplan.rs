//! `converge control-plane plan DIR`: what the fleet would do with the candidate
//! documents in DIR. The command asks the running `serve` over its admin socket
//! (`<data>/admin.sock`, 0600 in the 0700 data directory), because `serve` holds the
//! NATS connection and the HTTPS long polls of every node; `serve` sends each selected
//! node a signed dry run (`control::dryrun`), gathers the answers until all came or the
//! timeout, and returns one report. This module holds the query, the report and the
//! node selector.

use super::dryrun::{Counts, PlanAnswer, Problem};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the command asks `serve`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanQuery {
    /// Candidate documents, `<node-id>.json|yaml|yml` (an absolute path).
    pub dir: PathBuf,
    /// Comma-separated node ids or globs (`*`, `?`); all nodes when absent.
    #[serde(default)]
    pub nodes: Option<String>,
    pub timeout_ms: u64,
}

/// One node's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    Unchanged,
    Changes,
    /// The node (or the plane, for a file that does not build) would refuse it.
    Refused,
    Error,
    /// No answer within the timeout (the node is down or disconnected).
    NoAnswer,
}

/// One node in the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeResult {
    pub node_id: String,
    pub verdict: Verdict,
    /// `plane` when the file failed the plane's own checks (never sent), else `node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_by: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, Counts>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
    #[serde(default)]
    pub problem_count: usize,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plan: String,
    #[serde(default)]
    pub truncated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl NodeResult {
    pub fn answered(a: PlanAnswer) -> NodeResult {
        use super::dryrun::Outcome;
        NodeResult {
            node_id: a.node_id,
            verdict: match a.outcome {
                Outcome::Unchanged => Verdict::Unchanged,
                Outcome::Changes => Verdict::Changes,
                Outcome::Refused => Verdict::Refused,
                Outcome::Error => Verdict::Error,
            },
            refused_by: (a.outcome == Outcome::Refused).then(|| "node".into()),
            counts: a.counts,
            problems: a.problems,
            problem_count: a.problem_count,
            plan: a.plan,
            truncated: a.truncated,
            error: a.error,
        }
    }

    pub fn bare(node_id: &str, verdict: Verdict) -> NodeResult {
        NodeResult {
            node_id: node_id.into(),
            verdict,
            refused_by: None,
            counts: BTreeMap::new(),
            problems: Vec::new(),
            problem_count: 0,
            plan: String::new(),
            truncated: false,
            error: None,
        }
    }
}

/// The aggregate.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub nodes: usize,
    pub unchanged: usize,
    pub changes: usize,
    pub refused: usize,
    pub error: usize,
    pub no_answer: usize,
    /// Planned changes over the fleet, by reconciler.
    pub counts: BTreeMap<String, Counts>,
    /// Selected nodes with no file in DIR (not asked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_document: Vec<String>,
}

/// What `serve` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanReport {
    pub request_id: String,
    pub summary: Summary,
    pub nodes: Vec<NodeResult>,
}

impl PlanReport {
    /// Sorts the nodes and computes the summary.
    pub fn new(request_id: String, mut nodes: Vec<NodeResult>, no_document: Vec<String>) -> Self {
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let mut s = Summary {
            nodes: nodes.len(),
            no_document,
            ..Default::default()
        };
        for n in &nodes {
            match n.verdict {
                Verdict::Unchanged => s.unchanged += 1,
                Verdict::Changes => s.changes += 1,
                Verdict::Refused => s.refused += 1,
                Verdict::Error => s.error += 1,
                Verdict::NoAnswer => s.no_answer += 1,
            }
            for (r, c) in &n.counts {
                let t = s.counts.entry(r.clone()).or_default();
                t.add += c.add;
                t.change += c.change;
                t.remove += c.remove;
            }
        }
        PlanReport {
            request_id,
            summary: s,
            nodes,
        }
    }

    /// 0: every node unchanged; 2: changes and nothing worse (like `diff`); 1: a node
    /// would refuse, failed to plan or did not answer.
    pub fn exit_code(&self) -> u8 {
        let s = &self.summary;
        if s.refused + s.error + s.no_answer > 0 {
            1
        } else if s.changes > 0 {
            2
        } else {
            0
        }
    }

    /// The operator's view: the aggregate, then each node that is not unchanged.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let s = &self.summary;
        let mut out = format!(
            "{} node(s): {} unchanged, {} with changes, {} would refuse, {} error, {} did not answer\n",
            s.nodes, s.unchanged, s.changes, s.refused, s.error, s.no_answer
        );
        for (r, c) in &s.counts {
            let _ = writeln!(out, "  {r:<12} +{} ~{} -{}", c.add, c.change, c.remove);
        }
        if !s.no_document.is_empty() {
            let _ = writeln!(out, "no document in DIR: {}", s.no_document.join(", "));
        }
        for n in &self.nodes {
            match n.verdict {
                Verdict::Unchanged => {}
                Verdict::Changes => {
                    let _ = writeln!(out, "\n{}: changes", n.node_id);
                    for line in n.plan.lines() {
                        let _ = writeln!(out, "  {line}");
                    }
                    if n.truncated {
                        let _ = writeln!(out, "  … (plan truncated; counts are exact)");
                    }
                }
                Verdict::Refused => {
                    let _ = writeln!(
                        out,
                        "\n{}: would refuse the document ({} problem(s), checked by the {})",
                        n.node_id,
                        n.problem_count,
                        n.refused_by.as_deref().unwrap_or("node")
                    );
                    for p in &n.problems {
                        let _ = writeln!(out, "  {}: {}", p.path, p.message);
                    }
                }
                Verdict::Error => {
                    let _ = writeln!(
                        out,
                        "\n{}: error: {}",
                        n.node_id,
                        n.error.as_deref().unwrap_or("?")
                    );
                }
                Verdict::NoAnswer => {
                    let _ = writeln!(out, "\n{}: did not answer", n.node_id);
                }
            }
        }
        out
    }
}

/// Whether `id` is selected by `selector` (comma-separated ids or globs; `None`: all).
pub fn selected(selector: Option<&str>, id: &str) -> bool {
    match selector {
        None => true,
        Some(s) => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .any(|p| glob(p.as_bytes(), id.as_bytes())),
    }
}

/// `*` any run, `?` one character, anything else itself.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// The candidate file of `node` in `dir`, if any.
pub fn candidate_file(dir: &Path, node: &str) -> Option<PathBuf> {
    ["json", "yaml", "yml"]
        .iter()
        .map(|ext| dir.join(format!("{node}.{ext}")))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_ids_and_globs() {
        assert!(selected(None, "web-1"));
        assert!(selected(Some("web-1,db-2"), "db-2"));
        assert!(!selected(Some("web-1"), "web-10"));
        assert!(selected(Some("web-*"), "web-10"));
        assert!(selected(Some("*-1?"), "web-10"));
        assert!(!selected(Some("*-1?"), "web-1"));
        assert!(selected(Some("a*b*c"), "aXbYbZc"));
        assert!(!selected(Some(""), "x"));
    }

    #[test]
    fn the_summary_adds_up_and_the_exit_code_follows_the_worst() {
        let mut a = NodeResult::bare("b", Verdict::Changes);
        a.counts.insert(
            "containers".into(),
            Counts {
                add: 2,
                change: 1,
                remove: 0,
            },
        );
        let mut b = a.clone();
        b.node_id = "a".into();
        let r = PlanReport::new(
            "r".into(),
            vec![a, b, NodeResult::bare("c", Verdict::Unchanged)],
            vec![],
        );
        assert_eq!(r.nodes[0].node_id, "a");
        assert_eq!((r.summary.changes, r.summary.unchanged), (2, 1));
        assert_eq!(r.summary.counts["containers"].add, 4);
        assert_eq!(r.exit_code(), 2);
        let r = PlanReport::new(
            "r".into(),
            vec![NodeResult::bare("c", Verdict::NoAnswer)],
            vec![],
        );
        assert_eq!(r.exit_code(), 1);
        assert!(r.text().contains("c: did not answer"));
    }
}
