//! A driver for unit tests, never shipped: netavark's `fwnone` with a memory. It holds
//! one `inet converge` table as a [`Snapshot`], applies each committed batch to it by
//! decoding the messages the kernel would get (tables, chains, rules, sets, elements:
//! the same decoders a dump goes through), bumps the generation as the kernel does,
//! refuses a batch planned at an old generation, and can be told to refuse the next
//! commit or to change the table behind converge's back (drift).

use super::{CommitError, NftDriver};
use crate::nfnl::{self, msg, Message, NlError};
use crate::ruleset::{self, Elements, Snapshot};
use converge_core::{DriverError, HostEvent};
use futures::stream::BoxStream;
use std::sync::{Mutex, MutexGuard};

/// NFT_MSG_NEWCHAIN (rustables encodes chains; `msg` lists what converge encodes).
const NEWCHAIN: u8 = 3;

#[derive(Default)]
pub struct State {
    pub genid: u32,
    pub table: Snapshot,
    /// Every committed batch, as the messages' descriptions (`add table inet converge`).
    pub commits: Vec<Vec<String>>,
    /// How many times the table was read in full (a dump).
    pub reads: usize,
    /// The next commit fails with this kernel error (errno), once.
    pub refuse_next: Option<i32>,
}

#[derive(Default)]
pub struct Fake {
    state: Mutex<State>,
}

impl Fake {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Someone else changes the ruleset: `f` edits the table and the generation moves.
    pub fn drift(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut s = self.state();
        f(&mut s.table);
        s.genid = s.genid.wrapping_add(1).max(1);
    }
}

fn set_name(m: &Message) -> Option<String> {
    nfnl::attr_str(&m.attrs, 2)
}

/// What the kernel does with one message of a batch, on the snapshot.
fn apply(t: &mut Snapshot, m: &Message) {
    match m.ty {
        msg::NEWTABLE => t.exists = true,
        msg::DELTABLE => *t = Snapshot::default(),
        NEWCHAIN => {
            if let Some((name, chain)) = ruleset::parse_chain(&m.attrs) {
                t.structure.chains.insert(name, chain);
            }
        }
        msg::NEWRULE => {
            if let Some((chain, tag)) = ruleset::parse_rule(&m.attrs) {
                if let Some(c) = t.structure.chains.get_mut(&chain) {
                    c.rules.push(tag);
                }
            }
        }
        msg::NEWSET => {
            if let Some((name, shape)) = ruleset::parse_set(&m.attrs) {
                t.structure.sets.insert(name.clone(), shape);
                t.elements.entry(name).or_default();
            }
        }
        msg::NEWSETELEM => {
            if let Some(name) = set_name(m) {
                ruleset::parse_elements(&m.attrs, t.elements.entry(name).or_default());
            }
        }
        msg::DELSETELEM => {
            if let Some(name) = set_name(m) {
                let mut gone = Elements::new();
                ruleset::parse_elements(&m.attrs, &mut gone);
                if let Some(e) = t.elements.get_mut(&name) {
                    for k in gone.keys() {
                        e.remove(k);
                    }
                }
            }
        }
        other => panic!(
            "fake nftables: message type {other} ({}) not modelled",
            m.what
        ),
    }
}

impl NftDriver for Fake {
    fn generation(&self) -> Result<u32, DriverError> {
        Ok(self.state().genid)
    }

    fn read(&self) -> Result<Snapshot, DriverError> {
        let mut s = self.state();
        s.reads += 1;
        Ok(s.table.clone())
    }

    fn commit(&self, messages: &[Message], genid: u32) -> Result<(), CommitError> {
        let mut s = self.state();
        if genid != s.genid {
            return Err(CommitError::Stale(NlError::GenerationChanged {
                expected: genid,
            }));
        }
        if let Some(errno) = s.refuse_next.take() {
            // All or nothing: a refused batch changes nothing.
            return Err(CommitError::Failed(NlError::Rejected {
                what: messages.first().map(|m| m.what.clone()).unwrap_or_default(),
                source: std::io::Error::from_raw_os_error(errno),
            }));
        }
        let mut table = s.table.clone();
        for m in messages {
            apply(&mut table, m);
        }
        s.table = table;
        s.genid = s.genid.wrapping_add(1).max(1);
        s.commits
            .push(messages.iter().map(|m| m.what.clone()).collect());
        Ok(())
    }

    fn events(&self) -> Option<BoxStream<'static, HostEvent>> {
        None
    }
}
