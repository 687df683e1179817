//! Secret values sealed to one node: X25519 sealed boxes (libsodium `crypto_box_seal`,
//! via crypto_box's `seal`), base64 in the document's `secrets` section. The control
//! plane seals with the node's public sealing key; only the node can open them, and only
//! in memory: the store keeps the document as received, sealed.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use converge_core::Zeroizing;
use std::collections::BTreeMap;

/// A secret that cannot be opened or sealed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealedError {
    #[error("$.secrets: {0:?} is not a secret name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)")]
    BadName(String),
    #[error("$.secrets.{0}: not base64")]
    NotBase64(String),
    #[error("$.secrets.{0}: cannot be opened with this node's sealing key (sealed for another node, or damaged)")]
    CannotOpen(String),
    #[error("$.secrets.{0}: the opened value is not UTF-8")]
    NotUtf8(String),
    #[error("cannot seal secret {0:?}")]
    Seal(String),
}

/// Seals `value` for the holder of `to` (the control plane's side).
pub fn seal(to: &crypto_box::PublicKey, name: &str, value: &[u8]) -> Result<String, SealedError> {
    to.seal(&mut rand_core::OsRng, value)
        .map(|b| B64.encode(b))
        .map_err(|_| SealedError::Seal(name.to_string()))
}

/// Opens one sealed value; the plaintext is zeroed when dropped, as is every
/// intermediate copy.
pub fn open(
    key: &crypto_box::SecretKey,
    name: &str,
    sealed: &str,
) -> Result<Zeroizing<String>, SealedError> {
    let bytes = B64
        .decode(sealed.trim())
        .map_err(|_| SealedError::NotBase64(name.to_string()))?;
    let plain = Zeroizing::new(
        key.unseal(&bytes)
            .map_err(|_| SealedError::CannotOpen(name.to_string()))?,
    );
    match std::str::from_utf8(&plain) {
        Ok(s) => Ok(Zeroizing::new(s.to_string())),
        Err(_) => Err(SealedError::NotUtf8(name.to_string())),
    }
}

/// Opens every value of a document's `secrets` section; all or nothing.
pub fn open_all(
    key: &crypto_box::SecretKey,
    secrets: Option<&BTreeMap<String, String>>,
) -> Result<BTreeMap<String, Zeroizing<String>>, SealedError> {
    let mut out = BTreeMap::new();
    for (name, sealed) in secrets.into_iter().flatten() {
        if !converge_core::vocab::is_secret_name(name) {
            return Err(SealedError::BadName(name.clone()));
        }
        out.insert(name.clone(), open(key, name, sealed)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::identity::Identity;

    #[test]
    fn round_trip_and_only_the_node_opens() {
        let node = Identity::ephemeral();
        let other = Identity::ephemeral();
        let to = node.sealing_secret().public_key();
        let a = seal(&to, "db", b"hunter2").unwrap();
        let b = seal(&to, "db", b"hunter2").unwrap();
        assert_ne!(a, b, "sealing is randomised (ephemeral sender key)");
        assert!(!a.contains("hunter2"));
        assert_eq!(
            open(node.sealing_secret(), "db", &a).unwrap().as_str(),
            "hunter2"
        );
        assert_eq!(
            open(other.sealing_secret(), "db", &a),
            Err(SealedError::CannotOpen("db".into()))
        );
        let map = BTreeMap::from([("db".to_string(), a)]);
        assert_eq!(
            open_all(node.sealing_secret(), Some(&map)).unwrap()["db"].as_str(),
            "hunter2"
        );
        let bad = BTreeMap::from([("../x".to_string(), b)]);
        assert!(matches!(
            open_all(node.sealing_secret(), Some(&bad)),
            Err(SealedError::BadName(_))
        ));
        assert!(open_all(node.sealing_secret(), None).unwrap().is_empty());
    }
}
