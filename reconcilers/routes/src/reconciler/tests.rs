//! Unit tests of apply against the fake Caddy: one load per pass, narrowing a refused
//! change down to its routes, a concurrent edit retried soon.

use super::*;
use crate::driver::fake::FakeCaddy;
use crate::spec::RoutesSpec;
use converge_core::Retry;
use serde_json::json;

fn input(n: usize) -> RoutesInput {
    let routes: Vec<_> = (0..n)
        .map(|i| {
            json!({"name": format!("r{i}"), "hosts": [format!("r{i}.test")], "tls": "internal",
                        "upstreams": [{"address": format!("10.0.0.{}:80", i + 1)}]})
        })
        .collect();
    RoutesInput {
        spec: serde_json::from_value::<RoutesSpec>(json!({ "routes": routes })).unwrap(),
        peers: BTreeMap::new(),
    }
}

async fn pass(r: &Routes<FakeCaddy>, inp: &RoutesInput) -> (Plan<Action>, Vec<ObjectOutcome>) {
    let obs = r.observe(inp).await.unwrap();
    let p = r.plan(inp, &obs, &Facts::default());
    let shown = p.clone();
    (shown, r.apply(p).await)
}

#[tokio::test]
async fn many_routes_one_load_and_none_when_converged() {
    let r = Routes::new(FakeCaddy::new());
    let inp = input(20);
    let (_, out) = pass(&r, &inp).await;
    assert_eq!(out.len(), 20);
    assert!(out.iter().all(|o| o.error.is_none()));
    assert_eq!(r.driver().with(|s| s.loads), 1);
    let (p, _) = pass(&r, &inp).await;
    assert!(p.is_empty());
    assert_eq!(r.driver().with(|s| s.loads), 1);
}

#[tokio::test]
async fn a_refused_route_is_narrowed_down_and_the_rest_applied() {
    let r = Routes::new(FakeCaddy::new());
    r.driver().with(|s| {
        s.refuse.insert("converge-route-r5".into());
        s.refuse.insert("converge-route-r11".into());
    });
    let inp = input(16);
    let (_, out) = pass(&r, &inp).await;
    let failed: Vec<&str> = out
        .iter()
        .filter(|o| o.error.is_some())
        .map(|o| o.object.as_str())
        .collect();
    assert_eq!(failed, ["route r11", "route r5"]);
    assert!(out
        .iter()
        .find(|o| o.object == "route r5")
        .unwrap()
        .error
        .as_ref()
        .unwrap()
        .contains("bad route converge-route-r5"));
    assert_eq!(out.len(), 16);
    let cfg = r.driver().with(|s| s.config.clone());
    let present = crate::plan::extract(&cfg);
    assert_eq!(present.len(), 14);
    assert!(!present.contains_key("r5") && !present.contains_key("r11"));
    // Next pass: only the refused routes are tried again, in one attempt.
    let before = r.driver().with(|s| s.attempts);
    let (p, out) = pass(&r, &inp).await;
    assert_eq!(p.changes.len(), 2);
    let (failed, ok): (Vec<_>, Vec<_>) = out.iter().partition(|o| o.error.is_some());
    assert_eq!(failed.len(), 2, "{out:?}");
    // The routes in force are counted too, so the status can say 14 of 16 serve.
    assert_eq!(ok.len(), 14, "{out:?}");
    assert!(r.driver().with(|s| s.attempts) - before <= 3);
}

#[tokio::test]
async fn a_lost_redirect_is_put_back_without_a_reload() {
    let r = Routes::new(FakeCaddy::new());
    let inp = input(3);
    pass(&r, &inp).await;
    let loads = r.driver().with(|s| s.loads);
    // A flushed ruleset: the public ports no longer reach the serving instance.
    r.driver().with(|s| s.unredirected = true);
    let (p, out) = pass(&r, &inp).await;
    assert!(matches!(p.actions[..], [Action::Redirect]), "{p:?}");
    assert_eq!(p.changes[0].to_string(), "~ redirect caddy");
    assert!(out.iter().all(|o| o.error.is_none()), "{out:?}");
    assert_eq!(r.driver().with(|s| (s.redirects, s.loads)), (1, loads));
    let (p, _) = pass(&r, &inp).await;
    assert!(p.is_empty());
}

#[tokio::test]
async fn a_concurrent_edit_is_retried_soon() {
    let r = Routes::new(FakeCaddy::new());
    let inp = input(3);
    let obs = r.observe(&inp).await.unwrap();
    let p = r.plan(&inp, &obs, &Facts::default());
    // Someone changes the configuration between observe and apply.
    r.driver().with(|s| s.generation += 1);
    let out = r.apply(p).await;
    assert!(out
        .iter()
        .all(|o| o.retry == Retry::Soon && o.error.as_deref() == Some("412")));
    let (_, out) = pass(&r, &inp).await;
    assert!(out.iter().all(|o| o.error.is_none()));
}

#[tokio::test]
async fn caddy_gone_is_started_and_restored() {
    let r = Routes::new(FakeCaddy::new());
    let inp = input(2);
    pass(&r, &inp).await;
    r.driver().with(|s| s.running.clear());
    let (p, out) = pass(&r, &inp).await;
    assert!(matches!(p.actions[0], Action::Start { .. }));
    assert!(out.iter().all(|o| o.error.is_none()), "{out:?}");
    assert_eq!(
        crate::plan::extract(&r.driver().with(|s| s.config.clone())).len(),
        2
    );
}
