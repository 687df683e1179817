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

/// Whether `name` is a temp name of [`write_atomic`]: `.NAME.tmp.` and 16 hex digits.
fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && name.rsplit_once(".tmp.").is_some_and(|(_, r)| {
            r.len() == 16
                && r.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// Removes what [`write_atomic`] leaves when its process dies between creating its
/// temp file and the rename (kill -9): files below `dir` named as its temp files and
/// last modified before `before` (symlinks are not followed). Returns how many. For a
/// process that owns `dir` alone and has not written yet (the agent at its start).
pub fn remove_stale_temps(dir: &Path, before: std::time::SystemTime) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let Ok(meta) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        if meta.is_dir() {
            removed += remove_stale_temps(&e.path(), before);
        } else if meta.is_file()
            && is_temp_name(&e.file_name().to_string_lossy())
            && meta.modified().is_ok_and(|m| m < before)
            && fs::remove_file(e.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
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
    fn stale_temps_of_interrupted_writes_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("dns/hosts");
        fs::create_dir_all(&sub).unwrap();
        let stale = [
            dir.path().join(".state.json.tmp.0123456789abcdef"),
            sub.join(".converge.hosts.tmp.6bccae9761665b5d"),
        ];
        let kept = [
            dir.path().join("converge.hosts"),
            dir.path().join(".x.tmp.notahexname00"),
            dir.path().join("y.tmp"),
            sub.join(".z.tmp.0123456789abcde"),
        ];
        for p in stale.iter().chain(&kept) {
            fs::write(p, b"x").unwrap();
        }
        // A link named like a temp file is not followed (nor removed: not a file).
        std::os::unix::fs::symlink(
            dir.path().join("y.tmp"),
            sub.join(".l.tmp.0123456789abcdef"),
        )
        .unwrap();
        let before = std::time::SystemTime::now() + std::time::Duration::from_secs(1);
        assert_eq!(remove_stale_temps(dir.path(), before), 2);
        assert!(stale.iter().all(|p| !p.exists()));
        assert!(kept.iter().all(|p| p.exists()));
        // A temp file newer than `before` (a write under way) is left alone.
        let fresh = dir.path().join(".f.tmp.0123456789abcdef");
        fs::write(&fresh, b"x").unwrap();
        let long_ago = std::time::SystemTime::UNIX_EPOCH;
        assert_eq!(remove_stale_temps(dir.path(), long_ago), 0);
        assert!(fresh.exists());
    }

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
