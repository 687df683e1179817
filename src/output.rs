//! Human and JSON rendering of validation problems, plans and statuses.

use crate::engine::PassResult;
use crate::status::{ReconcilerStatus, State};
use converge_core::{Change, Op, Problems};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Output format of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

fn paint(color: bool, code: &str, s: &str) -> String {
    if color {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_string()
    }
}

/// Problems as one line each: `path: message (hint: …)`.
pub fn problems_text(file: &str, problems: &Problems) -> String {
    let mut out = format!("{file}: {} problem(s)\n", problems.len());
    for p in problems.iter() {
        let _ = writeln!(out, "  {p}");
    }
    out
}

/// A terraform-like plan. Secrets were already redacted by the reconcilers.
pub fn plan_text(
    results: &BTreeMap<&'static str, PassResult>,
    unbuilt: &[&str],
    color: bool,
) -> String {
    let mut out = String::new();
    let (mut add, mut change, mut remove, mut pending, mut failed) = (0, 0, 0, 0, 0);
    for (name, r) in results {
        match r {
            PassResult::Unmanaged => {
                let _ = writeln!(out, "{name}: not in the document (left alone)");
            }
            PassResult::Failed { error, .. } => {
                let _ = writeln!(
                    out,
                    "{name}: {}",
                    paint(color, "31", &format!("error: {error}"))
                );
            }
            PassResult::Ran {
                changes, waiting, ..
            } if changes.is_empty() && waiting.is_empty() => {
                let _ = writeln!(out, "{name}: no changes");
            }
            PassResult::Ran {
                changes, waiting, ..
            } => {
                let _ = writeln!(out, "{name}:");
                for c in changes {
                    match c.op {
                        Op::Create => add += 1,
                        Op::Update => change += 1,
                        Op::Delete => remove += 1,
                    }
                    write_change(&mut out, c, color);
                }
                for w in waiting {
                    let code = if w.failed {
                        failed += 1;
                        "31"
                    } else {
                        pending += 1;
                        "2"
                    };
                    let _ = writeln!(out, "  {}", paint(color, code, &w.to_string()));
                }
            }
        }
    }
    for name in unbuilt {
        let _ = writeln!(
            out,
            "{name}: section validated; its reconciler is not part of this build yet"
        );
    }
    let _ = write!(
        out,
        "\nPlan: {add} to add, {change} to change, {remove} to remove"
    );
    if pending > 0 {
        let _ = write!(out, "; {pending} waiting");
    }
    if failed > 0 {
        let _ = write!(out, "; {failed} failed (marked !, why beside each)");
    }
    let _ = writeln!(out, ".");
    out
}

fn write_change(out: &mut String, c: &Change, color: bool) {
    let code = match c.op {
        Op::Create => "32",
        Op::Update => "33",
        Op::Delete => "31",
    };
    let _ = writeln!(out, "  {}", paint(color, code, &c.to_string()));
    for f in &c.fields {
        let line = match (&f.old, &f.new) {
            (Some(o), Some(n)) => format!("{}: {o} -> {n}", f.field),
            (None, Some(n)) => format!("{}: {n}", f.field),
            (Some(o), None) => format!("{}: {o}", f.field),
            (None, None) => f.field.clone(),
        };
        let _ = writeln!(out, "      {line}");
    }
}

/// The plan as JSON: `{reconciler: {state, changes|error}}`.
pub fn plan_json(results: &BTreeMap<&'static str, PassResult>) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (name, r) in results {
        let v = match r {
            PassResult::Unmanaged => serde_json::json!({"managed": false}),
            PassResult::Failed { error, .. } => {
                serde_json::json!({"managed": true, "error": error})
            }
            PassResult::Ran {
                changes,
                waiting,
                outcomes,
                ..
            } => {
                serde_json::json!({"managed": true, "changes": changes, "waiting": waiting, "outcomes": outcomes})
            }
        };
        m.insert((*name).to_string(), v);
    }
    serde_json::Value::Object(m)
}

/// Whether any section has changes.
pub fn has_changes(results: &BTreeMap<&'static str, PassResult>) -> bool {
    results
        .values()
        .any(|r| matches!(r, PassResult::Ran { changes, .. } if !changes.is_empty()))
}

/// Status table.
pub fn status_text(generation: Option<u64>, statuses: &[ReconcilerStatus], color: bool) -> String {
    table(generation, statuses, color, false)
}

/// [`status_text`] of the state an agent stored before it stopped: every state reads
/// "was …" (nothing converges while no agent runs), never "Converged".
pub fn stored_status_text(generation: Option<u64>, statuses: &[ReconcilerStatus]) -> String {
    table(generation, statuses, false, true)
}

fn table(
    generation: Option<u64>,
    statuses: &[ReconcilerStatus],
    color: bool,
    stored: bool,
) -> String {
    let mut out = match generation {
        Some(g) => format!("accepted generation: {g}\n"),
        None => "accepted generation: none (no document yet)\n".to_string(),
    };
    let _ = writeln!(
        out,
        "{:<12} {:<12} {:>10} {:>7}  {:<24} MESSAGE",
        "RECONCILER", "STATE", "GENERATION", "OBJECTS", "SINCE"
    );
    for s in statuses {
        let state = if stored {
            format!("was {}", format!("{:?}", s.state).to_lowercase())
        } else {
            format!("{:?}", s.state)
        };
        let code = match s.state {
            State::Pending => "2",
            State::Converged => "32",
            State::Progressing => "33",
            State::Degraded => "31",
            State::Unmanaged => "2",
        };
        let _ = writeln!(
            out,
            "{:<12} {} {:>10} {:>7}  {:<24} {}",
            s.reconciler,
            paint(color, code, &format!("{state:<12}")),
            s.observed_generation
                .map(|g| g.to_string())
                .unwrap_or_else(|| "-".into()),
            s.owned.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            s.last_transition.format("%Y-%m-%dT%H:%M:%SZ"),
            s.message
        );
        for n in &s.objects {
            let _ = writeln!(out, "  · {}: {}", n.object, n.note);
        }
        // Failed objects, then waiting ones: same line, another mark.
        for (mark, code, list) in [("✗", "31", &s.object_errors), ("…", "2", &s.waiting)] {
            for e in list {
                let _ = writeln!(
                    out,
                    "  {} {}: {}",
                    paint(color, code, mark),
                    e.object,
                    e.error
                );
            }
        }
    }
    out
}
