//! Shared vocabulary of the document's sections: names, secret names, protocols,
//! address helpers, JSON paths of map keys and the "duplicate name" check, so that every
//! reconciler validates the same thing the same way (reconcilers never import each other).

use crate::Problems;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;

/// Transport protocol of a port.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

fn is_token(name: &str, max: usize) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Whether `name` is a valid object name (container, network, volume, peer, route,
/// repository, job): `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 63 characters.
pub fn is_name(name: &str) -> bool {
    is_token(name, 63)
}

/// Whether `name` is a valid local secret name: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most
/// 253 characters.
pub fn is_secret_name(name: &str) -> bool {
    is_token(name, 253)
}

/// Whether `name` is a valid environment variable name (`[A-Za-z_][A-Za-z0-9_]*`).
pub fn is_env_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// JSON path of the map entry `key` below `parent`: `parent.key` for identifier-like
/// keys, `parent["key"]` otherwise.
pub fn key_path(parent: &str, key: &str) -> String {
    if is_env_name(key) {
        format!("{parent}.{key}")
    } else {
        format!("{parent}[{key:?}]")
    }
}

/// Whether two host bind addresses (absent: every address) can collide on one port.
/// `0.0.0.0` covers every IPv4 address and `::` every IPv6 address.
pub fn host_ips_overlap(a: Option<IpAddr>, b: Option<IpAddr>) -> bool {
    match (a, b) {
        (None, _) | (_, None) => true,
        (Some(a), Some(b)) => {
            a == b || (a.is_ipv4() == b.is_ipv4() && (a.is_unspecified() || b.is_unspecified()))
        }
    }
}

/// The "duplicate name" check of a list: remembers where each value was first used and
/// reports later uses as `duplicate <what> "<value>"`, pointing at the first.
pub struct Unique<'a> {
    what: &'static str,
    list: String,
    seen: HashMap<&'a str, usize>,
}

impl<'a> Unique<'a> {
    /// `what` names the value (`container name`), `list` is the list's JSON path.
    pub fn new(what: &'static str, list: impl Into<String>) -> Self {
        Self {
            what,
            list: list.into(),
            seen: HashMap::new(),
        }
    }

    /// Records `value` of item `index`; a repeat is reported at `item_field`.
    pub fn check(
        &mut self,
        value: &'a str,
        index: usize,
        item_field: String,
        problems: &mut Problems,
    ) {
        if let Some(first) = self.seen.get(value) {
            problems.push_hint(
                item_field,
                format!("duplicate {} {value:?}", self.what),
                format!("already used by {}[{first}]", self.list),
            );
        } else {
            self.seen.insert(value, index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_name("web-1.a_b"));
        assert!(!is_name("-web"));
        assert!(!is_name(&"a".repeat(64)));
        assert!(is_secret_name(&"a".repeat(253)));
        assert!(!is_secret_name("a/b"));
        assert_eq!(key_path("$.env", "PATH"), "$.env.PATH");
        assert_eq!(key_path("$.labels", "a.b"), "$.labels[\"a.b\"]");
    }

    #[test]
    fn overlap() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert!(host_ips_overlap(None, ip("10.0.0.1")));
        assert!(host_ips_overlap(ip("0.0.0.0"), ip("10.0.0.1")));
        assert!(!host_ips_overlap(ip("0.0.0.0"), ip("::1")));
        assert!(!host_ips_overlap(ip("10.0.0.2"), ip("10.0.0.1")));
    }

    #[test]
    fn unique_reports_the_first_use() {
        let mut p = Problems::default();
        let mut u = Unique::new("peer name", "$.peers");
        for (i, n) in ["a", "b", "a"].iter().enumerate() {
            u.check(n, i, format!("$.peers[{i}].name"), &mut p);
        }
        assert_eq!(p.len(), 1);
        assert_eq!(p.0[0].path, "$.peers[2].name");
        assert_eq!(p.0[0].message, "duplicate peer name \"a\"");
        assert_eq!(p.0[0].hint.as_deref(), Some("already used by $.peers[0]"));
    }
}
