//! The node's keys: an Ed25519 identity key (signs requests to the control plane) and a
//! separate X25519 sealing key (opens the secrets sealed to the node). Both are made on
//! first use, 0600, written atomically, and never leave the node or reach a log.
//!
//! Files (each: base64 of the 32 secret bytes and a newline):
//! - `<data-dir>/identity.key`: Ed25519 seed;
//! - `<data-dir>/sealing.key`: X25519 secret. A separate key rather than one derived from
//!   the Ed25519 seed, so that a signature key is never also used for key agreement.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Key file failures.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} does not hold a key (base64 of 32 bytes)")]
    Invalid(String),
    #[error("{0} is readable by group or others (want mode 0600)")]
    Permissions(String),
}

impl IdentityError {
    /// A key file does not exist (as opposed to unreadable, invalid or too open).
    pub fn is_missing(&self) -> bool {
        matches!(self, IdentityError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// `<data-dir>/identity.key`.
pub fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join("identity.key")
}

/// `<data-dir>/sealing.key`.
pub fn sealing_path(data_dir: &Path) -> PathBuf {
    data_dir.join("sealing.key")
}

/// The node's keys.
pub struct Identity {
    signing: SigningKey,
    sealing: crypto_box::SecretKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Public halves only.
        f.debug_struct("Identity")
            .field("public_key", &self.public_key_b64())
            .field("sealing_key", &self.sealing_key_b64())
            .finish()
    }
}

/// A short, stable id of an Ed25519 public key: the first 16 hex digits of its SHA-256.
pub fn key_id(public: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(public.as_bytes())[..8])
}

/// A public key's fingerprint as operators compare it: `SHA256:` and the unpadded
/// base64 of the SHA-256 of its 32 bytes (the form `ssh-keygen -l` prints).
pub fn fingerprint(public: &VerifyingKey) -> String {
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    format!(
        "SHA256:{}",
        STANDARD_NO_PAD.encode(Sha256::digest(public.as_bytes()))
    )
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads a 32-byte key file; `None` if it does not exist.
pub(crate) fn read_key(path: &Path) -> Result<Option<Zeroizing<[u8; 32]>>, IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(IdentityError::Permissions(path.display().to_string()));
    }
    let bytes = Zeroizing::new(
        B64.decode(text.trim())
            .map_err(|_| IdentityError::Invalid(path.display().to_string()))?,
    );
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        return Err(IdentityError::Invalid(path.display().to_string()));
    }
    key.copy_from_slice(&bytes);
    Ok(Some(key))
}

pub(crate) fn write_key(path: &Path, key: &[u8; 32]) -> Result<(), IdentityError> {
    let text = Zeroizing::new(format!("{}\n", B64.encode(key)));
    converge_core::fsutil::write_atomic(path, text.as_bytes(), 0o600).map_err(io(path))
}

/// Reads a 32-byte secret key file, or makes it (0600) if it does not exist.
pub(crate) fn read_or_make(path: &Path) -> Result<Zeroizing<[u8; 32]>, IdentityError> {
    if let Some(k) = read_key(path)? {
        return Ok(k);
    }
    let mut key = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(key.as_mut());
    write_key(path, &key)?;
    Ok(key)
}

impl Identity {
    /// Loads the node's keys, generating (and saving) whichever is missing.
    pub fn load_or_create(data_dir: &Path) -> Result<Identity, IdentityError> {
        let seed = read_or_make(&identity_path(data_dir))?;
        let sealing = read_or_make(&sealing_path(data_dir))?;
        Ok(Identity::from_bytes(&seed, &sealing))
    }

    /// Loads existing keys only.
    pub fn load(data_dir: &Path) -> Result<Identity, IdentityError> {
        let missing = |p: PathBuf| IdentityError::Io {
            path: p.display().to_string(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let seed =
            read_key(&identity_path(data_dir))?.ok_or_else(|| missing(identity_path(data_dir)))?;
        let sealing =
            read_key(&sealing_path(data_dir))?.ok_or_else(|| missing(sealing_path(data_dir)))?;
        Ok(Identity::from_bytes(&seed, &sealing))
    }

    /// Writes both keys (atomically, 0600), replacing what was there: `join` does so
    /// only once the control plane accepted them.
    pub fn save(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let seed = Zeroizing::new(self.signing.to_bytes());
        let sealing = Zeroizing::new(self.sealing.to_bytes());
        write_key(&identity_path(data_dir), &seed)?;
        write_key(&sealing_path(data_dir), &sealing)
    }

    /// Keys from their secret bytes (tests and the control plane's own signing key).
    pub fn from_bytes(seed: &[u8; 32], sealing: &[u8; 32]) -> Identity {
        Identity {
            signing: SigningKey::from_bytes(seed),
            sealing: crypto_box::SecretKey::from(*sealing),
        }
    }

    /// Random keys that are never written anywhere.
    pub fn ephemeral() -> Identity {
        let mut seed = Zeroizing::new([0u8; 32]);
        let mut sealing = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(seed.as_mut());
        OsRng.fill_bytes(sealing.as_mut());
        Identity::from_bytes(&seed, &sealing)
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    pub fn public_key_b64(&self) -> String {
        B64.encode(self.public_key().as_bytes())
    }

    pub fn key_id(&self) -> String {
        key_id(&self.public_key())
    }

    pub fn sealing_secret(&self) -> &crypto_box::SecretKey {
        &self.sealing
    }

    pub fn sealing_key_b64(&self) -> String {
        B64.encode(self.sealing.public_key().as_bytes())
    }

    /// Signs `message` with the identity key.
    pub fn sign(&self, message: &[u8]) -> ed25519_dalek::Signature {
        self.signing.sign(message)
    }
}

/// Parses a base64 Ed25519 public key.
pub fn parse_public_key(b64: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = B64.decode(b64.trim()).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// Parses a base64 X25519 public key.
pub fn parse_sealing_key(b64: &str) -> Option<crypto_box::PublicKey> {
    let bytes: [u8; 32] = B64.decode(b64.trim()).ok()?.try_into().ok()?;
    Some(crypto_box::PublicKey::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_made_once_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        for p in [identity_path(dir.path()), sealing_path(dir.path())] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(a.sealing_key_b64(), b.sealing_key_b64());
        assert_ne!(a.public_key_b64(), a.sealing_key_b64());
        // Debug never shows secret bytes.
        let seed = std::fs::read_to_string(identity_path(dir.path())).unwrap();
        assert!(!format!("{a:?}").contains(seed.trim()));
        // Saved keys replace the files and load back.
        let c = Identity::ephemeral();
        c.save(dir.path()).unwrap();
        let d = Identity::load(dir.path()).unwrap();
        assert_ne!(a.public_key(), d.public_key());
        assert_eq!(c.public_key(), d.public_key());
        assert_eq!(c.sealing_key_b64(), d.sealing_key_b64());
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path()).unwrap();
        let p = identity_path(dir.path());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Identity::load(dir.path()),
            Err(IdentityError::Permissions(_))
        ));
    }
}
