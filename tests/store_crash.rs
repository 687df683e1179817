//! The store survives kill -9 of the agent at any moment: after each crash the database
//! passes SQLite's integrity check, no acknowledged document is lost, and the restarted
//! agent resumes from the last good generation.

mod common;

use common::agent::{converge, data, dns_doc, push, reconciler, start_agent, status};
use common::sandbox::{require_tool, TestNode};
use serde_json::json;
use std::time::Duration;

#[test]
fn kill_9_during_a_push_storm_loses_no_acknowledged_document() {
    require_tool("dnsmasq");
    let node = TestNode::new("store-kill");
    let mut generation = 0u64;
    for round in 0..5u64 {
        let mut agent = start_agent(&node, &[]);
        let mut acked = status(&node)["generation"].as_u64().unwrap_or(0);
        assert!(
            acked >= generation,
            "round {round}: resumed at {acked}, but {generation} was acknowledged"
        );
        generation = acked;
        // Pushes from a thread while this one kills the agent at a varying moment.
        let pusher = {
            let start = generation + 1;
            let node_ref = &node;
            std::thread::scope(|s| {
                let h = s.spawn(move || {
                    let mut last_ok = None;
                    for g in start..start + 200 {
                        let doc = dns_doc(node_ref, g, json!([{"name": "web.internal", "type": "A", "values": [format!("10.88.{}.{}", g / 250, g % 250 + 1)]}]));
                        if push(node_ref, &doc).status.success() {
                            last_ok = Some(g);
                        } else {
                            break; // the agent is gone
                        }
                    }
                    last_ok
                });
                std::thread::sleep(Duration::from_millis(150 + round * 70));
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
                h.join().expect("pusher")
            })
        };
        let _ = agent.wait();
        if let Some(g) = pusher {
            acked = g;
        }
        // No agent answers now: the stored state, said to be that (exit 3).
        let out = converge(&node, &["status", "--output", "json"]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "status after kill -9: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(s["agent"], "not running");
        let stored = s["generation"].as_u64().unwrap_or(0);
        assert!(
            stored >= acked,
            "round {round}: acknowledged {acked} but the store has {stored}"
        );
        generation = stored;
        let store =
            converge::store::Store::open(&data(&node).join("state.db")).expect("reopen store");
        assert_eq!(store.integrity_check().expect("integrity check"), "ok");
        assert_eq!(
            store.last_good().expect("last good").map(|(g, _)| g),
            Some(stored)
        );
        eprintln!("round {round}: acknowledged up to {acked}, store resumed at {stored}");
    }
    assert!(generation > 5, "pushes went through ({generation})");
    // The restarted agent converges the last good document.
    let _agent = start_agent(&node, &[]);
    common::sandbox::wait_until(Duration::from_secs(10), "converged after crashes", || {
        let s = status(&node);
        reconciler(&s, "dns")["state"] == "Converged"
            && reconciler(&s, "dns")["observedGeneration"] == s["generation"]
    });
}
