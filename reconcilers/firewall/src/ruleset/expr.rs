//! Rule expressions: the nf_tables expressions of each rule in converge's chains, and their tags.

use super::*;

pub(super) use converge_core::nfnl::expr::*;

/// The firewall's own expressions: packet fields into registers by key shape, and the
/// DNAT from a map lookup's data.
pub(super) trait FieldExprs {
    fn load(&mut self, fields: &[Field], addrs: &[bool]) -> &mut Self;
    fn dnat_from_map(&mut self, v6: bool) -> &mut Self;
}

impl FieldExprs for Exprs {
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

    /// DNAT to the address and port a map lookup left in R0 onwards.
    fn dnat_from_map(&mut self, v6: bool) -> &mut Self {
        let port_reg = if v6 { R0 + 4 } else { R0 + 1 };
        self.dnat(v6, Some(R0), port_reg)
    }
}

pub(super) fn rule(chain: &'static str, purpose: &str, build: impl FnOnce(&mut Exprs)) -> RuleDef {
    let mut e = Exprs::default();
    build(&mut e);
    let exprs = e.into_bytes();
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
                .dnat_from_map(v6);
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
        // Traffic a NAT rule sent to this host on purpose: the proxy's public ports
        // redirected to the active Caddy's internal ports (the routes reconciler) are
        // allowed by the rule for 443/80, which no longer matches the rewritten port.
        rules.push(rule("input", "accept redirected", |e| {
            e.ct(CT_STATUS, R0)
                .bits_set(R0, IPS_DST_NAT)
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
