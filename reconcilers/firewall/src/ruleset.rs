//! The converge table as data: the chains, rules and sets it always has, the elements the
//! spec and the containers' facts put in the sets, and their netlink messages.
//!
//! The packet path is a constant number of rules whatever the number of ports: every
//! published port is one element of a hash map keyed by `protocol . port` (or
//! `address . protocol . port` for a port bound to one host address), looked up by one
//! rule per map. Filters (`allowFrom`, `input`, `forward`) are elements of interval sets
//! with concatenated keys, also looked up by one rule each.

use crate::nfnl::{self, msg, Attrs, Message, NLM_F_APPEND, NLM_F_CREATE};
use crate::{FilterPolicy, FilterRule, FirewallSpec, Protocol, PublishedPort};
use converge_core::Facts;
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use smallvec::SmallVec;
use std::collections::BTreeMap;
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

/// A base chain's hook, or none for a regular chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    pub num: u32,
    pub priority: i32,
    pub nat: bool,
    pub accept: bool,
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

/// A chain converge creates: its name and, for a base chain, its hook.
pub struct ChainDef {
    pub name: &'static str,
    pub hook: Option<Hook>,
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

// ---- rule expressions -------------------------------------------------------------

const R0: u32 = 8; // NFT_REG32_00: concatenations fill consecutive 32-bit registers
const NFT_REG_VERDICT: u32 = 0;
const NFTA_LIST_ELEM: u16 = 1;
const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const RTN_LOCAL: u32 = 2;
const META_IIF: u32 = 4;
const META_NFPROTO: u32 = 15;
const META_L4PROTO: u32 = 16;
const CT_STATE: u32 = 0;
const CT_STATUS: u32 = 2;
const CT_ESTABLISHED_RELATED: u32 = 2 | 4;
const IPS_DST_NAT: u32 = 0x20;
const PAYLOAD_NETWORK: u32 = 1;
const PAYLOAD_TRANSPORT: u32 = 2;
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// Builder of one rule's expression list (the NFTA_RULE_EXPRESSIONS nest content).
#[derive(Default)]
struct Exprs(Attrs);

impl Exprs {
    fn expr(&mut self, name: &str, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        self.0.nest(NFTA_LIST_ELEM, |e| {
            e.str(1, name); // NFTA_EXPR_NAME
            e.nest(2, f); // NFTA_EXPR_DATA
        });
        self
    }

    fn meta(&mut self, key: u32, reg: u32) -> &mut Self {
        self.expr("meta", |a| {
            a.u32_be(1, reg).u32_be(2, key);
        })
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32, reg: u32) -> &mut Self {
        self.expr("payload", |a| {
            a.u32_be(1, reg)
                .u32_be(2, base)
                .u32_be(3, offset)
                .u32_be(4, len);
        })
    }

    fn cmp(&mut self, op: u32, reg: u32, data: &[u8]) -> &mut Self {
        self.expr("cmp", |a| {
            a.u32_be(1, reg).u32_be(2, op).nest(3, |d| {
                d.bytes(1, data);
            });
        })
    }

    /// `value & mask != 0` on a 32-bit host-order register (ct state / status bits).
    fn bits_set(&mut self, reg: u32, mask: u32) -> &mut Self {
        self.expr("bitwise", |a| {
            a.u32_be(1, reg)
                .u32_be(2, reg)
                .u32_be(3, 4)
                .nest(4, |d| {
                    d.bytes(1, &mask.to_ne_bytes());
                })
                .nest(5, |d| {
                    d.bytes(1, &[0; 4]);
                });
        })
        .cmp(CMP_NEQ, reg, &[0; 4])
    }

    fn ct(&mut self, key: u32, reg: u32) -> &mut Self {
        self.expr("ct", |a| {
            a.u32_be(1, reg).u32_be(2, key);
        })
    }

    /// `fib <saddr|daddr> type [!=] local`.
    fn fib_local(&mut self, daddr: bool, local: bool) -> &mut Self {
        self.expr("fib", |a| {
            a.u32_be(1, R0)
                .u32_be(2, 3)
                .u32_be(3, if daddr { 2 } else { 1 });
        })
        .cmp(
            if local { CMP_EQ } else { CMP_NEQ },
            R0,
            &RTN_LOCAL.to_ne_bytes(),
        )
    }

    fn nfproto(&mut self, v6: bool) -> &mut Self {
        let p = if v6 {
            nfnl::NFPROTO_IPV6
        } else {
            nfnl::NFPROTO_IPV4
        };
        self.meta(META_NFPROTO, R0).cmp(CMP_EQ, R0, &[p])
    }

    fn l4proto_is(&mut self, p: u8) -> &mut Self {
        self.meta(META_L4PROTO, R0).cmp(CMP_EQ, R0, &[p])
    }

    /// Loads `fields` (from the packet) into consecutive registers from R0. `Addr` fields
    /// are taken in order from `addrs` (source or destination).
    fn load(&mut self, fields: &[Field], addrs: &[bool]) -> &mut Self {
        let mut reg = R0;
        let mut addr = addrs.iter();
        for f in fields {
            match f {
                Addr4 | Addr6 => {
                    let v6 = *f == Addr6;
                    let src = addr.next().copied().unwrap_or(false);
                    let offset = match (v6, src) {
                        (false, true) => 12,
                        (false, false) => 16,
                        (true, true) => 8,
                        (true, false) => 24,
                    };
                    self.payload(PAYLOAD_NETWORK, offset, f.len() as u32, reg);
                }
                Proto => {
                    self.meta(META_L4PROTO, reg);
                }
                Port => {
                    self.payload(PAYLOAD_TRANSPORT, 2, 2, reg);
                }
            }
            reg += f.len().div_ceil(4) as u32;
        }
        self
    }

    fn lookup(&mut self, set: &str, dreg: Option<u32>, invert: bool) -> &mut Self {
        self.expr("lookup", |a| {
            a.str(1, set).u32_be(2, R0);
            if let Some(d) = dreg {
                a.u32_be(3, d);
            }
            if invert {
                a.u32_be(5, 1); // NFT_LOOKUP_F_INV
            }
        })
    }

    fn dnat(&mut self, v6: bool) -> &mut Self {
        let (family, port_reg) = if v6 {
            (nfnl::NFPROTO_IPV6, R0 + 4)
        } else {
            (nfnl::NFPROTO_IPV4, R0 + 1)
        };
        self.expr("nat", |a| {
            a.u32_be(1, 1) // NFT_NAT_DNAT
                .u32_be(2, family as u32)
                .u32_be(3, R0)
                .u32_be(5, port_reg);
        })
    }

    fn verdict(&mut self, code: i32, chain: Option<&str>) -> &mut Self {
        self.expr("immediate", |a| {
            a.u32_be(1, NFT_REG_VERDICT).nest(2, |d| {
                d.nest(2, |v| {
                    v.u32_be(1, code as u32);
                    if let Some(c) = chain {
                        v.str(2, c);
                    }
                });
            });
        })
    }

    fn masquerade(&mut self) -> &mut Self {
        self.expr("masq", |_| {})
    }
}

fn rule(chain: &'static str, purpose: &str, build: impl FnOnce(&mut Exprs)) -> RuleDef {
    let mut e = Exprs::default();
    build(&mut e);
    let exprs = e.0.into_bytes();
    let mut h = Sha256::new();
    h.update(chain.as_bytes());
    h.update(&exprs);
    let tag = format!("converge: {purpose} #{}", &hex::encode(h.finalize())[..8]);
    RuleDef { chain, tag, exprs }
}

/// The filter rule of an interval set: accept what its `src . dst . proto . port` matches.
fn accept_listed(chain: &'static str, set: &SetDef) -> RuleDef {
    let v6 = set.key[0] == Addr6;
    rule(chain, &format!("accept listed in @{}", set.name), |e| {
        e.nfproto(v6)
            .load(set.key, &[true, false])
            .lookup(set.name, None, false)
            .verdict(NF_ACCEPT, None);
    })
}

const PREROUTING: Hook = Hook {
    num: 0,
    priority: -100,
    nat: true,
    accept: true,
};
const OUTPUT: Hook = Hook {
    num: 3,
    priority: -100,
    nat: true,
    accept: true,
};
const POSTROUTING: Hook = Hook {
    num: 4,
    priority: 100,
    nat: true,
    accept: true,
};

fn filter_hook(num: u32, policy: FilterPolicy) -> Hook {
    Hook {
        num,
        priority: 0,
        nat: false,
        accept: policy == FilterPolicy::Accept,
    }
}

/// Chains, sets and rules for `spec` (elements are added by [`desired`]).
fn structure(spec: &FirewallSpec) -> (Vec<ChainDef>, Vec<&'static SetDef>, Vec<RuleDef>) {
    let mut chains = vec![
        ChainDef {
            name: "prerouting",
            hook: Some(PREROUTING),
        },
        ChainDef {
            name: "output",
            hook: Some(OUTPUT),
        },
        ChainDef {
            name: "published",
            hook: None,
        },
    ];
    let mut sets = vec![
        &DNAT4_ANY,
        &DNAT4_ON,
        &DNAT6_ANY,
        &DNAT6_ON,
        &RESTRICTED4,
        &RESTRICTED6,
        &ALLOW4,
        &ALLOW6,
    ];
    let mut rules = Vec::new();
    for (restricted, allow, v6) in [
        (&RESTRICTED4, &ALLOW4, false),
        (&RESTRICTED6, &ALLOW6, true),
    ] {
        rules.push(rule("prerouting", "drop sources not in allowFrom", |e| {
            e.fib_local(true, true)
                .nfproto(v6)
                .load(restricted.key, &[])
                .lookup(restricted.name, None, false)
                .load(allow.key, &[true])
                .lookup(allow.name, None, true)
                .verdict(NF_DROP, None);
        }));
    }
    for chain in ["prerouting", "output"] {
        rules.push(rule(chain, "published ports", |e| {
            e.fib_local(true, true).verdict(NFT_JUMP, Some("published"));
        }));
    }
    for map in [&DNAT4_ON, &DNAT4_ANY, &DNAT6_ON, &DNAT6_ANY] {
        let v6 = map.data[0] == Addr6;
        rules.push(rule("published", &format!("dnat by @{}", map.name), |e| {
            e.nfproto(v6)
                .load(map.key, &[false])
                .lookup(map.name, Some(R0), false)
                .dnat(v6);
        }));
    }
    if spec.masquerade {
        chains.push(ChainDef {
            name: "postrouting",
            hook: Some(POSTROUTING),
        });
        rules.push(rule("postrouting", "masquerade forwarded traffic", |e| {
            e.fib_local(false, false).masquerade();
        }));
    }
    if let Some(input) = &spec.input {
        chains.push(ChainDef {
            name: "input",
            hook: Some(filter_hook(1, input.policy)),
        });
        sets.extend([&INPUT4, &INPUT6]);
        rules.push(rule("input", "accept loopback", |e| {
            e.meta(META_IIF, R0)
                .cmp(CMP_EQ, R0, &1u32.to_ne_bytes())
                .verdict(NF_ACCEPT, None);
        }));
        rules.push(rule("input", "accept replies", |e| {
            e.ct(CT_STATE, R0)
                .bits_set(R0, CT_ESTABLISHED_RELATED)
                .verdict(NF_ACCEPT, None);
        }));
        for (v6, p) in [(false, IPPROTO_ICMP), (true, IPPROTO_ICMPV6)] {
            rules.push(rule("input", "accept icmp", |e| {
                e.nfproto(v6).l4proto_is(p).verdict(NF_ACCEPT, None);
            }));
        }
        rules.push(accept_listed("input", &INPUT4));
        rules.push(accept_listed("input", &INPUT6));
    }
    if let Some(forward) = &spec.forward {
        chains.push(ChainDef {
            name: "forward",
            hook: Some(filter_hook(2, forward.policy)),
        });
        sets.extend([&FORWARD4, &FORWARD6]);
        rules.push(rule("forward", "accept replies", |e| {
            e.ct(CT_STATE, R0)
                .bits_set(R0, CT_ESTABLISHED_RELATED)
                .verdict(NF_ACCEPT, None);
        }));
        rules.push(rule("forward", "accept published ports", |e| {
            e.ct(CT_STATUS, R0)
                .bits_set(R0, IPS_DST_NAT)
                .verdict(NF_ACCEPT, None);
        }));
        rules.push(accept_listed("forward", &FORWARD4));
        rules.push(accept_listed("forward", &FORWARD6));
    }
    (chains, sets, rules)
}

// ---- elements ---------------------------------------------------------------------

/// One field value as an inclusive range of its bytes (network order).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Range(Vec<u8>, Vec<u8>);

impl Range {
    fn one(v: Vec<u8>) -> Self {
        Range(v.clone(), v)
    }

    fn net(n: &IpNet) -> Self {
        match n {
            IpNet::V4(n) => Range(
                n.network().octets().to_vec(),
                n.broadcast().octets().to_vec(),
            ),
            IpNet::V6(n) => Range(
                n.network().octets().to_vec(),
                n.broadcast().octets().to_vec(),
            ),
        }
    }

    fn full(len: usize) -> Self {
        Range(vec![0; len], vec![0xff; len])
    }

    fn contains(&self, other: &Range) -> bool {
        self.0 <= other.0 && other.1 <= self.1
    }
}

fn pad(out: &mut Bytes, v: &[u8]) {
    out.extend_from_slice(v);
    out.resize((out.len() + 3) & !3, 0);
}

/// Key bytes of a plain (non-interval) element.
fn key(values: &[&[u8]]) -> Bytes {
    let mut k = Bytes::new();
    for v in values {
        pad(&mut k, v);
    }
    k
}

/// Element key of an interval element: start concatenation then end concatenation.
fn interval_key(ranges: &[Range]) -> Bytes {
    let mut k = Bytes::new();
    for r in ranges {
        pad(&mut k, &r.0);
    }
    for r in ranges {
        pad(&mut k, &r.1);
    }
    k
}

/// Interval element keys for `boxes`, leaving out any box contained in another (the
/// kernel refuses overlapping insertions; a contained box adds nothing to the match).
fn merge_boxes(boxes: Vec<Vec<Range>>) -> impl Iterator<Item = Bytes> {
    let mut kept: Vec<Vec<Range>> = Vec::new();
    for b in boxes {
        if kept
            .iter()
            .any(|k| k.iter().zip(&b).all(|(k, b)| k.contains(b)))
        {
            continue;
        }
        kept.retain(|k| !b.iter().zip(k).all(|(b, k)| b.contains(k)));
        kept.push(b);
    }
    kept.into_iter().map(|b| interval_key(&b))
}

fn proto_byte(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

fn ip_bytes(a: IpAddr) -> Bytes {
    match a {
        IpAddr::V4(a) => Bytes::from_slice(&a.octets()),
        IpAddr::V6(a) => Bytes::from_slice(&a.octets()),
    }
}

/// The filter rules as `src . dst . proto . port` boxes, per family.
fn filter_boxes(rules: &[FilterRule]) -> [Vec<Vec<Range>>; 2] {
    let mut out: [Vec<Vec<Range>>; 2] = [Vec::new(), Vec::new()];
    for r in rules {
        let nets = |list: &[String]| -> Vec<IpNet> {
            list.iter().filter_map(|s| s.parse().ok()).collect()
        };
        let (from, to) = (nets(&r.from), nets(&r.to));
        let proto = match r.protocol {
            Some(p) => Range::one(vec![proto_byte(p)]),
            None => Range::full(1),
        };
        let ports: Vec<Range> = if r.ports.is_empty() {
            vec![Range::full(2)]
        } else {
            r.ports
                .iter()
                .map(|p| Range::one(p.to_be_bytes().to_vec()))
                .collect()
        };
        for (fam, v6) in [(0, false), (1, true)] {
            let len = if v6 { 16 } else { 4 };
            let side = |nets: &[IpNet]| -> Option<Vec<Range>> {
                if nets.is_empty() {
                    return Some(vec![Range::full(len)]);
                }
                let r: Vec<Range> = nets
                    .iter()
                    .filter(|n| matches!(n, IpNet::V6(_)) == v6)
                    .map(Range::net)
                    .collect();
                (!r.is_empty()).then_some(r)
            };
            // A rule that names networks of one family only does not apply to the other.
            let (Some(src), Some(dst)) = (side(&from), side(&to)) else {
                continue;
            };
            for s in &src {
                for d in &dst {
                    for p in &ports {
                        out[fam].push(vec![s.clone(), d.clone(), proto.clone(), p.clone()]);
                    }
                }
            }
        }
    }
    out
}

/// One element: its set, key, and data (empty for plain sets).
pub type Element = (&'static SetDef, Bytes, Bytes);

/// The map elements of one published port, or `None` while its container has no
/// address (the port is skipped until it has one).
pub fn port_elements(p: &PublishedPort, facts: &Facts) -> Option<SmallVec<[Element; 2]>> {
    let proto = [proto_byte(p.protocol)];
    let port = p.host_port.to_be_bytes();
    let host_ip: Option<IpAddr> = p.host_ip.as_deref().and_then(|s| s.parse().ok());
    let fixed: Option<IpAddr> = p.target.address.as_deref().and_then(|a| a.parse().ok());
    let targets: &[IpAddr] = match (&fixed, &p.target.container) {
        (Some(a), _) => std::slice::from_ref(a),
        (None, Some(c)) => facts
            .containers
            .get(c)
            .map(|f| f.addresses.as_slice())
            .unwrap_or_default(),
        (None, None) => &[],
    };
    let mut out = SmallVec::new();
    for v6 in [false, true] {
        if host_ip.is_some_and(|h| h.is_ipv6() != v6) {
            continue;
        }
        let Some(t) = targets.iter().find(|t| t.is_ipv6() == v6) else {
            continue;
        };
        let data = key(&[&ip_bytes(*t), &p.target.port.to_be_bytes()]);
        out.push(match host_ip {
            Some(h) => (
                if v6 { &DNAT6_ON } else { &DNAT4_ON },
                key(&[&ip_bytes(h), &proto, &port]),
                data,
            ),
            None => (
                if v6 { &DNAT6_ANY } else { &DNAT4_ANY },
                key(&[&proto, &port]),
                data,
            ),
        });
    }
    (!out.is_empty()).then_some(out)
}

/// Why a published port is skipped, for the log and `converge diff`.
pub fn unresolved_note(p: &PublishedPort) -> String {
    let target = p.target.container.as_deref().unwrap_or("?");
    format!(
        "{}/{} (container {target} has no address yet)",
        p.protocol.as_str(),
        p.host_port
    )
}

/// The protocol and port an `allowFrom` applies to: its elements depend on every
/// published port of the group.
pub type Group = (u8, u16);

pub fn group_of(p: &PublishedPort) -> Group {
    (proto_byte(p.protocol), p.host_port)
}

/// The `restricted` and `allow` elements of one group, from its published ports that
/// are in the maps and carry `allowFrom` (validation makes their lists agree per
/// family). A family is restricted where one of them is published on it.
pub fn allow_elements<'a>(
    group: Group,
    ports: impl Iterator<Item = &'a PublishedPort>,
) -> Vec<Element> {
    let (proto, port) = (vec![group.0], group.1.to_be_bytes());
    let mut restricted = [false; 2];
    let mut boxes: [Vec<Vec<Range>>; 2] = Default::default();
    for p in ports {
        let Some(from) = &p.allow_from else { continue };
        let host_ip: Option<IpAddr> = p.host_ip.as_deref().and_then(|s| s.parse().ok());
        for (fam, r) in restricted.iter_mut().enumerate() {
            *r |= host_ip.is_none_or(|h| usize::from(h.is_ipv6()) == fam);
        }
        for n in from.iter().filter_map(|s| s.parse::<IpNet>().ok()) {
            boxes[usize::from(matches!(n, IpNet::V6(_)))].push(vec![
                Range::net(&n),
                Range::one(proto.clone()),
                Range::one(port.to_vec()),
            ]);
        }
    }
    let mut out = Vec::new();
    let [b4, b6] = boxes;
    for (fam, (rset, aset, boxes)) in [(&RESTRICTED4, &ALLOW4, b4), (&RESTRICTED6, &ALLOW6, b6)]
        .into_iter()
        .enumerate()
    {
        if restricted[fam] {
            out.push((rset, key(&[&proto, &port]), Bytes::new()));
        }
        out.extend(merge_boxes(boxes).map(|k| (aset, k, Bytes::new())));
    }
    out
}

/// The desired table for `spec`, with container targets resolved through `facts`.
pub fn desired(spec: &FirewallSpec, facts: &Facts) -> Desired {
    let (chains, sets, rules) = structure(spec);
    // Collected unsorted, then bulk-built: BTreeMap::from_iter sorts once (the
    // document's order is usually already sorted) instead of 10,000 tree inserts.
    let mut lists: BTreeMap<&'static str, Vec<(Bytes, Bytes)>> =
        sets.iter().map(|s| (s.name, Vec::new())).collect();
    let mut push = |(set, k, d): Element| {
        if let Some(e) = lists.get_mut(set.name) {
            e.push((k, d));
        }
    };
    let mut unresolved = Vec::new();
    let mut groups: BTreeMap<Group, Vec<&PublishedPort>> = BTreeMap::new();
    for p in &spec.published_ports {
        let Some(elements) = port_elements(p, facts) else {
            unresolved.push(unresolved_note(p));
            continue;
        };
        elements.into_iter().for_each(&mut push);
        if p.allow_from.is_some() {
            groups.entry(group_of(p)).or_default().push(p);
        }
    }
    for (group, ports) in groups {
        allow_elements(group, ports.into_iter())
            .into_iter()
            .for_each(&mut push);
    }
    for (filter, s4, s6) in [
        (spec.input.as_ref().map(|f| &f.allow), &INPUT4, &INPUT6),
        (
            spec.forward.as_ref().map(|f| &f.allow),
            &FORWARD4,
            &FORWARD6,
        ),
    ] {
        if let Some(rules) = filter {
            let [b4, b6] = filter_boxes(rules);
            for (set, boxes) in [(s4, b4), (s6, b6)] {
                merge_boxes(boxes).for_each(|k| push((set, k, Bytes::new())));
            }
        }
    }
    let elements: BTreeMap<String, Elements> = lists
        .into_iter()
        .map(|(name, list)| (name.to_string(), list.into_iter().collect()))
        .collect();
    let mut structure = Structure::default();
    for c in &chains {
        structure.chains.insert(
            c.name.to_string(),
            ChainState {
                hook: c.hook,
                rules: rules
                    .iter()
                    .filter(|r| r.chain == c.name)
                    .map(|r| r.tag.clone())
                    .collect(),
            },
        );
    }
    for s in &sets {
        structure.sets.insert(s.name.to_string(), s.shape());
    }
    Desired {
        snapshot: Snapshot {
            exists: true,
            structure,
            elements,
        },
        chains,
        sets,
        rules,
        unresolved,
    }
}

// ---- messages ---------------------------------------------------------------------

/// NFTA_SET_ELEM_KEY_END (after PAD and OBJREF in the kernel's enum).
const ELEM_KEY_END: u16 = 10;

/// Element messages stay well under the 64 KiB limit of one netlink attribute.
const CHUNK: usize = 60_000;

/// NEWSETELEM (or DELSETELEM) messages for `elems` of `set`, chunked.
pub fn element_messages<'a>(
    set: &SetDef,
    elems: impl Iterator<Item = (&'a Bytes, &'a Bytes)>,
    add: bool,
) -> Vec<Message> {
    let split = if set.interval {
        set.key_len()
    } else {
        usize::MAX
    };
    let mut out = Vec::new();
    let mut list = Attrs::new();
    let mut count = 0;
    let flush = |list: Attrs, count: usize, out: &mut Vec<Message>| {
        if count == 0 {
            return;
        }
        let mut a = Attrs::new();
        a.str(1, TABLE)
            .str(2, set.name)
            .nest_raw(3, &list.into_bytes());
        let (ty, flags, verb) = if add {
            (msg::NEWSETELEM, NLM_F_CREATE, "add")
        } else {
            (msg::DELSETELEM, 0, "delete")
        };
        out.push(Message::new(
            ty,
            flags,
            a,
            format!("{verb} {count} element(s) of set {}", set.name),
        ));
    };
    for (k, data) in elems {
        list.nest(NFTA_LIST_ELEM, |e| {
            let (start, end) = k.split_at(split.min(k.len()));
            e.nest(1, |v| {
                v.bytes(1, start);
            });
            if !end.is_empty() {
                e.nest(ELEM_KEY_END, |v| {
                    v.bytes(1, end);
                });
            }
            if add && !data.is_empty() {
                e.nest(2, |v| {
                    v.bytes(1, data);
                });
            }
        });
        count += 1;
        if list.len() >= CHUNK {
            flush(std::mem::take(&mut list), count, &mut out);
            count = 0;
        }
    }
    flush(list, count, &mut out);
    out
}

/// NEWSET for `set`; `id` is its batch-unique NFTA_SET_ID (the kernel requires one).
fn set_message(set: &SetDef, id: u32) -> Message {
    let shape = set.shape();
    let mut a = Attrs::new();
    a.str(1, TABLE)
        .str(2, set.name)
        .u32_be(10, id)
        .u32_be(3, shape.flags)
        .u32_be(4, shape.key_type)
        .u32_be(5, shape.key_len);
    if !set.data.is_empty() {
        a.u32_be(6, shape.data_type).u32_be(7, shape.data_len);
    }
    if set.interval {
        a.nest(9, |desc| {
            desc.nest(2, |concat| {
                for f in set.key {
                    concat.nest(NFTA_LIST_ELEM, |e| {
                        e.u32_be(1, f.len() as u32);
                    });
                }
            });
        });
    }
    Message::new(
        msg::NEWSET,
        NLM_F_CREATE,
        a,
        format!("create set {}", set.name),
    )
}

fn rule_message(r: &RuleDef) -> Message {
    // The tag travels as an nft comment (udata TLV type 0), so `nft list` shows it and a
    // dump tells converge's rules apart from edited ones.
    let mut udata = vec![0u8, (r.tag.len() + 1) as u8];
    udata.extend_from_slice(r.tag.as_bytes());
    udata.push(0);
    let mut a = Attrs::new();
    a.str(1, TABLE)
        .str(2, r.chain)
        .nest_raw(4, &r.exprs)
        .bytes(7, &udata);
    Message::new(
        msg::NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND,
        a,
        format!("add rule to chain {} ({})", r.chain, r.tag),
    )
}

/// Table and chain messages, encoded by rustables.
fn table_and_chains(chains: &[ChainDef], recreate: bool) -> Vec<Message> {
    use rustables::{Batch, Chain, ChainPolicy, ChainType, MsgType, ProtocolFamily, Table};
    let table = Table::new(ProtocolFamily::Inet).with_name(TABLE);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    if recreate {
        // add-then-delete works whether or not the table exists; the batch is atomic.
        batch.add(&table, MsgType::Del);
        batch.add(&table, MsgType::Add);
    }
    for c in chains {
        let mut chain = Chain::new(&table).with_name(c.name);
        if let Some(h) = c.hook {
            chain = chain
                .with_hook(
                    rustables::Hook::default()
                        .with_class(h.num)
                        .with_priority(h.priority as u32),
                )
                .with_type(if h.nat {
                    ChainType::Nat
                } else {
                    ChainType::Filter
                })
                .with_policy(if h.accept {
                    ChainPolicy::Accept
                } else {
                    ChainPolicy::Drop
                });
        }
        batch.add(&chain, MsgType::Add);
    }
    let bytes = batch.finalize();
    let parts = nfnl::split_messages(&bytes);
    // Drop rustables' own batch begin/end: the messages join converge's batch.
    let inner = parts.get(1..parts.len().saturating_sub(1)).unwrap_or(&[]);
    let mut names = vec!["add table inet converge".to_string()];
    if recreate {
        names.push("delete table inet converge".into());
        names.push("add table inet converge".into());
    }
    names.extend(chains.iter().map(|c| format!("add chain {}", c.name)));
    inner
        .iter()
        .zip(names)
        .filter_map(|(raw, what)| Message::encoded(raw, what))
        .collect()
}

/// Every message that builds the desired table from scratch (replacing any old one).
pub fn rebuild_messages(d: &Desired) -> Vec<Message> {
    let mut out = table_and_chains(&d.chains, true);
    out.extend(d.sets.iter().zip(1..).map(|(s, id)| set_message(s, id)));
    out.extend(d.rules.iter().map(rule_message));
    for s in &d.sets {
        if let Some(e) = d.snapshot.elements.get(s.name) {
            out.extend(element_messages(s, e.iter(), true));
        }
    }
    out
}

// ---- reading the kernel's table back ----------------------------------------------

/// Decodes a chain dump entry into (name, state without rules).
pub fn parse_chain(a: &[u8]) -> Option<(String, ChainState)> {
    let name = nfnl::attr_str(a, 3)?;
    let hook = nfnl::attr(a, 4).and_then(|h| {
        Some(Hook {
            num: nfnl::attr_u32_be(h, 1)?,
            priority: nfnl::attr_u32_be(h, 2)? as i32,
            nat: nfnl::attr_str(a, 7).as_deref() == Some("nat"),
            accept: nfnl::attr_u32_be(a, 5) != Some(NF_DROP as u32),
        })
    });
    Some((
        name,
        ChainState {
            hook,
            rules: Vec::new(),
        },
    ))
}

/// Decodes a rule dump entry into (chain, tag); a rule without converge's tag gets a
/// placeholder so the chain no longer matches.
pub fn parse_rule(a: &[u8]) -> Option<(String, String)> {
    let chain = nfnl::attr_str(a, 2)?;
    let tag = nfnl::attr(a, 7)
        .and_then(|u| {
            // udata TLVs: type u8, len u8, value
            let mut rest = u;
            while rest.len() >= 2 {
                let (t, l) = (rest[0], rest[1] as usize);
                let v = rest.get(2..2 + l)?;
                if t == 0 {
                    let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
                    return Some(String::from_utf8_lossy(&v[..end]).into_owned());
                }
                rest = &rest[2 + l..];
            }
            None
        })
        .unwrap_or_else(|| "(rule not written by converge)".into());
    Some((chain, tag))
}

/// Decodes a set dump entry.
pub fn parse_set(a: &[u8]) -> Option<(String, SetShape)> {
    Some((
        nfnl::attr_str(a, 2)?,
        SetShape {
            flags: nfnl::attr_u32_be(a, 3).unwrap_or(0),
            key_type: nfnl::attr_u32_be(a, 4).unwrap_or(0),
            key_len: nfnl::attr_u32_be(a, 5).unwrap_or(0),
            data_type: nfnl::attr_u32_be(a, 6).unwrap_or(0),
            data_len: nfnl::attr_u32_be(a, 7).unwrap_or(0),
        },
    ))
}

/// Decodes the elements of one element-dump entry into `into`.
pub fn parse_elements(a: &[u8], into: &mut Elements) {
    let Some(list) = nfnl::attr(a, 3) else { return };
    for (_, e) in nfnl::attrs(list) {
        let value = |ty| {
            nfnl::attr(e, ty)
                .and_then(|n| nfnl::attr(n, 1))
                .map(Bytes::from_slice)
        };
        let Some(mut k) = value(1) else { continue };
        if let Some(end) = value(ELEM_KEY_END) {
            k.extend_from_slice(&end);
        }
        into.insert(k, value(2).unwrap_or_default());
    }
}

// ---- display ----------------------------------------------------------------------

fn show_field(f: Field, start: &[u8], end: &[u8]) -> String {
    let full = start.iter().all(|b| *b == 0) && end.iter().all(|b| *b == 0xff);
    match f {
        Addr4 | Addr6 if full => "any".into(),
        Addr4 | Addr6 => {
            let ip = |b: &[u8]| -> Option<IpAddr> {
                match b.len() {
                    4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
                    16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
                    _ => None,
                }
            };
            let (Some(s), Some(e)) = (ip(start), ip(end)) else {
                return "?".into();
            };
            if s == e {
                return s.to_string();
            }
            let bits = start.len() * 8;
            let prefix = (0..=bits).find(|p| {
                IpNet::new(s, *p as u8).is_ok_and(|n| n.network() == s && n.broadcast() == e)
            });
            match prefix {
                Some(p) => format!("{s}/{p}"),
                None => format!("{s}-{e}"),
            }
        }
        Proto if full => "any".into(),
        Proto => match start.first() {
            Some(6) => "tcp".into(),
            Some(17) => "udp".into(),
            Some(p) => p.to_string(),
            None => "?".into(),
        },
        Port if full => "any".into(),
        Port => match start {
            [a, b] => u16::from_be_bytes([*a, *b]).to_string(),
            _ => "?".into(),
        },
    }
}

/// Readable form of a concatenation (`tcp . 8080`, `10.0.0.0/8 . tcp . 22`).
fn show(fields: &[Field], start: &[u8], end: &[u8]) -> String {
    let mut parts = Vec::new();
    let mut off = 0;
    for f in fields {
        let (s, e) = (
            start.get(off..off + f.len()).unwrap_or(&[]),
            end.get(off..off + f.len()).unwrap_or(&[]),
        );
        parts.push(show_field(*f, s, e));
        off += (f.len() + 3) & !3;
    }
    parts.join(" . ")
}

/// Readable key of an element of `set`, prefixed with its family (`ip`, `ip6`) where
/// the set is for one family.
pub fn show_key(set: &SetDef, k: &[u8]) -> String {
    let key = if set.interval {
        let (s, e) = k.split_at(set.key_len().min(k.len()));
        show(set.key, s, e)
    } else {
        show(set.key, k, k)
    };
    let fields = || set.key.iter().chain(set.data);
    if fields().any(|f| *f == Addr6) {
        format!("ip6 {key}")
    } else if fields().any(|f| *f == Addr4) {
        format!("ip {key}")
    } else {
        key
    }
}

/// Readable data of a map element.
pub fn show_data(set: &SetDef, d: &[u8]) -> String {
    show(set.data, d, d)
}

#[cfg(test)]
mod tests;
