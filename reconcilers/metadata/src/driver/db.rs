//! The metadata database, `<data-dir>/metadata.db` (SQLite, WAL): projects,
//! their entries, a global write counter that numbers every project write (the index
//! watches compare), and the listen addresses (so a restarted agent serves at once).
//!
//! A project's write is one transaction: readers of the database never see two
//! generations mixed. The database holds nothing the document does not: a file deleted
//! or edited by hand is found by the next pass and rewritten.

use crate::plan::{ProjectWrite, StoredProject};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The schema, one migration per version (`converge_core::sqlite::migrate`: `PRAGMA
/// user_version` counts those that ran). Append only.
const MIGRATIONS: &[&str] = &[
    // 1: projects, entries, listen addresses, the write counter.
    "CREATE TABLE projects(id TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL,
         rate_limit INTEGER NOT NULL, idx INTEGER NOT NULL) WITHOUT ROWID;
     CREATE TABLE entries(project TEXT NOT NULL, path TEXT NOT NULL,
         value TEXT NOT NULL, PRIMARY KEY(project, path)) WITHOUT ROWID;
     CREATE TABLE listen(addr TEXT PRIMARY KEY) WITHOUT ROWID;
     CREATE TABLE counter(id INTEGER PRIMARY KEY CHECK (id = 0),
         value INTEGER NOT NULL);
     INSERT INTO counter(id, value) VALUES (0, 0);",
];

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("metadata database {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("metadata database {path}: {context}: {source}")]
    Io {
        path: String,
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "metadata database {path}: schema version {found} is newer than this build's {}",
        MIGRATIONS.len()
    )]
    TooNew { path: String, found: i64 },
}

impl From<DbError> for converge_core::DriverError {
    fn from(e: DbError) -> Self {
        converge_core::DriverError::Failed(e.to_string())
    }
}

struct Open {
    conn: Connection,
    /// Device and inode of the file opened: a file deleted or replaced by hand is
    /// reopened (a connection would keep writing to the unlinked inode).
    id: (u64, u64),
}

/// The database, opened on first use and reopened when its file changed identity.
pub struct Db {
    path: PathBuf,
    conn: Mutex<Option<Open>>,
    /// Highest index seen: a recreated database continues from it, so indexes never go
    /// back while this process runs.
    last_index: AtomicU64,
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Db {
    pub fn new(path: impl Into<PathBuf>) -> Db {
        Db {
            path: path.into(),
            conn: Mutex::new(None),
            last_index: AtomicU64::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sqlite(&self, source: rusqlite::Error) -> DbError {
        DbError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Open>> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open connection, (re)opening the file when needed.
    fn conn(&self) -> Result<MutexGuard<'_, Option<Open>>, DbError> {
        let mut guard = self.lock();
        let current = file_id(&self.path);
        if guard.as_ref().is_some_and(|o| Some(o.id) != current) {
            // Close first: closing checkpoints into the old inode and removes the WAL,
            // so a new file never picks up the old file's log.
            *guard = None;
        }
        if guard.is_none() {
            *guard = Some(self.open()?);
        }
        Ok(guard)
    }

    fn open(&self) -> Result<Open, DbError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |context, source| DbError::Io {
            path: self.path.display().to_string(),
            context,
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("create directory", e))?;
        }
        let mut conn = Connection::open(&self.path).map_err(|e| self.sqlite(e))?;
        // Values are the projects' own data: readable by root only (the API is the way in).
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("chmod", e))?;
        // NORMAL is durable enough: the document (in state.db, FULL) is the source of
        // truth and a lost last transaction is rewritten by the next pass.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;",
        )
        .map_err(|e| self.sqlite(e))?;
        self.migrate(&mut conn)?;
        let id = file_id(&self.path).ok_or_else(|| {
            io(
                "stat",
                std::io::Error::new(std::io::ErrorKind::NotFound, "vanished after open"),
            )
        })?;
        Ok(Open { conn, id })
    }

    fn migrate(&self, conn: &mut Connection) -> Result<(), DbError> {
        let found = converge_core::sqlite::migrate(conn, MIGRATIONS).map_err(|e| self.sqlite(e))?;
        if found > MIGRATIONS.len() {
            return Err(DbError::TooNew {
                path: self.path.display().to_string(),
                found: i64::try_from(found).unwrap_or(i64::MAX),
            });
        }
        if found == 0 {
            // A new file continues from the highest index this process has seen, so
            // indexes never go back (a deleted database is recreated).
            let seed = i64::try_from(self.last_index.load(Ordering::Relaxed)).unwrap_or(0);
            conn.execute("UPDATE counter SET value = ?1 WHERE id = 0", [seed])
                .map_err(|e| self.sqlite(e))?;
        }
        Ok(())
    }

    fn seen(&self, index: u64) {
        self.last_index.fetch_max(index, Ordering::Relaxed);
    }

    /// Every stored project with its entries.
    pub fn read_all(&self) -> Result<BTreeMap<String, StoredProject>, DbError> {
        // Reading never creates the file (`converge diff` changes nothing); the first
        // write does.
        if file_id(&self.path).is_none() {
            *self.lock() = None;
            return Ok(BTreeMap::new());
        }
        let guard = self.conn()?;
        let Some(open) = guard.as_ref() else {
            return Ok(BTreeMap::new());
        };
        let e = |e| self.sqlite(e);
        let mut out = BTreeMap::new();
        let mut stmt = open
            .conn
            .prepare("SELECT id, token_sha256, rate_limit, idx FROM projects")
            .map_err(e)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(e)?;
        for row in rows {
            let (id, token, rate, idx) = row.map_err(e)?;
            let index = u64::try_from(idx).unwrap_or(0);
            self.seen(index);
            out.insert(
                id,
                StoredProject {
                    token_sha256: token,
                    rate_limit: u32::try_from(rate).unwrap_or(0),
                    index,
                    entries: BTreeMap::new(),
                },
            );
        }
        let mut stmt = open
            .conn
            .prepare("SELECT project, path, value FROM entries")
            .map_err(e)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(e)?;
        for row in rows {
            let (project, path, value) = row.map_err(e)?;
            match out.get_mut(&project) {
                Some(p) => {
                    p.entries.insert(path, Arc::from(value));
                }
                // An entry without its project (edited by hand): shown as a project
                // with an impossible hash, so the plan rewrites or removes it.
                None => {
                    out.insert(
                        project,
                        StoredProject {
                            token_sha256: String::new(),
                            rate_limit: 0,
                            index: 0,
                            entries: BTreeMap::from([(path, Arc::from(value))]),
                        },
                    );
                }
            }
        }
        Ok(out)
    }

    /// Applies one project's write in one transaction; returns the project's new index.
    pub fn write(&self, w: &ProjectWrite) -> Result<u64, DbError> {
        let mut guard = self.conn()?;
        let Some(open) = guard.as_mut() else {
            return Err(self.sqlite(rusqlite::Error::InvalidQuery));
        };
        let e = |e| self.sqlite(e);
        let tx = open.conn.transaction().map_err(e)?;
        let index: i64 = tx
            .query_row(
                "UPDATE counter SET value = value + 1 WHERE id = 0 RETURNING value",
                [],
                |r| r.get(0),
            )
            .map_err(e)?;
        tx.execute(
            "INSERT OR REPLACE INTO projects(id, token_sha256, rate_limit, idx) VALUES (?1, ?2, ?3, ?4)",
            params![w.id, w.token_sha256, w.rate_limit, index],
        )
        .map_err(e)?;
        {
            let mut del = tx
                .prepare("DELETE FROM entries WHERE project = ?1 AND path = ?2")
                .map_err(e)?;
            for path in &w.delete {
                del.execute(params![w.id, path]).map_err(e)?;
            }
            let mut put = tx
                .prepare("INSERT OR REPLACE INTO entries(project, path, value) VALUES (?1, ?2, ?3)")
                .map_err(e)?;
            for (path, value) in &w.set {
                put.execute(params![w.id, path, &**value]).map_err(e)?;
            }
        }
        tx.commit().map_err(e)?;
        let index = u64::try_from(index).unwrap_or(0);
        self.seen(index);
        Ok(index)
    }

    /// Removes a project and its entries in one transaction.
    pub fn remove(&self, id: &str) -> Result<(), DbError> {
        let mut guard = self.conn()?;
        let Some(open) = guard.as_mut() else {
            return Ok(());
        };
        let e = |e| self.sqlite(e);
        let tx = open.conn.transaction().map_err(e)?;
        tx.execute("DELETE FROM entries WHERE project = ?1", [id])
            .map_err(e)?;
        tx.execute("DELETE FROM projects WHERE id = ?1", [id])
            .map_err(e)?;
        tx.commit().map_err(e)
    }

    /// The listen addresses recorded by the last serving process.
    pub fn listen_addrs(&self) -> Result<BTreeSet<SocketAddr>, DbError> {
        if file_id(&self.path).is_none() {
            return Ok(BTreeSet::new());
        }
        let guard = self.conn()?;
        let Some(open) = guard.as_ref() else {
            return Ok(BTreeSet::new());
        };
        let e = |e| self.sqlite(e);
        let mut stmt = open.conn.prepare("SELECT addr FROM listen").map_err(e)?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(e)?;
        let mut out = BTreeSet::new();
        for row in rows {
            if let Ok(a) = row.map_err(e)?.parse() {
                out.insert(a);
            }
        }
        Ok(out)
    }

    /// Records (`true`) or forgets a listen address.
    pub fn set_listen(&self, addr: SocketAddr, on: bool) -> Result<(), DbError> {
        let guard = self.conn()?;
        let Some(open) = guard.as_ref() else {
            return Ok(());
        };
        let sql = if on {
            "INSERT OR IGNORE INTO listen(addr) VALUES (?1)"
        } else {
            "DELETE FROM listen WHERE addr = ?1"
        };
        open.conn
            .execute(sql, [addr.to_string()])
            .map_err(|e| self.sqlite(e))?;
        Ok(())
    }
}

/// Reads one project for an operator (`converge metadata inspect`), read-only, without
/// creating anything: `None` when the database or the project does not exist.
pub fn inspect(path: &Path, id: &str) -> Result<Option<StoredProject>, DbError> {
    if !path.exists() {
        return Ok(None);
    }
    let err = |source| DbError::Sqlite {
        path: path.display().to_string(),
        source,
    };
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(err)?;
    let head = conn
        .query_row(
            "SELECT token_sha256, rate_limit, idx FROM projects WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            },
        )
        .optional()
        .map_err(err)?;
    let Some((token, rate, idx)) = head else {
        return Ok(None);
    };
    let mut stmt = conn
        .prepare("SELECT path, value FROM entries WHERE project = ?1")
        .map_err(err)?;
    let mut entries = BTreeMap::new();
    for row in stmt
        .query_map([id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(err)?
    {
        let (p, v) = row.map_err(err)?;
        entries.insert(p, Arc::from(v));
    }
    Ok(Some(StoredProject {
        token_sha256: token,
        rate_limit: u32::try_from(rate).unwrap_or(0),
        index: u64::try_from(idx).unwrap_or(0),
        entries,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(id: &str, set: &[(&str, &str)], delete: &[&str]) -> ProjectWrite {
        ProjectWrite {
            id: id.into(),
            token_sha256: "ab".repeat(32),
            rate_limit: 10,
            set: set
                .iter()
                .map(|(k, v)| (k.to_string(), Arc::from(*v)))
                .collect(),
            delete: delete.iter().map(|d| d.to_string()).collect(),
            entries: BTreeMap::new(),
        }
    }

    #[test]
    fn writes_swap_entries_and_indexes_only_grow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m/metadata.db");
        let db = Db::new(&path);
        assert_eq!(
            db.write(&write("a", &[("x", "1"), ("y", "2")], &[]))
                .unwrap(),
            1
        );
        assert_eq!(db.write(&write("a", &[("x", "3")], &["y"])).unwrap(), 2);
        let all = db.read_all().unwrap();
        assert_eq!(all["a"].index, 2);
        assert_eq!(all["a"].entries.len(), 1);
        assert_eq!(&*all["a"].entries["x"], "3");
        let seen = inspect(&path, "a").unwrap().unwrap();
        assert_eq!(seen, all["a"]);
        // Deleted by hand: recreated on next use, indexes continue.
        std::fs::remove_file(&path).unwrap();
        assert!(db.read_all().unwrap().is_empty());
        assert_eq!(db.write(&write("a", &[("x", "3")], &[])).unwrap(), 3);
        db.set_listen("127.0.0.1:8500".parse().unwrap(), true)
            .unwrap();
        assert_eq!(db.listen_addrs().unwrap().len(), 1);
        db.remove("a").unwrap();
        assert!(db.read_all().unwrap().is_empty());
        assert!(inspect(&path, "a").unwrap().is_none());
    }

    #[test]
    fn a_database_of_every_earlier_version_is_upgraded_with_its_data() {
        for k in 0..MIGRATIONS.len() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("metadata.db");
            {
                // As a converge of schema version k left it (0: an empty file).
                let c = converge_core::sqlite::at_version(&path, MIGRATIONS, k).unwrap();
                if k >= 1 {
                    c.execute_batch(
                        "INSERT INTO projects VALUES ('a', 'cd', 5, 7);
                         INSERT INTO entries VALUES ('a', 'x', '\"v\"');
                         INSERT INTO listen VALUES ('127.0.0.1:8500');
                         UPDATE counter SET value = 7;",
                    )
                    .unwrap();
                }
            }
            let db = Db::new(&path);
            let all = db.read_all().unwrap();
            {
                let guard = db.conn().unwrap();
                let conn = &guard.as_ref().unwrap().conn;
                assert_eq!(
                    converge_core::sqlite::version(conn).unwrap(),
                    MIGRATIONS.len() as i64,
                    "from version {k}"
                );
            }
            if k >= 1 {
                assert_eq!((all["a"].index, all["a"].rate_limit), (7, 5));
                assert_eq!(&*all["a"].entries["x"], "\"v\"");
                assert_eq!(db.listen_addrs().unwrap().len(), 1);
                // The counter survived: the next write continues from it.
                assert_eq!(db.write(&write("a", &[("x", "1")], &[])).unwrap(), 8);
            } else {
                assert!(all.is_empty());
                assert_eq!(db.write(&write("a", &[("x", "1")], &[])).unwrap(), 1);
            }
        }
    }

    #[test]
    fn a_database_of_a_newer_build_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1)
            .unwrap();
        let db = Db::new(&path);
        assert!(matches!(db.read_all(), Err(DbError::TooNew { .. })));
        let c = Connection::open(&path).unwrap();
        assert_eq!(
            converge_core::sqlite::version(&c).unwrap(),
            MIGRATIONS.len() as i64 + 1
        );
    }
}
