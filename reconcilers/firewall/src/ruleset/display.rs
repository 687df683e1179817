//! Display: element keys and values as `converge diff` shows them.

use super::*;

pub(super) fn show_field(f: Field, start: &[u8], end: &[u8]) -> String {
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
pub(super) fn show(fields: &[Field], start: &[u8], end: &[u8]) -> String {
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
