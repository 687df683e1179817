//! The read API containers use: `GET /v1/metadata/{path}` and `GET /v1/metadata/?prefix=`,
//! a bearer token per project (its SHA-256 compared in constant time), Consul-style
//! blocking watches (`?index=N&wait=30s`, `X-Converge-Index`), and IMDSv2-like
//! hardening against SSRF through a container's proxied requests: a required header
//! (`Converge-Metadata: true`), `X-Forwarded-For`/`Forwarded`/`X-Real-IP`/`Via`
//! refused, one `Authorization` header only, small request limits. Isolation between
//! projects: open connections capped per source address (the project is not known
//! before the request arrives), and per project a token-bucket rate limit that every
//! parked watch draws on while it is held, a cap on parked watches and one on
//! requests in flight; beyond its share a client gets 503 (connections) or 429 (requests)
//! while other projects keep being served. Serves the in-memory [`Published`] snapshot
//! only; no token or value is ever logged (project ids and status codes are).

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
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
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
/// Open connections per listener; more are refused (503). Well above
/// [`MAX_CONNECTIONS_PER_SOURCE`], so one source's flood meets its own cap first.
pub const MAX_CONNECTIONS: usize = 4096;
/// Open connections from one source address, across every listener; more are refused
/// (503 and closed). The project is unknown when a connection is accepted (the token
/// comes with the request), so this is the connection-level share; a container has one
/// address.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 256;
/// Watches one project may have parked at once (and never more than its `rateLimit`,
/// since each parked watch holds one request per second of it); more get 429.
pub const MAX_WATCHES_PER_PROJECT: u32 = 64;
/// Requests of one project being answered at once, parked watches included; more get 429.
pub const MAX_IN_FLIGHT_PER_PROJECT: u32 = 128;
/// Connections being refused at once (each gets its 503 and up to this long to read
/// it); beyond that a refused connection is simply closed.
const MAX_REFUSING: usize = 256;
const REFUSE_LINGER: Duration = Duration::from_secs(1);
/// The answer to a connection over its source's (or the listener's) share.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 37\r\n\r\n{\"error\":\"too many open connections\"}";
/// Request head buffer (hyper's minimum): a larger head is refused.
const MAX_HEAD_BYTES: usize = 8192;

/// One project's share: its token bucket, its parked watches and requests in flight.
struct Share {
    tokens: f64,
    last: Instant,
    parked: u32,
    in_flight: u32,
}

impl Share {
    /// Refills the bucket for the time since the last look: `rate` per second, less
    /// one per parked watch (a held watch counts as a request per second).
    fn refill(&mut self, rate: f64, now: Instant) {
        let net = (rate - f64::from(self.parked)).max(0.0);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * net).min(rate);
        self.last = now;
    }
}

/// Every project's share, by project id.
#[derive(Default)]
struct Limits(Mutex<HashMap<String, Share>>);

/// Why a project's request is refused by [`Limits`].
#[derive(Debug, PartialEq)]
enum OverShare {
    Rate,
    InFlight,
    Watches,
}

impl OverShare {
    fn refusal(&self) -> Refusal {
        let message = match self {
            OverShare::Rate => "rate limit exceeded",
            OverShare::InFlight => "too many requests in flight for this project",
            OverShare::Watches => "too many parked watches for this project",
        };
        (StatusCode::TOO_MANY_REQUESTS, message)
    }
}

impl Limits {
    fn with<T>(&self, id: &str, per_second: u32, f: impl FnOnce(&mut Share, f64) -> T) -> T {
        let rate = f64::from(per_second.max(1));
        let now = Instant::now();
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // No allocation on the hot path: the id is copied once per project.
        if !map.contains_key(id) {
            map.insert(
                id.to_string(),
                Share {
                    tokens: rate,
                    last: now,
                    parked: 0,
                    in_flight: 0,
                },
            );
        }
        let mut spare = Share {
            tokens: 0.0,
            last: now,
            parked: 0,
            in_flight: 0,
        };
        // Always found (inserted above); `spare` only spares an unwrap.
        let share = map.get_mut(id).unwrap_or(&mut spare);
        share.refill(rate, now);
        f(share, rate)
    }

    /// Takes one request from the project's bucket (one second's worth of capacity).
    #[cfg(test)]
    fn allow(&self, id: &str, per_second: u32) -> bool {
        self.with(id, per_second, |s, _| {
            let ok = s.tokens >= 1.0;
            if ok {
                s.tokens -= 1.0;
            }
            ok
        })
    }

    /// Admits one request of the project: a token, then a place among its requests in
    /// flight; the place is held until the returned [`Slot`] is dropped.
    fn admit(self: &Arc<Self>, id: &str, per_second: u32) -> Result<Slot, OverShare> {
        self.with(id, per_second, |s, _| {
            if s.tokens < 1.0 {
                return Err(OverShare::Rate);
            }
            s.tokens -= 1.0;
            if s.in_flight >= MAX_IN_FLIGHT_PER_PROJECT {
                return Err(OverShare::InFlight);
            }
            s.in_flight += 1;
            Ok(())
        })?;
        Ok(Slot {
            limits: self.clone(),
            id: id.to_string(),
            rate: per_second,
            parked: false,
        })
    }
}

/// One admitted request's place in its project's share; parked while it waits as a
/// watch. Dropping it (the answer is sent, or the client left) gives both back.
struct Slot {
    limits: Arc<Limits>,
    id: String,
    rate: u32,
    parked: bool,
}

impl Slot {
    /// Parks this request as a watch, if the project has room for one more.
    fn park(&mut self) -> Result<(), OverShare> {
        if self.parked {
            return Ok(());
        }
        self.limits.with(&self.id, self.rate, |s, rate| {
            let cap = MAX_WATCHES_PER_PROJECT.min(rate as u32);
            if s.parked >= cap {
                return Err(OverShare::Watches);
            }
            s.parked += 1;
            Ok(())
        })?;
        self.parked = true;
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let parked = self.parked;
        self.limits.with(&self.id, self.rate, |s, _| {
            s.in_flight = s.in_flight.saturating_sub(1);
            if parked {
                s.parked = s.parked.saturating_sub(1);
            }
        });
    }
}

/// Open connections by source address, across every listener of the server.
#[derive(Default)]
struct Sources(Mutex<HashMap<IpAddr, usize>>);

impl Sources {
    /// One more connection from `ip`, unless it has its share open already.
    fn open(self: &Arc<Self>, ip: IpAddr) -> Option<SourceGuard> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceGuard {
            sources: self.clone(),
            ip,
        })
    }
}

/// A connection counted against its source; uncounted when the connection ends.
struct SourceGuard {
    sources: Arc<Sources>,
    ip: IpAddr,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut map = self.sources.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

struct ApiState {
    published: Published,
    limits: Arc<Limits>,
}

/// The API: the router over the published snapshot and the listeners serving it.
pub struct Server {
    state: Arc<ApiState>,
    router: Router,
    sources: Arc<Sources>,
    listeners: Mutex<BTreeMap<SocketAddr, JoinHandle<()>>>,
}

impl Server {
    pub fn new(published: Published) -> Server {
        let state = Arc::new(ApiState {
            published,
            limits: Arc::default(),
        });
        let router = router(state.clone());
        Server {
            state,
            router,
            sources: Arc::default(),
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
        let task = tokio::spawn(accept_loop(listener, router, addr, self.sources.clone()));
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

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    addr: SocketAddr,
    sources: Arc<Sources>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    // Connections live in this set: aborting the loop (unlisten) drops and closes them.
    let mut conns = JoinSet::new();
    let mut refusing = JoinSet::new();
    loop {
        let accepted = listener.accept().await;
        // Reaped after the wait, so the counts below are current.
        while conns.try_join_next().is_some() {}
        while refusing.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: pause instead of spinning.
                warn!(%addr, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let guard = match sources.open(peer.ip()) {
            Some(g) if conns.len() < MAX_CONNECTIONS => g,
            _ => {
                if refusing.len() < MAX_REFUSING {
                    refusing.spawn(refuse(stream));
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(router.clone());
        conns.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(MAX_HEAD_BYTES)
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = conn.await;
            drop(guard);
        });
    }
}

/// Answers a connection over its share with 503 and closes it once the client has
/// read it (closing with its request unread would reset the connection and could
/// lose the answer).
async fn refuse(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    converge_core::observe::request("metadata", 503);
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        stream.write_all(REFUSED).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 1024];
        while stream.read(&mut buf).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/metadata/", get(list))
        .route("/v1/metadata/{*path}", get(entry))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
        .layer(axum::middleware::map_response(counted))
}

/// Counts every answer by status (`converge_core::observe`; the agent's metrics).
async fn counted(r: Response<Body>) -> Response<Body> {
    converge_core::observe::request("metadata", r.status().as_u16());
    r
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

/// Headers a proxy adds: a request carrying one came through a proxy (an SSRF hole)
/// rather than from a container itself.
const PROXY_HEADERS: [&str; 4] = ["x-forwarded-for", "forwarded", "x-real-ip", "via"];

/// The token of an `Authorization: Bearer <token>` value; the scheme is
/// case-insensitive (RFC 7235), followed by one or more spaces.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let start = rest.iter().position(|c| *c != b' ')?;
    let token = &rest[start..];
    (token.len() <= MAX_TOKEN && token.iter().all(|c| c.is_ascii_graphic())).then_some(token)
}

/// The checks every request passes, in order: refused outright (403), size (413/414),
/// who is asking (400 for two `Authorization` headers, 401), how often and how much
/// at once (429). Returns the token's project and the request's place in its share.
fn admit(
    state: &ApiState,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(Arc<ProjectData>, Slot), Refusal> {
    if PROXY_HEADERS.iter().any(|h| headers.contains_key(*h)) {
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
    let mut auths = headers.get_all(header::AUTHORIZATION).iter();
    let Some(auth) = auths.next() else {
        return Err((StatusCode::UNAUTHORIZED, "missing bearer token"));
    };
    if auths.next().is_some() {
        // Which one would a proxy in front have checked? Refused rather than guessed.
        return Err((
            StatusCode::BAD_REQUEST,
            "more than one Authorization header",
        ));
    }
    let Some(token) = bearer_token(auth.as_bytes()) else {
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
    match state.limits.admit(&project.id, project.rate_limit) {
        Ok(slot) => Ok((project, slot)),
        Err(over) => {
            debug!(project = %project.id, ?over, "over its share");
            Err(over.refusal())
        }
    }
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

/// Admission, query, then the watch if one was asked for (parked in the project's
/// share only when it has to wait). The [`Slot`] is held until the answer is built.
async fn prepare(
    state: &ApiState,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(Arc<ProjectData>, Query, Slot), Refusal> {
    let (project, mut slot) = admit(state, headers, uri)?;
    let query = parse_query(uri.query()).map_err(|m| (StatusCode::BAD_REQUEST, m))?;
    let project = match query.index {
        Some(i) => {
            if project.index == i {
                slot.park().map_err(|over| {
                    debug!(project = %project.id, ?over, "over its share");
                    over.refusal()
                })?;
            }
            watch(state, project, i, query.wait.unwrap_or(DEFAULT_WAIT))
                .await
                .ok_or((StatusCode::UNAUTHORIZED, "unknown token"))?
        }
        None => project,
    };
    Ok((project, query, slot))
}

// The request is taken whole (not the `HeaderMap`/`Uri` extractors): those clone the
// headers and URI of every request.
async fn entry(
    State(state): State<Arc<ApiState>>,
    UrlPath(path): UrlPath<String>,
    req: Request,
) -> Response<Body> {
    let (project, query, _slot) = match prepare(&state, req.headers(), req.uri()).await {
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
    let (project, query, _slot) = match prepare(&state, req.headers(), req.uri()).await {
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
    fn bearer_scheme_is_case_insensitive() {
        for ok in [
            &b"Bearer tok"[..],
            b"bearer tok",
            b"BEARER tok",
            b"bEaReR   tok",
        ] {
            assert_eq!(bearer_token(ok), Some(&b"tok"[..]), "{ok:?}");
        }
        for bad in [
            &b"Bearertok"[..],
            b"Bearer ",
            b"Bearer\ttok",
            b"Basic tok",
            b"Bear tok",
            b"Bearer to k",
            b"",
        ] {
            assert_eq!(bearer_token(bad), None, "{bad:?}");
        }
        assert_eq!(
            bearer_token(&[b"Bearer ".as_slice(), &[b'a'; 513]].concat()),
            None
        );
    }

    #[test]
    fn parked_watches_draw_on_the_rate_and_are_capped() {
        let l = Arc::new(Limits::default());
        // Rate 3: three watches park (each took a token), a fourth request finds the
        // bucket empty, and nothing refills while the whole rate is held by watches.
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut s = l.admit("w", 3).expect("admitted");
            s.park().expect("parked");
            held.push(s);
        }
        assert!(matches!(l.admit("w", 3), Err(OverShare::Rate)));
        std::thread::sleep(Duration::from_millis(400));
        assert!(matches!(l.admit("w", 3), Err(OverShare::Rate)));
        held.clear();
        std::thread::sleep(Duration::from_millis(400));
        assert!(l.admit("w", 3).is_ok(), "refilled once the watches ended");

        // At most MAX_WATCHES_PER_PROJECT parked however high the rate.
        let mut held = Vec::new();
        for _ in 0..MAX_WATCHES_PER_PROJECT {
            let mut s = l.admit("many", 1000).expect("admitted");
            s.park().expect("parked");
            held.push(s);
        }
        let mut one_more = l.admit("many", 1000).expect("a plain request still passes");
        assert_eq!(one_more.park(), Err(OverShare::Watches));
        // Requests in flight, parked ones included, are capped too.
        let mut flying = Vec::new();
        while let Ok(s) = l.admit("many", 1000) {
            flying.push(s);
        }
        assert_eq!(
            held.len() + flying.len() + 1,
            MAX_IN_FLIGHT_PER_PROJECT as usize
        );
        assert!(l.admit("other", 1000).is_ok(), "shares are per project");
    }

    #[test]
    fn connections_are_capped_per_source() {
        let s = Arc::new(Sources::default());
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let open: Vec<SourceGuard> = (0..MAX_CONNECTIONS_PER_SOURCE)
            .map(|_| s.open(a).expect("under the cap"))
            .collect();
        assert!(s.open(a).is_none());
        assert!(s.open(b).is_some(), "other sources are not affected");
        drop(open);
        assert!(s.open(a).is_some());
        let text = std::str::from_utf8(REFUSED).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let want = format!("content-length: {}", body.len());
        assert!(head.split("\r\n").any(|l| l == want), "{head}");
    }

    #[test]
    fn rate_limit_holds_one_second() {
        let l = Limits::default();
        assert!(l.allow("a", 2) && l.allow("a", 2));
        assert!(!l.allow("a", 2));
        assert!(l.allow("b", 2), "buckets are per project");
    }
}
