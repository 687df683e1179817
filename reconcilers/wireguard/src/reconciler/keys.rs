//! WireGuard keys from files: the private key converge generates per interface in
//! `<data-dir>/wireguard/<iface>.key` (0600, directory 0700), and keys held in secrets
//! (`privateKeySecret`, `presharedKeySecret`).

use crate::plan::{KeyInput, SecretKey};
use crate::spec::{PublicKey, WireguardSpec};
use converge_core::fsutil::write_atomic;
use converge_core::SecretSource;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The directory of converge's generated keys (0700), watched by the agent.
pub fn key_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wireguard")
}

/// Where converge keeps the generated private key of `iface`.
pub fn key_path(data_dir: &Path, iface: &str) -> PathBuf {
    key_dir(data_dir).join(format!("{iface}.key"))
}

pub(super) fn make_key_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Errors of the key file helpers.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} does not hold a WireGuard key (base64 of 32 bytes)")]
    Invalid(String),
}

fn parse_key(text: &str) -> Option<SecretKey> {
    PublicKey::from_base64(text.trim()).map(|k| SecretKey(k.0))
}

fn generate() -> SecretKey {
    SecretKey(wireguard_control::Key::generate_private().0)
}

fn read_key(path: &Path) -> Result<Option<SecretKey>, KeyError> {
    match std::fs::read_to_string(path) {
        Ok(t) => parse_key(&t)
            .map(Some)
            .ok_or_else(|| KeyError::Invalid(path.display().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(KeyError::Io {
            path: path.display().to_string(),
            source: e,
        }),
    }
}

fn write_key(path: &Path, key: &SecretKey) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        make_key_dir(dir).map_err(io)?;
    }
    // write_atomic sets the mode on the temp file before the rename: never readable by others.
    write_atomic(
        path,
        format!("{}\n", PublicKey(key.0).to_base64()).as_bytes(),
        0o600,
    )
    .map_err(io)
}

/// Replaces the generated private key of `iface` with a new one (or creates it) and
/// returns the new public key (what `converge wireguard rotate-key` calls). A running
/// agent sees the file change (it watches [`key_dir`]) and sets the key on the interface
/// at once; every peer must learn the new public key before it can handshake again, so
/// the control plane must be told (status and facts report it). A node whose document
/// names a `privateKeySecret` does not use this file: rotate that secret instead.
pub fn rotate_key(data_dir: &Path, iface: &str) -> Result<PublicKey, KeyError> {
    let key = generate();
    write_key(&key_path(data_dir, iface), &key)?;
    Ok(key.public())
}

/// The generated key at `path`, written now if there is none. Read first: a key written
/// since observe (a rotation) is the one to use.
pub(super) fn read_or_generate(path: &Path) -> Result<SecretKey, KeyError> {
    if let Some(k) = read_key(path)? {
        return Ok(k);
    }
    let k = generate();
    write_key(path, &k)?;
    Ok(k)
}

/// When the generated key of `iface` was written (first use or `rotate-key`); `None`
/// without a key file (a key from `privateKeySecret`).
pub(super) fn written_at(data_dir: &Path, iface: &str) -> Option<SystemTime> {
    std::fs::metadata(key_path(data_dir, iface))
        .and_then(|m| m.modified())
        .ok()
}

/// A key held in a secret (local file override, else the sealed value).
pub(super) fn secret_key(
    secrets: &SecretSource,
    name: &str,
) -> Result<Option<SecretKey>, KeyError> {
    match secrets.get(name) {
        Ok(Some(t)) => parse_key(&t)
            .map(Some)
            .ok_or_else(|| KeyError::Invalid(format!("secret {name:?}"))),
        Ok(None) => Ok(None),
        Err(e) => Err(KeyError::Io {
            path: e.path,
            source: e.source,
        }),
    }
}

/// The private key `spec` asks for: its `privateKeySecret`, else the generated key file.
pub(super) fn private_key(
    data_dir: &Path,
    secrets: &SecretSource,
    spec: &WireguardSpec,
) -> KeyInput {
    let read = match &spec.private_key_secret {
        Some(name) => secret_key(secrets, name),
        None => read_key(&key_path(data_dir, &spec.interface)),
    };
    match read {
        Ok(Some(k)) => KeyInput::Ready(k),
        Ok(None) if spec.private_key_secret.is_none() => KeyInput::Missing,
        Ok(None) => KeyInput::Unreadable(format!(
            "{} not found",
            secrets.describe(spec.private_key_secret.as_deref().unwrap_or_default())
        )),
        Err(e) => KeyInput::Unreadable(e.to_string()),
    }
}
