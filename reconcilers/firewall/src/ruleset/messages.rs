//! Batch messages: table, chains, sets, rules and elements as nf_tables netlink messages.

use super::*;

/// NFTA_SET_ELEM_KEY_END (after PAD and OBJREF in the kernel's enum).
pub(super) const ELEM_KEY_END: u16 = 10;

/// Element messages stay well under the 64 KiB limit of one netlink attribute.
pub(super) const CHUNK: usize = 60_000;

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
pub(super) fn set_message(set: &SetDef, id: u32) -> Message {
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

pub(super) fn rule_message(r: &RuleDef) -> Message {
    // The tag travels as the rule's comment.
    nfnl::rule_message(TABLE, r.chain, &r.exprs, &r.tag)
}

/// Every message that builds the desired table from scratch (replacing any old one).
pub fn rebuild_messages(d: &Desired) -> Vec<Message> {
    let mut out = nfnl::table_and_chains(TABLE, &d.chains, true);
    out.extend(d.sets.iter().zip(1..).map(|(s, id)| set_message(s, id)));
    out.extend(d.rules.iter().map(rule_message));
    for s in &d.sets {
        if let Some(e) = d.snapshot.elements.get(s.name) {
            out.extend(element_messages(s, e.iter(), true));
        }
    }
    out
}
