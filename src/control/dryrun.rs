//! The fleet-wide dry run (`converge control-plane plan`): the signed request that
//! carries a candidate document to one node, and the node's answer (its plan, redacted
//! and capped).
//!
//! A request is signed in its own domain, never the envelope's:
//! `converge/dry-run/v1\n<nodeId>\n<requestId>\n<issuedAt>\n<document bytes>`, so a
//! dry-run request can never be taken for a document to apply (its signature does not
//! verify as an envelope, and an envelope's does not verify as a dry run). The node
//! answers only a request signed by the plane key it trusts, for itself, issued within
//! the clock window of signed HTTPS requests ([`MAX_SKEW_SECS`]).

use super::envelope::{EnvelopeError, Rotation};
use super::protocol::MAX_SKEW_SECS;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// First line of the bytes a dry-run request signs.
pub const DOMAIN: &str = "converge/dry-run/v1";

/// Largest plan text in an answer; longer text is cut (at a line) and `truncated` set.
/// Counts stay exact.
pub const MAX_PLAN_BYTES: usize = 64 << 10;

/// Most problems listed in an answer (their total is in `problemCount`).
pub const MAX_PROBLEMS: usize = 50;

/// On HTTPS, the long poll's answer carries this header with value [`KIND`] when the
/// body is a dry-run request rather than an envelope.
pub const H_KIND: &str = "x-converge-kind";
pub const KIND: &str = "dry-run";

/// The `requestId` of a dry-run request as it travels, unverified (to tell a repeat
/// from a new request before the work of verifying and planning it).
pub fn request_id_of(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Id {
        request_id: String,
    }
    serde_json::from_slice::<Id>(bytes)
        .ok()
        .map(|r| r.request_id)
}

/// A dry-run request as it travels (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRunRequest {
    pub version: u32,
    /// Always [`KIND`]: a reader can tell it from an envelope without its signature.
    pub kind: String,
    pub node_id: String,
    /// Ties the answer to the request (`[A-Za-z0-9-]`, at most 64).
    pub request_id: String,
    pub issued_at: String,
    pub key_id: String,
    /// Base64 of the candidate document's exact bytes (JSON).
    pub document: String,
    pub signature: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rotations: Vec<Rotation>,
}

/// Why a dry-run request was not answered with a plan.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DryRunError {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(
        "dry run issued at {issued_at}, outside the {MAX_SKEW_SECS} s window of this node's clock"
    )]
    Expired { issued_at: String },
}

/// The exact bytes a dry-run request's signature covers.
pub fn signed_bytes(
    node_id: &str,
    request_id: &str,
    issued_at: &str,
    document: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    if node_id.contains('\n') || issued_at.contains('\n') || !valid_request_id(request_id) {
        return Err(EnvelopeError::Malformed(
            "nodeId and issuedAt must not contain a newline; requestId is [A-Za-z0-9-]{1,64}"
                .into(),
        ));
    }
    let mut m = Vec::with_capacity(DOMAIN.len() + node_id.len() + 128 + document.len());
    for part in [DOMAIN, node_id, request_id, issued_at] {
        m.extend_from_slice(part.as_bytes());
        m.push(b'\n');
    }
    m.extend_from_slice(document);
    Ok(m)
}

fn valid_request_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A fresh request id: 16 random bytes, hex.
pub fn request_id() -> String {
    super::protocol::nonce()
}

impl DryRunRequest {
    /// Signs a dry run of `document` for `node_id` (the control plane's side).
    pub fn sign(
        key: &ed25519_dalek::SigningKey,
        node_id: &str,
        request_id: &str,
        issued_at: &str,
        document: &[u8],
    ) -> Result<DryRunRequest, EnvelopeError> {
        use ed25519_dalek::Signer;
        let msg = signed_bytes(node_id, request_id, issued_at, document)?;
        Ok(DryRunRequest {
            version: 1,
            kind: KIND.into(),
            node_id: node_id.into(),
            request_id: request_id.into(),
            issued_at: issued_at.into(),
            key_id: super::identity::key_id(&key.verifying_key()),
            document: B64.encode(document),
            signature: B64.encode(key.sign(&msg).to_bytes()),
            rotations: Vec::new(),
        })
    }

    pub fn parse(bytes: &[u8]) -> Result<DryRunRequest, EnvelopeError> {
        serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))
    }

    /// The key that signed it as trusted from `pinned` (the pinned key or the end of a
    /// rotation chain from it; a dry run never moves the node's pin).
    pub fn signer(&self, pinned: &VerifyingKey) -> Result<VerifyingKey, EnvelopeError> {
        super::envelope::Envelope {
            version: 1,
            node_id: String::new(),
            generation: 0,
            issued_at: String::new(),
            key_id: self.key_id.clone(),
            document: String::new(),
            signature: String::new(),
            rotations: self.rotations.clone(),
        }
        .signer(pinned)
    }

    /// Checks the signature with `key` (see [`DryRunRequest::signer`]) first, then the
    /// node and the clock window (`now`, unix seconds). Returns the document bytes.
    pub fn verify(
        &self,
        key: &VerifyingKey,
        this_node: &str,
        now: i64,
    ) -> Result<Vec<u8>, DryRunError> {
        if self.version != 1 || self.kind != KIND {
            return Err(EnvelopeError::Malformed(format!(
                "version {} kind {:?} (this agent knows 1, {KIND:?})",
                self.version, self.kind
            ))
            .into());
        }
        if self.signature.is_empty() {
            return Err(EnvelopeError::Unsigned.into());
        }
        if self.key_id != super::identity::key_id(key) {
            return Err(EnvelopeError::UnknownKey {
                found: self.key_id.clone(),
                pinned: super::identity::key_id(key),
            }
            .into());
        }
        let (sig, document) = super::envelope::decode_signed(&self.signature, &self.document)?;
        let msg = signed_bytes(&self.node_id, &self.request_id, &self.issued_at, &document)?;
        key.verify(&msg, &sig)
            .map_err(|_| EnvelopeError::BadSignature)?;
        if self.node_id != this_node {
            return Err(EnvelopeError::OtherNode {
                document: self.node_id.clone(),
                this: this_node.to_string(),
            }
            .into());
        }
        let issued = chrono::DateTime::parse_from_rfc3339(&self.issued_at)
            .map_err(|e| EnvelopeError::Malformed(format!("issuedAt: {e}")))?
            .timestamp();
        if (now - issued).abs() > MAX_SKEW_SECS {
            return Err(DryRunError::Expired {
                issued_at: self.issued_at.clone(),
            });
        }
        Ok(document)
    }
}

/// What a node found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The host already matches the candidate.
    Unchanged,
    /// Applying the candidate would change the host (see `counts`).
    Changes,
    /// The node would refuse the candidate (see `problems`).
    Refused,
    /// The node could not plan (a reconciler failed to observe, a request that did not
    /// verify).
    Error,
}

/// Planned changes of one reconciler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub add: u64,
    pub change: u64,
    pub remove: u64,
}

/// One reason to refuse, with its JSON path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

/// The node's answer to a dry run (sent like its status: `type` = `planned`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanAnswer {
    pub request_id: String,
    pub node_id: String,
    pub outcome: Outcome,
    /// Per reconciler with changes (exact, whatever the text cap).
    #[serde(default)]
    pub counts: BTreeMap<String, Counts>,
    /// At most [`MAX_PROBLEMS`]; `problemCount` is the total.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
    #[serde(default)]
    pub problem_count: usize,
    /// What `converge diff` prints (secrets redacted), at most [`MAX_PLAN_BYTES`].
    #[serde(default)]
    pub plan: String,
    #[serde(default)]
    pub truncated: bool,
    /// Reconcilers that failed to plan, and why a request was not planned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PlanAnswer {
    /// An answer without a plan.
    pub fn without_plan(request_id: &str, node_id: &str, outcome: Outcome) -> PlanAnswer {
        PlanAnswer {
            request_id: request_id.into(),
            node_id: node_id.into(),
            outcome,
            counts: BTreeMap::new(),
            problems: Vec::new(),
            problem_count: 0,
            plan: String::new(),
            truncated: false,
            error: None,
        }
    }

    /// Keeps at most [`MAX_PROBLEMS`] problems, recording the total.
    pub fn set_problems(&mut self, problems: impl IntoIterator<Item = Problem>) {
        let all: Vec<Problem> = problems.into_iter().collect();
        self.problem_count = all.len();
        self.problems = all.into_iter().take(MAX_PROBLEMS).collect();
    }

    /// Sets the plan text, cut at a line within [`MAX_PLAN_BYTES`].
    pub fn set_plan(&mut self, text: String) {
        if text.len() <= MAX_PLAN_BYTES {
            self.plan = text;
            self.truncated = false;
            return;
        }
        let mut end = MAX_PLAN_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let cut = text[..end].rfind('\n').map_or(end, |i| i + 1);
        self.plan = text[..cut].to_string();
        self.truncated = true;
    }
}

/// "JSON path: message" as the document's problems print, split back into its parts
/// (refusals the accept path words as one string, like `$.node.mode: …`).
pub fn problem_from_message(message: &str) -> Problem {
    match message.split_once(": ") {
        Some((path, rest)) if path.starts_with('$') => Problem {
            path: path.into(),
            message: rest.into(),
        },
        _ => Problem {
            path: "$".into(),
            message: message.into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::envelope::Envelope;
    use crate::control::identity::Identity;

    const DOC: &[u8] = br#"{"apiVersion":"converge/v1","generation":3}"#;
    const T: &str = "2026-11-24T10:00:00Z";

    fn t() -> i64 {
        chrono::DateTime::parse_from_rfc3339(T).unwrap().timestamp()
    }

    #[test]
    fn a_dry_run_verifies_only_as_a_dry_run() {
        let cp = Identity::ephemeral();
        let req = DryRunRequest::sign(cp.signing_key(), "n1", "abc", T, DOC).unwrap();
        let back = DryRunRequest::parse(&serde_json::to_vec(&req).unwrap()).unwrap();
        assert_eq!(back.verify(&cp.public_key(), "n1", t() + 10).unwrap(), DOC);
        // Its signature, carried by an envelope (whatever generation), is not an
        // envelope's: the apply path refuses it.
        for generation in [0, 1, 3, u64::MAX] {
            let forged = Envelope {
                version: 1,
                node_id: "n1".into(),
                generation,
                issued_at: T.into(),
                key_id: cp.key_id(),
                document: req.document.clone(),
                signature: req.signature.clone(),
                rotations: Vec::new(),
            };
            assert_eq!(
                forged.verify(&cp.public_key(), "n1", None),
                Err(EnvelopeError::BadSignature)
            );
        }
        // The request itself does not parse as an envelope (no generation).
        assert!(Envelope::parse(&serde_json::to_vec(&req).unwrap()).is_err());
        // And an envelope's signature does not verify as a dry run.
        let env = Envelope::sign(cp.signing_key(), "n1", 3, T, DOC).unwrap();
        let as_dry = DryRunRequest {
            signature: env.signature,
            ..req.clone()
        };
        assert_eq!(
            as_dry.verify(&cp.public_key(), "n1", t()),
            Err(DryRunError::Envelope(EnvelopeError::BadSignature))
        );
    }

    #[test]
    fn refusals_other_key_node_request_id_and_clock_window() {
        let cp = Identity::ephemeral();
        let other = Identity::ephemeral();
        let req = DryRunRequest::sign(cp.signing_key(), "n1", "abc", T, DOC).unwrap();
        assert!(matches!(
            req.verify(&other.public_key(), "n1", t()),
            Err(DryRunError::Envelope(EnvelopeError::UnknownKey { .. }))
        ));
        let mut forged = DryRunRequest::sign(other.signing_key(), "n1", "abc", T, DOC).unwrap();
        forged.key_id = cp.key_id();
        assert_eq!(
            forged.verify(&cp.public_key(), "n1", t()),
            Err(DryRunError::Envelope(EnvelopeError::BadSignature))
        );
        assert!(matches!(
            req.verify(&cp.public_key(), "n2", t()),
            Err(DryRunError::Envelope(EnvelopeError::OtherNode { .. }))
        ));
        let mut moved = req.clone();
        moved.request_id = "abd".into();
        assert_eq!(
            moved.verify(&cp.public_key(), "n1", t()),
            Err(DryRunError::Envelope(EnvelopeError::BadSignature))
        );
        assert!(matches!(
            req.verify(&cp.public_key(), "n1", t() + MAX_SKEW_SECS + 1),
            Err(DryRunError::Expired { .. })
        ));
        assert!(matches!(
            req.verify(&cp.public_key(), "n1", t() - MAX_SKEW_SECS - 1),
            Err(DryRunError::Expired { .. })
        ));
        assert!(DryRunRequest::sign(cp.signing_key(), "n1", "a\nb", T, DOC).is_err());
    }

    #[test]
    fn the_plan_text_is_capped_at_a_line_and_problems_are_counted() {
        let mut a = PlanAnswer::without_plan("r", "n", Outcome::Changes);
        let line = "  + containers/web: create\n";
        a.set_plan(line.repeat(MAX_PLAN_BYTES / line.len() + 10));
        assert!(a.truncated && a.plan.len() <= MAX_PLAN_BYTES && a.plan.ends_with('\n'));
        a.set_problems((0..120).map(|i| problem_from_message(&format!("$.x[{i}]: bad"))));
        assert_eq!((a.problems.len(), a.problem_count), (MAX_PROBLEMS, 120));
        assert_eq!(a.problems[3].path, "$.x[3]");
        assert_eq!(problem_from_message("no path").path, "$");
    }
}
