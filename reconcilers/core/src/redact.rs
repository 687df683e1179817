//! Secret redaction for logs, diffs and status: show a keyed fingerprint, never the
//! value. The fingerprint is an HMAC-SHA-256 under a per-node key (`set_key`, from
//! `<data-dir>/redaction.key`), so a diff still shows *that* a secret changed while a
//! weak secret cannot be found by hashing guesses; without a node key, a random key
//! per process is used.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::OnceLock;

static KEY: OnceLock<[u8; 32]> = OnceLock::new();

/// Sets the node's redaction key; only the first call counts (the key of a process
/// never changes, so its fingerprints stay comparable). Returns false when a key was
/// already in use.
pub fn set_key(key: [u8; 32]) -> bool {
    KEY.set(key).is_ok()
}

fn key() -> &'static [u8; 32] {
    KEY.get_or_init(|| {
        let mut k = [0u8; 32];
        // Without randomness the fingerprints would be guessable: better to stop.
        if let Err(e) = getrandom::getrandom(&mut k) {
            panic!("no randomness for the redaction key: {e}");
        }
        k
    })
}

/// Returns `<redacted, hmac:XXXXXXXXXXXX>` for a secret value.
pub fn redact(secret: &str) -> String {
    // HMAC accepts keys of any length: this cannot fail.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key()) {
        Ok(m) => m,
        Err(_) => return "<redacted>".to_string(),
    };
    mac.update(secret.as_bytes());
    let tag = mac.finalize().into_bytes();
    format!("<redacted, hmac:{}>", &hex::encode(tag)[..12])
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    #[test]
    fn never_contains_the_secret_nor_its_plain_hash() {
        let r = super::redact("hunter2");
        assert!(!r.contains("hunter2"));
        assert!(r.starts_with("<redacted, hmac:"));
        assert_eq!(r, super::redact("hunter2"));
        assert_ne!(r, super::redact("hunter3"));
        // A guess hashed with plain SHA-256 does not match the fingerprint.
        let plain = hex::encode(sha2::Sha256::digest(b"hunter2"));
        assert!(!r.contains(&plain[..12]), "{r}");
    }
}
