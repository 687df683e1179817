//! Unit tests of the pure plan: splice, one change per pass, waiting routes, redaction.

use super::*;
use crate::spec::RoutesSpec;
use converge_core::ContainerFacts;
use serde_json::json;

fn input(routes: Value) -> RoutesInput {
    let spec: RoutesSpec = serde_json::from_value(json!({ "routes": routes })).unwrap();
    let mut peers = BTreeMap::new();
    peers.insert("w1".to_string(), "10.210.0.7".parse().unwrap());
    RoutesInput { spec, peers }
}

fn foreign() -> Value {
    json!({
        "admin": {"listen": "unix//run/caddy/admin.sock"},
        "apps": {
            "http": {"servers": {"theirs": {"listen": [":8081"], "routes": [{"handle": [{"handler": "static_response", "body": "x"}]}]}}},
            "tls": {"automation": {"policies": [{"issuers": [{"module": "acme"}]}]}}
        }
    })
}

fn observed(config: Value) -> Observed {
    let mut secrets = BTreeMap::new();
    secrets.insert("crt".to_string(), Secret("CERTPEM".into()));
    secrets.insert("key".to_string(), Secret("TOPSECRETKEY".into()));
    Observed {
        process: Process::Managed {
            pids: vec![1, 2],
            missing: false,
            bootstrap: json!({"admin": {}}),
        },
        config: Some(Config {
            etag: Some("\"/config/ 1\"".into()),
            value: config,
            standby: None,
            redirected: true,
        }),
        secrets,
        upstreams: Vec::new(),
        stream_close_delay: true,
        load_hold: None,
    }
}

fn facts() -> Facts {
    let mut f = Facts::default();
    f.containers.insert(
        "web".into(),
        ContainerFacts {
            addresses: vec!["10.88.0.5".parse().unwrap()],
            running: true,
        },
    );
    f
}

fn routes() -> Value {
    json!([
        {"name": "a", "hosts": ["a.test"], "tls": "internal", "upstreams": [{"container": "web", "port": 80}]},
        {"name": "b", "hosts": ["b.test"], "path": "/api/", "upstreams": [{"peer": "w1", "port": 8080}, {"address": "10.0.0.9:80"}],
         "healthCheck": {"path": "/h"}},
        {"name": "c", "hosts": ["c.test"], "tls": "off", "redirect": {"to": "https://a.test{uri}"}},
        {"name": "d", "hosts": ["d.test"], "tls": "certificate", "certificateSecret": "crt", "keySecret": "key",
         "upstreams": [{"address": "10.0.0.9:80"}]}
    ])
}

fn load_of(p: &Plan<Action>) -> &Load {
    p.actions
        .iter()
        .find_map(|a| match a {
            Action::Load(l) => Some(l.as_ref()),
            _ => None,
        })
        .expect("a load")
}

#[test]
fn one_change_for_many_routes_then_nothing_and_foreign_objects_kept() {
    let inp = input(routes());
    let p = plan(&inp, &observed(foreign()), &facts());
    assert_eq!(p.actions.len(), 1, "one configuration change");
    let lines: Vec<String> = p.changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(lines, ["+ route a", "+ route b", "+ route c", "+ route d"]);
    let cfg = load_of(&p).config.clone();
    // Foreign objects untouched, ours spliced in.
    assert_eq!(
        cfg["apps"]["http"]["servers"]["theirs"],
        foreign()["apps"]["http"]["servers"]["theirs"]
    );
    assert_eq!(cfg["admin"], foreign()["admin"]);
    let pol = cfg["apps"]["tls"]["automation"]["policies"]
        .as_array()
        .unwrap();
    assert_eq!(pol.len(), 2);
    assert_eq!(pol[0]["@id"], "converge-tls-a");
    assert_eq!(pol[1], json!({"issuers": [{"module": "acme"}]}));
    let https = &cfg["apps"]["http"]["servers"][HTTPS_SERVER]["routes"];
    // Longest path first.
    assert_eq!(https[0]["@id"], "converge-route-b");
    assert_eq!(
        https[0]["handle"][0]["upstreams"],
        json!([{"dial": "10.210.0.7:8080"}, {"dial": "10.0.0.9:80"}])
    );
    assert_eq!(
        cfg["apps"]["http"]["servers"][HTTP_SERVER]["routes"][0]["@id"],
        "converge-route-c"
    );
    // Caddy must not install its local CA into the host's trust store.
    assert_eq!(
        cfg["apps"]["pki"]["certificate_authorities"]["local"]["install_trust"],
        json!(false)
    );
    // Converged: nothing to do.
    let again = plan(&inp, &observed(cfg.clone()), &facts());
    assert!(again.is_empty(), "{:?}", again.changes);
    // Removing every route leaves exactly the foreign configuration.
    let none = plan(&input(json!([])), &observed(cfg), &facts());
    assert_eq!(none.actions.len(), 1);
    let back = &load_of(&none).config;
    assert_eq!(
        back["apps"]["http"]["servers"],
        foreign()["apps"]["http"]["servers"]
    );
    assert_eq!(
        back["apps"]["tls"]["automation"],
        foreign()["apps"]["tls"]["automation"]
    );
}

#[test]
fn a_changed_route_shows_its_fields_and_no_secret() {
    let inp = input(routes());
    let cfg = load_of(&plan(&inp, &observed(foreign()), &facts()))
        .config
        .clone();
    let mut r = routes();
    r[0]["upstreams"] = json!([{"address": "10.0.0.10:80"}]);
    let mut obs = observed(cfg);
    obs.secrets
        .insert("key".into(), Secret("ANOTHERKEY".into()));
    let p = plan(&input(r), &obs, &facts());
    assert_eq!(p.actions.len(), 1);
    let lines: Vec<String> = p.changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(lines, ["~ route a", "~ route d"]);
    assert_eq!(p.changes[0].fields[0].field, "upstreams");
    assert_eq!(p.changes[0].fields[0].old.as_deref(), Some("10.88.0.5:80"));
    assert_eq!(p.changes[1].fields[0].field, "tls");
    let shown = format!(
        "{:?} {:?}",
        serde_json::to_string(&p.changes).unwrap(),
        p.actions
    );
    for secret in ["TOPSECRETKEY", "ANOTHERKEY", "CERTPEM"] {
        assert!(!shown.contains(secret), "{shown}");
    }
}

#[test]
fn unknown_container_waits_and_keeps_what_is_in_force() {
    let inp = input(routes());
    let cfg = load_of(&plan(&inp, &observed(foreign()), &facts()))
        .config
        .clone();
    let p = plan(&inp, &observed(cfg), &Facts::default());
    assert!(p.is_empty(), "{:?}", p.changes);
    assert_eq!(p.waiting.len(), 1);
    assert_eq!(
        p.waiting[0].to_string(),
        "~ route a (waiting for container web's address)"
    );
    // Not in force yet: waits without being created.
    let p = plan(&inp, &observed(foreign()), &Facts::default());
    assert!(!p.changes.iter().any(|c| c.id == "a"));
}

#[test]
fn caddy_down_is_started_then_loaded_and_edits_are_repaired() {
    let inp = input(routes());
    let mut obs = observed(foreign());
    obs.config = None;
    obs.process = Process::Managed {
        pids: vec![],
        missing: false,
        bootstrap: json!({"admin": {"listen": "unix//x"}}),
    };
    let p = plan(&inp, &obs, &facts());
    assert!(matches!(p.actions[0], Action::Start { .. }));
    assert_eq!(load_of(&p).etag, None);
    assert_eq!(load_of(&p).config["admin"], json!({"listen": "unix//x"}));
    // Someone edits our server's listen address: put back, as one change.
    let mut cfg = load_of(&plan(&inp, &observed(foreign()), &facts()))
        .config
        .clone();
    cfg["apps"]["http"]["servers"][HTTPS_SERVER]["listen"] = json!([":8443"]);
    let p = plan(&inp, &observed(cfg), &facts());
    assert_eq!(p.actions.len(), 1);
    assert_eq!(p.changes[0].to_string(), "~ config caddy");
}

#[test]
fn stream_close_delay_only_where_caddy_has_it() {
    let inp = input(routes());
    let mut obs = observed(foreign());
    let with = load_of(&plan(&inp, &obs, &facts())).config.to_string();
    obs.stream_close_delay = false;
    let without = load_of(&plan(&inp, &obs, &facts())).config.to_string();
    assert!(with.contains("stream_close_delay"));
    assert!(!without.contains("stream_close_delay"));
}

#[test]
fn shorthand_placeholders_render_as_full_names() {
    // Caddy expands only full names in JSON: `{uri}` left as is would reach clients.
    let inp = input(routes());
    let config = load_of(&plan(&inp, &observed(foreign()), &facts()))
        .config
        .to_string();
    assert!(
        config.contains("https://a.test{http.request.uri}"),
        "{config}"
    );
    assert!(!config.contains("{uri}"), "{config}");
}

#[test]
fn dialed_addresses_are_every_upstream_in_the_configuration() {
    let config = serde_json::json!({"apps": {"http": {"servers": {
        "converge-https": {"routes": [{"handle": [{"handler": "reverse_proxy",
            "upstreams": [{"dial": "10.210.0.7:8081"}, {"dial": "[fd00::7]:80"}]}]}]},
        "theirs": {"routes": [{"handle": [{"handler": "reverse_proxy",
            "upstreams": [{"dial": "localhost:9000"}, {"dial": "10.1.2.3:80"}]}]}]}
    }}}});
    let got: Vec<String> = dialed(&config).iter().map(|a| a.to_string()).collect();
    assert_eq!(got, ["10.1.2.3", "10.210.0.7", "fd00::7"]);
}

#[test]
fn a_load_within_the_reload_interval_is_held_a_start_is_not() {
    let inp = input(routes());
    let mut o = observed(foreign());
    o.load_hold = Some(Duration::from_millis(400));
    let p = plan(&inp, &o, &facts());
    assert!(
        p.actions.is_empty() && p.changes.is_empty(),
        "{:?}",
        p.actions
    );
    let w = p.waiting.iter().find(|w| w.id == "caddy").expect("held");
    assert!(w.in_progress && w.retry_after == Some(Duration::from_millis(400)));
    assert!(w.reason.contains("4 changes held"), "{}", w.reason);
    // Nothing to change: nothing held either.
    let applied = splice(
        &foreign(),
        &load_of(&plan(&inp, &observed(foreign()), &facts())).desired,
    );
    let mut o = observed(applied);
    o.load_hold = Some(Duration::from_millis(400));
    let p = plan(&inp, &o, &facts());
    assert!(p.actions.is_empty() && p.waiting.iter().all(|w| w.id != "caddy"));
    // Caddy not running: started at once, its routes loaded in the same pass.
    let mut o = observed(foreign());
    o.config = None;
    o.process = Process::Managed {
        pids: vec![],
        missing: false,
        bootstrap: json!({"admin": {}}),
    };
    o.load_hold = Some(Duration::from_millis(400));
    let p = plan(&inp, &o, &facts());
    assert!(matches!(p.actions[0], Action::Start { .. }));
    load_of(&p);
}

#[test]
fn the_pair_is_put_right_and_a_lost_instance_is_started_alone() {
    let inp = input(routes());
    let converged = load_of(&plan(&inp, &observed(foreign()), &facts()))
        .config
        .clone();
    let mut obs = observed(converged.clone());
    obs.config.as_mut().unwrap().standby = Some(converged.clone());
    assert!(
        plan(&inp, &obs, &facts()).actions.is_empty(),
        "in agreement"
    );
    // The standby lacks the routes (its reload after the drain failed): one load.
    obs.config.as_mut().unwrap().standby = Some(foreign());
    let p = plan(&inp, &obs, &facts());
    assert_eq!(load_of(&p).config, converged);
    assert!(load_of(&p).changed.is_empty());
    assert_eq!(p.changes[0].to_string(), "~ config caddy");
    // Foreign objects differing on the standby are not converge's business.
    let mut edited = converged.clone();
    edited["apps"]["http"]["servers"]["theirs"]["listen"] = json!([":9"]);
    obs.config.as_mut().unwrap().standby = Some(edited);
    assert!(plan(&inp, &obs, &facts()).actions.is_empty());
    // The kernel's redirect is gone (a flushed ruleset): put back, no reload, even
    // while loads are held by the reload interval.
    obs.config.as_mut().unwrap().redirected = false;
    obs.load_hold = Some(Duration::from_millis(400));
    let p = plan(&inp, &obs, &facts());
    assert!(matches!(p.actions[..], [Action::Redirect]), "{p:?}");
    // With a route change held meanwhile: the redirect goes ahead, the change waits.
    let moved = input(
        json!([{"name": "api", "hosts": ["api.test"], "tls": "internal",
        "upstreams": [{"address": "10.0.0.9:80"}]}]),
    );
    let p = plan(&moved, &obs, &facts());
    assert!(matches!(p.actions[..], [Action::Redirect]), "{p:?}");
    assert_eq!(p.changes.len(), 1);
    assert!(p.waiting.iter().any(|w| w.in_progress));
    obs.load_hold = None;
    obs.config.as_mut().unwrap().redirected = true;
    // One instance killed: only it is started, nothing is stopped.
    obs.config = None;
    obs.process = Process::Managed {
        pids: vec![7],
        missing: true,
        bootstrap: json!({"admin": {}}),
    };
    let p = plan(&inp, &obs, &facts());
    assert!(matches!(&p.actions[0], Action::Start { stop } if stop.is_empty()));
}
