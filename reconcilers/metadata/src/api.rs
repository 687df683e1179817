//! The read API containers use: `GET /v1/metadata/{path}` and `GET /v1/metadata/?prefix=`,
//! a bearer token per project (its SHA-256 compared in constant time), Consul-style
//! blocking watches (`?index=N&wait=30s`, `X-Converge-Index`), and IMDSv2-like
//! hardening against SSRF through a container's proxied requests: a required header
//! (`Converge-Metadata: true`), `X-Forwarded-For`/`Forwarded` refused, small request
//! limits, a per-token rate limit. Serves the in-memory [`Published`] snapshot only; no
//! token or value is ever logged (project ids and status codes are).

use crate::snapshot::{ProjectData, Published};
use crate::spec::is_entry_path;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Response, StatusCode, Uri};
use axum::routing::get;
use axum::Router;
use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

/// The header every request must carry (a proxied or redirected request made through
/// an SSRF hole in a container rarely can).
pub const REQUIRED_HEADER: &str = "converge-metadata";
/// The index of the project's data a response was taken from.
pub const INDEX_HEADER: &str = "x-converge-index";
/// Longest request URI.
const MAX_URI: usize = 2048;
/// Longest bearer token.
const MAX_TOKEN: usize = 512;
/// Default and longest blocking wait.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Open connections per listener; more are closed at once.
const MAX_CONNECTIONS: usize = 1024;
/// Request head buffer (hyper's minimum): a larger head is refused.
const MAX_HEAD_BYTES: usize = 8192;

/// Token buckets by project id.
#[derive(Default)]
struct RateLimits(Mutex<HashMap<String, (f64, Instant)>>);

impl RateLimits {
    /// Takes one request from the project's bucket (one second's worth of capacity).
    fn allow(&self, id: &str, per_second: u32) -> bool {
        let rate = f64::from(per_second.max(1));
        let now = Instant::now();
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // No allocation on the hot path: the id is copied once per project.
        if !map.contains_key(id) {
            map.insert(id.to_string(), (rate, now));
        }
        let Some((tokens, last)) = map.get_mut(id) else {
            return false;
        };
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct ApiState {
    published: Published,
    limits: RateLimits,
}

/// The API: the router over the published snapshot and the listeners serving it.
pub struct Server {
    state: Arc<ApiState>,
    router: Router,
    listeners: Mutex<BTreeMap<SocketAddr, JoinHandle<()>>>,
}

impl Server {
    pub fn new(published: Published) -> Server {
        let state = Arc::new(ApiState {
            published,
            limits: RateLimits::default(),
        });
        let router = router(state.clone());
        Server {
            state,
            router,
            listeners: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn published(&self) -> &Published {
        &self.state.published
    }

    /// The router, for tests that call it without a socket.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Addresses with a live accept loop.
    pub fn listening(&self) -> BTreeSet<SocketAddr> {
        let mut map = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, task| !task.is_finished());
        map.keys().copied().collect()
    }

    /// Binds `addr` and serves on it (needs a tokio runtime).
    pub fn listen(&self, addr: SocketAddr) -> std::io::Result<()> {
        let listener = bind(addr)?;
        let router = self.router.clone();
        let task = tokio::spawn(accept_loop(listener, router, addr));
        let old = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, task);
        if let Some(old) = old {
            old.abort();
        }
        info!(%addr, "metadata API listening");
        Ok(())
    }

    /// Stops serving on `addr`: its listener and open connections close.
    pub fn unlisten(&self, addr: SocketAddr) {
        if let Some(task) = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr)
        {
            task.abort();
            info!(%addr, "metadata API stopped listening");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for task in self
            .listeners
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            task.abort();
        }
    }
}

/// A listening socket with IP_FREEBIND: a container network's gateway address exists
/// only once the runtime has created the bridge, which may be after this pass.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use std::os::fd::AsRawFd;
    let (socket, level, opt) = match addr {
        SocketAddr::V4(_) => (TcpSocket::new_v4()?, libc::SOL_IP, libc::IP_FREEBIND),
        SocketAddr::V6(_) => (TcpSocket::new_v6()?, libc::SOL_IPV6, libc::IPV6_FREEBIND),
    };
    socket.set_reuseaddr(true)?;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int of the given length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            opt,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(listener: TcpListener, router: Router, addr: SocketAddr) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    // Connections live in this set: aborting the loop (unlisten) drops and closes them.
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: pause instead of spinning.
                warn!(%addr, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if conns.len() >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(router.clone());
        conns.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(MAX_HEAD_BYTES)
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = conn.await;
        });
    }
}

fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/metadata/", get(list))
        .route("/v1/metadata/{*path}", get(entry))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn json(status: StatusCode, body: Bytes, index: u64) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(INDEX_HEADER, HeaderValue::from(index));
    r
}

/// Query parameters of a read.
#[derive(Debug, Default, PartialEq)]
struct Query {
    prefix: Option<String>,
    index: Option<u64>,
    wait: Option<Duration>,
}

/// `30s`, `1m`, `500ms`, or plain seconds.
fn parse_wait(s: &str) -> Option<Duration> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        _ => return None,
    };
    Some(d.min(MAX_WAIT))
}

fn parse_query(q: Option<&str>) -> Result<Query, &'static str> {
    let mut out = Query::default();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            // Paths are plain ASCII: nothing to percent-decode.
            "prefix"
                if v.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-/".contains(&c)) =>
            {
                out.prefix = Some(v.to_string())
            }
            "prefix" => return Err("invalid prefix"),
            "index" => out.index = Some(v.parse().map_err(|_| "invalid index")?),
            "wait" => out.wait = Some(parse_wait(v).ok_or("invalid wait (e.g. 30s, 1m)")?),
            _ => return Err("unknown query parameter"),
        }
    }
    Ok(out)
}

/// Why a request is refused: its status and message.
type Refusal = (StatusCode, &'static str);

/// The checks every request passes, in order: refused outright (403), size (413/414),
/// who is asking (401), how often (429). Returns the token's project.
fn admit(state: &ApiState, headers: &HeaderMap, uri: &Uri) -> Result<Arc<ProjectData>, Refusal> {
    if headers.contains_key("x-forwarded-for") || headers.contains_key(header::FORWARDED) {
        return Err((StatusCode::FORBIDDEN, "forwarded requests are refused"));
    }
    if headers.get(REQUIRED_HEADER).map(|v| v.as_bytes()) != Some(b"true") {
        return Err((
            StatusCode::FORBIDDEN,
            "missing header Converge-Metadata: true",
        ));
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Err((StatusCode::PAYLOAD_TOO_LARGE, "requests have no body"));
    }
    let uri_len = uri.path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > MAX_URI {
        return Err((StatusCode::URI_TOO_LONG, "request URI too long"));
    }
    let Some(auth) = headers.get(header::AUTHORIZATION) else {
        return Err((StatusCode::UNAUTHORIZED, "missing bearer token"));
    };
    let token = auth.as_bytes().strip_prefix(b"Bearer ").filter(|t| {
        !t.is_empty() && t.len() <= MAX_TOKEN && t.iter().all(|c| c.is_ascii_graphic())
    });
    let Some(token) = token else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "malformed Authorization header (want: Bearer <token>)",
        ));
    };
    let hash: [u8; 32] = Sha256::digest(token).into();
    let project = find(&state.published.current().projects, &hash);
    let Some(project) = project else {
        return Err((StatusCode::UNAUTHORIZED, "unknown token"));
    };
    if !state.limits.allow(&project.id, project.rate_limit) {
        debug!(project = %project.id, "rate limited");
        return Err((StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded"));
    }
    Ok(project)
}

/// The project whose token hash is `hash`: every project is compared, in constant time
/// each, so the time taken does not depend on which one (if any) matched.
fn find(
    projects: &BTreeMap<String, Arc<ProjectData>>,
    hash: &[u8; 32],
) -> Option<Arc<ProjectData>> {
    let mut found = None;
    for p in projects.values() {
        if bool::from(p.token_sha256.ct_eq(hash)) {
            found = Some(p.clone());
        }
    }
    found
}

/// Waits while the project's index is still `index` (at most `wait`); returns the
/// project as it is then (`None`: the token's project is gone).
async fn watch(
    state: &ApiState,
    project: Arc<ProjectData>,
    index: u64,
    wait: Duration,
) -> Option<Arc<ProjectData>> {
    let mut rx = state.published.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    let mut current = Some(project);
    loop {
        {
            let snap = rx.borrow_and_update();
            let hash = current.as_ref().map(|p| p.token_sha256);
            current = hash.and_then(|h| find(&snap.projects, &h));
        }
        match &current {
            Some(p) if p.index == index => {}
            _ => return current,
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return current,
        }
    }
}

/// Admission, query, then the watch if one was asked for.
async fn prepare(
    state: &ApiState,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(Arc<ProjectData>, Query), Refusal> {
    let project = admit(state, headers, uri)?;
    let query = parse_query(uri.query()).map_err(|m| (StatusCode::BAD_REQUEST, m))?;
    let project = match query.index {
        Some(i) => watch(state, project, i, query.wait.unwrap_or(DEFAULT_WAIT))
            .await
            .ok_or((StatusCode::UNAUTHORIZED, "unknown token"))?,
        None => project,
    };
    Ok((project, query))
}

// The request is taken whole (not the `HeaderMap`/`Uri` extractors): those clone the
// headers and URI of every request.
async fn entry(
    State(state): State<Arc<ApiState>>,
    UrlPath(path): UrlPath<String>,
    req: Request,
) -> Response<Body> {
    let (project, query) = match prepare(&state, req.headers(), req.uri()).await {
        Ok(p) => p,
        Err((status, message)) => return error(status, message),
    };
    if query.prefix.is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "prefix is for listings (/v1/metadata/?prefix=)",
        );
    }
    if !is_entry_path(&path) {
        return error(StatusCode::BAD_REQUEST, "invalid path");
    }
    match project.entries.get(&path) {
        Some(v) => json(StatusCode::OK, v.clone(), project.index),
        None => {
            let mut r = error(StatusCode::NOT_FOUND, "no entry at this path");
            r.headers_mut()
                .insert(INDEX_HEADER, HeaderValue::from(project.index));
            r
        }
    }
}

async fn list(State(state): State<Arc<ApiState>>, req: Request) -> Response<Body> {
    let (project, query) = match prepare(&state, req.headers(), req.uri()).await {
        Ok(p) => p,
        Err((status, message)) => return error(status, message),
    };
    let prefix = query.prefix.unwrap_or_default();
    let mut out = BytesMut::with_capacity(256);
    out.put_u8(b'{');
    let mut first = true;
    for (k, v) in project
        .entries
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
    {
        if !first {
            out.put_u8(b',');
        }
        first = false;
        // Paths are plain ASCII without quotes or backslashes: no escaping needed.
        out.put_u8(b'"');
        out.put_slice(k.as_bytes());
        out.put_slice(b"\":");
        out.put_slice(v);
    }
    out.put_u8(b'}');
    json(StatusCode::OK, out.freeze(), project.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_wait_parsing() {
        assert_eq!(parse_wait("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_wait("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_wait("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_wait("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_wait("1h"), None);
        assert_eq!(parse_wait("99999m"), Some(MAX_WAIT));
        let q = parse_query(Some("prefix=db/&index=4&wait=1s")).unwrap();
        assert_eq!(q.prefix.as_deref(), Some("db/"));
        assert_eq!(q.index, Some(4));
        assert!(parse_query(Some("prefix=%2e%2e")).is_err());
        assert!(parse_query(Some("other=1")).is_err());
        assert!(parse_query(None).unwrap() == Query::default());
    }

    #[test]
    fn rate_limit_holds_one_second() {
        let l = RateLimits::default();
        assert!(l.allow("a", 2) && l.allow("a", 2));
        assert!(!l.allow("a", 2));
        assert!(l.allow("b", 2), "buckets are per project");
    }
}
