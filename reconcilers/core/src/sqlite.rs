//! The one migration rule of converge's SQLite stores (`state.db`, `metadata.db`, the
//! plane's `control-plane.db`): `PRAGMA user_version` counts the migrations that ran,
//! and a store's migrations are an ordered list of SQL batches that only grows.

use rusqlite::{Connection, TransactionBehavior};

/// Brings a database to the newest schema: runs the `migrations` it has not run yet
/// (`PRAGMA user_version` = how many ran), each in its own transaction with the version
/// bump, so an interrupted upgrade resumes where it stopped. The version is read under
/// the write lock: two processes opening a new database at once (the agent starting,
/// `converge status` reading the store meanwhile) never both run a migration.
///
/// Returns the version the database had before, which may be above
/// `migrations.len()` (written by a newer build): nothing is run then, and the caller
/// decides whether it can use such a database.
pub fn migrate(conn: &mut Connection, migrations: &[&str]) -> rusqlite::Result<usize> {
    let mut found = None;
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let done: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        // A negative version is no version this rule wrote: treat it as newer.
        let done_n = usize::try_from(done).unwrap_or(usize::MAX);
        let before = *found.get_or_insert(done_n);
        let Some(sql) = migrations.get(done_n) else {
            return Ok(before);
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", done + 1)?;
        tx.commit()?;
    }
}

/// Turns `conn`'s database to WAL. Several processes doing it at once to a new database
/// (the agent starting while `converge status` opens the store) can deadlock on the
/// journal's locks, and SQLite answers BUSY at once to all but one of them rather than
/// through the busy timeout: those try again, up to about 5 s.
pub fn set_wal(conn: &Connection) -> rusqlite::Result<()> {
    for _ in 0..250 {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
    conn.pragma_update(None, "journal_mode", "WAL")
}

/// A database at `path` as a build of schema version `k` left it: the first `k`
/// migrations run, the version set (for each store's upgrade-from-every-version test).
pub fn at_version(
    path: &std::path::Path,
    migrations: &[&str],
    k: usize,
) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    for sql in &migrations[..k.min(migrations.len())] {
        c.execute_batch(sql)?;
    }
    c.pragma_update(None, "user_version", k as i64)?;
    Ok(c)
}

/// The version a database is at (`PRAGMA user_version`).
pub fn version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &[&str] = &[
        "CREATE TABLE t (a INTEGER NOT NULL);",
        "ALTER TABLE t ADD COLUMN b TEXT NOT NULL DEFAULT 'x';",
        "CREATE INDEX t_b ON t (b);",
    ];

    #[test]
    fn runs_what_has_not_run_in_order_and_reports_the_version_found() {
        for k in 0..=M.len() {
            let mut c = Connection::open_in_memory().unwrap();
            assert_eq!(migrate(&mut c, &M[..k]).unwrap(), 0);
            if k > 0 {
                c.execute("INSERT INTO t (a) VALUES (7)", []).unwrap();
            }
            assert_eq!(migrate(&mut c, M).unwrap(), k);
            assert_eq!(version(&c).unwrap(), M.len() as i64);
            c.execute("INSERT INTO t (a, b) VALUES (1, 'y')", [])
                .unwrap();
            let rows: i64 = c
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(rows, if k > 0 { 2 } else { 1 });
            // Again: nothing runs.
            assert_eq!(migrate(&mut c, M).unwrap(), M.len());
        }
    }

    #[test]
    fn a_failed_migration_leaves_the_version_before_it() {
        let mut c = Connection::open_in_memory().unwrap();
        let bad = [M[0], "ALTER TABLE nope ADD COLUMN z;"];
        assert!(migrate(&mut c, &bad).is_err());
        assert_eq!(version(&c).unwrap(), 1);
        assert_eq!(migrate(&mut c, M).unwrap(), 1);
        assert_eq!(version(&c).unwrap(), 3);
    }

    #[test]
    fn a_newer_database_is_left_alone() {
        let mut c = Connection::open_in_memory().unwrap();
        c.pragma_update(None, "user_version", 9).unwrap();
        assert_eq!(migrate(&mut c, M).unwrap(), 9);
        assert_eq!(version(&c).unwrap(), 9);
    }
}
