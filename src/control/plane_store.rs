//! The reference control plane's records (SQLite, `<data>/control-plane.db`): one-time
//! registration tokens (only their SHA-256 is kept), enrolled nodes, and each node's last
//! status and refusal, and staged rollouts. With `--state nats` it is this instance's
//! cache of the shared buckets (`control::plane_shared`).

use super::rollout::Rollout;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
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
    #[error("this registration token is for node {token_for:?}, not {asked:?}")]
    WrongNode { token_for: String, asked: String },
    #[error(
        "a node {id:?} is enrolled already (names that normalise alike share an id); \
             to give it new keys, issue a token with `control-plane nodes re-enroll {id}`"
    )]
    Enrolled { id: String },
    #[error("control-plane store: {0}")]
    Io(#[from] std::io::Error),
    #[error("the plane's shared state (NATS): {0}")]
    Shared(String),
}

/// Schema versions in order (`PRAGMA user_version` = how many ran).
const MIGRATIONS: &[&str] = &[
    // 1: tokens and nodes (the tables existed before versions were recorded, hence
    // IF NOT EXISTS).
    "CREATE TABLE IF NOT EXISTS tokens (
       hash TEXT PRIMARY KEY, expires_at INTEGER NOT NULL, used_by TEXT
     );
     CREATE TABLE IF NOT EXISTS nodes (
       id TEXT PRIMARY KEY, name TEXT NOT NULL, public_key TEXT NOT NULL,
       sealing_key TEXT NOT NULL, facts TEXT NOT NULL, enrolled_at TEXT NOT NULL,
       nats_password TEXT, last_seen TEXT, accepted_generation INTEGER,
       converged_generation INTEGER, status TEXT, refused TEXT
     );",
    // 2: a token is for one node id (NULL: any id not enrolled yet), and may replace
    // that node's keys only if issued by `nodes re-enroll`.
    "ALTER TABLE tokens ADD COLUMN node TEXT;
     ALTER TABLE tokens ADD COLUMN reenroll INTEGER NOT NULL DEFAULT 0;",
    // 3: a node's NATS nkey (its identity key); nodes enrolled before keep a password.
    "ALTER TABLE nodes ADD COLUMN nats_key TEXT;",
    // 4: staged rollouts, each one JSON document (`control::rollout::Rollout`).
    "CREATE TABLE rollouts (
       id TEXT PRIMARY KEY, created_at TEXT NOT NULL, phase TEXT NOT NULL, body TEXT NOT NULL
     );",
    // 5: a token copied to the shared tokens bucket (`--state nats`).
    "ALTER TABLE tokens ADD COLUMN shared INTEGER NOT NULL DEFAULT 0;",
];

/// What a registration token allows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenScope {
    /// The node id it enrolls; `None`: any id that is not enrolled yet.
    pub node: Option<String>,
    /// It replaces the keys of that enrolled node (`nodes re-enroll`).
    pub reenroll: bool,
}

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
    /// The node's NATS user nkey (public, `U…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_key: Option<String>,
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

impl NodeRecord {
    /// The converge version the node last reported, else the one it enrolled with.
    pub fn version(&self) -> &str {
        self.status
            .as_ref()
            .and_then(|s| s["facts"]["convergeVersion"].as_str())
            .or_else(|| self.facts["convergeVersion"].as_str())
            .unwrap_or("-")
    }

    /// The reconcilers of its last status (none before the first).
    pub fn reconcilers(&self) -> &[serde_json::Value] {
        self.status
            .as_ref()
            .and_then(|s| s["reconcilers"].as_array())
            .map_or(&[], Vec::as_slice)
    }
}

pub struct PlaneStore {
    conn: Connection,
}

/// A token as stored: the SHA-256 of the token in hex.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl PlaneStore {
    pub fn open(path: &Path) -> Result<PlaneStore, PlaneError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        converge_core::sqlite::set_wal(&conn)?;
        // Node credentials and token hashes: root's only.
        crate::privacy::make_private(path)?;
        let mut store = PlaneStore { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), PlaneError> {
        converge_core::sqlite::migrate(&mut self.conn, MIGRATIONS)?;
        Ok(())
    }

    /// Records a new token valid for `ttl_secs`, for what `scope` allows.
    pub fn add_token(
        &self,
        token: &str,
        ttl_secs: i64,
        scope: &TokenScope,
    ) -> Result<(), PlaneError> {
        let expires = chrono::Utc::now().timestamp() + ttl_secs;
        self.conn.execute(
            "INSERT INTO tokens (hash, expires_at, node, reenroll) VALUES (?1, ?2, ?3, ?4)",
            params![hash(token), expires, scope.node, scope.reenroll],
        )?;
        Ok(())
    }

    /// Enrolls `n` with `token`, in one transaction: refuses unknown, used and expired
    /// tokens, a token issued for another node, and a node id already enrolled unless
    /// the token re-enrolls exactly that node (then its keys and credentials are
    /// replaced, its history kept). Nothing changes when refused.
    pub fn enroll(&mut self, token: &str, n: &NodeRecord) -> Result<(), PlaneError> {
        let tx = self.conn.transaction()?;
        let row: Option<(i64, Option<String>, Option<String>, bool)> = tx
            .query_row(
                "SELECT expires_at, used_by, node, reenroll FROM tokens WHERE hash = ?1",
                params![hash(token)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let reenroll = match row {
            None => return Err(PlaneError::UnknownToken),
            Some((_, Some(_), _, _)) => return Err(PlaneError::UsedToken),
            Some((exp, None, _, _)) if exp < chrono::Utc::now().timestamp() => {
                return Err(PlaneError::ExpiredToken)
            }
            Some((_, None, Some(node), _)) if node != n.id => {
                return Err(PlaneError::WrongNode {
                    token_for: node,
                    asked: n.id.clone(),
                })
            }
            Some((_, None, _, reenroll)) => reenroll,
        };
        let enrolled: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM nodes WHERE id = ?1)",
            params![n.id],
            |r| r.get(0),
        )?;
        if enrolled && !reenroll {
            return Err(PlaneError::Enrolled { id: n.id.clone() });
        }
        tx.execute(
            "UPDATE tokens SET used_by = ?2 WHERE hash = ?1",
            params![hash(token), n.id],
        )?;
        put_enrolled(&tx, n)?;
        tx.commit()?;
        Ok(())
    }

    /// Saves a node's enrollment (keys, facts, NATS credentials), new or replacing the
    /// one kept; its status is kept. (Another instance enrolled it: `--state nats`.)
    pub fn put_enrollment(&self, n: &NodeRecord) -> Result<(), PlaneError> {
        put_enrolled(&self.conn, n)
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
                    accepted_generation, converged_generation, status, refused, nats_key FROM nodes {tail}"
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
                nats_key: r.get(12)?,
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
    ) -> Result<Option<NodeState>, PlaneError> {
        self.merge_state(
            id,
            NodeState {
                last_seen: Some(now()),
                accepted_generation: accepted,
                converged_generation: converged,
                status: Some(status.clone()),
                refused: None,
            },
        )
    }

    /// Saves a node's refusal.
    pub fn put_refusal(
        &self,
        id: &str,
        refusal: &serde_json::Value,
    ) -> Result<Option<NodeState>, PlaneError> {
        self.merge_state(
            id,
            NodeState {
                last_seen: Some(now()),
                refused: Some(refusal.clone()),
                ..NodeState::default()
            },
        )
    }
}

/// Inserts or replaces a node's enrollment columns.
fn put_enrolled(conn: &Connection, n: &NodeRecord) -> Result<(), PlaneError> {
    conn.execute(
        "INSERT INTO nodes (id, name, public_key, sealing_key, facts, enrolled_at, nats_password, nats_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (id) DO UPDATE SET name = ?2, public_key = ?3, sealing_key = ?4, facts = ?5,
           enrolled_at = ?6, nats_password = ?7, nats_key = ?8",
        params![
            n.id,
            n.name,
            n.public_key,
            n.sealing_key,
            n.facts.to_string(),
            n.enrolled_at,
            n.nats_password,
            n.nats_key
        ],
    )?;
    Ok(())
}

/// What a node last told the plane: the part of its record that changes with each
/// message, as the instances of a plane share it (`--state nats`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub last_seen: Option<String>,
    pub accepted_generation: Option<u64>,
    pub converged_generation: Option<u64>,
    pub status: Option<serde_json::Value>,
    pub refused: Option<serde_json::Value>,
}

impl NodeState {
    pub fn of(n: &NodeRecord) -> NodeState {
        NodeState {
            last_seen: n.last_seen.clone(),
            accepted_generation: n.accepted_generation,
            converged_generation: n.converged_generation,
            status: n.status.clone(),
            refused: n.refused.clone(),
        }
    }

    /// Folds `other` in: the newer status by (accepted generation, the node's `sentAt`),
    /// so a retried or delayed message never replaces a newer one and the accepted
    /// generation never goes down; the newer refusal; the later sign of life. Order
    /// does not matter, so two instances that saw the same messages in any order agree.
    /// The one rule for the store and the shared bucket alike.
    pub fn merge(&mut self, other: NodeState) {
        let sent = |v: &Option<serde_json::Value>| {
            v.as_ref()
                .and_then(|v| v["sentAt"].as_str().map(str::to_string))
        };
        let status_key = |s: &NodeState| (s.accepted_generation, sent(&s.status));
        if other.status.is_some()
            && (self.status.is_none() || status_key(&other) > status_key(self))
        {
            self.accepted_generation = other.accepted_generation;
            self.converged_generation = other.converged_generation;
            self.status = other.status;
        }
        if other.refused.is_some()
            && (self.refused.is_none() || sent(&other.refused) > sent(&self.refused))
        {
            self.refused = other.refused;
        }
        self.last_seen = self.last_seen.take().max(other.last_seen);
    }
}

/// A token not yet copied to the shared bucket: its hash, expiry (unix seconds), scope.
pub type UnsharedToken = (String, i64, TokenScope);

impl PlaneStore {
    /// Tokens not yet in the shared bucket, unused.
    pub fn unshared_tokens(&self) -> Result<Vec<UnsharedToken>, PlaneError> {
        let mut st = self.conn.prepare(
            "SELECT hash, expires_at, node, reenroll FROM tokens WHERE shared = 0 AND used_by IS NULL",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                TokenScope {
                    node: r.get(2)?,
                    reenroll: r.get(3)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks `token` used by `node` (spent in the shared bucket: `--state nats`).
    pub fn mark_token_used(&self, token: &str, node: &str) -> Result<(), PlaneError> {
        self.conn.execute(
            "UPDATE tokens SET used_by = ?2 WHERE hash = ?1",
            params![hash(token), node],
        )?;
        Ok(())
    }

    pub fn mark_token_shared(&self, hash: &str) -> Result<(), PlaneError> {
        self.conn.execute(
            "UPDATE tokens SET shared = 1 WHERE hash = ?1",
            params![hash],
        )?;
        Ok(())
    }

    /// Folds `state` into the node's record ([`NodeState::merge`]); the merged state.
    pub fn merge_state(&self, id: &str, state: NodeState) -> Result<Option<NodeState>, PlaneError> {
        let Some(node) = self.node(id)? else {
            return Ok(None);
        };
        let mut merged = NodeState::of(&node);
        merged.merge(state);
        let g = |v: Option<u64>| v.and_then(|g| i64::try_from(g).ok());
        let json = |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string());
        self.conn.execute(
            "UPDATE nodes SET last_seen = ?2, accepted_generation = ?3, converged_generation = ?4,
               status = ?5, refused = ?6 WHERE id = ?1",
            params![
                id,
                merged.last_seen,
                g(merged.accepted_generation),
                g(merged.converged_generation),
                json(&merged.status),
                json(&merged.refused)
            ],
        )?;
        Ok(Some(merged))
    }
}

impl PlaneStore {
    /// Saves a rollout (new, or its next step).
    pub fn put_rollout(&self, r: &Rollout) -> Result<(), PlaneError> {
        let body = serde_json::to_string(r).map_err(|e| std::io::Error::other(e.to_string()))?;
        let phase = serde_json::to_value(r.phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        self.conn.execute(
            "INSERT INTO rollouts (id, created_at, phase, body) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO UPDATE SET phase = ?3, body = ?4",
            params![r.id, r.created_at, phase, body],
        )?;
        Ok(())
    }

    /// Rollouts, newest first (at most `limit`), or the one with `id`.
    pub fn rollouts(&self, id: Option<&str>, limit: usize) -> Result<Vec<Rollout>, PlaneError> {
        let mut st = self.conn.prepare(
            "SELECT body FROM rollouts WHERE ?1 IS NULL OR id = ?1
             ORDER BY created_at DESC, id DESC LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = st.query_map(params![id, limit], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for body in rows {
            let body = body?;
            let r = serde_json::from_str(&body)
                .map_err(|e| std::io::Error::other(format!("a stored rollout: {e}")))?;
            out.push(r);
        }
        Ok(out)
    }

    /// The rollout under way, if any (there is at most one).
    pub fn running_rollout(&self) -> Result<Option<Rollout>, PlaneError> {
        let id: Option<String> = self
            .conn
            .query_row(
                "SELECT id FROM rollouts WHERE phase = 'running' LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        match id {
            Some(id) => Ok(self.rollouts(Some(&id), 1)?.pop()),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, key: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            name: id.into(),
            public_key: key.into(),
            sealing_key: key.into(),
            facts: serde_json::json!({}),
            enrolled_at: String::new(),
            nats_password: None,
            nats_key: None,
            last_seen: None,
            accepted_generation: None,
            converged_generation: None,
            status: None,
            refused: None,
        }
    }

    fn key_of(s: &PlaneStore, id: &str) -> String {
        s.node(id).unwrap().unwrap().public_key
    }

    #[test]
    fn tokens_are_one_time_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = PlaneStore::open(&dir.path().join("db")).unwrap();
        let any = TokenScope::default();
        s.add_token("good", 60, &any).unwrap();
        s.add_token("old", -1, &any).unwrap();
        assert!(matches!(
            s.enroll("nope", &record("a", "k")),
            Err(PlaneError::UnknownToken)
        ));
        s.enroll("good", &record("a", "k")).unwrap();
        assert!(matches!(
            s.enroll("good", &record("b", "k")),
            Err(PlaneError::UsedToken)
        ));
        assert!(matches!(
            s.enroll("old", &record("b", "k")),
            Err(PlaneError::ExpiredToken)
        ));
    }

    #[test]
    fn enrollment_cannot_take_over_a_node() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = PlaneStore::open(&dir.path().join("db")).unwrap();
        let any = TokenScope::default();
        let for_web1 = TokenScope {
            node: Some("web-1".into()),
            reenroll: false,
        };
        s.add_token("t1", 60, &for_web1).unwrap();
        // A token for web-1 enrolls web-1 only; refused, it stays unused.
        assert!(matches!(
            s.enroll("t1", &record("web-2", "k")),
            Err(PlaneError::WrongNode { .. })
        ));
        s.enroll("t1", &record("web-1", "k1")).unwrap();
        // Another fresh token cannot replace web-1's keys: refused, keys kept.
        s.add_token("t2", 60, &any).unwrap();
        assert!(matches!(
            s.enroll("t2", &record("web-1", "evil")),
            Err(PlaneError::Enrolled { .. })
        ));
        assert_eq!(key_of(&s, "web-1"), "k1");
        // The refused token was not spent: it still enrolls a new node.
        s.enroll("t2", &record("web-3", "k3")).unwrap();
        // Only a re-enroll token for exactly web-1 replaces its keys.
        let reenroll = TokenScope {
            node: Some("web-1".into()),
            reenroll: true,
        };
        s.add_token("t3", 60, &reenroll).unwrap();
        assert!(matches!(
            s.enroll("t3", &record("web-3", "evil")),
            Err(PlaneError::WrongNode { .. })
        ));
        s.enroll("t3", &record("web-1", "k1b")).unwrap();
        assert_eq!(key_of(&s, "web-1"), "k1b");
    }

    #[test]
    fn a_database_of_the_first_version_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            // As an older converge left it: version 0, tokens without a scope.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.execute(
                "INSERT INTO tokens (hash, expires_at) VALUES (?1, ?2)",
                params![hash("old"), chrono::Utc::now().timestamp() + 60],
            )
            .unwrap();
        }
        let mut s = PlaneStore::open(&path).unwrap();
        let v = converge_core::sqlite::version(&s.conn).unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        // An old token is a token for any new node.
        s.enroll("old", &record("n", "k")).unwrap();
        drop(s);
        // Opening again changes nothing.
        PlaneStore::open(&path).unwrap();
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

    #[test]
    fn two_instances_merging_the_same_messages_in_any_order_agree() {
        let status = |accepted: u64, sent: &str| NodeState {
            last_seen: Some(sent.into()),
            accepted_generation: Some(accepted),
            converged_generation: Some(accepted - 1),
            status: Some(serde_json::json!({"sentAt": sent, "g": accepted})),
            refused: None,
        };
        let refusal = |sent: &str| NodeState {
            last_seen: Some(sent.into()),
            refused: Some(serde_json::json!({"sentAt": sent})),
            ..NodeState::default()
        };
        let messages = [
            status(4, "t1"),
            refusal("t2"),
            status(5, "t3"),
            status(5, "t4"),
            refusal("t5"),
            status(4, "t6"), // late: an older generation
        ];
        let fold = |order: &[usize]| {
            let mut s = NodeState::default();
            for i in order {
                s.merge(messages[*i].clone());
            }
            s
        };
        let forward = fold(&[0, 1, 2, 3, 4, 5]);
        assert_eq!(forward, fold(&[5, 4, 3, 2, 1, 0]));
        assert_eq!(forward, fold(&[2, 5, 0, 4, 3, 1]));
        // The newest status of the newest generation, the newest refusal, the last sign
        // of life.
        assert_eq!(forward.status, status(5, "t4").status);
        assert_eq!(forward.refused, refusal("t5").refused);
        assert_eq!(forward.last_seen.as_deref(), Some("t6"));
        // Merging what is already there changes nothing.
        let mut again = forward.clone();
        again.merge(forward.clone());
        assert_eq!(again, forward);
    }

    #[test]
    fn a_store_of_every_earlier_version_is_upgraded_with_its_data() {
        for k in 0..MIGRATIONS.len() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("db");
            {
                // As a plane of schema version k left it.
                let c = converge_core::sqlite::at_version(&path, MIGRATIONS, k).unwrap();
                if k >= 1 {
                    c.execute(
                        "INSERT INTO tokens (hash, expires_at) VALUES (?1, ?2)",
                        params![hash("old"), chrono::Utc::now().timestamp() + 60],
                    )
                    .unwrap();
                    c.execute(
                        "INSERT INTO nodes (id, name, public_key, sealing_key, facts, enrolled_at, nats_password) VALUES ('web-1', 'web-1', 'k1', 's1', '{}', 'then', 'pw')",
                        [],
                    )
                    .unwrap();
                }
            }
            let mut s = PlaneStore::open(&path).unwrap();
            let v = converge_core::sqlite::version(&s.conn).unwrap();
            assert_eq!(v, MIGRATIONS.len() as i64, "from version {k}");
            // The newest schema: token scopes and node nkeys.
            let (node, reenroll): (Option<String>, bool) = s
                .conn
                .query_row("SELECT node, reenroll FROM tokens LIMIT 0", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .unwrap()
                .unwrap_or_default();
            assert_eq!((node, reenroll), (None, false));
            if k >= 1 {
                let (key, password, nkey): (String, Option<String>, Option<String>) = s
                    .conn
                    .query_row(
                        "SELECT public_key, nats_password, nats_key FROM nodes WHERE id = 'web-1'",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .unwrap();
                assert_eq!(
                    (key.as_str(), password.as_deref(), nkey),
                    ("k1", Some("pw"), None)
                );
                // The old token is a token for any new node.
                s.enroll("old", &record("n", "k")).unwrap();
            }
        }
    }
}
