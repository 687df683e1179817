//! Durable agent state in SQLite (WAL): documents by generation, the last good one,
//! per-reconciler status, and an event journal. Migrations follow
//! `converge_core::sqlite::migrate` (`PRAGMA user_version`).

use crate::status::ReconcilerStatus;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("store: corrupt record: {0}")]
    Corrupt(String),
    #[error("generation {offered} refused: not newer than the accepted generation {current}")]
    Stale { offered: u64, current: u64 },
}

/// How many documents are kept (the last good one is always among them).
const KEEP_DOCUMENTS: i64 = 20;
/// How many journal events are kept.
const KEEP_EVENTS: i64 = 10_000;

const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE documents (
        generation INTEGER PRIMARY KEY,
        received_at TEXT NOT NULL,
        body TEXT NOT NULL
     );
     CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE status (
        reconciler TEXT PRIMARY KEY,
        applied_generation INTEGER,
        body TEXT NOT NULL
     );
     CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        reconciler TEXT NOT NULL,
        object TEXT NOT NULL,
        message TEXT NOT NULL
     );",
    // 2: why and from which generation each journal event came.
    "ALTER TABLE events ADD COLUMN reason TEXT NOT NULL DEFAULT '';
     ALTER TABLE events ADD COLUMN generation INTEGER;",
];

/// One row of the event journal: what changed (`object`, `message`), why (`reason`:
/// the pass's trigger), when (`at`), from which document (`generation`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// Increasing; `converge events --follow` asks for events after the last it saw.
    #[serde(default)]
    pub id: i64,
    pub at: String,
    pub reconciler: String,
    pub object: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        id: r.get(0)?,
        at: r.get(1)?,
        reconciler: r.get(2)?,
        object: r.get(3)?,
        message: r.get(4)?,
        reason: r.get(5)?,
        generation: r
            .get::<_, Option<i64>>(6)?
            .and_then(|g| u64::try_from(g).ok()),
    })
}

const EVENT_COLUMNS: &str = "id, at, reconciler, object, message, reason, generation";

/// Handle on the SQLite database.
pub struct Store {
    conn: Connection,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Store {
    /// Opens (creating and migrating as needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL + FULL: a committed transaction survives kill -9 and power loss.
        converge_core::sqlite::set_wal(&conn)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // A small page cache: the agent reads the store rarely (start-up, status).
        conn.pragma_update(None, "cache_size", -512)?;
        // It holds env values, metadata entries, export URLs: root's only.
        crate::privacy::make_private(path).map_err(|e| {
            StoreError::Corrupt(format!("cannot make {} private: {e}", path.display()))
        })?;
        let mut store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        // A newer build's database is used as it is (a rolled-back update keeps its
        // state): its migrations only ever add.
        converge_core::sqlite::migrate(&mut self.conn, MIGRATIONS)?;
        Ok(())
    }

    /// Schema version after migrations.
    pub fn version(&self) -> Result<usize, StoreError> {
        let v: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        usize::try_from(v).map_err(|_| StoreError::Corrupt(format!("user_version {v}")))
    }

    /// Highest generation accepted so far.
    pub fn current_generation(&self) -> Result<Option<u64>, StoreError> {
        let v: Option<String> = self
            .conn
            .query_row("SELECT value FROM state WHERE key = 'last_good'", [], |r| {
                r.get(0)
            })
            .optional()?;
        v.map(|s| {
            s.parse()
                .map_err(|_| StoreError::Corrupt(format!("last_good = {s:?}")))
        })
        .transpose()
    }

    /// Records a validated document as the new last good one, in one transaction.
    /// Refuses a generation that is not newer than the current one (stale or replayed).
    pub fn accept(&mut self, generation: u64, body: &str) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let current: Option<String> = tx
            .query_row("SELECT value FROM state WHERE key = 'last_good'", [], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(current) = current.and_then(|s| s.parse::<u64>().ok()) {
            if generation <= current {
                return Err(StoreError::Stale {
                    offered: generation,
                    current,
                });
            }
        }
        let g = i64::try_from(generation)
            .map_err(|_| StoreError::Corrupt(format!("generation {generation} too large")))?;
        tx.execute(
            "INSERT OR REPLACE INTO documents (generation, received_at, body) VALUES (?1, ?2, ?3)",
            params![g, now(), body],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO state (key, value) VALUES ('last_good', ?1)",
            params![generation.to_string()],
        )?;
        tx.execute(
            "DELETE FROM documents WHERE generation NOT IN
               (SELECT generation FROM documents ORDER BY generation DESC LIMIT ?1)",
            params![KEEP_DOCUMENTS],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A small named value of agent state (e.g. the control-plane connection).
    pub fn put_state(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO state (key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        Ok(())
    }

    /// A value saved with [`Store::put_state`].
    pub fn get_state(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM state WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The last good document's generation and text.
    pub fn last_good(&self) -> Result<Option<(u64, String)>, StoreError> {
        let Some(g) = self.current_generation()? else {
            return Ok(None);
        };
        let gi = i64::try_from(g).map_err(|_| StoreError::Corrupt(format!("generation {g}")))?;
        let body: Option<String> = self
            .conn
            .query_row(
                "SELECT body FROM documents WHERE generation = ?1",
                params![gi],
                |r| r.get(0),
            )
            .optional()?;
        match body {
            Some(b) => Ok(Some((g, b))),
            None => Err(StoreError::Corrupt(format!("document {g} missing"))),
        }
    }

    /// Generations of the stored documents, newest first.
    pub fn generations(&self) -> Result<Vec<u64>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT generation FROM documents ORDER BY generation DESC")?;
        let rows = st.query_map([], |r| r.get::<_, i64>(0))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(
                u64::try_from(r?).map_err(|_| StoreError::Corrupt("negative generation".into()))?,
            );
        }
        Ok(out)
    }

    /// Saves one reconciler's status.
    pub fn put_status(&mut self, s: &ReconcilerStatus) -> Result<(), StoreError> {
        let body = serde_json::to_string(s).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let applied = s.observed_generation.and_then(|g| i64::try_from(g).ok());
        self.conn.execute(
            "INSERT OR REPLACE INTO status (reconciler, applied_generation, body) VALUES (?1, ?2, ?3)",
            params![s.reconciler, applied, body],
        )?;
        Ok(())
    }

    /// All saved statuses, by reconciler name.
    pub fn statuses(&self) -> Result<Vec<ReconcilerStatus>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT body FROM status ORDER BY reconciler")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            let body = r?;
            out.push(serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// Appends events to the journal in one transaction, trimming old ones.
    pub fn journal(
        &mut self,
        reconciler: &str,
        entries: &[(String, String)],
    ) -> Result<(), StoreError> {
        self.journal_why(reconciler, "", None, entries)
    }

    /// [`Store::journal`], recording why the pass ran and its document's generation.
    pub fn journal_why(
        &mut self,
        reconciler: &str,
        reason: &str,
        generation: Option<u64>,
        entries: &[(String, String)],
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare(
                "INSERT INTO events (at, reconciler, object, message, reason, generation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let at = now();
            let generation = generation.and_then(|g| i64::try_from(g).ok());
            for (object, message) in entries {
                st.execute(params![at, reconciler, object, message, reason, generation])?;
            }
        }
        tx.execute(
            "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?1",
            params![KEEP_EVENTS],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The newest `limit` events, newest first.
    pub fn events(&self, limit: usize) -> Result<Vec<Event>, StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {EVENT_COLUMNS} FROM events ORDER BY id DESC LIMIT ?1"
        ))?;
        let rows = st.query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], event_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Up to `limit` events with an id above `after`, oldest first (`events --follow`).
    pub fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))?;
        let rows = st.query_map(
            params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
            event_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// SQLite's own consistency check; `ok` when healthy.
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_opening_a_new_store_at_once_migrate_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let opened: Vec<Result<usize, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        Store::open(&path)
                            .and_then(|st| st.version())
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in opened {
            assert_eq!(r, Ok(MIGRATIONS.len()));
        }
    }

    #[test]
    fn generations_only_move_forward_and_old_documents_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("db")).unwrap();
        assert_eq!(s.version().unwrap(), MIGRATIONS.len());
        assert_eq!(s.last_good().unwrap(), None);
        for g in 1..=30 {
            s.accept(g, &format!("doc {g}")).unwrap();
        }
        assert!(matches!(
            s.accept(30, "replay"),
            Err(StoreError::Stale { .. })
        ));
        assert!(matches!(s.accept(3, "old"), Err(StoreError::Stale { .. })));
        assert_eq!(s.last_good().unwrap(), Some((30, "doc 30".into())));
        assert_eq!(s.generations().unwrap().len(), KEEP_DOCUMENTS as usize);
        drop(s);
        // Reopening does not re-run migrations or lose data.
        let s = Store::open(&dir.path().join("db")).unwrap();
        assert_eq!(s.current_generation().unwrap(), Some(30));
        assert_eq!(s.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn journal_keeps_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("db")).unwrap();
        s.journal(
            "dns",
            &[("a".into(), "one".into()), ("b".into(), "two".into())],
        )
        .unwrap();
        let ev = s.events(10).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].object, "b");
        s.journal_why("dns", "resync", Some(7), &[("c".into(), "create".into())])
            .unwrap();
        let newer = s.events_after(ev[0].id, 10).unwrap();
        assert_eq!(newer.len(), 1);
        assert_eq!(
            (newer[0].object.as_str(), newer[0].reason.as_str()),
            ("c", "resync")
        );
        assert_eq!(newer[0].generation, Some(7));
        assert!(s.events_after(newer[0].id, 10).unwrap().is_empty());
    }

    #[test]
    fn a_store_of_every_earlier_version_is_upgraded_with_its_data() {
        for k in 0..MIGRATIONS.len() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.db");
            {
                // As a converge of schema version k left it.
                let c = converge_core::sqlite::at_version(&path, MIGRATIONS, k).unwrap();
                if k >= 1 {
                    c.execute(
                        "INSERT INTO documents (generation, received_at, body) VALUES (4, 'then', 'doc 4')",
                        [],
                    )
                    .unwrap();
                    c.execute(
                        "INSERT INTO state (key, value) VALUES ('last_good', '4')",
                        [],
                    )
                    .unwrap();
                    c.execute(
                        "INSERT INTO events (at, reconciler, object, message) VALUES ('then', 'dns', 'a', 'old')",
                        [],
                    )
                    .unwrap();
                }
            }
            let mut s = Store::open(&path).unwrap();
            assert_eq!(s.version().unwrap(), MIGRATIONS.len(), "from version {k}");
            if k >= 1 {
                assert_eq!(
                    s.last_good().unwrap(),
                    Some((4, "doc 4".into())),
                    "from version {k}"
                );
                let ev = s.events(10).unwrap();
                assert_eq!(ev.len(), 1);
                assert_eq!((ev[0].message.as_str(), ev[0].reason.as_str()), ("old", ""));
                assert_eq!(ev[0].generation, None);
            }
            // The newest schema is in place: events carry why and which generation.
            s.journal_why("dns", "resync", Some(5), &[("b".into(), "new".into())])
                .unwrap();
            let ev = s.events(10).unwrap();
            assert_eq!(
                (ev[0].reason.as_str(), ev[0].generation),
                ("resync", Some(5))
            );
            assert_eq!(s.integrity_check().unwrap(), "ok");
        }
    }
}
