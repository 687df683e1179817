//! The signed document envelope: what the control plane sends and the node verifies
//! before a document reaches the accept path (limits, validation, generation, store).
//!
//! ```json
//! {"version": 1, "nodeId": "web-1", "generation": 7, "issuedAt": "2026-11-24T10:00:00Z",
//!  "keyId": "<16 hex>", "document": "<base64 of the document's bytes>",
//!  "signature": "<base64 of the 64-byte Ed25519 signature>"}
//! ```
//!
//! The signature covers exactly these bytes (see docs/protocol.md):
//! `converge/envelope/v1\n<nodeId>\n<generation in decimal>\n<issuedAt>\n<document bytes>`.
//! None of the first four fields may contain a newline, so the split is unambiguous.
//!
//! After the plane rotates its signing key, every envelope also carries `rotations`: the
//! chain of statements, each signed by the key before it, that leads from older keys to
//! the one that signed the envelope (see [`Rotation`]). A node pinned to an older key
//! follows the chain from its pinned key and pins the newest; the old key is refused
//! from then on.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// First line of the signed bytes: the domain and version of the signature.
pub const DOMAIN: &str = "converge/envelope/v1";

/// The envelope as it travels (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub version: u32,
    pub node_id: String,
    pub generation: u64,
    pub issued_at: String,
    pub key_id: String,
    /// Base64 of the document's exact bytes (JSON).
    pub document: String,
    /// Base64 of the Ed25519 signature; empty or missing = unsigned.
    #[serde(default)]
    pub signature: String,
    /// The plane's key rotations, oldest first (empty until the first rotation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rotations: Vec<Rotation>,
}

/// The control-plane key a node trusts now: read by the accept path, which moves it along
/// a rotation chain, and by the HTTPS poll, which names it so the plane re-sends a
/// document signed by a newer key.
pub type Pin = std::sync::Arc<std::sync::Mutex<VerifyingKey>>;

/// First line of the bytes a rotation statement signs.
pub const ROTATE_DOMAIN: &str = "converge/rotate/v1";

/// "The key `old_key` is replaced by `new_key`", signed by the old key. Signed bytes:
/// `converge/rotate/v1\n<oldKey>\n<newKey>\n<issuedAt>` (keys in base64).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    pub old_key: String,
    pub new_key: String,
    pub issued_at: String,
    pub signature: String,
}

impl Rotation {
    fn bytes(old_key: &str, new_key: &str, issued_at: &str) -> String {
        format!("{ROTATE_DOMAIN}\n{old_key}\n{new_key}\n{issued_at}")
    }

    /// `old` hands over to `new` (the control plane's side).
    pub fn sign(old: &ed25519_dalek::SigningKey, new: &VerifyingKey, issued_at: &str) -> Rotation {
        use ed25519_dalek::Signer;
        let old_key = B64.encode(old.verifying_key().as_bytes());
        let new_key = B64.encode(new.as_bytes());
        let signature = B64.encode(
            old.sign(Self::bytes(&old_key, &new_key, issued_at).as_bytes())
                .to_bytes(),
        );
        Rotation {
            old_key,
            new_key,
            issued_at: issued_at.to_string(),
            signature,
        }
    }

    /// The new key, when this statement is signed by `from`.
    fn follow(&self, from: &VerifyingKey) -> Option<VerifyingKey> {
        if self.old_key != B64.encode(from.as_bytes()) || self.issued_at.contains('\n') {
            return None;
        }
        let sig: [u8; 64] = B64.decode(&self.signature).ok()?.try_into().ok()?;
        from.verify(
            Self::bytes(&self.old_key, &self.new_key, &self.issued_at).as_bytes(),
            &Signature::from_bytes(&sig),
        )
        .ok()?;
        super::identity::parse_public_key(&self.new_key)
    }
}

/// The largest envelope of a document of at most `max_document` bytes: its base64 and
/// room for the other fields.
pub fn max_bytes(max_document: usize) -> usize {
    max_document
        .div_ceil(3)
        .saturating_mul(4)
        .saturating_add(64 << 10)
}

/// Why an envelope was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("unsigned document refused")]
    Unsigned,
    #[error("signed by key {found}, not by the pinned control-plane key {pinned}")]
    UnknownKey { found: String, pinned: String },
    #[error("bad signature: the document was not signed by the pinned control-plane key")]
    BadSignature,
    #[error("document is for node {document:?}, this is node {this:?}")]
    OtherNode { document: String, this: String },
    #[error("generation {offered} refused: not newer than the applied generation {applied} (replay or rollback)")]
    Stale { offered: u64, applied: u64 },
}

/// The exact bytes the signature covers.
pub fn signed_bytes(
    node_id: &str,
    generation: u64,
    issued_at: &str,
    document: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    if node_id.contains('\n') || issued_at.contains('\n') {
        return Err(EnvelopeError::Malformed(
            "nodeId and issuedAt must not contain a newline".into(),
        ));
    }
    let mut m =
        Vec::with_capacity(DOMAIN.len() + node_id.len() + issued_at.len() + 32 + document.len());
    m.extend_from_slice(DOMAIN.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(node_id.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(generation.to_string().as_bytes());
    m.push(b'\n');
    m.extend_from_slice(issued_at.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(document);
    Ok(m)
}

impl Envelope {
    /// Signs `document` for `node_id` (the control plane's side).
    pub fn sign(
        key: &ed25519_dalek::SigningKey,
        node_id: &str,
        generation: u64,
        issued_at: &str,
        document: &[u8],
    ) -> Result<Envelope, EnvelopeError> {
        use ed25519_dalek::Signer;
        let msg = signed_bytes(node_id, generation, issued_at, document)?;
        let sig = key.sign(&msg);
        Ok(Envelope {
            version: 1,
            node_id: node_id.to_string(),
            generation,
            issued_at: issued_at.to_string(),
            key_id: super::identity::key_id(&key.verifying_key()),
            document: B64.encode(document),
            signature: B64.encode(sig.to_bytes()),
            rotations: Vec::new(),
        })
    }

    /// The key this envelope claims to be signed by, as trusted from `pinned`: the pinned
    /// key itself, or the end of a chain of rotations that starts at it (each statement
    /// verified by the key before it). The envelope's own signature is checked by
    /// [`Envelope::verify`] against the key returned.
    pub fn signer(&self, pinned: &VerifyingKey) -> Result<VerifyingKey, EnvelopeError> {
        let mut key = *pinned;
        // Each step must verify under the key before it, so at most one pass per statement.
        for _ in 0..=self.rotations.len() {
            if super::identity::key_id(&key) == self.key_id {
                return Ok(key);
            }
            match self.rotations.iter().find_map(|r| r.follow(&key)) {
                Some(next) => key = next,
                None => break,
            }
        }
        Err(EnvelopeError::UnknownKey {
            found: self.key_id.clone(),
            pinned: super::identity::key_id(pinned),
        })
    }

    /// Parses an envelope from its JSON bytes.
    pub fn parse(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))
    }

    /// Checks the signature against the pinned key first (nothing unauthenticated is
    /// looked at further), then the node and the generation. Returns the document bytes.
    pub fn verify(
        &self,
        pinned: &VerifyingKey,
        this_node: &str,
        applied: Option<u64>,
    ) -> Result<Vec<u8>, EnvelopeError> {
        if self.version != 1 {
            return Err(EnvelopeError::Malformed(format!(
                "version {} (this agent knows 1)",
                self.version
            )));
        }
        if self.signature.is_empty() {
            return Err(EnvelopeError::Unsigned);
        }
        let pinned_id = super::identity::key_id(pinned);
        if self.key_id != pinned_id {
            return Err(EnvelopeError::UnknownKey {
                found: self.key_id.clone(),
                pinned: pinned_id,
            });
        }
        let (sig, document) = decode_signed(&self.signature, &self.document)?;
        let msg = signed_bytes(&self.node_id, self.generation, &self.issued_at, &document)?;
        pinned
            .verify(&msg, &sig)
            .map_err(|_| EnvelopeError::BadSignature)?;
        if self.node_id != this_node {
            return Err(EnvelopeError::OtherNode {
                document: self.node_id.clone(),
                this: this_node.to_string(),
            });
        }
        if let Some(applied) = applied {
            if self.generation <= applied {
                return Err(EnvelopeError::Stale {
                    offered: self.generation,
                    applied,
                });
            }
        }
        Ok(document)
    }
}

/// The base64 signature and document of a signed message (an envelope, a dry-run
/// request): a signature that is not 64 bytes is a bad signature.
pub(super) fn decode_signed(
    signature: &str,
    document: &str,
) -> Result<(Signature, Vec<u8>), EnvelopeError> {
    let sig: [u8; 64] = B64
        .decode(signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(EnvelopeError::BadSignature)?;
    let document = B64
        .decode(document)
        .map_err(|e| EnvelopeError::Malformed(format!("document: {e}")))?;
    Ok((Signature::from_bytes(&sig), document))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::identity::Identity;
    use proptest::prelude::*;

    const DOC: &[u8] = br#"{"apiVersion":"converge/v1","generation":3}"#;

    fn signed(id: &Identity) -> Envelope {
        Envelope::sign(id.signing_key(), "n1", 3, "2026-11-24T10:00:00Z", DOC).unwrap()
    }

    #[test]
    fn a_good_envelope_verifies_and_returns_the_exact_bytes() {
        let cp = Identity::ephemeral();
        let env = signed(&cp);
        let json = serde_json::to_vec(&env).unwrap();
        let back = Envelope::parse(&json).unwrap();
        assert_eq!(back.verify(&cp.public_key(), "n1", Some(2)).unwrap(), DOC);
        assert_eq!(back.verify(&cp.public_key(), "n1", None).unwrap(), DOC);
    }

    #[test]
    fn refusals_are_typed() {
        let cp = Identity::ephemeral();
        let other = Identity::ephemeral();
        let env = signed(&cp);
        let mut unsigned = env.clone();
        unsigned.signature.clear();
        assert_eq!(
            unsigned.verify(&cp.public_key(), "n1", None),
            Err(EnvelopeError::Unsigned)
        );
        assert!(matches!(
            env.verify(&other.public_key(), "n1", None),
            Err(EnvelopeError::UnknownKey { .. })
        ));
        // Signed by another key that claims the pinned key's id.
        let mut forged = signed(&other);
        forged.key_id = cp.key_id();
        assert_eq!(
            forged.verify(&cp.public_key(), "n1", None),
            Err(EnvelopeError::BadSignature)
        );
        assert!(matches!(
            env.verify(&cp.public_key(), "n2", None),
            Err(EnvelopeError::OtherNode { .. })
        ));
        assert_eq!(
            env.verify(&cp.public_key(), "n1", Some(3)),
            Err(EnvelopeError::Stale {
                offered: 3,
                applied: 3
            })
        );
        assert!(matches!(
            env.verify(&cp.public_key(), "n1", Some(9)),
            Err(EnvelopeError::Stale { .. })
        ));
        // Changing the node id or generation of a signed envelope breaks the signature.
        let mut moved = env.clone();
        moved.node_id = "n2".into();
        assert_eq!(
            moved.verify(&cp.public_key(), "n2", None),
            Err(EnvelopeError::BadSignature)
        );
        let mut bumped = env;
        bumped.generation = 4;
        assert_eq!(
            bumped.verify(&cp.public_key(), "n1", None),
            Err(EnvelopeError::BadSignature)
        );
    }

    #[test]
    fn a_rotation_chain_leads_from_the_pinned_key_and_only_from_it() {
        let (k1, k2, k3) = (
            Identity::ephemeral(),
            Identity::ephemeral(),
            Identity::ephemeral(),
        );
        let t = "2026-12-07T10:00:00Z";
        let r12 = Rotation::sign(k1.signing_key(), &k2.public_key(), t);
        let r23 = Rotation::sign(k2.signing_key(), &k3.public_key(), t);
        let mut env = signed(&k3);
        // No chain: a node pinned to k1 does not know k3.
        assert!(matches!(
            env.signer(&k1.public_key()),
            Err(EnvelopeError::UnknownKey { .. })
        ));
        env.rotations = vec![r12.clone(), r23.clone()];
        assert_eq!(env.signer(&k1.public_key()), Ok(k3.public_key()));
        assert_eq!(env.signer(&k2.public_key()), Ok(k3.public_key()));
        assert_eq!(env.signer(&k3.public_key()), Ok(k3.public_key()));
        let key = env.signer(&k1.public_key()).unwrap();
        assert_eq!(env.verify(&key, "n1", None).unwrap(), DOC);
        // After the switch the old key is refused: no statement leads back to it.
        let mut old = signed(&k1);
        old.rotations = env.rotations.clone();
        assert!(matches!(
            old.signer(&k3.public_key()),
            Err(EnvelopeError::UnknownKey { .. })
        ));
        // A statement not signed by the key it replaces breaks the chain.
        let forged = Rotation::sign(k3.signing_key(), &k3.public_key(), t);
        let mut bad = Rotation {
            old_key: r12.old_key.clone(),
            ..forged
        };
        env.rotations = vec![bad.clone(), r23.clone()];
        assert!(env.signer(&k1.public_key()).is_err());
        // Nor may its fields be changed.
        bad = Rotation {
            issued_at: "2026-12-08T10:00:00Z".into(),
            ..r12
        };
        env.rotations = vec![bad, r23];
        assert!(env.signer(&k1.public_key()).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Flipping any bit of the signed bytes (document, node, generation, issuedAt
        /// as they are carried) or of the signature fails verification.
        #[test]
        fn any_byte_flip_fails(pos in 0usize..4096, bit in 0u8..8) {
            let cp = Identity::ephemeral();
            let env = signed(&cp);
            let sig = B64.decode(&env.signature).unwrap();
            let msg = signed_bytes(&env.node_id, env.generation, &env.issued_at, DOC).unwrap();
            let total = msg.len() + sig.len();
            let pos = pos % total;
            let (mut msg, mut sig) = (msg, sig);
            if pos < msg.len() { msg[pos] ^= 1 << bit } else { sig[pos - msg.len()] ^= 1 << bit }
            let sig: [u8; 64] = sig.try_into().unwrap();
            prop_assert!(cp.public_key().verify(&msg, &Signature::from_bytes(&sig)).is_err());
            // And through the envelope: a flipped document byte.
            let mut doc = DOC.to_vec();
            let i = pos % doc.len();
            doc[i] ^= 1 << bit;
            let mut tampered = env.clone();
            tampered.document = B64.encode(&doc);
            prop_assert_eq!(tampered.verify(&cp.public_key(), "n1", None), Err(EnvelopeError::BadSignature));
        }
    }
}
