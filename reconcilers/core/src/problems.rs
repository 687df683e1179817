//! Validation problems: every problem found in a document, each with its JSON path.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One thing wrong with a document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// JSON path of the offending value, e.g. `$.containers[3].ports[0].hostPort`.
    pub path: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Accumulates problems so validation reports all of them at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
            hint: None,
        });
    }

    pub fn push_hint(
        &mut self,
        path: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
            hint: Some(hint.into()),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Problem> {
        self.0.iter()
    }
}

/// Checks that `name` is a valid DNS name (RFC 1123 labels, ≤ 253 chars), optionally
/// with a leading `*.` wildcard or `_service._proto.` labels (allowed when `underscores`).
pub fn is_dns_name(name: &str, underscores: bool) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    name.split('.').enumerate().all(|(i, label)| {
        let body = if underscores {
            label.strip_prefix('_').unwrap_or(label)
        } else {
            label
        };
        (i == 0 && label == "*")
            || (!body.is_empty()
                && label.len() <= 63
                && body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !body.starts_with('-')
                && !body.ends_with('-'))
    })
}

/// Checks that `s` is a base64 encoding of exactly 32 bytes (a WireGuard key).
pub fn is_wireguard_key(s: &str) -> bool {
    // 32 bytes encode to 43 characters plus one '=' of padding.
    s.len() == 44
        && s.ends_with('=')
        && s[..43]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        // The last character before '=' carries 2 unused bits which must be zero.
        && matches!(s.as_bytes()[42], b'A' | b'E' | b'I' | b'M' | b'Q' | b'U' | b'Y' | b'c' | b'g' | b'k' | b'o' | b's' | b'w' | b'0' | b'4' | b'8')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert!(is_dns_name("web.internal", false));
        assert!(is_dns_name("*.apps.internal", false));
        assert!(is_dns_name("_http._tcp.web.internal", true));
        assert!(!is_dns_name("_http._tcp.web.internal", false));
        assert!(!is_dns_name("-bad.internal", false));
        assert!(!is_dns_name("a..b", false));
        assert!(!is_dns_name("", false));
        assert!(!is_dns_name("sp ace.internal", false));
        assert!(!is_dns_name(&"a".repeat(64), false));
    }

    #[test]
    fn wireguard_keys() {
        assert!(is_wireguard_key(
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
        ));
        assert!(!is_wireguard_key(
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBm="
        ));
        assert!(!is_wireguard_key("not-a-key"));
        assert!(!is_wireguard_key(
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBml="
        ));
    }
}
