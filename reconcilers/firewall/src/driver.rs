//! The firewall driver: reads converge's table back from the kernel and commits batches,
//! over netlink in the current network namespace.

use crate::nfnl::{self, msg, Attrs, Message, Nft, NlError};
use crate::ruleset::{self, Snapshot, TABLE};
use converge_core::DriverError;
use futures::stream::BoxStream;

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
    fn events(&self) -> Option<BoxStream<'static, ()>>;
}

/// Why a commit failed: the ruleset moved under us (retry), or the kernel refused.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Stale(NlError),
    #[error(transparent)]
    Failed(NlError),
}

/// The real kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct Kernel;

fn driver_err(context: &str, e: NlError) -> DriverError {
    DriverError::Failed(format!("{context}: {e}"))
}

impl NftDriver for Kernel {
    fn generation(&self) -> Result<u32, DriverError> {
        Nft::open()
            .and_then(|mut n| n.generation())
            .map_err(|e| driver_err("read the nftables generation", e))
    }

    fn read(&self) -> Result<Snapshot, DriverError> {
        read(&mut Nft::open().map_err(|e| driver_err("open netlink", e))?)
            .map_err(|e| driver_err("read table inet converge", e))
    }

    fn commit(&self, messages: &[Message], genid: u32) -> Result<(), CommitError> {
        let mut nft = Nft::open().map_err(CommitError::Failed)?;
        match nft.commit(messages, Some(genid)) {
            Ok(()) => Ok(()),
            Err(e @ NlError::GenerationChanged { .. }) => Err(CommitError::Stale(e)),
            Err(e) => Err(CommitError::Failed(e)),
        }
    }

    fn events(&self) -> Option<BoxStream<'static, ()>> {
        use futures::StreamExt;
        match nfnl::watch_table(TABLE) {
            Ok(rx) => Some(tokio_stream(rx).boxed()),
            Err(e) => {
                tracing::warn!(error = %e, "no nftables notifications; drift is repaired at the next resync");
                None
            }
        }
    }
}

fn tokio_stream(mut rx: tokio::sync::mpsc::Receiver<()>) -> impl futures::Stream<Item = ()> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
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
