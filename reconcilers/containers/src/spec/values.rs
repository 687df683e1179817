//! Parsers of the section's value formats: durations, memory sizes, image references.

use std::time::Duration;

/// Parses a duration such as `500ms`, `10s`, `1m30s` or `2h`: one or more
/// `<integer><unit>` parts with units `ms`, `s`, `m`, `h`, largest unit first.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut last_rank = usize::MAX;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, rank, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 0, 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1, 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 2, 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 3, 1)
        } else {
            return None;
        };
        if rank >= last_rank {
            return None;
        }
        last_rank = rank;
        rest = &rest[len..];
        let factor = u32::try_from(n).ok()?;
        total = total.checked_add(unit.checked_mul(factor)?)?;
    }
    Some(total)
}

/// Parses a memory size (`512Mi`, `1G`, `1048576`) to bytes.
pub fn parse_memory(s: &str) -> Option<u64> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let n: u64 = s[..digits].parse().ok()?;
    let mult: u64 = match &s[digits..] {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Why `image` is not a well-formed, pinned image reference, if it is not.
pub fn check_image(image: &str) -> Result<(), String> {
    if image.is_empty() {
        return Err("image must not be empty".into());
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("image {image:?} contains whitespace"));
    }
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let ok = d.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if !ok {
            return Err(format!(
                "image digest {d:?} is not sha256:<64 lowercase hex digits>"
            ));
        }
    }
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        let b = t.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !ok {
            return Err(format!("image tag {t:?} is not valid"));
        }
    }
    if tag.is_none() && digest.is_none() {
        return Err(format!("image {image:?} has neither a tag nor a digest"));
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost") {
        let registry = parts.remove(0);
        let (host, port) = match registry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry, None),
        };
        let host_ok = converge_core::problems::is_dns_name(host, false) && !host.contains('*');
        let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0));
        if !host_ok || !port_ok {
            return Err(format!(
                "image registry {registry:?} is not a valid host[:port]"
            ));
        }
    }
    for p in &parts {
        let b = p.as_bytes();
        let ok = !b.is_empty()
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
            && b.iter().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-')
            })
            && !p.contains("..");
        if !ok {
            return Err(format!(
                "image repository component {p:?} is not valid (lowercase letters, digits and . _ - only)"
            ));
        }
    }
    Ok(())
}
