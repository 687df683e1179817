//! What the read API serves: an immutable snapshot of every project, replaced as a whole
//! (one `Arc` per project) after each committed transaction, so a reader holds one
//! generation of a project from start to end of its request.

use crate::plan::StoredProject;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// One project as readers see it.
#[derive(Debug)]
pub struct ProjectData {
    pub id: String,
    /// The token hash, raw bytes (compared in constant time).
    pub token_sha256: [u8; 32],
    pub rate_limit: u32,
    pub index: u64,
    /// Values as compact JSON, ready to send.
    pub entries: BTreeMap<String, Bytes>,
}

impl ProjectData {
    pub fn new(id: &str, token_hex: &str, rate_limit: u32, index: u64) -> ProjectData {
        let mut token_sha256 = [0u8; 32];
        // A malformed stored hash (edited by hand) matches no token: all zeros is the
        // hash of nothing anyone can present, and the next pass rewrites it.
        if hex::decode_to_slice(token_hex, &mut token_sha256).is_err() {
            token_sha256 = [0u8; 32];
        }
        ProjectData {
            id: id.to_string(),
            token_sha256,
            rate_limit,
            index,
            entries: BTreeMap::new(),
        }
    }

    pub fn from_stored(id: &str, p: &StoredProject) -> ProjectData {
        let mut d = ProjectData::new(id, &p.token_sha256, p.rate_limit, p.index);
        d.entries = p
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), Bytes::copy_from_slice(v.as_bytes())))
            .collect();
        d
    }
}

/// Every project, by id.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub projects: BTreeMap<String, Arc<ProjectData>>,
}

/// The published snapshot: readers `borrow` it, watches wait on `changed`.
#[derive(Clone)]
pub struct Published {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
}

impl Default for Published {
    fn default() -> Self {
        Self::new()
    }
}

impl Published {
    pub fn new() -> Published {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Published { tx: Arc::new(tx) }
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Replaces every project (startup, a reopened database).
    pub fn replace_all(&self, projects: BTreeMap<String, Arc<ProjectData>>) {
        self.tx.send_replace(Arc::new(Snapshot { projects }));
    }

    /// Replaces one project (`Some`) or drops it (`None`); other projects keep their
    /// `Arc`s, so the copy costs one pointer per project.
    pub fn update(&self, id: &str, data: Option<Arc<ProjectData>>) {
        self.tx.send_modify(|snap| {
            let mut projects = snap.projects.clone();
            match data {
                Some(d) => projects.insert(id.to_string(), d),
                None => projects.remove(id),
            };
            *snap = Arc::new(Snapshot { projects });
        });
    }
}
