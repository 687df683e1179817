//! The pure plan: what the document wants served (`Served`), what the database and the
//! listeners hold (`Observed`), and the minimal writes between them. No I/O, no clock.

use crate::spec::{MetadataSpec, DEFAULT_PORT, DEFAULT_RATE_LIMIT};
use converge_core::{Change, Facts, FieldChange, Op, Plan};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// One project as served: entries hold their values as compact JSON text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedProject {
    pub token_sha256: String,
    pub rate_limit: u32,
    pub entries: BTreeMap<String, Arc<str>>,
}

/// The reconciler's input: the section resolved against the rest of the document (the
/// container networks' gateways give the default listen addresses).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Served {
    pub projects: BTreeMap<String, ServedProject>,
    pub listen: BTreeSet<SocketAddr>,
    /// The node's host name and message of the day, when the section sets them.
    pub hostname: Option<String>,
    pub motd: Option<String>,
}

impl Served {
    /// Resolves the section: `gateways` are the gateway addresses of the document's
    /// container networks (computed by the caller, which sees the whole document).
    pub fn new(spec: &MetadataSpec, gateways: &[IpAddr]) -> Served {
        let projects = spec
            .projects
            .iter()
            .map(|p| {
                let entries = p
                    .entries
                    .iter()
                    .map(|(k, v)| {
                        // Serialising a Value cannot fail (string keys only).
                        let text = serde_json::to_string(v).unwrap_or_else(|_| "null".into());
                        (k.clone(), Arc::from(text))
                    })
                    .collect();
                (
                    p.id.clone(),
                    ServedProject {
                        token_sha256: p.token_sha256.clone(),
                        rate_limit: p.rate_limit.unwrap_or(DEFAULT_RATE_LIMIT),
                        entries,
                    },
                )
            })
            .collect();
        let listen = match &spec.listen {
            // Validation has checked every address.
            Some(list) => list.iter().filter_map(|a| a.parse().ok()).collect(),
            // Labels alone open no port.
            None if spec.projects.is_empty() => BTreeSet::new(),
            None => std::iter::once(IpAddr::V4(Ipv4Addr::LOCALHOST))
                .chain(gateways.iter().copied())
                .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
                .collect(),
        };
        Served {
            projects,
            listen,
            hostname: spec.hostname.clone(),
            motd: spec.motd.clone(),
        }
    }
}

/// One project as stored in the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredProject {
    pub token_sha256: String,
    pub rate_limit: u32,
    /// Bumped by every write of this project (watches compare it).
    pub index: u64,
    pub entries: BTreeMap<String, Arc<str>>,
}

/// What the host holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub projects: BTreeMap<String, StoredProject>,
    /// The kernel's host name and `/etc/hostname` (read when the section sets one).
    pub hostname: Option<(String, String)>,
    /// `/etc/motd` (read when the section sets one; inner None: no file).
    pub motd: Option<Option<String>>,
    /// Addresses the API listens on; `None` when this process does not serve (one-shot
    /// commands such as `converge apply` only write the database).
    pub listening: Option<BTreeSet<SocketAddr>>,
}

/// One project's write: one transaction that leaves exactly `entries` stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectWrite {
    pub id: String,
    pub token_sha256: String,
    pub rate_limit: u32,
    /// Entries to insert or replace (new or changed only).
    pub set: Vec<(String, Arc<str>)>,
    /// Entries to delete.
    pub delete: Vec<String>,
    /// The whole desired set, published to readers once the transaction commits.
    pub entries: BTreeMap<String, Arc<str>>,
}

/// One driver operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Write(ProjectWrite),
    Remove(String),
    Listen(SocketAddr),
    Unlisten(SocketAddr),
    SetHostname(String),
    WriteMotd(String),
}

/// A short fingerprint of a value or hash for diffs: never the value itself.
fn fingerprint(text: &str) -> String {
    format!(
        "sha256:{}",
        &hex::encode(Sha256::digest(text.as_bytes()))[..12]
    )
}

/// Diff of served against observed; empty when converged.
pub fn plan(served: &Served, observed: &Observed, _facts: &Facts) -> Plan<Action> {
    let mut p = Plan::default();
    if let (Some(want), Some((kernel, file))) = (&served.hostname, &observed.hostname) {
        if kernel != want || file != want {
            p.changes
                .push(
                    Change::new(Op::Update, "hostname", "node").with_field(FieldChange::new(
                        "hostname",
                        Some(kernel.clone()),
                        Some(want.clone()),
                    )),
                );
            p.actions.push(Action::SetHostname(want.clone()));
        }
    }
    if let (Some(want), Some(have)) = (&served.motd, &observed.motd) {
        if have.as_deref() != Some(want.as_str()) {
            // Fingerprints, not the text: a diff line stays one line.
            p.changes
                .push(
                    Change::new(Op::Update, "motd", "/etc/motd").with_field(FieldChange::new(
                        "content",
                        have.as_deref().map(fingerprint),
                        Some(fingerprint(want)),
                    )),
                );
            p.actions.push(Action::WriteMotd(want.clone()));
        }
    }
    for (id, want) in &served.projects {
        let have = observed.projects.get(id);
        let (op, mut change) = match have {
            None => (Op::Create, Change::new(Op::Create, "project", id)),
            Some(_) => (Op::Update, Change::new(Op::Update, "project", id)),
        };
        let mut write = ProjectWrite {
            id: id.clone(),
            token_sha256: want.token_sha256.clone(),
            rate_limit: want.rate_limit,
            set: Vec::new(),
            delete: Vec::new(),
            entries: want.entries.clone(),
        };
        let empty = BTreeMap::new();
        let have_entries = have.map(|h| &h.entries).unwrap_or(&empty);
        for (path, value) in &want.entries {
            let old = have_entries.get(path);
            if old != Some(value) {
                write.set.push((path.clone(), value.clone()));
                change = change.with_field(FieldChange::new(
                    format!("entries.{path}"),
                    old.map(|o| fingerprint(o)),
                    Some(fingerprint(value)),
                ));
            }
        }
        for (path, old) in have_entries {
            if !want.entries.contains_key(path) {
                write.delete.push(path.clone());
                change = change.with_field(FieldChange::new(
                    format!("entries.{path}"),
                    Some(fingerprint(old)),
                    None,
                ));
            }
        }
        let meta_changed = match have {
            None => true,
            Some(h) => h.token_sha256 != want.token_sha256 || h.rate_limit != want.rate_limit,
        };
        if let Some(h) = have {
            if h.token_sha256 != want.token_sha256 {
                // Hash prefixes only: enough to tell tokens apart in a diff.
                change = change.with_field(FieldChange::new(
                    "tokenSha256",
                    Some(format!(
                        "{}…",
                        &h.token_sha256[..h.token_sha256.len().min(12)]
                    )),
                    Some(format!(
                        "{}…",
                        &want.token_sha256[..want.token_sha256.len().min(12)]
                    )),
                ));
            }
            if h.rate_limit != want.rate_limit {
                change = change.with_field(FieldChange::new(
                    "rateLimit",
                    Some(h.rate_limit.to_string()),
                    Some(want.rate_limit.to_string()),
                ));
            }
        }
        if op == Op::Create || meta_changed || !write.set.is_empty() || !write.delete.is_empty() {
            p.changes.push(change);
            p.actions.push(Action::Write(write));
        }
    }
    for id in observed.projects.keys() {
        if !served.projects.contains_key(id) {
            p.changes.push(Change::new(Op::Delete, "project", id));
            p.actions.push(Action::Remove(id.clone()));
        }
    }
    if let Some(listening) = &observed.listening {
        for a in served.listen.difference(listening) {
            p.changes
                .push(Change::new(Op::Create, "listener", a.to_string()));
            p.actions.push(Action::Listen(*a));
        }
        for a in listening.difference(&served.listen) {
            p.changes
                .push(Change::new(Op::Delete, "listener", a.to_string()));
            p.actions.push(Action::Unlisten(*a));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const H1: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const H2: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    fn served(v: serde_json::Value, gateways: &[IpAddr]) -> Served {
        let spec: MetadataSpec = serde_json::from_value(v).unwrap();
        Served::new(&spec, gateways)
    }

    /// What the host holds after applying `p` to `o` (the fake driver's behaviour).
    fn apply(mut o: Observed, p: &Plan<Action>) -> Observed {
        for a in &p.actions {
            match a {
                Action::Write(w) => {
                    let index = o.projects.get(&w.id).map(|h| h.index).unwrap_or(0) + 1;
                    let mut entries = o
                        .projects
                        .get(&w.id)
                        .map(|h| h.entries.clone())
                        .unwrap_or_default();
                    for d in &w.delete {
                        entries.remove(d);
                    }
                    for (k, v) in &w.set {
                        entries.insert(k.clone(), v.clone());
                    }
                    o.projects.insert(
                        w.id.clone(),
                        StoredProject {
                            token_sha256: w.token_sha256.clone(),
                            rate_limit: w.rate_limit,
                            index,
                            entries,
                        },
                    );
                }
                Action::Remove(id) => {
                    o.projects.remove(id);
                }
                Action::Listen(a) => {
                    o.listening.get_or_insert_with(BTreeSet::new).insert(*a);
                }
                Action::Unlisten(a) => {
                    if let Some(l) = o.listening.as_mut() {
                        l.remove(a);
                    }
                }
                Action::SetHostname(h) => o.hostname = Some((h.clone(), h.clone())),
                Action::WriteMotd(m) => o.motd = Some(Some(m.clone())),
            }
        }
        o
    }

    #[test]
    fn hostname_and_motd_converge_and_drift_is_repaired() {
        let s = served(
            json!({"hostname": "web-7", "motd": "Managed by converge\n"}),
            &[],
        );
        let o = Observed {
            hostname: Some(("localhost".into(), "localhost".into())),
            motd: Some(None),
            ..Default::default()
        };
        let p = plan(&s, &o, &Facts::default());
        let shown: Vec<String> = p.changes.iter().map(|c| c.to_string()).collect();
        assert_eq!(shown, ["~ hostname node", "~ motd /etc/motd"]);
        let o = apply(o, &p);
        assert!(plan(&s, &o, &Facts::default()).is_empty());
        // Someone set the kernel's name only (`hostname x`): set again.
        let drifted = Observed {
            hostname: Some(("x".into(), "web-7".into())),
            ..o.clone()
        };
        assert_eq!(
            plan(&s, &drifted, &Facts::default()).actions,
            [Action::SetHostname("web-7".into())]
        );
        // Absent from the section: left as it is.
        let none = served(json!({}), &[]);
        assert!(plan(&none, &drifted, &Facts::default()).is_empty());
    }

    #[test]
    fn listen_defaults_to_loopback_and_gateways() {
        let gw: IpAddr = "10.89.7.1".parse().unwrap();
        assert!(
            served(json!({}), &[gw]).listen.is_empty(),
            "no projects, no port"
        );
        let one = json!([{"id": "a", "tokenSha256": H1}]);
        let s = served(json!({"projects": one}), &[gw]);
        let want: BTreeSet<SocketAddr> = ["127.0.0.1:8500", "10.89.7.1:8500"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(s.listen, want);
        let s = served(
            json!({"projects": one, "listen": ["127.0.0.2:9000"]}),
            &[gw],
        );
        assert_eq!(s.listen.len(), 1);
        assert!(served(json!({"listen": []}), &[gw]).listen.is_empty());
    }

    #[test]
    fn only_changed_entries_are_written_and_values_never_shown() {
        let a = served(
            json!({"projects": [
                {"id": "a", "tokenSha256": H1, "entries": {"x": 1, "y": "secret-value", "z": [1]}},
                {"id": "b", "tokenSha256": H2, "entries": {"k": true}}
            ]}),
            &[],
        );
        let o = apply(
            Observed {
                listening: Some(BTreeSet::new()),
                ..Default::default()
            },
            &plan(&a, &Observed::default(), &Facts::default()),
        );
        let b = served(
            json!({"projects": [
                {"id": "a", "tokenSha256": H1, "entries": {"x": 2, "z": [1], "w": null}},
                {"id": "b", "tokenSha256": H2, "entries": {"k": true}}
            ]}),
            &[],
        );
        let p = plan(&b, &o, &Facts::default());
        let writes: Vec<&ProjectWrite> = p
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Write(w) => Some(w),
                _ => None,
            })
            .collect();
        assert_eq!(writes.len(), 1, "project b is unchanged");
        let w = writes[0];
        assert_eq!(w.id, "a");
        let set: Vec<&str> = w.set.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(set, ["w", "x"]);
        assert_eq!(w.delete, ["y"]);
        let shown = format!("{:?}", p.changes);
        assert!(!shown.contains("secret-value"), "{shown}");
        let o = apply(o, &p);
        assert!(plan(&b, &o, &Facts::default()).is_empty());
    }

    #[test]
    fn plan_is_idempotent_and_removes_what_is_gone() {
        let cases = [
            json!({}),
            json!({"projects": [{"id": "a", "tokenSha256": H1, "entries": {"p/q": {"n": 1}}}]}),
            json!({"projects": [{"id": "a", "tokenSha256": H2, "rateLimit": 5}], "listen": ["127.0.0.1:1"]}),
            json!({"projects": [{"id": "c", "tokenSha256": H1}], "listen": []}),
        ];
        let mut o = Observed {
            listening: Some(BTreeSet::new()),
            ..Default::default()
        };
        for c in cases {
            let s = served(c, &[]);
            let p = plan(&s, &o, &Facts::default());
            o = apply(o, &p);
            assert!(plan(&s, &o, &Facts::default()).is_empty());
            let ids: Vec<&String> = o.projects.keys().collect();
            let want: Vec<&String> = s.projects.keys().collect();
            assert_eq!(ids, want);
            assert_eq!(o.listening.as_ref(), Some(&s.listen));
        }
    }

    /// A section from small alphabets, so that successive specs share projects,
    /// entries and values.
    fn arb_section() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let entries = proptest::collection::btree_map(
            prop::sample::select(vec!["a", "b", "c/d", "c/e"]),
            prop::sample::select(vec![
                json!(1),
                json!("x"),
                json!({"k": [1, 2]}),
                json!(null),
            ]),
            0..4,
        );
        let project = (
            prop::sample::select(vec!["p", "q", "r"]),
            prop::sample::select(vec![H1, H2]),
            prop::option::of(1u32..3),
            entries,
        );
        (
            proptest::collection::vec(project, 0..3),
            prop::option::of(proptest::collection::btree_set(
                prop::sample::select(vec!["127.0.0.1:1", "127.0.0.1:2"]),
                0..3,
            )),
        )
            .prop_map(|(projects, listen)| {
                // Unique ids and hashes, as validation demands.
                let mut seen = BTreeSet::new();
                let projects: Vec<serde_json::Value> = projects
                    .into_iter()
                    .filter(|(id, h, _, _)| seen.insert(*id) && seen.insert(*h))
                    .map(|(id, h, rate, e)| {
                        json!({"id": id, "tokenSha256": h, "rateLimit": rate, "entries": e})
                    })
                    .collect();
                match listen {
                    Some(l) => json!({"projects": projects, "listen": l}),
                    None => json!({"projects": projects}),
                }
            })
    }

    proptest::proptest! {
        /// plan(apply(plan(s))) is empty, from whatever the previous spec left.
        #[test]
        fn plan_after_apply_is_empty(
            specs in proptest::collection::vec(arb_section(), 1..6)
        ) {
            let gw: IpAddr = "10.89.7.1".parse().unwrap();
            let mut o = Observed { listening: Some(BTreeSet::new()), ..Default::default() };
            for spec in specs {
                let s = served(spec, &[gw]);
                let p = plan(&s, &o, &Facts::default());
                o = apply(o, &p);
                let again = plan(&s, &o, &Facts::default());
                proptest::prop_assert!(again.is_empty(), "{:?}", again.changes);
            }
        }
    }

    #[test]
    fn without_a_server_listeners_are_not_planned() {
        let s = served(json!({}), &[]);
        assert!(plan(&s, &Observed::default(), &Facts::default()).is_empty());
    }
}
