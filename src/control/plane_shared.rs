//! The plane's state shared by several `control-plane serve` instances on one NATS
//! cluster (`--state nats`): enrollment records, each node's newest status, one-time
//! tokens, rollouts and the rollout driver's lease, each in a JetStream KV bucket (with
//! the documents bucket's replicas). Every instance keeps its SQLite store as a cache of
//! these buckets, fed by a watch ([`follow`]); what must happen once across instances (a
//! token spent, a node id taken, a rollout step, the driver's lease, a generation's
//! envelope) is a compare-and-set on the bucket.

use super::envelope::Envelope;
use super::plane_store::{NodeRecord, NodeState, PlaneError, TokenScope};
use super::rollout::Rollout;
use async_nats::jetstream::kv::{
    CreateErrorKind, Entry, Operation, Store, UpdateError, UpdateErrorKind,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tracing::warn;

/// Enrollment records, by node id.
const NODES: &str = "converge-plane-nodes";
/// Each node's newest status and refusal ([`NodeState`]), by node id.
const STATUS: &str = "converge-plane-status";
/// One-time tokens, by the token's SHA-256.
const TOKENS: &str = "converge-plane-tokens";
/// Rollouts, by id.
const ROLLOUTS: &str = "converge-plane-rollouts";
/// The rollout driver's lease (one key).
const LEASE: &str = "converge-plane-lease";
const LEASE_KEY: &str = "rollout-driver";
/// How long a lease holds without renewal: the holder renews it every second, so another
/// instance drives a rollout about this long after the holder died.
const LEASE_MS: i64 = 3000;
/// Compare-and-set attempts before a write gives up (each lost race re-reads).
const ATTEMPTS: usize = 5;
/// Consumers a bucket's stream may have: the documents bucket has one per node of its
/// shard. nats-server 2.15 gives a stream that sets no limit its default of 1,000 and
/// reads any value up to 0 as "the default", so unlimited cannot be asked for.
const MAX_CONSUMERS: i32 = 1_000_000;

/// Opens the KV bucket `name`, making its stream if needed. The stream is made directly:
/// async-nats' `create_key_value` first asks for account information in a form
/// nats-server 2.9 does not answer. Same settings as a bucket of history 1 (what `nats kv
/// add` makes), except that reads go to the stream's leader unless `direct` (a direct
/// read may be answered by a replica that has not yet got a write just acknowledged,
/// and a token just shared would read as unknown), and the consumer limit is set
/// ([`MAX_CONSUMERS`]).
pub async fn bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    replicas: usize,
    direct: bool,
) -> Result<Store, async_nats::Error> {
    let config = async_nats::jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: direct,
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: replicas,
        max_consumers: MAX_CONSUMERS,
        ..Default::default()
    };
    let stream = js.get_or_create_stream(config.clone()).await?;
    // A stream made without a limit on nats-server 2.15 got its default of 1,000: raised
    // (2.15 lets the limit be changed; older servers never set one).
    let limit = stream.cached_info().config.max_consumers;
    if (1..MAX_CONSUMERS).contains(&limit) {
        if let Err(e) = js.update_stream(config).await {
            warn!(bucket = name, limit, error = %e, "cannot raise the bucket's consumer limit");
        }
    }
    Ok(js.get_key_value(name).await?)
}

/// A token in the shared bucket.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SharedToken {
    expires_at: i64,
    node: Option<String>,
    reenroll: bool,
    used_by: Option<String>,
}

/// A node's enrollment as the nodes bucket holds it (the record without its status).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Enrollment {
    id: String,
    name: String,
    public_key: String,
    sealing_key: String,
    facts: serde_json::Value,
    enrolled_at: String,
    nats_password: Option<String>,
    nats_key: Option<String>,
}

/// The rollout driver's lease.
#[derive(Serialize, Deserialize)]
struct Lease {
    holder: String,
    until_ms: i64,
}

fn shared_err(e: impl std::fmt::Display) -> PlaneError {
    PlaneError::Shared(e.to_string())
}

fn lost_race(e: &UpdateError) -> bool {
    e.kind() == UpdateErrorKind::WrongLastRevision
}

fn json<T: Serialize>(v: &T) -> bytes::Bytes {
    serde_json::to_vec(v).unwrap_or_default().into()
}

/// The current value of `key`, if it has one (not deleted).
async fn current(store: &Store, key: &str) -> Result<Option<Entry>, PlaneError> {
    let entry = store.entry(key).await.map_err(shared_err)?;
    Ok(entry.filter(|e| e.operation == Operation::Put))
}

/// Writes `value` at `key` if it still is at `revision` (`None`: has no value); false
/// when another writer was first.
async fn swap(
    store: &Store,
    key: &str,
    value: bytes::Bytes,
    revision: Option<u64>,
) -> Result<Option<u64>, PlaneError> {
    match store.update(key, value, revision.unwrap_or(0)).await {
        Ok(rev) => Ok(Some(rev)),
        Err(e) if lost_race(&e) => Ok(None),
        Err(e) => Err(shared_err(e)),
    }
}

/// The buckets of one plane instance.
pub struct Shared {
    /// This instance, as the lease names it.
    pub instance: String,
    pub nodes: Store,
    pub status: Store,
    pub rollouts: Store,
    tokens: Store,
    lease: Store,
}

impl Shared {
    pub async fn open(
        js: &async_nats::jetstream::Context,
        replicas: usize,
        instance: String,
    ) -> Result<Shared, async_nats::Error> {
        Ok(Shared {
            instance,
            nodes: bucket(js, NODES, replicas, false).await?,
            status: bucket(js, STATUS, replicas, false).await?,
            rollouts: bucket(js, ROLLOUTS, replicas, false).await?,
            tokens: bucket(js, TOKENS, replicas, false).await?,
            lease: bucket(js, LEASE, replicas, false).await?,
        })
    }

    /// Copies a token made on this instance (`control-plane token`) to the bucket.
    pub async fn share_token(
        &self,
        hash: &str,
        expires_at: i64,
        scope: &TokenScope,
    ) -> Result<(), PlaneError> {
        let t = SharedToken {
            expires_at,
            node: scope.node.clone(),
            reenroll: scope.reenroll,
            used_by: None,
        };
        match self.tokens.create(hash, json(&t)).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(shared_err(e)),
        }
    }

    /// Enrolls `n` with the token of SHA-256 `hash`, as `PlaneStore::enroll` does for one
    /// instance: the token is spent by compare-and-set (two instances cannot both spend
    /// it) and a new node id taken with `create` (two nodes cannot both take it). A token
    /// spent on an id another enrollment took meanwhile is given back. Retried after an
    /// answer was lost (a server failing over), it completes what the first try began.
    pub async fn enroll(&self, hash: &str, n: &NodeRecord) -> Result<(), PlaneError> {
        for _ in 0..ATTEMPTS {
            let entry = current(&self.tokens, hash)
                .await?
                .ok_or(PlaneError::UnknownToken)?;
            let mut t: SharedToken = serde_json::from_slice(&entry.value).map_err(shared_err)?;
            let held = self.enrolled(&n.id).await?;
            let ours = held.as_ref().is_some_and(|h| h.public_key == n.public_key);
            if let Some(user) = &t.used_by {
                return match (*user == n.id, ours) {
                    (true, true) => Ok(()),
                    (true, false) if held.is_none() || t.reenroll => {
                        self.write_enrollment(n, held.is_some()).await
                    }
                    _ => Err(PlaneError::UsedToken),
                };
            }
            if t.expires_at < chrono::Utc::now().timestamp() {
                return Err(PlaneError::ExpiredToken);
            }
            if let Some(node) = t.node.as_ref().filter(|node| **node != n.id) {
                return Err(PlaneError::WrongNode {
                    token_for: node.clone(),
                    asked: n.id.clone(),
                });
            }
            if held.is_some() && !t.reenroll {
                return Err(PlaneError::Enrolled { id: n.id.clone() });
            }
            t.used_by = Some(n.id.clone());
            let Some(spent) = swap(&self.tokens, hash, json(&t), Some(entry.revision)).await?
            else {
                continue; // another instance used or changed it: read it again
            };
            let taken = self.write_enrollment(n, held.is_some()).await;
            if let Err(PlaneError::Enrolled { .. }) = taken {
                t.used_by = None;
                if let Err(e) = swap(&self.tokens, hash, json(&t), Some(spent)).await {
                    warn!(error = %e, "a token spent on a refused enrollment was not given back");
                }
            }
            return taken;
        }
        Err(shared_err("the token kept changing under this enrollment"))
    }

    /// The node's enrollment in the bucket.
    async fn enrolled(&self, id: &str) -> Result<Option<NodeRecord>, PlaneError> {
        Ok(current(&self.nodes, id)
            .await?
            .and_then(|e| enrollment(&e.value)))
    }

    /// Writes `n`'s enrollment: replacing the one there (a re-enrollment) or taking the
    /// id (refused if another node has it; found with `n`'s own key, it is this
    /// enrollment's own earlier write whose answer was lost).
    async fn write_enrollment(&self, n: &NodeRecord, replace: bool) -> Result<(), PlaneError> {
        let record = json(&Enrollment {
            id: n.id.clone(),
            name: n.name.clone(),
            public_key: n.public_key.clone(),
            sealing_key: n.sealing_key.clone(),
            facts: n.facts.clone(),
            enrolled_at: n.enrolled_at.clone(),
            nats_password: n.nats_password.clone(),
            nats_key: n.nats_key.clone(),
        });
        if replace {
            return self
                .nodes
                .put(&n.id, record)
                .await
                .map(|_| ())
                .map_err(shared_err);
        }
        match self.nodes.create(&n.id, record).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                match self.enrolled(&n.id).await? {
                    Some(h) if h.public_key == n.public_key => Ok(()),
                    _ => Err(PlaneError::Enrolled { id: n.id.clone() }),
                }
            }
            Err(e) => Err(shared_err(e)),
        }
    }

    /// Folds `state` into the node's shared state ([`NodeState::merge`], by
    /// compare-and-set, so no instance's newer status is overwritten).
    pub async fn push_state(&self, id: &str, state: &NodeState) -> Result<(), PlaneError> {
        for _ in 0..ATTEMPTS {
            let entry = current(&self.status, id).await?;
            let kept: Option<NodeState> = entry
                .as_ref()
                .and_then(|e| serde_json::from_slice(&e.value).ok());
            let mut merged = kept.clone().unwrap_or_default();
            merged.merge(state.clone());
            if kept.as_ref() == Some(&merged) {
                return Ok(());
            }
            let revision = entry.map(|e| e.revision);
            if swap(&self.status, id, json(&merged), revision)
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(shared_err(
            "the node's status kept changing under this write",
        ))
    }

    /// Saves a rollout if the bucket still holds it at `revision` (`None`: a new one);
    /// its new revision, or `None` when another instance wrote it first.
    pub async fn put_rollout(
        &self,
        r: &Rollout,
        revision: Option<u64>,
    ) -> Result<Option<u64>, PlaneError> {
        swap(&self.rollouts, &r.id, json(r), revision).await
    }

    /// Takes or renews the rollout driver's lease for this instance: until when it is
    /// held (unix ms), or `None` while another instance holds it.
    pub async fn lease(&self, now_ms: i64) -> Result<Option<i64>, PlaneError> {
        let entry = current(&self.lease, LEASE_KEY).await?;
        if let Some(e) = &entry {
            let held: Option<Lease> = serde_json::from_slice(&e.value).ok();
            if held.is_some_and(|l| l.holder != self.instance && l.until_ms > now_ms) {
                return Ok(None);
            }
        }
        let until_ms = now_ms + LEASE_MS;
        let lease = Lease {
            holder: self.instance.clone(),
            until_ms,
        };
        let revision = entry.map(|e| e.revision);
        Ok(swap(&self.lease, LEASE_KEY, json(&lease), revision)
            .await?
            .map(|_| until_ms))
    }
}

/// A node's enrollment from the nodes bucket, as a record without status.
pub fn enrollment(value: &[u8]) -> Option<NodeRecord> {
    let e: Enrollment = serde_json::from_slice(value).ok()?;
    Some(NodeRecord {
        id: e.id,
        name: e.name,
        public_key: e.public_key,
        sealing_key: e.sealing_key,
        facts: e.facts,
        enrolled_at: e.enrolled_at,
        nats_password: e.nats_password,
        nats_key: e.nats_key,
        last_seen: None,
        accepted_generation: None,
        converged_generation: None,
        status: None,
        refused: None,
    })
}

/// Puts a node's envelope of `generation` into the documents bucket unless the bucket
/// holds this generation or a newer one already (another instance built it from the
/// same file: sealed anew, its bytes differ, and the node would refuse a second copy of
/// one generation as a replay). Returns the envelope the bucket holds afterwards.
pub async fn publish_once(
    docs: &Store,
    id: &str,
    generation: u64,
    bytes: bytes::Bytes,
) -> Result<bytes::Bytes, PlaneError> {
    for _ in 0..ATTEMPTS {
        let entry = current(docs, id).await?;
        if let Some(e) = &entry {
            let held = Envelope::parse(&e.value).map(|env| env.generation);
            if held.is_ok_and(|g| g >= generation) {
                return Ok(e.value.clone());
            }
        }
        let revision = entry.map(|e| e.revision);
        if swap(docs, id, bytes.clone(), revision).await?.is_some() {
            return Ok(bytes);
        }
    }
    Err(shared_err(
        "the node's document kept changing under this put",
    ))
}

/// Follows `store` from its start: `apply` gets each value (with its key, revision, and
/// whether the watch has caught up with the bucket: nothing older pending), the values
/// there first, then each new one. After an error the watch starts again past the last
/// revision applied, so a server failover loses nothing.
pub async fn follow(store: Store, mut apply: impl FnMut(&str, u64, &[u8], bool)) {
    let mut next: Option<u64> = None;
    loop {
        let watch = match next {
            None => store.watch_with_history(">").await,
            Some(rev) => store.watch_all_from_revision(rev).await,
        };
        match watch {
            Ok(mut entries) => {
                while let Some(entry) = entries.next().await {
                    match entry {
                        Ok(e) => {
                            if e.operation == Operation::Put {
                                apply(&e.key, e.revision, &e.value, e.delta == 0);
                            }
                            next = Some(e.revision + 1);
                        }
                        Err(e) => {
                            warn!(error = %e, "a shared bucket's watch failed; watching again");
                            break;
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot watch a shared bucket; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
