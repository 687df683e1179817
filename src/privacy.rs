//! Private local state: the process umask and core-dump setting, file modes of the
//! stores, the node's redaction key, and who may use the agent socket (SO_PEERCRED).

use anyhow::Context;
use converge_core::fsutil::write_atomic;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Everything the process creates is private unless it says otherwise (files that
/// others must read are written with an explicit mode), whatever the unit's umask;
/// and the process is not dumpable: it holds private keys, so no core file and no
/// ptrace by other users.
pub fn harden_process() {
    // SAFETY: umask and prctl take plain integers and cannot fail in a way that matters.
    unsafe {
        libc::umask(0o077);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// `path` (a SQLite database) and its `-wal`/`-shm` companions, made 0600 where they
/// exist: databases created by an older converge (or under another umask) were 0644.
pub fn make_private(db: &Path) -> std::io::Result<()> {
    let mut paths = vec![db.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        paths.push(PathBuf::from(p));
    }
    for p in paths {
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => r?,
        }
    }
    Ok(())
}

/// `<data-dir>/redaction.key`: 32 random bytes (0600) keying the fingerprints of
/// secrets in diffs, status and logs, created on first use when `create` (the agent;
/// one-shot commands use it when it exists). Installed for this process.
pub fn load_redaction_key(data_dir: &Path, create: bool) -> anyhow::Result<()> {
    let path = data_dir.join("redaction.key");
    let key: [u8; 32] = match std::fs::read(&path) {
        Ok(bytes) => bytes
            .as_slice()
            .try_into()
            .map_err(|_| anyhow::anyhow!("{} is not 32 bytes", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut k = [0u8; 32];
            getrandom::getrandom(&mut k).context("no randomness for the redaction key")?;
            write_atomic(&path, &k, 0o600).with_context(|| format!("write {}", path.display()))?;
            k
        }
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    converge_core::redact::set_key(key);
    Ok(())
}

/// What a client of the agent socket asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Push a document, read the status.
    Operate,
    /// Read a metadata project's entries in full (root only).
    Inspect,
}

/// Who may use the agent socket: root, and the members of `--socket-group` (the socket
/// is then 0660 root:group) for pushes and status.
#[derive(Clone, Debug, Default)]
pub struct SocketAccess {
    group: Option<nix::unistd::Group>,
}

impl SocketAccess {
    /// `group` by name; an unknown group is an error (a typo must not open nothing or
    /// everything silently).
    pub fn new(group: Option<&str>) -> anyhow::Result<Self> {
        let group = match group {
            None => None,
            Some(name) => Some(
                nix::unistd::Group::from_name(name)
                    .with_context(|| format!("look up group {name}"))?
                    .ok_or_else(|| anyhow::anyhow!("--socket-group: no group named {name:?}"))?,
            ),
        };
        Ok(Self { group })
    }

    /// The gid the socket file gets, if any.
    pub fn gid(&self) -> Option<u32> {
        self.group.as_ref().map(|g| g.gid.as_raw())
    }

    /// Whether the peer (`uid`, primary `gid`) may do `what`.
    pub fn allows(&self, uid: u32, gid: u32, what: Access) -> bool {
        if uid == 0 {
            return true;
        }
        let Some(group) = &self.group else {
            return false;
        };
        if what == Access::Inspect {
            return false;
        }
        if gid == group.gid.as_raw() {
            return true;
        }
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .is_some_and(|u| group.mem.contains(&u.name))
    }
}

/// Creates the data directory: 0711, so daemons that drop privileges (dnsmasq, Caddy)
/// can reach their own subdirectory without being able to list the others; everything
/// the agent keeps in it directly (store, keys, socket) is 0600.
pub fn prepare_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("chmod {}", data_dir.display()))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_become_private() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        for p in [&db, &dir.path().join("state.db-wal")] {
            std::fs::write(p, b"x").unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        make_private(&db).unwrap();
        for p in [&db, &dir.path().join("state.db-wal")] {
            let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }

    #[test]
    fn the_process_is_private_and_not_dumpable() {
        harden_process();
        // SAFETY: plain syscalls; the umask and dump flag are put back for other tests.
        let (umask, dumpable) = unsafe {
            let u = libc::umask(0o022);
            let d = libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0);
            libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
            (u, d)
        };
        assert_eq!(umask, 0o077);
        assert_eq!(dumpable, 0);
    }

    #[test]
    fn only_root_without_a_group() {
        let a = SocketAccess::default();
        assert!(a.allows(0, 0, Access::Operate));
        assert!(a.allows(0, 0, Access::Inspect));
        assert!(!a.allows(1000, 1000, Access::Operate));
        let root_group = SocketAccess::new(Some("root")).unwrap();
        assert!(root_group.allows(1000, 0, Access::Operate));
        assert!(!root_group.allows(1000, 0, Access::Inspect));
        assert!(SocketAccess::new(Some("no-such-group-converge")).is_err());
    }
}
