//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz) and for the replay of their
//! corpus in the test suite (`tests/fuzz_corpus.rs`): each takes untrusted bytes the
//! way the agent does and must never panic, whatever they are.

use crate::document::{self, Format};
use crate::limits::Limits;
use std::sync::OnceLock;

/// A document as the agent gets it (file, socket, control plane): size and encoding
/// checks, limits, the typed parse, the schema pass and the semantic rules. The first
/// byte picks the format (odd: YAML).
pub fn document(data: &[u8]) {
    let format = match data.first() {
        Some(b) if b % 2 == 1 => Format::Yaml,
        _ => Format::Json,
    };
    let _ = document::parse_bytes(
        data.get(1..).unwrap_or_default(),
        format,
        &Limits::default(),
    );
}

/// A key pair fixed for the process: the plane key the envelope target verifies against.
fn plane_key() -> &'static ed25519_dalek::SigningKey {
    static KEY: OnceLock<ed25519_dalek::SigningKey> = OnceLock::new();
    KEY.get_or_init(|| ed25519_dalek::SigningKey::from_bytes(&[7; 32]))
}

/// A control-plane envelope as a node receives it: the JSON, the signature check against
/// the pinned key, the node and generation checks, then the document it carries.
pub fn envelope(data: &[u8]) {
    use crate::control::envelope::Envelope;
    let Ok(env) = Envelope::parse(data) else {
        return;
    };
    let _ = env.verify(&plane_key().verifying_key(), "fuzz-node", Some(1));
    // A validly signed envelope cannot come out of the fuzzer; sign what it made, so
    // the document and rotation paths past the signature are reached too.
    if let Ok(doc) =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &env.document)
    {
        if let Ok(signed) = Envelope::sign(
            plane_key(),
            &env.node_id,
            env.generation,
            &env.issued_at,
            &doc,
        ) {
            if let Ok(bytes) = signed.verify(&plane_key().verifying_key(), &env.node_id, None) {
                let _ = document::parse_bytes(&bytes, Format::Json, &Limits::default());
            }
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
    })
}

/// A request on the agent's socket: the header line, and for a push the document after
/// it, read with the agent's own framing and limits.
pub fn socket_request(data: &[u8]) {
    runtime().block_on(async {
        let mut reader = tokio::io::BufReader::new(data);
        let Ok(Ok(request)) = crate::agent::read_request(&mut reader).await else {
            return;
        };
        if let crate::agent::Request::Push { yaml } = request {
            let limits = Limits::default();
            if let Ok(bytes) = crate::limits::read_document_async(&mut reader, &limits).await {
                let format = if yaml { Format::Yaml } else { Format::Json };
                let _ = document::parse_bytes(&bytes, format, &limits);
            }
        }
    });
}

/// The metadata API's router with one project (token `fuzz`) holding a few entries.
fn metadata_router() -> &'static axum::Router {
    static ROUTER: OnceLock<axum::Router> = OnceLock::new();
    ROUTER.get_or_init(|| {
        use converge_metadata::snapshot::{ProjectData, Published};
        use sha2::Digest as _;
        let published = Published::new();
        let token = hex::encode(sha2::Sha256::digest(b"fuzz"));
        let mut project = ProjectData::new("p", &token, 1_000_000, 3);
        for path in ["a", "a/b", "config/db"] {
            project
                .entries
                .insert(path.into(), bytes::Bytes::from_static(b"\"v\""));
        }
        let mut projects = std::collections::BTreeMap::new();
        projects.insert("p".to_string(), std::sync::Arc::new(project));
        published.replace_all(projects);
        converge_metadata::api::Server::new(published).router()
    })
}

/// A request to the metadata API: the first line is the request target (path and
/// query), each further line a `name: value` header; the project's token and the
/// required header are added unless the input sets its own.
pub fn metadata_request(data: &[u8]) {
    use tower_service::Service as _;
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let target = lines.next().unwrap_or_default();
    let mut builder = axum::http::Request::builder().uri(target);
    let mut own_auth = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            own_auth |= name.eq_ignore_ascii_case("authorization");
            builder = builder.header(name.trim(), value.trim());
        }
    }
    if !own_auth {
        builder = builder
            .header("authorization", "Bearer fuzz")
            .header("converge-metadata", "true");
    }
    let Ok(request) = builder.body(axum::body::Body::empty()) else {
        return;
    };
    let mut router = metadata_router().clone();
    runtime().block_on(async {
        // A watch on the current index waits up to its `wait`: cut it short.
        let _ =
            tokio::time::timeout(std::time::Duration::from_millis(20), router.call(request)).await;
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_entry_point_takes_good_and_bad_input() {
        super::document(b"\x00{\"apiVersion\": \"converge/v1\"}");
        super::document(b"\x01apiVersion: [");
        super::envelope(b"{\"version\": 1}");
        super::socket_request(b"{\"op\": \"push\", \"yaml\": false}\n{}");
        super::metadata_request(b"/v1/metadata/a/b?index=3&wait=1s");
        super::metadata_request(b"/v1/metadata/%ff%00../x\nx-forwarded-for: 1.2.3.4");
    }
}
