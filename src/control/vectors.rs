//! Protocol test vectors (docs/protocol-vectors.json and the "Test vectors" section of
//! docs/protocol.md): fixed keys run through the real signing, sealing and request code,
//! so another implementation of a node or a control plane can check itself byte for
//! byte. The test regenerates both and fails when the committed copies differ;
//! `CONVERGE_UPDATE_VECTORS=1 cargo test --lib control::vectors` rewrites them.

use super::envelope::{signed_bytes, Envelope, Rotation, DOMAIN, ROTATE_DOMAIN};
use super::identity::{fingerprint, key_id, Identity};
use super::protocol::{SignedRequest, H_NODE, H_NONCE, H_SIGNATURE, H_TIME};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::SigningKey;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const JSON_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol-vectors.json");
const MD_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md");
const BEGIN: &str = "<!-- test vectors: generated from docs/protocol-vectors.json, do not edit -->";
const END: &str = "<!-- end of test vectors -->";
const REGENERATE: &str = "CONVERGE_UPDATE_VECTORS=1 cargo test --lib control::vectors";

/// 32 bytes `start, start+1, …` (readable seeds that anyone can type).
fn seed(start: u8) -> [u8; 32] {
    std::array::from_fn(|i| start.wrapping_add(i as u8))
}

const NODE: &str = "web-1";
const GENERATION: u64 = 7;
const ISSUED_AT: &str = "2026-11-24T10:00:00.000Z";
const ROTATED_AT: &str = "2026-12-07T10:00:00.000Z";
const SECRET_NAME: &str = "db-password";
const SECRET: &str = "correct horse battery staple";
const REQUEST_TIME: i64 = 1_795_000_000;
const REQUEST_NONCE: &str = "000102030405060708090a0b0c0d0e0f";
const DRY_RUN_ID: &str = "5d1c0a7e2b9f4e11";

/// Hands out fixed bytes: `crypto_box_seal`'s ephemeral key, made reproducible.
struct FixedRng([u8; 32]);

impl rand_core::RngCore for FixedRng {
    fn next_u32(&mut self) -> u32 {
        rand_core::impls::next_u32_via_fill(self)
    }
    fn next_u64(&mut self) -> u64 {
        rand_core::impls::next_u64_via_fill(self)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for (d, s) in dest.iter_mut().zip(self.0.iter().cycle()) {
            *d = *s;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand_core::CryptoRng for FixedRng {}

fn ed25519_key(seed: [u8; 32]) -> Value {
    let public = SigningKey::from_bytes(&seed).verifying_key();
    json!({
        "seedHex": hex::encode(seed),
        "publicKey": B64.encode(public.as_bytes()),
        "publicKeyHex": hex::encode(public.as_bytes()),
        "keyId": key_id(&public),
        "fingerprint": fingerprint(&public),
    })
}

/// The vectors, made with the code the node and the reference plane run.
fn generate() -> Value {
    let plane = SigningKey::from_bytes(&seed(0x00));
    let plane_next = SigningKey::from_bytes(&seed(0x20));
    let node = Identity::from_bytes(&seed(0x40), &seed(0x60));
    let ephemeral = seed(0x80);

    // Sealed secret: crypto_box_seal with a fixed ephemeral key (a real seal draws it at
    // random), opened again with the node's sealing key.
    let recipient = node.sealing_secret().public_key();
    let sealed = recipient
        .seal(&mut FixedRng(ephemeral), SECRET.as_bytes())
        .expect("seal");
    let ephemeral_public = crypto_box::SecretKey::from(ephemeral).public_key();
    let nonce = seal_nonce(ephemeral_public.as_bytes(), recipient.as_bytes());
    let sealed_b64 = B64.encode(&sealed);
    assert_eq!(
        super::sealed::open(node.sealing_secret(), SECRET_NAME, &sealed_b64)
            .expect("the vector opens")
            .as_str(),
        SECRET
    );

    // The document carries the sealed secret, as the plane sends it.
    let document = format!(
        r#"{{"apiVersion":"converge/v1","node":{{"id":"{NODE}","mode":"worker"}},"generation":{GENERATION},"issuedAt":"{ISSUED_AT}","secrets":{{"{SECRET_NAME}":"{sealed_b64}"}}}}"#
    );
    let env = Envelope::sign(&plane, NODE, GENERATION, ISSUED_AT, document.as_bytes())
        .expect("sign envelope");
    let env_signed = signed_bytes(NODE, GENERATION, ISSUED_AT, document.as_bytes()).expect("bytes");
    let env_json = serde_json::to_string(&env).expect("envelope json");

    // Rotation plane -> plane_next, and the same document re-signed by the new key.
    let rotation = Rotation::sign(&plane, &plane_next.verifying_key(), ROTATED_AT);
    let rotation_signed = format!(
        "{ROTATE_DOMAIN}\n{}\n{}\n{}",
        rotation.old_key, rotation.new_key, rotation.issued_at
    );
    let mut rotated = Envelope::sign(
        &plane_next,
        NODE,
        GENERATION,
        ISSUED_AT,
        document.as_bytes(),
    )
    .expect("sign envelope");
    rotated.rotations = vec![rotation.clone()];

    // A dry-run request of the same document: its own signature domain, no generation.
    let dry = super::dryrun::DryRunRequest::sign(
        &plane,
        NODE,
        DRY_RUN_ID,
        ISSUED_AT,
        document.as_bytes(),
    )
    .expect("sign dry run");
    let dry_signed = super::dryrun::signed_bytes(NODE, DRY_RUN_ID, ISSUED_AT, document.as_bytes())
        .expect("bytes");

    // A signed status request.
    let status = json!({
        "type": "status", "nodeId": NODE, "sentAt": "2026-11-24T10:00:05.000Z",
        "acceptedGeneration": GENERATION, "reconcilers": [],
        "facts": facts(), "heartbeatSecs": 15,
    });
    let body = serde_json::to_string(&status).expect("status json");
    let path = format!("/v1/nodes/{NODE}/status");
    let req = SignedRequest {
        method: "POST",
        path_and_query: &path,
        time: REQUEST_TIME,
        nonce: REQUEST_NONCE,
        body: body.as_bytes(),
    };
    let req_signature = req.sign(node.signing_key());

    let nats_key = super::nats::nkey(node.signing_key()).expect("nkey").0;
    let enroll = super::protocol::EnrollRequest {
        token: "example-token".into(),
        name: NODE.into(),
        public_key: node.public_key_b64(),
        sealing_key: node.sealing_key_b64(),
        facts: serde_json::from_value(facts()).expect("facts"),
        nats_key: Some(nats_key.clone()),
    };

    let mut node_identity = ed25519_key(seed(0x40));
    node_identity["natsKey"] = json!(nats_key);
    json!({
        "about": "converge control-plane protocol v1 test vectors (docs/protocol.md). Generated by src/control/vectors.rs from fixed seeds; every value is checked by its test. Hex is lowercase; base64 is standard with padding unless said otherwise.",
        "keys": {
            "plane": ed25519_key(seed(0x00)),
            "planeNext": ed25519_key(seed(0x20)),
            "nodeIdentity": node_identity,
            "nodeSealing": {
                "secretHex": hex::encode(seed(0x60)),
                "publicKey": node.sealing_key_b64(),
                "publicKeyHex": hex::encode(recipient.as_bytes()),
            },
        },
        "enrollment": {
            "request": serde_json::to_value(&enroll).expect("enroll json"),
        },
        "sealedSecret": {
            "name": SECRET_NAME,
            "plaintext": SECRET,
            "recipientSecretHex": hex::encode(seed(0x60)),
            "recipientPublicKey": node.sealing_key_b64(),
            "ephemeralSecretHex": hex::encode(ephemeral),
            "ephemeralPublicKeyHex": hex::encode(ephemeral_public.as_bytes()),
            "nonceHex": hex::encode(nonce),
            "sealedHex": hex::encode(&sealed),
            "sealed": sealed_b64,
        },
        "envelope": {
            "signingKey": "plane",
            "nodeId": NODE,
            "generation": GENERATION,
            "issuedAt": ISSUED_AT,
            "document": document,
            "signedBytesHex": hex::encode(&env_signed),
            "signature": env.signature,
            "json": env_json,
        },
        "rotation": {
            "oldKey": "plane",
            "newKey": "planeNext",
            "issuedAt": ROTATED_AT,
            "signedBytesHex": hex::encode(rotation_signed.as_bytes()),
            "signature": rotation.signature,
            "statement": serde_json::to_value(&rotation).expect("rotation json"),
            "envelopeSignature": rotated.signature,
            "envelopeJson": serde_json::to_string(&rotated).expect("envelope json"),
        },
        "dryRun": {
            "signingKey": "plane",
            "nodeId": NODE,
            "requestId": DRY_RUN_ID,
            "issuedAt": ISSUED_AT,
            "signedBytesHex": hex::encode(&dry_signed),
            "signature": dry.signature,
            "json": serde_json::to_string(&dry).expect("dry-run json"),
        },
        "request": {
            "signingKey": "nodeIdentity",
            "method": "POST",
            "path": path,
            "body": body,
            "bodySha256Hex": hex::encode(Sha256::digest(body.as_bytes())),
            "signedBytesHex": hex::encode(req.bytes()),
            "signature": req_signature,
            "headers": {
                H_NODE: NODE,
                H_TIME: REQUEST_TIME.to_string(),
                H_NONCE: REQUEST_NONCE,
                H_SIGNATURE: req_signature,
            },
        },
    })
}

fn facts() -> Value {
    json!({
        "hostname": NODE, "arch": "x86_64", "kernel": "6.1.0-26-amd64",
        "convergeVersion": "0.1.0", "containerRuntime": "podman",
        "wireguardPublicKeys": {}, "mode": "worker",
    })
}

/// `crypto_box_seal`'s nonce: BLAKE2b-192 of the ephemeral public key, then the
/// recipient's (computed here apart from crypto_box, as another implementation would).
fn seal_nonce(ephemeral: &[u8; 32], recipient: &[u8; 32]) -> [u8; 24] {
    use blake2::digest::{Update, VariableOutput};
    let mut h = blake2::Blake2bVar::new(24).expect("24-byte blake2b");
    h.update(ephemeral);
    h.update(recipient);
    let mut out = [0u8; 24];
    h.finalize_variable(&mut out).expect("24 bytes");
    out
}

/// Hex in lines of 64 digits (32 bytes), for reading.
fn hex_block(hex: &str) -> String {
    hex.as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Signed bytes as text, `\n` shown as line breaks (every vector here is UTF-8).
fn text_of(hex_bytes: &str) -> String {
    String::from_utf8(hex::decode(hex_bytes).unwrap_or_default()).unwrap_or_default()
}

/// The "Test vectors" section of docs/protocol.md, from the JSON.
fn markdown(v: &Value) -> String {
    use std::fmt::Write;
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let mut md = format!("{BEGIN}\n");
    let _ = write!(
        md,
        "\nThe same values, machine-readable, are in `docs/protocol-vectors.json`. Seeds are\n\
         the 32 bytes `00 01 … 1f` (plane), `20 … 3f` (plane after a rotation), `40 … 5f`\n\
         (node identity), `60 … 7f` (node sealing key), `80 … 9f` (the sealing's ephemeral\n\
         key). Ed25519 signatures are deterministic: an implementation that signs these\n\
         bytes with these seeds gets these signatures.\n\n#### Keys\n\n\
         | key | seed / secret (hex) | public key (base64) | key id | fingerprint |\n|---|---|---|---|---|\n"
    );
    for (name, k) in [
        ("plane", &v["keys"]["plane"]),
        ("planeNext", &v["keys"]["planeNext"]),
        ("nodeIdentity", &v["keys"]["nodeIdentity"]),
    ] {
        let _ = writeln!(
            md,
            "| {name} | `{}` | `{}` | `{}` | `{}` |",
            s(&k["seedHex"]),
            s(&k["publicKey"]),
            s(&k["keyId"]),
            s(&k["fingerprint"])
        );
    }
    let seal = &v["keys"]["nodeSealing"];
    let _ = write!(
        md,
        "| nodeSealing (X25519) | `{}` | `{}` | | |\n\n\
         The node identity as a NATS user nkey: `{}`.\n\n",
        s(&seal["secretHex"]),
        s(&seal["publicKey"]),
        s(&v["keys"]["nodeIdentity"]["natsKey"])
    );
    let _ = write!(
        md,
        "#### Enrollment request\n\n```json\n{}\n```\n\n",
        serde_json::to_string_pretty(&v["enrollment"]["request"]).unwrap_or_default()
    );
    let ss = &v["sealedSecret"];
    let _ = write!(
        md,
        "#### Sealed secret\n\n`{}` = `{}` sealed to nodeSealing. A real seal draws the\n\
         ephemeral key at random, so two seals never match byte for byte; with the ephemeral\n\
         secret below this one is reproducible. What every implementation must do is open it\n\
         with the node's sealing secret.\n\n\
         - ephemeral secret (hex): `{}`\n- ephemeral public key (hex): `{}`\n\
         - nonce = BLAKE2b-192(ephemeral pk ‖ recipient pk) (hex): `{}`\n\n\
         Sealed (base64, as in the document's `secrets`):\n\n```\n{}\n```\n\n",
        s(&ss["name"]),
        s(&ss["plaintext"]),
        s(&ss["ephemeralSecretHex"]),
        s(&ss["ephemeralPublicKeyHex"]),
        s(&ss["nonceHex"]),
        s(&ss["sealed"])
    );
    let e = &v["envelope"];
    let _ = write!(
        md,
        "#### Envelope\n\nSigned by plane for node `{}`, generation {}. Signed bytes (text; each line\n\
         break is one 0x0A byte, none at the end):\n\n```\n{}\n```\n\nThe same bytes in hex:\n\n```\n{}\n```\n\n\
         Signature (base64): `{}`\n\nThe envelope as it travels:\n\n```json\n{}\n```\n\n",
        s(&e["nodeId"]),
        e["generation"],
        text_of(&s(&e["signedBytesHex"])),
        hex_block(&s(&e["signedBytesHex"])),
        s(&e["signature"]),
        s(&e["json"])
    );
    let r = &v["rotation"];
    let _ = write!(
        md,
        "#### Rotation\n\nplane hands over to planeNext. Signed bytes (text, then hex):\n\n```\n{}\n```\n\n```\n{}\n```\n\n\
         Signature (base64): `{}`\n\nThe same document re-signed by planeNext, carrying the\n\
         statement (a node pinned to plane follows it and pins planeNext):\n\n```json\n{}\n```\n\n",
        text_of(&s(&r["signedBytesHex"])),
        hex_block(&s(&r["signedBytesHex"])),
        s(&r["signature"]),
        s(&r["envelopeJson"])
    );
    let d = &v["dryRun"];
    let _ = write!(
        md,
        "#### Dry-run request\n\nThe envelope's document as a dry run (§7), request id `{}`, signed by plane.\n\
         Signed bytes (text, then hex):\n\n```\n{}\n```\n\n```\n{}\n```\n\n\
         Signature (base64): `{}`\n\nAs it travels:\n\n```json\n{}\n```\n\n",
        s(&d["requestId"]),
        text_of(&s(&d["signedBytesHex"])),
        hex_block(&s(&d["signedBytesHex"])),
        s(&d["signature"]),
        s(&d["json"])
    );
    let q = &v["request"];
    let headers: String = q["headers"]
        .as_object()
        .map(|h| h.iter().map(|(k, v)| format!("{k}: {}\n", s(v))).collect())
        .unwrap_or_default();
    let _ = write!(
        md,
        "#### Signed HTTPS request\n\n`{} {}` by nodeIdentity, body (SHA-256 `{}`):\n\n```json\n{}\n```\n\n\
         Signed bytes (text, then hex):\n\n```\n{}\n```\n\n```\n{}\n```\n\nHeaders:\n\n```\n{}```\n\n{END}",
        s(&q["method"]),
        s(&q["path"]),
        s(&q["bodySha256Hex"]),
        s(&q["body"]),
        text_of(&s(&q["signedBytesHex"])),
        hex_block(&s(&q["signedBytesHex"])),
        headers
    );
    md
}

/// docs/protocol.md with its vectors section replaced by `section`.
fn splice(doc: &str, section: &str) -> Option<String> {
    let start = doc.find(BEGIN)?;
    let end = doc[start..].find(END)? + start + END.len();
    Some(format!("{}{section}{}", &doc[..start], &doc[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::identity::parse_public_key;

    #[test]
    fn committed_vectors_are_current() {
        let v = generate();
        let json = format!("{}\n", serde_json::to_string_pretty(&v).expect("json"));
        let md_doc = std::fs::read_to_string(MD_PATH).unwrap_or_default();
        let spliced = splice(&md_doc, &markdown(&v));
        if std::env::var_os("CONVERGE_UPDATE_VECTORS").is_some() {
            std::fs::write(JSON_PATH, &json).expect("write vectors json");
            let md_new = spliced.expect("docs/protocol.md has the test vectors markers");
            std::fs::write(MD_PATH, md_new).expect("write protocol.md");
            return;
        }
        let on_disk = std::fs::read_to_string(JSON_PATH).unwrap_or_default();
        assert!(
            on_disk == json,
            "docs/protocol-vectors.json is stale: run `{REGENERATE}`"
        );
        assert!(
            spliced.as_deref() == Some(md_doc.as_str()),
            "the test vectors in docs/protocol.md are stale or missing: run `{REGENERATE}`"
        );
    }

    /// The committed vectors verify with the node's own checks (not only the signer's
    /// code that made them).
    #[test]
    fn the_vectors_verify_as_a_node_verifies() {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(JSON_PATH).unwrap_or_default())
                .expect("docs/protocol-vectors.json parses");
        let key = |k: &str| parse_public_key(v["keys"][k]["publicKey"].as_str().unwrap()).unwrap();
        let (plane, next, node) = (key("plane"), key("planeNext"), key("nodeIdentity"));
        // Seeds give the public keys.
        for (name, public) in [
            ("plane", plane),
            ("planeNext", next),
            ("nodeIdentity", node),
        ] {
            let seed: [u8; 32] = hex::decode(v["keys"][name]["seedHex"].as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap();
            assert_eq!(
                SigningKey::from_bytes(&seed).verifying_key(),
                public,
                "{name}"
            );
        }
        assert!(crate::control::nats::nkey_matches(
            v["keys"]["nodeIdentity"]["natsKey"].as_str().unwrap(),
            &node
        ));

        // The envelope: signature over the documented bytes, accepted by the node.
        let e = &v["envelope"];
        let env = Envelope::parse(e["json"].as_str().unwrap().as_bytes()).unwrap();
        let signed = hex::decode(e["signedBytesHex"].as_str().unwrap()).unwrap();
        assert!(signed.starts_with(format!("{DOMAIN}\n").as_bytes()));
        let doc = env.verify(&plane, NODE, Some(GENERATION - 1)).unwrap();
        assert_eq!(doc, e["document"].as_str().unwrap().as_bytes());
        assert_eq!(
            signed_bytes(NODE, GENERATION, &env.issued_at, &doc).unwrap(),
            signed
        );
        // Another node, or the same generation again, is refused.
        assert!(env.verify(&plane, "web-2", None).is_err());
        assert!(env.verify(&plane, NODE, Some(GENERATION)).is_err());

        // The rotated envelope: followed from the old key, refused by the old key alone.
        let r = &v["rotation"];
        let rotated = Envelope::parse(r["envelopeJson"].as_str().unwrap().as_bytes()).unwrap();
        assert_eq!(rotated.signer(&plane), Ok(next));
        assert_eq!(rotated.verify(&next, NODE, None).unwrap(), doc);
        assert!(rotated.verify(&plane, NODE, None).is_err());
        let rot_signed = hex::decode(r["signedBytesHex"].as_str().unwrap()).unwrap();
        assert!(rot_signed.starts_with(format!("{ROTATE_DOMAIN}\n").as_bytes()));

        // The sealed secret opens with the sealing secret, and is what the documented
        // construction gives: ephemeral pk ‖ XSalsa20-Poly1305(nonce, plaintext).
        let ss = &v["sealedSecret"];
        let secret: [u8; 32] = hex::decode(ss["recipientSecretHex"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let secret = crypto_box::SecretKey::from(secret);
        let sealed = ss["sealed"].as_str().unwrap();
        assert_eq!(
            crate::control::sealed::open(&secret, SECRET_NAME, sealed)
                .unwrap()
                .as_str(),
            ss["plaintext"].as_str().unwrap()
        );
        let eph: [u8; 32] = hex::decode(ss["ephemeralSecretHex"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let eph = crypto_box::SecretKey::from(eph);
        let nonce = seal_nonce(eph.public_key().as_bytes(), secret.public_key().as_bytes());
        assert_eq!(hex::encode(nonce), ss["nonceHex"].as_str().unwrap());
        use crypto_box::aead::Aead;
        let boxed = crypto_box::SalsaBox::new(&secret.public_key(), &eph)
            .encrypt(&nonce.into(), SECRET.as_bytes())
            .unwrap();
        let mut expect = eph.public_key().as_bytes().to_vec();
        expect.extend(boxed);
        assert_eq!(B64.encode(expect), sealed);
        // The document in the envelope carries it.
        let parsed: Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(parsed["secrets"][SECRET_NAME], sealed);

        // The dry run verifies as a node checks it, in its own domain: never as an
        // envelope.
        let d = &v["dryRun"];
        let dry: crate::control::dryrun::DryRunRequest =
            serde_json::from_str(d["json"].as_str().unwrap()).unwrap();
        let dry_signed = hex::decode(d["signedBytesHex"].as_str().unwrap()).unwrap();
        assert!(dry_signed.starts_with(format!("{}\n", crate::control::dryrun::DOMAIN).as_bytes()));
        let issued = chrono::DateTime::parse_from_rfc3339(ISSUED_AT)
            .unwrap()
            .timestamp();
        assert_eq!(dry.verify(&plane, NODE, issued + 10).unwrap(), doc);
        assert!(dry.verify(&plane, "web-2", issued).is_err());
        assert!(dry.verify(&next, NODE, issued).is_err());
        assert!(Envelope::parse(d["json"].as_str().unwrap().as_bytes())
            .and_then(|e| e.verify(&plane, NODE, None))
            .is_err());

        // The signed request verifies as the plane checks it, near its time only.
        let q = &v["request"];
        let req = SignedRequest {
            method: q["method"].as_str().unwrap(),
            path_and_query: q["path"].as_str().unwrap(),
            time: REQUEST_TIME,
            nonce: q["headers"][H_NONCE].as_str().unwrap(),
            body: q["body"].as_str().unwrap().as_bytes(),
        };
        assert_eq!(
            req.bytes(),
            hex::decode(q["signedBytesHex"].as_str().unwrap()).unwrap()
        );
        let sig = q["headers"][H_SIGNATURE].as_str().unwrap();
        assert!(req.verify(&node, sig, REQUEST_TIME + 10));
        assert!(!req.verify(&node, sig, REQUEST_TIME + 1000));
        assert!(!req.verify(&plane, sig, REQUEST_TIME));
    }
}
