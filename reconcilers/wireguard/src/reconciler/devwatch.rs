//! The device watch. A peer removed or changed by hand (`wg set`) makes no netlink
//! event, so every `Config::watch_every` the device is read cheaply
//! ([`WgDriver::device_sum`]) and its sum compared with the sum of converge's copy
//! (the device as the last pass read it, patched by converge's own writes). On a
//! difference the copy is dropped, so the next pass reads the device in full and
//! compares every peer, and a host event asks the engine for that pass. The watch
//! itself changes nothing on the host: the pass repairs.
//!
//! Statistics and the endpoints of peers the section gives none of are not in the sum
//! (see [`crate::sum`]), so traffic and roaming cause no pass. A peer with a configured
//! endpoint that roams causes one pass (which keeps the roamed endpoint while the
//! session is alive, see `plan::ROAMING_WINDOW`), after which the copy matches again.
//! A device state that already caused a pass causes no other (should the copy still
//! differ after it), so the watch never makes passes run back to back.
//!
//! A look costs ~0.4 ms of CPU at 1,000 peers (and wireguard-go ~1.4 ms to answer it;
//! BENCHMARKS.md): the looks are spaced so that they take at most [`BUDGET`] of one
//! core in the agent, every second up to ~1,200 peers.

use super::cache::Cache;
use crate::driver::WgDriver;
use crate::spec::{Parsed, PublicKey};
use crate::sum::DeviceSum;
use converge_core::HostEvent;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The share of one core the looks may take in the agent: a look that costs more CPU
/// than this share of `every` delays the next one.
pub(super) const BUDGET: f64 = 0.001;
/// The longest wait between two looks, however large the device.
const MAX_WAIT: Duration = Duration::from_secs(30);
use tracing::{debug, info};

/// The section's interface and peers, as of the last pass.
pub(super) struct Watched {
    pub(super) iface: String,
    pub(super) peers: Arc<Parsed>,
}

/// Whether the section sets this peer's endpoint (else WireGuard learns it: roaming).
fn endpoint_set(peers: &Parsed, k: &PublicKey) -> bool {
    peers
        .index
        .get(k)
        .and_then(|&i| peers.wants.get(i)?.as_ref())
        .is_some_and(|w| w.endpoint.is_some())
}

fn lock(cache: &Mutex<Cache>) -> MutexGuard<'_, Cache> {
    cache.lock().unwrap_or_else(|p| p.into_inner())
}

/// One look: `Some` (and the copy dropped) when the device differs from converge's copy.
/// Nothing is compared while apply writes, before the first pass, when the copy is
/// already dropped (the next pass reads in full anyway) or when the copy changed while
/// the device was read.
pub(super) fn check<D: WgDriver>(driver: &D, cache: &Mutex<Cache>) -> Option<HostEvent> {
    let (iface, backend, version, peers) = {
        let c = lock(cache);
        if c.writing || c.device_read_at.is_none() {
            return None;
        }
        let (Some(w), Some(link)) = (&c.watched, &c.link) else {
            return None;
        };
        (
            w.iface.clone(),
            link.backend,
            c.device_version,
            w.peers.clone(),
        )
    };
    let counted = |k: &PublicKey| endpoint_set(&peers, k);
    let live = match driver.device_sum(&iface, backend, &counted) {
        Ok(s) => s,
        Err(e) => {
            // A missing interface or wireguard-go is the netlink watch's to report.
            debug!(interface = %iface, error = %e, "device watch: cannot read the device");
            return None;
        }
    };
    let mut c = lock(cache);
    if c.writing || c.device_version != version {
        return None;
    }
    let expected = match c.expected {
        Some((v, s)) if v == version => s,
        _ => {
            let s = DeviceSum::of(c.state.device.as_ref()?, &counted);
            c.expected = Some((version, s));
            s
        }
    };
    if live == expected {
        c.fired = None;
        return None;
    }
    if c.fired == Some(live) {
        return None;
    }
    c.fired = Some(live);
    info!(interface = %iface, "the device was changed outside converge; the next pass reads it in full");
    c.invalidate_device();
    Some(HostEvent(format!(
        "WireGuard device {iface} changed outside converge"
    )))
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The wait before the next look, after a look that cost `cpu`.
pub(super) fn next_wait(every: Duration, cpu: Duration) -> Duration {
    every.max(cpu.div_f64(BUDGET)).min(MAX_WAIT.max(every))
}

/// The watch as a stream of host events: a look every `every` (or less often, see
/// [`BUDGET`]), each on a blocking thread.
pub(super) fn watch<D: WgDriver>(
    driver: Arc<D>,
    cache: Arc<Mutex<Cache>>,
    every: Duration,
) -> BoxStream<'static, HostEvent> {
    futures::stream::unfold(
        (driver, cache, every),
        move |(driver, cache, mut wait)| async move {
            loop {
                tokio::time::sleep(wait).await;
                let (d, c) = (driver.clone(), cache.clone());
                let look = tokio::task::spawn_blocking(move || {
                    let start = thread_cpu();
                    let event = check(&*d, &c);
                    (event, thread_cpu().saturating_sub(start))
                })
                .await;
                match look {
                    Ok((event, cpu)) => {
                        wait = next_wait(every, cpu);
                        if let Some(e) = event {
                            return Some((e, (driver, cache, wait)));
                        }
                    }
                    // A panic in a look: the watch stops, passes still run on every resync.
                    Err(_) => return None,
                }
            }
        },
    )
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_are_spaced_by_their_cost() {
        let s = Duration::from_secs(1);
        assert_eq!(next_wait(s, Duration::from_micros(450)), s);
        assert_eq!(
            next_wait(s, Duration::from_millis(5)),
            Duration::from_secs(5)
        );
        assert_eq!(next_wait(s, Duration::from_secs(1)), MAX_WAIT);
        let long = Duration::from_secs(90);
        assert_eq!(next_wait(long, Duration::from_secs(1)), long);
    }
}
