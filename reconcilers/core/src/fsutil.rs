//! Crash-safe file writes: temp file in the same directory, fsync, rename, fsync dir.
//! The temp file has an unpredictable name and is created with `O_EXCL|O_NOFOLLOW`, so
//! nobody can plant a link or a file where it will be written.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Atomically replaces `path` with `contents` and the given permission `mode`.
///
/// Readers see either the old or the new file, never a partial one, and the new
/// content is on disk before the rename makes it visible. The temp name starts with a
/// dot so directory watchers that skip dotfiles (dnsmasq's `--hostsdir`) ignore it.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut random = [0u8; 8];
    getrandom::getrandom(&mut random).map_err(io::Error::other)?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        hex::encode(random)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        // The umask may have narrowed the mode given at creation.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a file, mapping "not found" to `None`.
pub fn read_optional(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_content_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(read_optional(&p).unwrap().as_deref(), Some("two"));
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // The temp name cannot be guessed: a link planted at the old pid-based name
        // is neither followed nor written through.
        let planted = dir.path().join(format!(".f.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(dir.path().join("victim"), &planted).unwrap();
        write_atomic(&p, b"three", 0o600).unwrap();
        assert!(!dir.path().join("victim").exists());
        assert_eq!(read_optional(&p).unwrap().as_deref(), Some("three"));
        assert_eq!(read_optional(&dir.path().join("missing")).unwrap(), None);
    }
}
