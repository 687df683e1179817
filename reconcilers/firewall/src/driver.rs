//! The firewall driver: reads converge's table back from the kernel and commits batches,
//! over netlink in the current network namespace.

use crate::nfnl::{self, msg, Attrs, Message, Nft, NlError};
use crate::ruleset::{self, Snapshot, TABLE};
use converge_core::{DriverError, HostEvent};
use futures::stream::BoxStream;

#[cfg(test)]
pub mod fake;

/// What the reconciler needs from the kernel.
pub trait NftDriver: Send + Sync + 'static {
    /// The ruleset generation (bumped by every commit of anyone).
    fn generation(&self) -> Result<u32, DriverError>;
    /// Reads converge's table: chains, rule tags, sets and elements.
    fn read(&self) -> Result<Snapshot, DriverError>;
    /// Commits `messages` as one atomic batch, refused if the ruleset generation is no
    /// longer `genid`.
    fn commit(&self, messages: &[Message], genid: u32) -> Result<(), CommitError>;
    /// Notifications that converge's table changed (by anyone).
    fn events(&self) -> Option<BoxStream<'static, HostEvent>>;
}

/// Why a commit failed: the ruleset moved under us (retry), or the kernel refused.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Stale(NlError),
    #[error(transparent)]
    Failed(NlError),
}

/// The real kernel, over one long-lived netlink socket.
///
/// Closing an nf_tables socket waits for the kernel to finish releasing whatever the
/// last commit removed (an RCU grace period, 8-16 ms here): that wait is what makes
/// `nft delete element` cost ~15 ms. Keeping the socket open keeps that wait off every
/// pass; a socket that failed is dropped and reopened on the next call.
#[derive(Default)]
pub struct Kernel {
    sock: std::sync::Mutex<Option<Nft>>,
}

impl Kernel {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Nft) -> Result<T, NlError>) -> Result<T, NlError> {
        let mut guard = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let nft = match guard.as_mut() {
            Some(n) => n,
            None => guard.insert(Nft::open()?),
        };
        let r = f(nft);
        // A socket that saw an I/O error may hold stale replies: start over.
        if matches!(r, Err(NlError::Io(_) | NlError::Malformed(_))) {
            *guard = None;
        }
        r
    }
}

fn driver_err(context: &str, e: NlError) -> DriverError {
    DriverError::Failed(format!("{context}: {e}"))
}

impl NftDriver for Kernel {
    fn generation(&self) -> Result<u32, DriverError> {
        self.with(|n| n.generation())
            .map_err(|e| driver_err("read the nftables generation", e))
    }

    fn read(&self) -> Result<Snapshot, DriverError> {
        self.with(read)
            .map_err(|e| driver_err("read table inet converge", e))
    }

    fn commit(&self, messages: &[Message], genid: u32) -> Result<(), CommitError> {
        match self.with(|n| n.commit(messages, Some(genid))) {
            Ok(()) => Ok(()),
            Err(e @ NlError::GenerationChanged { .. }) => Err(CommitError::Stale(e)),
            Err(e) => Err(CommitError::Failed(e)),
        }
    }

    fn events(&self) -> Option<BoxStream<'static, HostEvent>> {
        nfnl::table_events(TABLE)
    }
}

fn table_filter() -> Attrs {
    let mut a = Attrs::new();
    a.str(1, TABLE);
    a
}

/// Reads converge's table. A missing table is `exists: false`, not an error.
pub fn read(nft: &mut Nft) -> Result<Snapshot, NlError> {
    // GETTABLE with the inet family in the header dumps the inet tables.
    let mut snap = Snapshot {
        exists: nft
            .dump(msg::GETTABLE, Attrs::new())?
            .iter()
            .any(|t| nfnl::attr_str(t, 1).as_deref() == Some(TABLE)),
        ..Snapshot::default()
    };
    if !snap.exists {
        return Ok(snap);
    }
    // The kernel filters some dumps by the table attribute and not others (chains):
    // keep only replies whose table (attribute 1 of every object) is ours.
    let ours = |a: &Vec<u8>| nfnl::attr_str(a, 1).as_deref() == Some(TABLE);
    for a in nft
        .dump(msg::GETCHAIN, table_filter())?
        .iter()
        .filter(|a| ours(a))
    {
        if let Some((name, chain)) = ruleset::parse_chain(a) {
            snap.structure.chains.insert(name, chain);
        }
    }
    for a in nft
        .dump(msg::GETRULE, table_filter())?
        .iter()
        .filter(|a| ours(a))
    {
        if let Some((chain, tag)) = ruleset::parse_rule(a) {
            if let Some(c) = snap.structure.chains.get_mut(&chain) {
                c.rules.push(tag);
            }
        }
    }
    for a in nft
        .dump(msg::GETSET, table_filter())?
        .iter()
        .filter(|a| ours(a))
    {
        if let Some((name, shape)) = ruleset::parse_set(a) {
            snap.structure.sets.insert(name, shape);
        }
    }
    let names: Vec<String> = snap.structure.sets.keys().cloned().collect();
    for name in names {
        let mut filter = Attrs::new();
        filter.str(1, TABLE).str(2, &name);
        let mut elems = ruleset::Elements::new();
        for a in nft.dump(msg::GETSETELEM, filter)? {
            ruleset::parse_elements(&a, &mut elems);
        }
        snap.elements.insert(name, elems);
    }
    Ok(snap)
}
