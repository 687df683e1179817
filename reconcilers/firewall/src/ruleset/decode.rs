//! Reading the kernel's table back: a dump decoded into a snapshot.

use super::*;

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
        .and_then(nfnl::parse_rule_comment)
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
