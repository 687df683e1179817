//! Caddy's admin API over its unix socket (HTTP/1.1 on hyper, one connection per call):
//! the configuration with its ETag, a guarded replacement, the upstreams' state.

use super::LoadError;
use crate::plan::{Config, UpstreamStatus};
use bytes::Bytes;
use converge_core::{with_timeout, DriverError};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

/// A read or a small call; a load reloads every app and may wait for listeners.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Client of one admin socket.
#[derive(Clone)]
pub struct Admin {
    socket: PathBuf,
}

/// Sending a request again when Caddy dropped it: how often, how far apart.
const SEND_ATTEMPTS: u32 = 5;
const SEND_RETRY: Duration = Duration::from_millis(50);

/// Why an exchange failed: no response at all (the request may be sent again), or
/// anything else.
enum CallError {
    Unanswered(DriverError),
    Other(DriverError),
}

impl From<DriverError> for CallError {
    fn from(e: DriverError) -> Self {
        CallError::Other(e)
    }
}

/// A response: status, ETag, body.
struct Reply {
    status: StatusCode,
    etag: Option<String>,
    body: Bytes,
}

impl Admin {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// One admin call, sent again when Caddy closed the connection without answering.
    /// Caddy replaces its admin server on every configuration load, and Go's net/http
    /// drops requests on connections the old server accepted but had not read yet
    /// (golang/go#75591), so a call right after a load can meet a closed connection.
    /// Sending again is safe: every call converge makes is idempotent (GET, a whole
    /// configuration replaced under If-Match, a PATCH setting one value).
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        if_match: Option<&str>,
    ) -> Result<Reply, DriverError> {
        let mut attempt = 1;
        loop {
            match self
                .exchange(method.clone(), path, body.clone(), if_match)
                .await
            {
                Ok(reply) => return Ok(reply),
                Err(CallError::Unanswered(e)) if attempt < SEND_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "caddy admin closed the connection unanswered: sending again");
                    attempt += 1;
                    tokio::time::sleep(SEND_RETRY).await;
                }
                Err(CallError::Unanswered(e) | CallError::Other(e)) => return Err(e),
            }
        }
    }

    /// One request on a fresh connection.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        if_match: Option<&str>,
    ) -> Result<Reply, CallError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| {
                // Caddy restarting (or not started yet): look again soon.
                DriverError::Transient(format!("caddy admin socket {}: {e}", self.socket.display()))
            })?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| DriverError::Failed(format!("caddy admin handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "caddy admin connection");
            }
        });
        // An empty Host header: Caddy checks Host against the admin endpoint's allowed
        // origins. For a unix socket, Caddy 2.6 allows only the empty host (a normal
        // Host such as `localhost` gets 403 "host not allowed"; fixed in 2.10), and
        // Go's HTTP server refuses an HTTP/1.1 request without any Host (400). 2.11
        // accepts the empty host as well, so this works on both without touching the
        // admin `origins` of a Caddy converge does not run.
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "");
        if let Some(tag) = if_match {
            req = req.header(hyper::header::IF_MATCH, tag);
        }
        let req = match body {
            Some(b) => req
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(b))),
            None => req.body(Full::new(Bytes::new())),
        }
        .map_err(|e| DriverError::Failed(format!("caddy admin request: {e}")))?;
        let resp = send.send_request(req).await.map_err(|e| {
            CallError::Unanswered(DriverError::Transient(format!("caddy admin {path}: {e}")))
        })?;
        let status = resp.status();
        let etag = resp
            .headers()
            .get(hyper::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| DriverError::Transient(format!("caddy admin {path}: {e}")))?
            .to_bytes();
        Ok(Reply { status, etag, body })
    }

    /// `GET /config/`: the whole configuration (`null` when empty) and its ETag.
    pub async fn get_config(&self) -> Result<Config, DriverError> {
        let r = with_timeout(
            "caddy GET /config/",
            CALL_TIMEOUT,
            self.call(Method::GET, "/config/", None, None),
        )
        .await?;
        if !r.status.is_success() {
            return Err(DriverError::Failed(format!(
                "caddy GET /config/: {} {}",
                r.status,
                error_text(&r.body)
            )));
        }
        let value: Value = serde_json::from_slice(&r.body)
            .map_err(|e| DriverError::Failed(format!("caddy GET /config/: {e}")))?;
        Ok(Config {
            etag: r.etag,
            value,
            standby: None,
            redirected: true,
        })
    }

    /// `POST /config/` with the whole configuration: one reload; Caddy keeps the
    /// previous configuration when it refuses this one. (`/load` would do the same but
    /// ignores If-Match.)
    pub async fn load(&self, config: &Value, etag: Option<&str>) -> Result<(), LoadError> {
        let body = serde_json::to_vec(config)
            .map_err(|e| DriverError::Failed(format!("encode caddy config: {e}")))?;
        let r = with_timeout(
            "caddy POST /config/",
            LOAD_TIMEOUT,
            self.call(Method::POST, "/config/", Some(body), etag),
        )
        .await?;
        match r.status {
            s if s.is_success() => Ok(()),
            StatusCode::PRECONDITION_FAILED => Err(LoadError::Driver(DriverError::Transient(
                "caddy's configuration was changed by someone else meanwhile (412): planning again"
                    .into(),
            ))),
            _ => Err(LoadError::Refused(error_text(&r.body))),
        }
    }

    /// `PATCH path` with `body` (one object by path or `/id/<@id>`): one reload. Used by
    /// the benchmark to compare with converge's single change.
    pub async fn patch(&self, path: &str, body: &Value) -> Result<(), DriverError> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| DriverError::Failed(format!("encode caddy object: {e}")))?;
        let r = with_timeout(
            "caddy PATCH",
            LOAD_TIMEOUT,
            self.call(Method::PATCH, path, Some(bytes), None),
        )
        .await?;
        if r.status.is_success() {
            Ok(())
        } else {
            Err(DriverError::Failed(format!(
                "caddy PATCH {path}: {} {}",
                r.status,
                error_text(&r.body)
            )))
        }
    }

    /// `GET /reverse_proxy/upstreams`.
    pub async fn upstreams(&self) -> Result<Vec<UpstreamStatus>, DriverError> {
        let r = with_timeout(
            "caddy GET /reverse_proxy/upstreams",
            CALL_TIMEOUT,
            self.call(Method::GET, "/reverse_proxy/upstreams", None, None),
        )
        .await?;
        if !r.status.is_success() {
            return Err(DriverError::Failed(format!(
                "caddy GET /reverse_proxy/upstreams: {}",
                r.status
            )));
        }
        serde_json::from_slice::<Option<Vec<UpstreamStatus>>>(&r.body)
            .map(Option::unwrap_or_default)
            .map_err(|e| DriverError::Failed(format!("caddy upstreams: {e}")))
    }
}

/// Caddy's error message from a JSON `{"error": "..."}` body, else the body itself.
fn error_text(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}
