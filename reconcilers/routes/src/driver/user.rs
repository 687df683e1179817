//! The unprivileged system user converge runs its Caddy pair as (managed mode), and the
//! ownership that takes: Caddy needs no root (it listens on the high internal ports
//! behind the nf_tables redirect), so it gets only what it must write — its
//! certificate storage (`<caddy>/data`, `<caddy>/config`) and its instance directory
//! (`<caddy>/<a|b>`: pid file, admin socket) — while `<caddy>` itself stays root's, 0711,
//! and what the agent writes there stays root's, 0600 (logs; the empty drain marker is
//! 0640 with Caddy's group, as Caddy's `file` matcher reads it; the agent reaches
//! Caddy's directories as root). The user must exist: a missing user is an
//! error naming the fix, never a silent fallback to root; `root` may be chosen
//! explicitly (`--caddy-user root`), with a warning.

use converge_core::DriverError;
use std::ffi::CString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// The user `install/setup.sh --proxy` creates (`useradd --system`).
pub const DEFAULT_USER: &str = "converge-caddy";

/// Who Caddy runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// `name`'s uid and primary gid from the passwd database; `None` when there is no such
/// user.
pub fn lookup(name: &str) -> Result<Option<RunAs>, DriverError> {
    let c = CString::new(name)
        .map_err(|_| DriverError::Failed(format!("invalid user name {name:?}")))?;
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        // SAFETY: a zeroed passwd is a valid out-parameter; getpwnam_r writes into it and
        // into `buf` (of the given length) and sets `found` to it or to null.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                c.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(DriverError::io(
                format!("look up user {name}"),
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        return Ok((!found.is_null()).then(|| RunAs {
            name: name.to_string(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        }));
    }
}

/// The user to run Caddy as: `None` runs it as the agent's own user (the agent is not
/// root, so there is nothing to drop; or `root` was chosen explicitly).
pub fn resolve(name: &str) -> Result<Option<RunAs>, DriverError> {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    if name == "root" {
        tracing::warn!(
            "caddy runs as root (--caddy-user root): a compromised Caddy owns the host; \
             create the system user {DEFAULT_USER} (install/setup.sh --proxy) instead"
        );
        return Ok(None);
    }
    match lookup(name)? {
        Some(u) if u.uid == 0 => Ok(None),
        Some(u) => Ok(Some(u)),
        None => Err(DriverError::Failed(format!(
            "caddy user {name:?} does not exist: create it with `useradd --system --no-create-home \
             --home-dir /nonexistent --shell /usr/sbin/nologin {name}` (install/setup.sh --proxy \
             does), or pass --caddy-user root to run Caddy as root (not recommended)"
        ))),
    }
}

/// Whether `user` may search (traverse) a directory with this metadata (its
/// supplementary groups are dropped when Caddy starts, so only the primary group counts).
fn can_traverse(user: &RunAs, m: &std::fs::Metadata) -> bool {
    let mode = m.mode();
    if m.uid() == user.uid {
        mode & 0o100 != 0
    } else if m.gid() == user.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// Fails, naming the directory, when `user` cannot reach `dir` (every parent must be
/// searchable by it); Caddy would otherwise fail later with a bare "permission denied".
pub fn check_reachable(user: &RunAs, dir: &Path) -> Result<(), DriverError> {
    for parent in dir.ancestors().skip(1) {
        let Ok(m) = std::fs::metadata(parent) else {
            continue;
        };
        if !can_traverse(user, &m) {
            return Err(DriverError::Failed(format!(
                "caddy user {} cannot reach {}: {} is mode {:04o} (owner uid {}); make it \
                 searchable (e.g. chmod o+x {}) or use another --data-dir",
                user.name,
                dir.display(),
                parent.display(),
                m.mode() & 0o7777,
                m.uid(),
                parent.display()
            )));
        }
    }
    Ok(())
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DriverError + 'a {
    move |e| DriverError::io(format!("{what} {}", path.display()), e)
}

/// Creates `dir` (and parents) with `mode` if missing, then sets `mode` on it.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), DriverError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io_err("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", dir))
}

/// Gives `path` and everything below it to `user` (symlinks themselves, never their
/// targets); entries it owns already are left alone.
pub fn chown_tree(path: &Path, user: &RunAs) -> Result<(), DriverError> {
    let m = std::fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    if m.uid() != user.uid || m.gid() != user.gid {
        std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
            .map_err(io_err("chown", path))?;
    }
    if m.is_dir() {
        for entry in std::fs::read_dir(path).map_err(io_err("list", path))? {
            let entry = entry.map_err(io_err("list", path))?;
            chown_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_root_and_not_a_made_up_user() {
        let root = lookup("root").expect("passwd").expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(lookup("converge-no-such-user-x").expect("passwd"), None);
        assert!(lookup("nul\0name").is_err());
    }

    #[test]
    fn a_missing_user_is_an_error_naming_the_fix() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let e = resolve("converge-no-such-user-x").expect_err("missing user");
        assert!(e.to_string().contains("useradd --system"), "{e}");
        assert_eq!(resolve("root").expect("root"), None);
    }

    #[test]
    fn traversal_is_checked_per_parent() {
        let user = RunAs {
            name: "u".into(),
            uid: 4242,
            gid: 4242,
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        let inner = tmp.path().join("x/caddy");
        std::fs::create_dir_all(&inner).expect("mkdir");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::set_permissions(tmp.path().join("x"), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let e = check_reachable(&user, &inner.join("a")).expect_err("x is 0700");
        assert!(e.to_string().contains("/x is mode 0700"), "{e}");
        std::fs::set_permissions(tmp.path().join("x"), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        // The tempdir's own parents (/tmp) are searchable by everyone.
        check_reachable(&user, &inner.join("a")).expect("reachable");
    }
}
