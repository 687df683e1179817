//! Rule expressions: the nf_tables expressions of each rule in converge's chains, and their tags.

use super::*;

pub(super) const R0: u32 = 8; // NFT_REG32_00: concatenations fill consecutive 32-bit registers
pub(super) const NFT_REG_VERDICT: u32 = 0;
pub(super) const NFTA_LIST_ELEM: u16 = 1;
pub(super) const NF_DROP: i32 = 0;
pub(super) const NF_ACCEPT: i32 = 1;
pub(super) const NFT_JUMP: i32 = -3;
pub(super) const RTN_LOCAL: u32 = 2;
pub(super) const META_IIF: u32 = 4;
pub(super) const META_NFPROTO: u32 = 15;
pub(super) const META_L4PROTO: u32 = 16;
pub(super) const CT_STATE: u32 = 0;
pub(super) const CT_STATUS: u32 = 2;
pub(super) const CT_ESTABLISHED_RELATED: u32 = 2 | 4;
pub(super) const IPS_DST_NAT: u32 = 0x20;
pub(super) const PAYLOAD_NETWORK: u32 = 1;
pub(super) const PAYLOAD_TRANSPORT: u32 = 2;
pub(super) const CMP_EQ: u32 = 0;
pub(super) const CMP_NEQ: u32 = 1;
pub(super) const IPPROTO_ICMP: u8 = 1;
pub(super) const IPPROTO_ICMPV6: u8 = 58;

/// Builder of one rule's expression list (the NFTA_RULE_EXPRESSIONS nest content).
#[derive(Default)]
pub(super) struct Exprs(Attrs);

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

pub(super) fn rule(chain: &'static str, purpose: &str, build: impl FnOnce(&mut Exprs)) -> RuleDef {
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
pub(super) fn accept_listed(chain: &'static str, set: &SetDef) -> RuleDef {
    let v6 = set.key[0] == Addr6;
    rule(chain, &format!("accept listed in @{}", set.name), |e| {
        e.nfproto(v6)
            .load(set.key, &[true, false])
            .lookup(set.name, None, false)
            .verdict(NF_ACCEPT, None);
    })
}

pub(super) const PREROUTING: Hook = Hook {
    num: 0,
    priority: -100,
    nat: true,
    accept: true,
};
pub(super) const OUTPUT: Hook = Hook {
    num: 3,
    priority: -100,
    nat: true,
    accept: true,
};
pub(super) const POSTROUTING: Hook = Hook {
    num: 4,
    priority: 100,
    nat: true,
    accept: true,
};

pub(super) fn filter_hook(num: u32, policy: FilterPolicy) -> Hook {
    Hook {
        num,
        priority: 0,
        nat: false,
        accept: policy == FilterPolicy::Accept,
    }
}

/// Chains, sets and rules for `spec` (elements are added by [`desired`]).
pub(super) fn structure(
    spec: &FirewallSpec,
) -> (Vec<ChainDef>, Vec<&'static SetDef>, Vec<RuleDef>) {
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
