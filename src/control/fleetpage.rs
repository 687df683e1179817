//! The fleet page (`serve --fleet-page`, at `/fleet`): one read-only, server-rendered
//! HTML page an operator keeps open during a rollout: every node with its accepted and
//! converged generation, conditions, agent version and last sign of life; the newest
//! rollout's waves; the last dry run's aggregate. No script: it reloads itself every few
//! seconds. It is reached with the operator token in `<data>/fleet-page.token` (0600 in
//! the 0700 data directory, so whoever may use the admin socket may read it), once as
//! `?token=`, which sets a cookie for the reloads.

use super::fleetplan::PlanReport;
use super::plane_store::NodeRecord;
use super::rollout::{Outcome, Rollout};
use std::fmt::Write;
use std::path::Path;

/// Seconds between reloads.
pub const REFRESH_SECS: u32 = 3;
/// The cookie that carries the token after the first visit.
pub const COOKIE: &str = "converge_fleet";

/// The page's token: read from `<data>/fleet-page.token`, made there on first use.
pub fn token(data: &Path) -> anyhow::Result<String> {
    let path = data.join("fleet-page.token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim();
        if t.len() >= 32 {
            return Ok(t.to_string());
        }
    }
    use rand_core::RngCore;
    let mut raw = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut raw);
    let t = hex::encode(raw);
    converge_core::fsutil::write_atomic(&path, format!("{t}\n").as_bytes(), 0o600)?;
    Ok(t)
}

/// How a request may see the page.
#[derive(Debug, PartialEq, Eq)]
pub enum Access {
    /// With the cookie.
    Cookie,
    /// With `?token=`: set the cookie.
    Query,
    Denied,
}

/// Checks the request's `?token=` and cookie against `token` (in constant time).
pub fn access(query_token: Option<&str>, cookie_header: Option<&str>, token: &str) -> Access {
    use subtle::ConstantTimeEq;
    let ok = |t: &str| bool::from(t.as_bytes().ct_eq(token.as_bytes()));
    let from_cookie = cookie_header.and_then(|h| {
        h.split(';')
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE)
            .map(|(_, v)| v)
    });
    if from_cookie.is_some_and(ok) {
        Access::Cookie
    } else if query_token.is_some_and(ok) {
        Access::Query
    } else {
        Access::Denied
    }
}

/// Text for HTML element content and quoted attributes.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn generation(g: Option<u64>) -> String {
    g.map(|g| g.to_string()).unwrap_or_else(|| "-".into())
}

/// CSS class of a reconciler state or rollout outcome.
fn class(state: &str) -> &'static str {
    match state {
        "Converged" | "converged" | "succeeded" => "ok",
        "Progressing" | "Pending" | "waiting" | "running" | "pending" => "busy",
        "Degraded" | "refused" | "degraded" | "timedOut" | "halted" | "reverted" => "bad",
        _ => "off",
    }
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse}td,th{padding:.25em .7em;text-align:left;border-bottom:1px solid #ddd}\
.ok{color:#176d2c}.busy{color:#8a5a00}.bad{color:#b00020;font-weight:600}.off{color:#888}\
pre{background:#f4f4f4;padding:.6em}h2{margin-top:1.4em}";

/// The whole page.
pub fn render(
    nodes: &[NodeRecord],
    rollout: Option<&Rollout>,
    plan: Option<&PlanReport>,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let mut out = format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta http-equiv=refresh content={REFRESH_SECS}>\
         <title>converge fleet</title><style>{STYLE}</style></head><body>\
         <h1>converge fleet</h1><p id=summary>{}</p>",
        esc(&summary(nodes, now))
    );
    out.push_str("<h2>Rollout</h2>");
    match rollout {
        None => out.push_str("<p id=rollout>none yet</p>"),
        Some(r) => rollout_html(&mut out, r),
    }
    out.push_str("<h2>Last dry run</h2>");
    match plan {
        None => out.push_str("<p id=plan>none since the plane started</p>"),
        Some(p) => {
            let _ = write!(
                out,
                "<pre id=plan>{}</pre>",
                esc(&format!("{}\n{}", p.request_id, p.text()))
            );
        }
    }
    out.push_str(
        "<h2>Nodes</h2><table id=nodes><tr><th>node<th>accepted<th>converged\
         <th>conditions<th>version<th>last seen</tr>",
    );
    for n in nodes {
        let _ = write!(
            out,
            "<tr id=\"node-{id}\"><td>{id}<td>{}<td>{}<td>",
            generation(n.accepted_generation),
            generation(n.converged_generation),
            id = esc(&n.id)
        );
        for r in n.reconcilers().iter().filter(|r| r["state"] != "Unmanaged") {
            let state = r["state"].as_str().unwrap_or("?");
            let _ = write!(
                out,
                "<span class={}>{}={}</span> ",
                class(state),
                esc(r["reconciler"].as_str().unwrap_or("?")),
                esc(state)
            );
        }
        // A refusal counts until the node accepts a newer generation.
        let refusal = n.refused.as_ref().filter(|r| {
            let g = r["generation"].as_u64();
            n.accepted_generation
                .is_none_or(|a| g.is_none_or(|g| g > a))
        });
        if let Some(e) = refusal.and_then(|r| r["error"].as_str()) {
            let _ = write!(out, "<span class=bad>refused: {}</span>", esc(e));
        }
        let version = n.version();
        let _ = write!(
            out,
            "<td>{}<td>{}</tr>",
            esc(version),
            esc(&ago(n.last_seen.as_deref(), now))
        );
    }
    let _ = write!(
        out,
        "</table><p class=off>{} · reloads every {REFRESH_SECS} s</p></body></html>",
        now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    out
}

/// `4 nodes: 3 converged, 1 degraded, 0 not seen for 5 minutes`.
fn summary(nodes: &[NodeRecord], now: chrono::DateTime<chrono::Utc>) -> String {
    let degraded = |n: &NodeRecord| n.reconcilers().iter().any(|r| r["state"] == "Degraded");
    let converged = nodes
        .iter()
        .filter(|n| {
            n.accepted_generation.is_some() && n.converged_generation >= n.accepted_generation
        })
        .count();
    let silent = nodes
        .iter()
        .filter(|n| {
            n.last_seen
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_none_or(|t| (now - t.with_timezone(&chrono::Utc)).num_seconds() > 300)
        })
        .count();
    format!(
        "{} nodes: {converged} converged at their accepted generation, {} degraded, {silent} not seen for 5 minutes",
        nodes.len(),
        nodes.iter().filter(|n| degraded(n)).count()
    )
}

/// `12 s ago`.
fn ago(t: Option<&str>, now: chrono::DateTime<chrono::Utc>) -> String {
    let Some(t) = t.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) else {
        return "never".into();
    };
    let s = (now - t.with_timezone(&chrono::Utc)).num_seconds().max(0);
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

fn rollout_html(out: &mut String, r: &Rollout) {
    let phase = serde_json::to_value(r.phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let _ = write!(
        out,
        "<p id=rollout>{} <span class={}>{}</span> · canary {}, batch {}, wait {} s{}</p>",
        esc(&r.id),
        class(&phase),
        esc(&phase),
        r.spec.canary,
        r.spec.batch,
        r.spec.wait_ms / 1000,
        if r.spec.revert { ", revert" } else { "" }
    );
    if let Some(m) = &r.message {
        let _ = write!(out, "<p class=bad>{}</p>", esc(m));
    }
    out.push_str("<table id=waves><tr><th>wave<th>nodes</tr>");
    for (i, w) in r.waves.iter().enumerate() {
        let _ = write!(out, "<tr><td>{}<td>", esc(&r.wave_line(i)));
        for n in &w.nodes {
            let outcome = serde_json::to_value(n.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let _ = write!(
                out,
                "<span class={} title=\"{}\">{} {}</span> ",
                if n.outcome == Outcome::Pending {
                    "off"
                } else {
                    class(&outcome)
                },
                esc(n.detail.as_deref().unwrap_or_default()),
                esc(&n.node_id),
                esc(&outcome)
            );
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_checked_from_the_cookie_or_the_query() {
        let t = "a".repeat(64);
        assert_eq!(access(Some(&t), None, &t), Access::Query);
        let cookie = format!("x=1; {COOKIE}={t}");
        assert_eq!(access(None, Some(&cookie), &t), Access::Cookie);
        assert_eq!(access(Some("b"), None, &t), Access::Denied);
        assert_eq!(access(None, Some("converge_fleet=b"), &t), Access::Denied);
        assert_eq!(access(None, None, &t), Access::Denied);
    }

    #[test]
    fn node_text_is_escaped() {
        let n = NodeRecord {
            id: "<script>".into(),
            name: String::new(),
            public_key: String::new(),
            sealing_key: String::new(),
            facts: serde_json::json!({"convergeVersion": "\"><img>"}),
            enrolled_at: String::new(),
            nats_password: None,
            nats_key: None,
            last_seen: None,
            accepted_generation: Some(2),
            converged_generation: Some(2),
            status: Some(serde_json::json!({"reconcilers": [
                {"reconciler": "dns", "state": "Degraded", "observedGeneration": 2}]})),
            refused: Some(serde_json::json!({"generation": 3, "error": "<b>bad</b>"})),
        };
        let page = render(&[n], None, None, chrono::Utc::now());
        assert!(!page.contains("<script>") && !page.contains("<img>") && !page.contains("<b>"));
        assert!(page.contains("&lt;script&gt;"));
        assert!(page
            .contains("1 nodes: 1 converged at their accepted generation, 1 degraded, 1 not seen"));
        assert!(page.contains("<span class=bad>dns=Degraded</span>"));
        assert!(page.contains("refused: &lt;b&gt;"));
    }
}
