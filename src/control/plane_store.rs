//! The reference control plane's records (SQLite, `<data>/control-plane.db`): one-time
//! registration tokens (only their SHA-256 is kept), enrolled nodes, and each node's last
//! status and refusal.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::Path;

/// Control-plane store failures.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error("control-plane store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("unknown registration token")]
    UnknownToken,
    #[error("registration token already used")]
    UsedToken,
    #[error("registration token expired")]
    ExpiredToken,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
  hash TEXT PRIMARY KEY, expires_at INTEGER NOT NULL, used_by TEXT
);
CREATE TABLE IF NOT EXISTS nodes (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, public_key TEXT NOT NULL,
  sealing_key TEXT NOT NULL, facts TEXT NOT NULL, enrolled_at TEXT NOT NULL,
  nats_password TEXT, last_seen TEXT, accepted_generation INTEGER,
  converged_generation INTEGER, status TEXT, refused TEXT
);";

/// One enrolled node.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub id: String,
    pub name: String,
    pub public_key: String,
    pub sealing_key: String,
    pub facts: serde_json::Value,
    pub enrolled_at: String,
    #[serde(skip)]
    pub nats_password: Option<String>,
    pub last_seen: Option<String>,
    /// Generation the node accepted (received and stored).
    pub accepted_generation: Option<u64>,
    /// Lowest generation every managed reconciler converged to.
    pub converged_generation: Option<u64>,
    /// The node's last status message.
    pub status: Option<serde_json::Value>,
    /// The node's last refusal.
    pub refused: Option<serde_json::Value>,
}

pub struct PlaneStore {
    conn: Connection,
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl PlaneStore {
    pub fn open(path: &Path) -> Result<PlaneStore, PlaneError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(PlaneStore { conn })
    }

    /// Records a new token valid for `ttl_secs`.
    pub fn add_token(&self, token: &str, ttl_secs: i64) -> Result<(), PlaneError> {
        let expires = chrono::Utc::now().timestamp() + ttl_secs;
        self.conn.execute(
            "INSERT INTO tokens (hash, expires_at) VALUES (?1, ?2)",
            params![hash(token), expires],
        )?;
        Ok(())
    }

    /// Marks a token used by `node`; refuses unknown, used and expired tokens.
    pub fn use_token(&mut self, token: &str, node: &str) -> Result<(), PlaneError> {
        let tx = self.conn.transaction()?;
        let row: Option<(i64, Option<String>)> = tx
            .query_row(
                "SELECT expires_at, used_by FROM tokens WHERE hash = ?1",
                params![hash(token)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match row {
            None => return Err(PlaneError::UnknownToken),
            Some((_, Some(_))) => return Err(PlaneError::UsedToken),
            Some((exp, None)) if exp < chrono::Utc::now().timestamp() => {
                return Err(PlaneError::ExpiredToken)
            }
            Some(_) => {}
        }
        tx.execute(
            "UPDATE tokens SET used_by = ?2 WHERE hash = ?1",
            params![hash(token), node],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Adds or replaces a node (a re-enrollment with `--force` brings new keys).
    pub fn put_node(&self, n: &NodeRecord) -> Result<(), PlaneError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO nodes (id, name, public_key, sealing_key, facts, enrolled_at, nats_password)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![n.id, n.name, n.public_key, n.sealing_key, n.facts.to_string(), n.enrolled_at, n.nats_password],
        )?;
        Ok(())
    }

    pub fn nodes(&self) -> Result<Vec<NodeRecord>, PlaneError> {
        self.select("ORDER BY id", [])
    }

    /// One node, by its primary key: every signed HTTPS request looks its node up, so
    /// this must not read (and parse the status of) every node.
    pub fn node(&self, id: &str) -> Result<Option<NodeRecord>, PlaneError> {
        Ok(self.select("WHERE id = ?1", params![id])?.pop())
    }

    fn select(
        &self,
        tail: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<NodeRecord>, PlaneError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT id, name, public_key, sealing_key, facts, enrolled_at, nats_password, last_seen,
                    accepted_generation, converged_generation, status, refused FROM nodes {tail}"
        ))?;
        let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
        let rows = st.query_map(args, |r| {
            Ok(NodeRecord {
                id: r.get(0)?,
                name: r.get(1)?,
                public_key: r.get(2)?,
                sealing_key: r.get(3)?,
                facts: json(r.get(4)?).unwrap_or_default(),
                enrolled_at: r.get(5)?,
                nats_password: r.get(6)?,
                last_seen: r.get(7)?,
                accepted_generation: r
                    .get::<_, Option<i64>>(8)?
                    .and_then(|g| u64::try_from(g).ok()),
                converged_generation: r
                    .get::<_, Option<i64>>(9)?
                    .and_then(|g| u64::try_from(g).ok()),
                status: json(r.get(10)?),
                refused: json(r.get(11)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Saves a node's status message, unless it is older than the one kept: status
    /// is delivered at least once, so a retried or delayed message can arrive after
    /// a newer one, and a node's accepted generation never goes down. Any message
    /// still counts as a sign of life.
    pub fn put_status(
        &self,
        id: &str,
        accepted: Option<u64>,
        converged: Option<u64>,
        status: &serde_json::Value,
    ) -> Result<(), PlaneError> {
        let g = |v: Option<u64>| v.and_then(|g| i64::try_from(g).ok());
        // SET expressions see the row as it was, so each CASE tests the kept generation.
        self.conn.execute(
            "UPDATE nodes SET last_seen = ?2,
               converged_generation = CASE WHEN accepted_generation IS NULL OR ?3 >= accepted_generation THEN ?4 ELSE converged_generation END,
               status = CASE WHEN accepted_generation IS NULL OR ?3 >= accepted_generation THEN ?5 ELSE status END,
               accepted_generation = CASE WHEN accepted_generation IS NULL OR ?3 >= accepted_generation THEN ?3 ELSE accepted_generation END
             WHERE id = ?1",
            params![id, now(), g(accepted), g(converged), status.to_string()],
        )?;
        Ok(())
    }

    /// Saves a node's refusal.
    pub fn put_refusal(&self, id: &str, refusal: &serde_json::Value) -> Result<(), PlaneError> {
        self.conn.execute(
            "UPDATE nodes SET last_seen = ?2, refused = ?3 WHERE id = ?1",
            params![id, now(), refusal.to_string()],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_one_time_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = PlaneStore::open(&dir.path().join("db")).unwrap();
        s.add_token("good", 60).unwrap();
        s.add_token("old", -1).unwrap();
        assert!(matches!(
            s.use_token("nope", "a"),
            Err(PlaneError::UnknownToken)
        ));
        s.use_token("good", "a").unwrap();
        assert!(matches!(
            s.use_token("good", "b"),
            Err(PlaneError::UsedToken)
        ));
        assert!(matches!(
            s.use_token("old", "b"),
            Err(PlaneError::ExpiredToken)
        ));
    }

    #[test]
    fn a_late_older_status_does_not_replace_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = PlaneStore::open(&dir.path().join("db")).unwrap();
        s.conn
            .execute(
                "INSERT INTO nodes (id, name, public_key, sealing_key, facts, enrolled_at) VALUES ('n', 'n', '', '', '{}', '')",
                [],
            )
            .unwrap();
        let kept = |s: &PlaneStore| {
            s.conn
                .query_row(
                    "SELECT accepted_generation, converged_generation, status FROM nodes",
                    [],
                    |r| {
                        Ok((
                            r.get::<_, Option<i64>>(0)?,
                            r.get::<_, Option<i64>>(1)?,
                            r.get::<_, String>(2)?,
                        ))
                    },
                )
                .unwrap()
        };
        s.put_status("n", Some(5), Some(5), &serde_json::json!("five"))
            .unwrap();
        s.put_status("n", Some(4), Some(4), &serde_json::json!("four"))
            .unwrap();
        assert_eq!(kept(&s), (Some(5), Some(5), "\"five\"".into()));
        s.put_status("n", None, None, &serde_json::json!("none"))
            .unwrap();
        assert_eq!(kept(&s).0, Some(5));
        s.put_status("n", Some(6), Some(5), &serde_json::json!("six"))
            .unwrap();
        assert_eq!(kept(&s), (Some(6), Some(5), "\"six\"".into()));
    }
}
