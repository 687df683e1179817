//! Staged rollouts (`control-plane rollout DIR`): candidate documents published wave by
//! wave, canary first, each wave gated on its nodes' health. A wave passes when every
//! node in it reports the new generation Converged; the rollout halts on the first
//! refusal, Degraded reconciler or missed deadline, and with `revert` publishes each
//! changed node's previous document again (under a newer generation: nodes never go back
//! to an older one). `serve` drives it by writing the documents directory it already
//! publishes from, so a rollout needs nothing from nodes that a plain publish does not.
//! The whole rollout is one JSON row in the plane's store, saved at every step, so it
//! resumes where it was after a plane restart.

use super::plane_store::NodeRecord;
use crate::document::Format;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What the operator asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Candidate documents, `<node-id>.json|yaml|yml` (an absolute path).
    pub dir: PathBuf,
    /// Comma-separated node ids or globs; every node with a candidate when absent.
    #[serde(default)]
    pub nodes: Option<String>,
    /// Nodes in the first wave, alone.
    pub canary: usize,
    /// Size of each later wave.
    pub batch: Batch,
    /// How long each wave may take to converge.
    pub wait_ms: u64,
    /// On a halt, publish the previous documents to the nodes already changed.
    pub revert: bool,
}

/// The size of a wave: a share of the rollout's nodes (rounded up) or a count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Batch {
    Percent(u8),
    Nodes(usize),
}

impl TryFrom<String> for Batch {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Batch> for String {
    fn from(b: Batch) -> String {
        b.to_string()
    }
}

impl std::str::FromStr for Batch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: a batch is N nodes or P% (1-100)");
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p @ 1..=100) => Ok(Batch::Percent(p)),
                _ => Err(bad()),
            },
            None => match s.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(Batch::Nodes(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Batch::Percent(p) => write!(f, "{p}%"),
            Batch::Nodes(n) => write!(f, "{n}"),
        }
    }
}

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    Running,
    /// Every wave passed.
    Succeeded,
    /// A node failed its gate; later waves were not published.
    Halted,
    /// Halted, and the changed nodes were sent their previous documents.
    Reverted,
    /// Stopped by the operator; later waves were not published.
    Aborted,
}

impl Phase {
    pub fn is_done(self) -> bool {
        self != Phase::Running
    }
}

/// One node's part in its wave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// Its wave has not started.
    Pending,
    /// Published; not converged yet.
    Waiting,
    Converged,
    Refused,
    Degraded,
    TimedOut,
    /// Sent its previous document again after a halt.
    Reverted,
}

/// A document as the documents directory holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DocFile {
    /// File name in the documents directory (`web-1.yaml`).
    pub name: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStep {
    pub node_id: String,
    /// The candidate's generation: the node passes at this one or newer.
    pub generation: u64,
    pub candidate: DocFile,
    /// What the documents directory held for the node before (for a revert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<DocFile>,
    pub outcome: Outcome,
    /// Why it failed, or what a revert published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Unix milliseconds of its last outcome change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Wave {
    pub nodes: Vec<NodeStep>,
    /// Unix milliseconds: published, and passed (or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    pub id: String,
    pub created_at: String,
    pub spec: RolloutSpec,
    pub phase: Phase,
    pub waves: Vec<Wave>,
    /// Why it halted or was aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Selected nodes left out: no candidate, or a candidate equal to what they have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<i64>,
}

/// Why a rollout cannot start; nothing was published.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("rollout {0} is still running: wait for it, or `control-plane rollouts abort {0}`")]
    Busy(String),
    #[error("no selected node has a changed candidate in {0}")]
    Empty(PathBuf),
    #[error("candidate for {node}: {problem}")]
    Invalid { node: String, problem: String },
}

/// A node's health at a generation, from its last status and refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Converged,
    Working,
    Refused(String),
    Degraded(String),
}

/// Judges `node` against `generation` from what it last reported: a refusal of that
/// generation (or newer); a managed reconciler Degraded at it; every managed
/// reconciler Converged at it (or no section managed and the generation accepted).
pub fn health(node: &NodeRecord, generation: u64) -> Health {
    let g = |v: &serde_json::Value| v.as_u64();
    if let Some(r) = &node.refused {
        if g(&r["generation"]).is_some_and(|r| r >= generation) {
            return Health::Refused(r["error"].as_str().unwrap_or("refused").to_string());
        }
    }
    if node.accepted_generation.is_none_or(|a| a < generation) {
        return Health::Working;
    }
    let managed: Vec<_> = node
        .reconcilers()
        .iter()
        .filter(|r| r["state"] != "Unmanaged")
        .collect();
    let at = |r: &serde_json::Value| g(&r["observedGeneration"]).is_some_and(|o| o >= generation);
    if let Some(r) = managed.iter().find(|r| r["state"] == "Degraded" && at(r)) {
        return Health::Degraded(format!(
            "{}: {}",
            r["reconciler"].as_str().unwrap_or("?"),
            r["message"].as_str().unwrap_or_default()
        ));
    }
    if managed.iter().all(|r| r["state"] == "Converged" && at(r)) {
        Health::Converged
    } else {
        Health::Working
    }
}

/// The waves of `ids` (in order): `canary` alone first, then batches.
pub fn waves(ids: &[String], canary: usize, batch: Batch) -> Vec<Vec<String>> {
    let canary = canary.min(ids.len());
    let size = match batch {
        Batch::Nodes(n) => n,
        Batch::Percent(p) => (ids.len() * usize::from(p)).div_ceil(100),
    }
    .max(1);
    let (first, rest) = ids.split_at(canary);
    let mut out: Vec<Vec<String>> = Vec::new();
    if !first.is_empty() {
        out.push(first.to_vec());
    }
    out.extend(rest.chunks(size).map(<[String]>::to_vec));
    out
}

/// A new rollout id: the time and 4 random bytes.
pub fn new_id() -> String {
    use rand_core::RngCore;
    let mut raw = [0u8; 4];
    rand_core::OsRng.fill_bytes(&mut raw);
    format!(
        "r{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        hex::encode(raw)
    )
}

/// The document file of `node` in `dir`, if any (`json`, then `yaml`, then `yml`).
pub fn doc_file(dir: &Path, node: &str) -> Option<DocFile> {
    ["json", "yaml", "yml"].iter().find_map(|ext| {
        let name = format!("{node}.{ext}");
        let text = std::fs::read_to_string(dir.join(&name)).ok()?;
        Some(DocFile { name, text })
    })
}

/// The step the plane takes next: one per call, so each is saved before the next.
pub struct Driver<'a> {
    /// The documents directory `serve` publishes from.
    pub docs: &'a Path,
    pub now_ms: i64,
}

impl Driver<'_> {
    /// Moves `r` on given its current wave's node records (`node(id)`); returns whether
    /// anything changed (to be saved). Writes the documents directory.
    pub fn advance(
        &self,
        r: &mut Rollout,
        node: impl Fn(&str) -> Option<NodeRecord>,
    ) -> std::io::Result<bool> {
        if r.phase.is_done() {
            return Ok(false);
        }
        let Some(i) = r.waves.iter().position(|w| w.ended_ms.is_none()) else {
            r.phase = Phase::Succeeded;
            r.ended_ms = Some(self.now_ms);
            return Ok(true);
        };
        if r.waves[i].started_ms.is_none() {
            for step in &mut r.waves[i].nodes {
                self.write(&step.candidate, step.previous.as_ref())?;
                step.outcome = Outcome::Waiting;
                step.at_ms = Some(self.now_ms);
            }
            r.waves[i].started_ms = Some(self.now_ms);
            return Ok(true);
        }
        let started = r.waves[i].started_ms.unwrap_or(self.now_ms);
        let late =
            self.now_ms.saturating_sub(started) > i64::try_from(r.spec.wait_ms).unwrap_or(i64::MAX);
        let mut changed = false;
        let mut failed: Option<String> = None;
        for step in r.waves[i]
            .nodes
            .iter_mut()
            .filter(|s| s.outcome == Outcome::Waiting)
        {
            let health = node(&step.node_id).map(|n| health(&n, step.generation));
            let (outcome, detail) = match health {
                Some(Health::Converged) => (Outcome::Converged, None),
                Some(Health::Refused(e)) => (Outcome::Refused, Some(e)),
                Some(Health::Degraded(e)) => (Outcome::Degraded, Some(e)),
                None if !late => continue,
                Some(Health::Working) if !late => continue,
                None => (
                    Outcome::TimedOut,
                    Some("the node is no longer enrolled".into()),
                ),
                Some(Health::Working) => (
                    Outcome::TimedOut,
                    Some(format!(
                        "not Converged at generation {} within {}",
                        step.generation,
                        secs(r.spec.wait_ms)
                    )),
                ),
            };
            step.outcome = outcome;
            step.at_ms = Some(self.now_ms);
            if let Some(d) = &detail {
                failed.get_or_insert_with(|| {
                    format!("{} {}: {d}", step.node_id, outcome_word(outcome))
                });
            }
            step.detail = detail;
            changed = true;
        }
        if let Some(why) = failed {
            r.waves[i].ended_ms = Some(self.now_ms);
            r.message = Some(format!("wave {} failed: {why}", i + 1));
            r.phase = Phase::Halted;
            r.ended_ms = Some(self.now_ms);
            if r.spec.revert {
                self.revert(r, &node)?;
                r.phase = Phase::Reverted;
            }
            return Ok(true);
        }
        if r.waves[i]
            .nodes
            .iter()
            .all(|s| s.outcome == Outcome::Converged)
        {
            r.waves[i].ended_ms = Some(self.now_ms);
            changed = true;
        }
        Ok(changed)
    }

    /// Publishes each changed node's previous document again, with a generation above
    /// anything it has seen (nodes refuse older generations).
    fn revert(
        &self,
        r: &mut Rollout,
        node: &impl Fn(&str) -> Option<NodeRecord>,
    ) -> std::io::Result<()> {
        for step in r
            .waves
            .iter_mut()
            .filter(|w| w.started_ms.is_some())
            .flat_map(|w| w.nodes.iter_mut())
        {
            let Some(prev) = step.previous.clone() else {
                step.detail = Some(format!(
                    "{}; no previous document: the candidate stays",
                    step.detail.as_deref().unwrap_or("changed")
                ));
                continue;
            };
            let seen = node(&step.node_id)
                .and_then(|n| n.accepted_generation)
                .unwrap_or(0);
            let generation = seen.max(step.generation) + 1;
            let text = match with_generation(&prev, generation) {
                Ok(t) => t,
                Err(e) => {
                    step.detail = Some(format!("cannot revert: previous document: {e}"));
                    continue;
                }
            };
            self.write(
                &DocFile {
                    name: prev.name.clone(),
                    text,
                },
                Some(&step.candidate),
            )?;
            step.outcome = Outcome::Reverted;
            step.at_ms = Some(self.now_ms);
            step.detail = Some(format!(
                "{}previous document published as generation {generation}",
                step.detail
                    .as_deref()
                    .map(|d| format!("{d}; "))
                    .unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// Writes `file` into the documents directory atomically, and removes `other` if it
    /// is a different name for the same node (so one file per node stays).
    fn write(&self, file: &DocFile, other: Option<&DocFile>) -> std::io::Result<()> {
        converge_core::fsutil::write_atomic(
            &self.docs.join(&file.name),
            file.text.as_bytes(),
            0o600,
        )?;
        if let Some(o) = other.filter(|o| o.name != file.name) {
            match std::fs::remove_file(self.docs.join(&o.name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

/// `doc` with its top-level `generation` set, in the file's own format.
fn with_generation(doc: &DocFile, generation: u64) -> Result<String, String> {
    let format = Format::from_path(Path::new(&doc.name));
    let mut v: serde_json::Value = match format {
        Format::Yaml => serde_yaml::from_str(&doc.text).map_err(|e| e.to_string())?,
        Format::Json => serde_json::from_str(&doc.text).map_err(|e| e.to_string())?,
    };
    let obj = v.as_object_mut().ok_or("not an object")?;
    obj.insert("generation".into(), generation.into());
    match format {
        Format::Yaml => serde_yaml::to_string(&v).map_err(|e| e.to_string()),
        Format::Json => serde_json::to_string_pretty(&v).map_err(|e| e.to_string()),
    }
}

fn outcome_word(o: Outcome) -> &'static str {
    match o {
        Outcome::Pending => "pending",
        Outcome::Waiting => "waiting",
        Outcome::Converged => "converged",
        Outcome::Refused => "refused the document",
        Outcome::Degraded => "is Degraded",
        Outcome::TimedOut => "timed out",
        Outcome::Reverted => "reverted",
    }
}

fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

impl Rollout {
    /// Lines for the operator: the rollout, then each wave and its nodes.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let s = &self.spec;
        let mut out = format!(
            "rollout {}  {:?}  created {}  (canary {}, batch {}, wait {}{})\n",
            self.id,
            self.phase,
            self.created_at,
            s.canary,
            s.batch,
            secs(s.wait_ms),
            if s.revert { ", revert" } else { "" }
        );
        if let Some(m) = &self.message {
            let _ = writeln!(out, "  {m}");
        }
        for (i, w) in self.waves.iter().enumerate() {
            let _ = writeln!(out, "  {}", self.wave_line(i));
            for n in w.nodes.iter().filter(|n| n.outcome != Outcome::Pending) {
                let _ = writeln!(
                    out,
                    "    {} generation {}: {}{}",
                    n.node_id,
                    n.generation,
                    outcome_word(n.outcome),
                    n.detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                );
            }
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(
                out,
                "  skipped (no changed candidate): {}",
                self.skipped.join(", ")
            );
        }
        out
    }

    /// `wave 2/4 (3 nodes): passed in 4.1 s`.
    pub fn wave_line(&self, i: usize) -> String {
        let w = &self.waves[i];
        let label = if i == 0 && self.spec.canary > 0 {
            "canary"
        } else {
            "wave"
        };
        let state = match (w.started_ms, w.ended_ms) {
            (None, _) => "not started".to_string(),
            (Some(_), None) => "waiting".to_string(),
            (Some(a), Some(b)) => {
                let took = secs(u64::try_from(b - a).unwrap_or(0));
                let failed =
                    |n: &NodeStep| !matches!(n.outcome, Outcome::Converged | Outcome::Waiting);
                if w.nodes.iter().all(|n| n.outcome == Outcome::Converged) {
                    format!("passed in {took}")
                } else if w.nodes.iter().any(failed) {
                    format!("failed after {took}")
                } else {
                    format!("stopped after {took}")
                }
            }
        };
        let ids: Vec<&str> = w.nodes.iter().map(|n| n.node_id.as_str()).collect();
        format!(
            "{label} {}/{} ({}): {state}",
            i + 1,
            self.waves.len(),
            ids.join(", ")
        )
    }

    /// Exit code of `rollout`: 0 succeeded, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.phase != Phase::Succeeded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ids(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn waves_put_the_canary_alone_then_batches() {
        let w = waves(&ids(10), 1, Batch::Percent(30));
        let sizes: Vec<usize> = w.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1, 3, 3, 3]);
        assert_eq!(w[0], vec!["n1".to_string()]);
        let w = waves(&ids(5), 0, Batch::Nodes(2));
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
        assert_eq!(waves(&ids(2), 5, Batch::Percent(1)).len(), 1);
        assert_eq!(waves(&ids(3), 1, Batch::Percent(1)).len(), 3);
        assert!(waves(&[], 1, Batch::Nodes(1)).is_empty());
    }

    #[test]
    fn batches_parse_and_print() {
        assert_eq!("10%".parse(), Ok(Batch::Percent(10)));
        assert_eq!("3".parse(), Ok(Batch::Nodes(3)));
        for bad in ["0", "0%", "101%", "x", "-1", ""] {
            assert!(bad.parse::<Batch>().is_err(), "{bad}");
        }
        assert_eq!(Batch::Percent(25).to_string(), "25%");
    }

    fn record(accepted: Option<u64>, reconcilers: serde_json::Value) -> NodeRecord {
        NodeRecord {
            id: "a".into(),
            name: "a".into(),
            public_key: String::new(),
            sealing_key: String::new(),
            facts: json!({}),
            enrolled_at: String::new(),
            nats_password: None,
            nats_key: None,
            last_seen: None,
            accepted_generation: accepted,
            converged_generation: None,
            status: Some(json!({"type": "status", "reconcilers": reconcilers})),
            refused: None,
        }
    }

    fn rec(name: &str, state: &str, generation: u64) -> serde_json::Value {
        json!({"reconciler": name, "state": state, "observedGeneration": generation, "message": "m"})
    }

    #[test]
    fn health_reads_refusals_degraded_and_converged_at_the_generation() {
        let ok = record(
            Some(3),
            json!([rec("dns", "Converged", 3), rec("routes", "Unmanaged", 3)]),
        );
        assert_eq!(health(&ok, 3), Health::Converged);
        assert_eq!(health(&ok, 4), Health::Working);
        let old = record(Some(3), json!([rec("dns", "Converged", 2)]));
        assert_eq!(health(&old, 3), Health::Working);
        let sick = record(
            Some(3),
            json!([rec("dns", "Converged", 3), rec("containers", "Degraded", 3)]),
        );
        assert_eq!(health(&sick, 3), Health::Degraded("containers: m".into()));
        // Degraded at an older generation is not this generation's fault.
        let was = record(Some(3), json!([rec("containers", "Degraded", 2)]));
        assert_eq!(health(&was, 3), Health::Working);
        let none = record(Some(3), json!([rec("dns", "Unmanaged", 3)]));
        assert_eq!(health(&none, 3), Health::Converged);
        let mut refused = record(Some(2), json!([]));
        refused.refused = Some(json!({"generation": 3, "error": "bad mode"}));
        assert_eq!(health(&refused, 3), Health::Refused("bad mode".into()));
        refused.refused = Some(json!({"generation": 2, "error": "older"}));
        assert_eq!(health(&refused, 3), Health::Working);
    }

    fn step(id: &str, generation: u64, previous: bool) -> NodeStep {
        NodeStep {
            node_id: id.into(),
            generation,
            candidate: DocFile {
                name: format!("{id}.json"),
                text: format!("{{\"generation\": {generation}}}"),
            },
            previous: previous.then(|| DocFile {
                name: format!("{id}.yaml"),
                text: "generation: 1\nnode: {id: x}\n".into(),
            }),
            outcome: Outcome::Pending,
            detail: None,
            at_ms: None,
        }
    }

    fn rollout(revert: bool) -> Rollout {
        Rollout {
            id: "r".into(),
            created_at: String::new(),
            spec: RolloutSpec {
                dir: PathBuf::new(),
                nodes: None,
                canary: 1,
                batch: Batch::Nodes(2),
                wait_ms: 1000,
                revert,
            },
            phase: Phase::Running,
            waves: vec![
                Wave {
                    nodes: vec![step("a", 2, true)],
                    started_ms: None,
                    ended_ms: None,
                },
                Wave {
                    nodes: vec![step("b", 2, true), step("c", 2, false)],
                    started_ms: None,
                    ended_ms: None,
                },
            ],
            message: None,
            skipped: vec![],
            ended_ms: None,
        }
    }

    #[test]
    fn a_rollout_publishes_wave_by_wave_and_passes_on_converged() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = rollout(false);
        let at = |now_ms| Driver {
            docs: dir.path(),
            now_ms,
        };
        let converged = |_: &str| Some(record(Some(2), json!([rec("dns", "Converged", 2)])));
        let working = |_: &str| Some(record(Some(1), json!([])));
        // Wave 1 published: a's candidate written, its old yaml removed; b untouched.
        std::fs::write(dir.path().join("a.yaml"), "old").unwrap();
        assert!(at(0).advance(&mut r, working).unwrap());
        assert!(dir.path().join("a.json").exists() && !dir.path().join("a.yaml").exists());
        assert!(!dir.path().join("b.json").exists());
        assert!(!at(500).advance(&mut r, working).unwrap());
        assert!(at(600).advance(&mut r, converged).unwrap());
        assert_eq!(r.waves[0].ended_ms, Some(600));
        assert!(at(700).advance(&mut r, working).unwrap());
        assert!(dir.path().join("b.json").exists() && dir.path().join("c.json").exists());
        assert!(at(800).advance(&mut r, converged).unwrap());
        assert!(at(900).advance(&mut r, converged).unwrap());
        assert_eq!(r.phase, Phase::Succeeded);
        assert!(
            r.text().contains("canary 1/2 (a): passed in 0.6 s"),
            "{}",
            r.text()
        );
        assert!(!at(1000).advance(&mut r, converged).unwrap());
    }

    #[test]
    fn a_failed_canary_halts_and_reverts_with_a_newer_generation() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = rollout(true);
        let at = |now_ms| Driver {
            docs: dir.path(),
            now_ms,
        };
        let mut sick = record(Some(1), json!([]));
        sick.refused = Some(json!({"generation": 2, "error": "$.node.mode: not this node's"}));
        at(0).advance(&mut r, |_| None).unwrap();
        assert!(at(10).advance(&mut r, |_| Some(sick.clone())).unwrap());
        assert_eq!(r.phase, Phase::Reverted);
        assert!(r
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("a refused the document"));
        assert_eq!(r.waves[0].nodes[0].outcome, Outcome::Reverted);
        // The previous yaml is back, above the candidate's generation; the candidate gone.
        let back = std::fs::read_to_string(dir.path().join("a.yaml")).unwrap();
        assert!(back.contains("generation: 3"), "{back}");
        assert!(!dir.path().join("a.json").exists());
        // Wave 2 was never published.
        assert_eq!(r.waves[1].started_ms, None);
        assert!(!dir.path().join("b.json").exists());
    }

    #[test]
    fn a_wave_that_misses_its_deadline_halts() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = rollout(false);
        let at = |now_ms| Driver {
            docs: dir.path(),
            now_ms,
        };
        let working = |_: &str| Some(record(Some(1), json!([])));
        at(0).advance(&mut r, working).unwrap();
        assert!(!at(1000).advance(&mut r, working).unwrap());
        assert!(at(1001).advance(&mut r, working).unwrap());
        assert_eq!(r.phase, Phase::Halted);
        assert_eq!(r.waves[0].nodes[0].outcome, Outcome::TimedOut);
        // Without revert the candidate stays.
        assert!(dir.path().join("a.json").exists());
    }
}
