//! Enrollment (`converge join`): make the node's keys, register the public halves and
//! the host's facts with a one-time token, pin what the control plane answers in
//! `<data-dir>/control.json`.

use super::identity::Identity;
use super::protocol::{ControlConfig, EnrollRequest, EnrollResponse, Facts};
use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use std::path::Path;

/// The host's facts, as reported at enrollment and in status.
pub fn facts(data_dir: &Path, host: &crate::registry::HostOptions, proxy: bool) -> Facts {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let runtime = match host.runtime {
        crate::registry::RuntimeChoice::Podman => "podman",
        crate::registry::RuntimeChoice::Docker => "docker",
        _ if host.podman_socket.exists() => "podman",
        _ if host.docker_socket.exists() => "docker",
        _ => "none",
    };
    Facts {
        hostname: read("/proc/sys/kernel/hostname"),
        arch: std::env::consts::ARCH.to_string(),
        kernel: read("/proc/sys/kernel/osrelease"),
        converge_version: crate::VERSION.to_string(),
        container_runtime: runtime.to_string(),
        wireguard_public_keys: wireguard_keys(data_dir),
        mode: if proxy { "proxy" } else { "worker" }.to_string(),
    }
}

/// Public keys of the generated WireGuard keys (`<data-dir>/wireguard/<iface>.key`).
fn wireguard_keys(data_dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(converge_wireguard::key_dir(data_dir)) else {
        return out;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let (Some(iface), Some("key")) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Some(secret) = B64
            .decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
        else {
            continue;
        };
        // X25519 with the usual clamping: the same public key WireGuard derives.
        let public = crypto_box::SecretKey::from(secret).public_key();
        out.insert(iface.to_string(), B64.encode(public.as_bytes()));
    }
    out
}

/// Options of `converge join`.
pub struct JoinOptions<'a> {
    pub url: &'a str,
    pub token: &'a str,
    pub name: String,
    pub proxy: bool,
    pub force: bool,
    /// PEM certificate(s) to trust for the control plane's HTTPS (pinned in control.json).
    pub ca_pem: Option<String>,
    /// The signing key the plane must answer with (`SHA256:…`); any other is refused.
    pub plane_key: Option<String>,
    /// Allow `http://`: the plane's key then arrives unauthenticated.
    pub insecure_http: bool,
}

/// Enrolls this node; returns the pinned configuration.
pub async fn join(
    data_dir: &Path,
    host: &crate::registry::HostOptions,
    opts: JoinOptions<'_>,
) -> anyhow::Result<ControlConfig> {
    let plain = opts.url.to_ascii_lowercase().starts_with("http://");
    if plain && !opts.insecure_http {
        bail!(
            "refusing to enroll over plain http://: the control plane's signing key would be trusted \
             without authentication; use https:// (with --ca for a private CA), or --insecure-http \
             together with --plane-key on a network you trust"
        );
    }
    if let Some(existing) = ControlConfig::load(data_dir)? {
        if !opts.force {
            bail!(
                "this node is already enrolled as {:?} with {} (use --force to enroll again with new keys)",
                existing.node_id,
                existing.url
            );
        }
    }
    crate::privacy::prepare_data_dir(data_dir)?;
    // New keys live in memory until the control plane accepted them: a refused join
    // leaves no key file, and a refused `--force` leaves the node's old keys working.
    let identity = if opts.force {
        Identity::ephemeral()
    } else {
        match Identity::load(data_dir) {
            Ok(existing) => existing,
            Err(e) if e.is_missing() => Identity::ephemeral(),
            Err(e) => return Err(e.into()),
        }
    };
    let req = EnrollRequest {
        token: opts.token.to_string(),
        name: opts.name,
        public_key: identity.public_key_b64(),
        sealing_key: identity.sealing_key_b64(),
        facts: facts(data_dir, host, opts.proxy),
        nats_key: Some(
            super::nats::nkey(identity.signing_key())
                .map_err(|e| anyhow::anyhow!(e))?
                .0,
        ),
    };
    let base = opts.url.trim_end_matches('/');
    let client =
        super::protocol::http_client(opts.ca_pem.as_deref(), std::time::Duration::from_secs(30))?;
    let resp = client
        .post(format!("{base}/v1/enroll"))
        .json(&req)
        .send()
        .await
        .with_context(|| format!("cannot reach the control plane at {base}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let why = body["error"].as_str().unwrap_or("no reason given");
        bail!("enrollment refused (HTTP {}): {why}", status.as_u16());
    }
    // A short answer (ids and keys); anything larger is not the control plane's.
    let body = super::protocol::read_capped(resp, 64 << 10)
        .await
        .map_err(|e| anyhow::anyhow!("enrollment answer: {e}"))?;
    let answer: EnrollResponse = serde_json::from_slice(&body).context("bad enrollment answer")?;
    let Some(signing) = super::identity::parse_public_key(&answer.signing_key) else {
        bail!("the control plane's signing key is not an Ed25519 public key");
    };
    let fingerprint = super::identity::fingerprint(&signing);
    match &opts.plane_key {
        Some(want) if *want != fingerprint => bail!(
            "the control plane answered with signing key {fingerprint}, not the expected {want}: \
             not enrolled (the plane enrolled this node's keys, which stay unused)"
        ),
        Some(_) => {}
        None if plain => tracing::warn!(
            %fingerprint,
            "enrolled over plain HTTP: compare the control plane's signing key with the one `control-plane serve` printed"
        ),
        None => {}
    }
    let config = ControlConfig {
        url: base.to_string(),
        node_id: answer.node_id,
        signing_key: answer.signing_key,
        transport: answer.transport,
        ca_cert: opts.ca_pem,
        enrolled_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        heartbeat_secs: 15,
    };
    identity.save(data_dir)?;
    config.save(data_dir)?;
    Ok(config)
}
