//! Table, chain and rule messages: tables and chains encoded by rustables, rules from an
//! expression list (`expr.rs`) with converge's comment.

use super::{msg, rule_comment, Attrs};
use super::{split_messages, Message, NLM_F_APPEND, NLM_F_CREATE};

/// A base chain's hook, or none for a regular chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    pub num: u32,
    pub priority: i32,
    pub nat: bool,
    pub accept: bool,
}

/// A chain converge creates: its name and, for a base chain, its hook.
pub struct ChainDef {
    pub name: &'static str,
    pub hook: Option<Hook>,
}

/// Messages that add the `inet` table `table` (replacing it with `recreate`) and
/// `chains`, encoded by rustables.
pub fn table_and_chains(table: &str, chains: &[ChainDef], recreate: bool) -> Vec<Message> {
    use rustables::{Batch, Chain, ChainPolicy, ChainType, MsgType, ProtocolFamily, Table};
    let t = Table::new(ProtocolFamily::Inet).with_name(table);
    let mut batch = Batch::new();
    batch.add(&t, MsgType::Add);
    if recreate {
        // add-then-delete works whether or not the table exists; the batch is atomic.
        batch.add(&t, MsgType::Del);
        batch.add(&t, MsgType::Add);
    }
    for c in chains {
        let mut chain = Chain::new(&t).with_name(c.name);
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
    let parts = split_messages(&bytes);
    // Drop rustables' own batch begin/end: the messages join converge's batch.
    let inner = parts.get(1..parts.len().saturating_sub(1)).unwrap_or(&[]);
    let mut names = vec![format!("add table inet {table}")];
    if recreate {
        names.push(format!("delete table inet {table}"));
        names.push(format!("add table inet {table}"));
    }
    names.extend(chains.iter().map(|c| format!("add chain {}", c.name)));
    inner
        .iter()
        .zip(names)
        .filter_map(|(raw, what)| Message::encoded(raw, what))
        .collect()
}

/// A message appending a rule to `chain` of `table`: `exprs` (an expression list) with
/// `comment`, which `nft list` shows and a dump reads back.
pub fn rule_message(table: &str, chain: &str, exprs: &[u8], comment: &str) -> Message {
    let mut a = Attrs::new();
    a.str(1, table)
        .str(2, chain)
        .nest_raw(4, exprs)
        .bytes(7, &rule_comment(comment));
    Message::new(
        msg::NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND,
        a,
        format!("add rule to chain {chain} ({comment})"),
    )
}
