//! The converge table as data: the chains, rules and sets it always has, the elements the
//! spec and the containers' facts put in the sets, and their netlink messages.
//!
//! The packet path is a constant number of rules whatever the number of ports: every
//! published port is one element of a hash map keyed by `protocol . port` (or
//! `address . protocol . port` for a port bound to one host address), looked up by one
//! rule per map. Filters (`allowFrom`, `input`, `forward`) are elements of interval sets
//! with concatenated keys, also looked up by one rule each.

use crate::nfnl::{self, msg, Attrs, Message, NLM_F_CREATE};
pub use crate::nfnl::{ChainDef, Hook};
use crate::{FilterPolicy, FilterRule, FirewallSpec, Protocol, PublishedPort};
use converge_core::Facts;
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

pub const TABLE: &str = "converge";

/// One field of a set key or value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Addr4,
    Addr6,
    Proto,
    Port,
}

impl Field {
    /// nft's data type id (`nft describe`), so `nft list` prints the values readably.
    fn type_id(self) -> u32 {
        match self {
            Field::Addr4 => 7,
            Field::Addr6 => 8,
            Field::Proto => 12,
            Field::Port => 13,
        }
    }

    fn len(self) -> usize {
        match self {
            Field::Addr4 => 4,
            Field::Addr6 => 16,
            Field::Proto => 1,
            Field::Port => 2,
        }
    }
}

/// Length of a concatenation: each field takes whole 32-bit registers.
fn concat_len(fields: &[Field]) -> usize {
    fields.iter().map(|f| (f.len() + 3) & !3).sum()
}

/// nft's id of a concatenated type: 6 bits per field, first field highest.
fn concat_type(fields: &[Field]) -> u32 {
    fields.iter().fold(0, |t, f| (t << 6) | f.type_id())
}

const SET_INTERVAL: u32 = 0x4;
const SET_MAP: u32 = 0x8;
const SET_CONCAT: u32 = 0x80;

/// A named set or map of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetDef {
    pub name: &'static str,
    pub key: &'static [Field],
    pub data: &'static [Field],
    /// Interval set: every key field is a range (pipapo in the kernel).
    pub interval: bool,
    /// What one element is, in `converge diff` (`published-port`, `allow-from`, …).
    pub kind: &'static str,
}

impl SetDef {
    pub fn key_len(&self) -> usize {
        concat_len(self.key)
    }

    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if !self.data.is_empty() {
            f |= SET_MAP;
        }
        if self.interval {
            f |= SET_INTERVAL | SET_CONCAT;
        }
        f
    }

    /// What the kernel reports back for this set, to compare with a dump.
    pub fn shape(&self) -> SetShape {
        SetShape {
            flags: self.flags(),
            key_type: concat_type(self.key),
            key_len: self.key_len() as u32,
            data_type: concat_type(self.data),
            data_len: concat_len(self.data) as u32,
        }
    }
}

/// A set's definition as the kernel stores it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetShape {
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
    pub data_type: u32,
    pub data_len: u32,
}

use Field::*;

pub const DNAT4_ANY: SetDef = SetDef {
    name: "dnat4_any",
    key: &[Proto, Port],
    data: &[Addr4, Port],
    interval: false,
    kind: "published-port",
};
pub const DNAT4_ON: SetDef = SetDef {
    name: "dnat4_on",
    key: &[Addr4, Proto, Port],
    data: &[Addr4, Port],
    interval: false,
    kind: "published-port",
};
pub const DNAT6_ANY: SetDef = SetDef {
    name: "dnat6_any",
    key: &[Proto, Port],
    data: &[Addr6, Port],
    interval: false,
    kind: "published-port",
};
pub const DNAT6_ON: SetDef = SetDef {
    name: "dnat6_on",
    key: &[Addr6, Proto, Port],
    data: &[Addr6, Port],
    interval: false,
    kind: "published-port",
};
pub const RESTRICTED4: SetDef = SetDef {
    name: "restricted4",
    key: &[Proto, Port],
    data: &[],
    interval: false,
    kind: "restricted-port",
};
pub const RESTRICTED6: SetDef = SetDef {
    name: "restricted6",
    key: &[Proto, Port],
    data: &[],
    interval: false,
    kind: "restricted-port",
};
pub const ALLOW4: SetDef = SetDef {
    name: "allow4",
    key: &[Addr4, Proto, Port],
    data: &[],
    interval: true,
    kind: "allow-from",
};
pub const ALLOW6: SetDef = SetDef {
    name: "allow6",
    key: &[Addr6, Proto, Port],
    data: &[],
    interval: true,
    kind: "allow-from",
};
pub const INPUT4: SetDef = SetDef {
    name: "input4",
    key: &[Addr4, Addr4, Proto, Port],
    data: &[],
    interval: true,
    kind: "input-allow",
};
pub const INPUT6: SetDef = SetDef {
    name: "input6",
    key: &[Addr6, Addr6, Proto, Port],
    data: &[],
    interval: true,
    kind: "input-allow",
};
pub const FORWARD4: SetDef = SetDef {
    name: "forward4",
    key: &[Addr4, Addr4, Proto, Port],
    data: &[],
    interval: true,
    kind: "forward-allow",
};
pub const FORWARD6: SetDef = SetDef {
    name: "forward6",
    key: &[Addr6, Addr6, Proto, Port],
    data: &[],
    interval: true,
    kind: "forward-allow",
};

const ALL_SETS: [&SetDef; 12] = [
    &DNAT4_ANY,
    &DNAT4_ON,
    &DNAT6_ANY,
    &DNAT6_ON,
    &RESTRICTED4,
    &RESTRICTED6,
    &ALLOW4,
    &ALLOW6,
    &INPUT4,
    &INPUT6,
    &FORWARD4,
    &FORWARD6,
];

/// The definition of the set called `name`, if converge has one.
pub fn set_def(name: &str) -> Option<&'static SetDef> {
    ALL_SETS.iter().copied().find(|s| s.name == name)
}

/// Every address the table's DNAT maps send traffic to (the first field of each map
/// element's data), i.e. the targets this firewall uses right now.
pub fn targets(snapshot: &Snapshot) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    for (name, elements) in &snapshot.elements {
        let Some(def) = set_def(name) else { continue };
        let len = match def.data.first() {
            Some(Field::Addr4) => 4,
            Some(Field::Addr6) => 16,
            _ => continue,
        };
        for data in elements.values() {
            let ip = match data.get(..len) {
                Some(b) if len == 4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
                Some(b) => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
                None => None,
            };
            out.extend(ip);
        }
    }
    out
}

/// A chain with the tags of its rules, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainState {
    pub hook: Option<Hook>,
    pub rules: Vec<String>,
}

/// Everything but the elements: when this differs, the table is rebuilt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Structure {
    pub chains: BTreeMap<String, ChainState>,
    pub sets: BTreeMap<String, SetShape>,
}

/// Bytes of a key or value, inline up to 24 bytes (every map key and value here), so a
/// table of 10,000 elements is not 20,000 allocations.
pub type Bytes = SmallVec<[u8; 24]>;

/// Set elements: key (and key end, for intervals) → data (empty for plain sets).
pub type Elements = BTreeMap<Bytes, Bytes>;

/// The table as the kernel has it (observed) or as it should be (desired).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub exists: bool,
    pub structure: Structure,
    pub elements: BTreeMap<String, Elements>,
}

/// An element whose data differs between two tables (`None`: absent; a changed map
/// value is a delete and an add of the same key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElementChange {
    pub set: &'static SetDef,
    pub key: Bytes,
    pub old: Option<Bytes>,
    pub new: Option<Bytes>,
}

impl Snapshot {
    /// The table after `changes` are committed.
    pub fn apply(&mut self, changes: &[ElementChange]) {
        for c in changes {
            let set = self.elements.entry(c.set.name.to_string()).or_default();
            match &c.new {
                Some(data) => set.insert(c.key.clone(), data.clone()),
                None => set.remove(&c.key),
            };
        }
    }
}

/// One rule: its chain, a readable purpose (part of its tag) and its expressions.
pub struct RuleDef {
    pub chain: &'static str,
    pub tag: String,
    pub exprs: Vec<u8>,
}

/// The full desired table: snapshot to compare plus what is needed to (re)build it.
pub struct Desired {
    pub snapshot: Snapshot,
    pub chains: Vec<ChainDef>,
    pub sets: Vec<&'static SetDef>,
    pub rules: Vec<RuleDef>,
    /// Published ports whose container has no address yet (skipped this pass).
    pub unresolved: Vec<String>,
}

mod decode;
mod display;
mod elements;
mod expr;
mod messages;

pub use decode::*;
pub use display::*;
pub use elements::*;
use expr::*;
pub use messages::*;

#[cfg(test)]
mod tests;
