//! Status notes: one for the interface (backend, public key, when the generated key was
//! written) and one per peer (last handshake in UTC, counters, endpoint), a peer's note
//! formatted again only when what it was made from changed.

use crate::plan::{self, peer_label, Observed};
use crate::spec::PublicKey;
use converge_core::ObjectNote;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::SystemTime;

/// The peer notes of the last `notes` call, sorted by key.
#[derive(Default)]
pub(super) struct Notes(Mutex<Vec<(PublicKey, PeerNote)>>);

impl Notes {
    /// The notes of `observed`; `key_written` is asked only when there is an interface.
    pub(super) fn notes(
        &self,
        observed: &Observed,
        key_written: impl FnOnce() -> Option<SystemTime>,
    ) -> Vec<ObjectNote> {
        let mut notes = Vec::new();
        let Some(link) = &observed.link else {
            return notes;
        };
        let device = observed.state.device.as_ref();
        // When the generated key was written (first use or `rotate-key`), so status
        // shows a rotation; a key from `privateKeySecret` has no key file.
        let written = key_written()
            .map(|t| format!(", key from {}", utc(t)))
            .unwrap_or_default();
        notes.push(ObjectNote {
            object: format!("interface {}", observed.interface),
            note: format!(
                "backend {}, public key {}{written}",
                link.backend,
                device
                    .and_then(|d| d.public_key)
                    .map_or_else(|| "not set".to_string(), |k| k.to_base64())
            ),
        });
        let Some(device) = device else {
            return notes;
        };
        let parsed = &observed.peers;
        let mut peers: Vec<_> = device.peers.iter().collect();
        peers.sort_unstable_by_key(|(k, _)| **k);
        notes.reserve(peers.len());
        let mut memo = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Both sorted by key: one merge, no hashing.
        let mut old = std::mem::replace(&mut *memo, Vec::with_capacity(peers.len()))
            .into_iter()
            .peekable();
        for (key, p) in peers {
            let name = parsed
                .index
                .get(key)
                .and_then(|&i| parsed.names.get(i))
                .map_or("(not in the document)", String::as_str);
            while old.next_if(|(k, _)| k < key).is_some() {}
            let entry = match old.next_if(|(k, _)| k == key) {
                Some((_, e)) if e.made_from(name, p) => e,
                _ => PeerNote::new(name, key, p),
            };
            notes.push(entry.note.clone());
            memo.push((*key, entry));
        }
        notes
    }
}

/// A peer's status note and what it was made from. The engine asks for the notes on
/// every pass, and formatting one per peer costs ~10 ms at 10,000 peers, so a note is
/// formatted again only when its inputs changed (most do not between passes).
pub(super) struct PeerNote {
    name: String,
    last_handshake: Option<SystemTime>,
    rx: u64,
    tx: u64,
    endpoint: Option<SocketAddr>,
    note: ObjectNote,
}

impl PeerNote {
    fn new(name: &str, key: &PublicKey, p: &plan::PeerState) -> PeerNote {
        // An absolute time: status is read long after the pass that wrote it.
        let handshake = match p.last_handshake {
            Some(t) => format!("last handshake {}", utc(t)),
            None => "no handshake yet".to_string(),
        };
        PeerNote {
            name: name.to_string(),
            last_handshake: p.last_handshake,
            rx: p.rx_bytes,
            tx: p.tx_bytes,
            endpoint: p.endpoint,
            note: ObjectNote {
                object: format!("peer {}", peer_label(name, key)),
                note: format!(
                    "{handshake}, rx {} B, tx {} B, endpoint {}",
                    p.rx_bytes,
                    p.tx_bytes,
                    p.endpoint
                        .map_or_else(|| "none".to_string(), |e| e.to_string())
                ),
            },
        }
    }

    fn made_from(&self, name: &str, p: &plan::PeerState) -> bool {
        self.name == name
            && self.last_handshake == p.last_handshake
            && self.rx == p.rx_bytes
            && self.tx == p.tx_bytes
            && self.endpoint == p.endpoint
    }
}

/// `t` as `YYYY-MM-DDTHH:MM:SSZ` (UTC, whole seconds).
fn utc(t: SystemTime) -> String {
    // A time before the epoch (a clock set back) shows as the epoch, as it always has;
    // chrono would print the year 1969.
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    i64::try_from(secs)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(
            || "(time out of range)".to_string(),
            |d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn handshake_times_in_notes_are_utc() {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(utc(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(utc(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(utc(at(1_796_123_045)), "2026-12-01T11:04:05Z");
    }
}
