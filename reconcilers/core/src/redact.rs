//! Secret redaction for logs, diffs and status: show a stable fingerprint, never the value.

use sha2::{Digest, Sha256};

/// Returns `<redacted sha256:XXXXXXXXXXXX>` for a secret value.
///
/// The short digest lets an operator see *that* a secret changed without seeing it.
pub fn redact(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    format!("<redacted sha256:{}>", &hex::encode(digest)[..12])
}

#[cfg(test)]
mod tests {
    #[test]
    fn never_contains_the_secret() {
        let r = super::redact("hunter2");
        assert!(!r.contains("hunter2"));
        assert!(r.starts_with("<redacted sha256:"));
        assert_eq!(r, super::redact("hunter2"));
    }
}
