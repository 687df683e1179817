//! The switch between the two Caddy instances: TCP ports 443 and 80 of this host's own
//! addresses are redirected (port-only DNAT, the address is kept) to the active
//! instance's internal ports by the nf_tables table `inet converge_proxy`, rewritten in
//! ONE transaction per switch. Connections already established keep their instance
//! (conntrack); new ones go to the new instance from the commit on.

use super::pair::Instance;
use converge_core::nfnl::expr::{Exprs, IPPROTO_TCP, R0};
use converge_core::nfnl::{self, msg, Attrs, ChainDef, Hook, Message, Nft};
use converge_core::{blocking, DriverError, HostEvent};
use futures::stream::BoxStream;
use std::collections::BTreeSet;

pub const TABLE: &str = "converge_proxy";
/// After the firewall's NAT chains (-100), so its drops of disallowed sources run first
/// and a port it publishes keeps its own DNAT.
const PRIORITY: i32 = -90;
/// (chain, hook number): connections from elsewhere, and from this host itself.
const CHAINS: [(&str, u32); 2] = [("prerouting", 0), ("output", 3)];

/// One rule: (chain, comment, expressions).
type RuleDef = (&'static str, String, Vec<u8>);

/// The rules that send the public ports to `inst`.
fn rules(inst: Instance) -> Vec<RuleDef> {
    let mut out = Vec::new();
    for (chain, _) in CHAINS {
        for v6 in [false, true] {
            for (public, internal) in [(443, inst.https_port()), (80, inst.http_port())] {
                let mut e = Exprs::default();
                e.nfproto(v6)
                    .fib_local(true, true)
                    .l4proto_is(IPPROTO_TCP)
                    .dport_is(public)
                    .immediate(R0, &internal.to_be_bytes())
                    .dnat(v6, None, R0);
                let family = if v6 { "ipv6" } else { "ipv4" };
                let comment = format!(
                    "converge: tcp {public} to caddy {} :{internal} ({family})",
                    inst.name()
                );
                out.push((chain, comment, e.into_bytes()));
            }
        }
    }
    out
}

/// Table and chains (added if missing), each chain flushed and refilled for `inst`.
fn switch_messages(inst: Instance) -> Vec<Message> {
    let chains = CHAINS.map(|(name, num)| ChainDef {
        name,
        hook: Some(Hook {
            num,
            priority: PRIORITY,
            nat: true,
            accept: true,
        }),
    });
    let mut out = nfnl::table_and_chains(TABLE, &chains, false);
    for (chain, _) in CHAINS {
        // DELRULE with a chain and no handle flushes the chain.
        let mut a = Attrs::new();
        a.str(1, TABLE).str(2, chain);
        out.push(Message::new(
            msg::DELRULE,
            0,
            a,
            format!("flush chain {chain}"),
        ));
    }
    out.extend(
        rules(inst)
            .iter()
            .map(|(chain, comment, exprs)| nfnl::rule_message(TABLE, chain, exprs, comment)),
    );
    out
}

fn netlink(e: nfnl::NlError) -> DriverError {
    DriverError::Failed(format!("nftables table {TABLE}: {e}"))
}

/// Sends new connections to `inst` (one atomic transaction).
pub async fn switch(inst: Instance) -> Result<(), DriverError> {
    blocking("nftables task", move || {
        let mut nft = Nft::open().map_err(netlink)?;
        nft.commit(&switch_messages(inst), None).map_err(netlink)
    })
    .await
}

/// The instance the kernel sends new connections to; `None` when the table is missing
/// or is not exactly converge's rules for one instance (edited, flushed).
pub async fn active() -> Result<Option<Instance>, DriverError> {
    blocking("nftables task", || {
        let mut nft = Nft::open().map_err(netlink)?;
        let mut filter = Attrs::new();
        filter.str(1, TABLE);
        let found: Vec<(String, String)> = nft
            .dump(msg::GETRULE, filter)
            .map_err(netlink)?
            .iter()
            .filter(|a| nfnl::attr_str(a, 1).as_deref() == Some(TABLE))
            .map(|a| {
                let chain = nfnl::attr_str(a, 2).unwrap_or_default();
                let comment = nfnl::attr(a, 7)
                    .and_then(nfnl::parse_rule_comment)
                    .unwrap_or_default();
                (chain, comment)
            })
            .collect();
        let kernel_rules = found.len();
        let found: BTreeSet<(String, String)> = found.into_iter().collect();
        Ok(Instance::BOTH.into_iter().find(|i| {
            let want: BTreeSet<(String, String)> = rules(*i)
                .into_iter()
                .map(|(c, comment, _)| (c.to_string(), comment))
                .collect();
            want == found && kernel_rules == want.len()
        }))
    })
    .await
}

/// An event whenever the table changes (a flushed ruleset, an edit, converge's own
/// switch).
pub fn events() -> Option<BoxStream<'static, HostEvent>> {
    nfnl::table_events(TABLE)
}
