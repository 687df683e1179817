//! The `images` section's glue: what observe reads for it (the prefetch list's images,
//! the image store for GC, how long this agent has known each image and when it last
//! saw it used), prefetch pulls (in the agent in a background task whose progress the
//! status shows, its end a host event), GC removals (users read again just before,
//! space freed measured), and the status notes.

use super::{pull_image, Containers};
use crate::driver::{human_bytes, ContainerRuntime, DiskUsage, ImageInfo, PullProgress};
use crate::plan::images::{gc_decision, protected, ImageStore, PrefetchStatus};
use crate::plan::Observed;
use crate::spec::{ImagesSpec, Registry};
use converge_core::{DriverError, HostEvent, ObjectNote, ObjectOutcome};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

/// First delay after a failed prefetch; doubles per failure up to [`PREFETCH_RETRY_MAX`].
pub const PREFETCH_RETRY: Duration = Duration::from_secs(10);
pub const PREFETCH_RETRY_MAX: Duration = Duration::from_secs(300);

/// One prefetch of this agent.
#[derive(Clone, Debug)]
enum Prefetch {
    Pulling {
        progress: PullProgress,
        since: Instant,
    },
    Failed {
        error: String,
        at: Instant,
        failures: u32,
    },
    Done(String),
}

/// When this agent first saw an image, and last saw a container use it.
#[derive(Clone, Copy, Debug)]
struct Seen {
    first: Instant,
    last_used: Option<i64>,
}

/// What the last GC did.
#[derive(Clone, Debug)]
struct GcRecord {
    removed: usize,
    failed: usize,
    freed: u64,
    took: Duration,
    at: SystemTime,
}

/// The reconciler's memory for the `images` section.
pub(super) struct ImagesState {
    prefetch: Arc<Mutex<BTreeMap<String, Prefetch>>>,
    seen: Mutex<BTreeMap<String, Seen>>,
    last_gc: Mutex<Option<GcRecord>>,
    events: mpsc::UnboundedSender<HostEvent>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<HostEvent>>>,
}

impl Default for ImagesState {
    fn default() -> Self {
        let (events, rx) = mpsc::unbounded_channel();
        Self {
            prefetch: Arc::default(),
            seen: Mutex::default(),
            last_gc: Mutex::default(),
            events,
            receiver: Mutex::new(Some(rx)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl ImagesState {
    /// Ends of background prefetches, as host events (taken once).
    pub(super) fn take_events(&self) -> Option<mpsc::UnboundedReceiver<HostEvent>> {
        lock(&self.receiver).take()
    }
}

impl<R: ContainerRuntime> Containers<R> {
    /// The prefetch list's images (added to `images`), this agent's prefetches, and,
    /// with `gc`, the image store (an error there fails GC alone).
    pub(super) async fn observe_images(
        &self,
        spec: &ImagesSpec,
        observed: &mut Observed,
    ) -> Result<(), DriverError> {
        for image in &spec.prefetch {
            if !observed.images.contains_key(image) {
                let local = self
                    .call("image inspect", self.runtime.image(image))
                    .await?;
                observed.images.insert(image.clone(), local);
            }
        }
        observed.prefetch = {
            let mut prefetch = lock(&self.images.prefetch);
            prefetch.retain(|image, _| spec.prefetch.contains(image));
            prefetch
                .iter()
                .map(|(image, p)| (image.clone(), status(p)))
                .collect()
        };
        if let Some(gc) = &spec.gc {
            observed.store = Some(
                self.read_store()
                    .await
                    .map(|(images, users, disk)| {
                        let (known_for, last_used) = self.remember(&images, &users);
                        ImageStore {
                            images,
                            users,
                            disk,
                            known_for,
                            last_used,
                            policy: gc.clone(),
                        }
                    })
                    .map_err(|e| e.to_string()),
            );
        }
        Ok(())
    }

    async fn read_store(
        &self,
    ) -> Result<
        (
            Vec<ImageInfo>,
            std::collections::BTreeSet<String>,
            DiskUsage,
        ),
        DriverError,
    > {
        let images = self.call("image list", self.runtime.list_images()).await?;
        let users = self.call("image users", self.runtime.image_users()).await?;
        let disk = self
            .call("image store disk", self.runtime.image_disk())
            .await?;
        Ok((images, users, disk))
    }

    /// Updates when each image was first seen and last used; returns how long each has
    /// been known and their last use.
    fn remember(
        &self,
        images: &[ImageInfo],
        users: &std::collections::BTreeSet<String>,
    ) -> (BTreeMap<String, Duration>, BTreeMap<String, i64>) {
        let now = Instant::now();
        let unix = unix_now();
        let mut seen = lock(&self.images.seen);
        seen.retain(|id, _| images.iter().any(|i| &i.id == id));
        let mut known_for = BTreeMap::new();
        let mut last_used = BTreeMap::new();
        for i in images {
            let s = seen.entry(i.id.clone()).or_insert(Seen {
                first: now,
                last_used: None,
            });
            if i.in_use || users.contains(&i.id) {
                s.last_used = Some(unix);
            }
            known_for.insert(i.id.clone(), now.duration_since(s.first));
            if let Some(t) = s.last_used {
                last_used.insert(i.id.clone(), t);
            }
        }
        (known_for, last_used)
    }

    /// Starts the prefetch pulls: in the agent each in its own task (the pass goes
    /// on; its end is a host event), otherwise one after another in the pass.
    pub(super) async fn prefetch(
        &self,
        pulls: Vec<(String, Option<Registry>)>,
    ) -> Vec<ObjectOutcome> {
        let mut outcomes = Vec::new();
        for (image, registry) in pulls {
            let progress = PullProgress::default();
            lock(&self.images.prefetch).insert(
                image.clone(),
                Prefetch::Pulling {
                    progress: progress.clone(),
                    since: Instant::now(),
                },
            );
            let runtime = self.runtime.clone();
            let config = self.config.clone();
            let prefetch = self.images.prefetch.clone();
            let events = self.images.events.clone();
            let object = format!("image {image}");
            let span = tracing::info_span!("prefetch", image = %image);
            let task = async move {
                info!(registry = crate::registry::server_of(&image), "prefetching");
                let started = Instant::now();
                let r = pull_image(&*runtime, &config, &image, registry.as_ref(), &progress).await;
                let mut map = lock(&prefetch);
                let failures = match map.get(&image) {
                    Some(Prefetch::Failed { failures, .. }) => *failures,
                    _ => 0,
                };
                let event = match &r {
                    Ok(()) => {
                        let s = progress.summary();
                        let done = format!(
                            "prefetched: {}, {} layers in {:.1}s",
                            human_bytes(s.total),
                            s.layers,
                            started.elapsed().as_secs_f64()
                        );
                        info!("{done}");
                        map.insert(image.clone(), Prefetch::Done(done));
                        format!("image {image} prefetched")
                    }
                    Err(e) => {
                        warn!(error = %e, "prefetch failed");
                        map.insert(
                            image.clone(),
                            Prefetch::Failed {
                                error: e.to_string(),
                                at: Instant::now(),
                                failures: failures + 1,
                            },
                        );
                        format!("prefetch of image {image} failed")
                    }
                };
                drop(map);
                let _ = events.send(HostEvent(event));
                r
            }
            .instrument(span);
            if self.config.background_prefetch {
                tokio::spawn(task);
                outcomes.push(ObjectOutcome::ok(object));
            } else {
                outcomes.push(ObjectOutcome::from_result(object, task.await));
            }
        }
        outcomes
    }

    /// Removes the images GC chose, oldest first, after reading their users again (one
    /// a container started using since the pass began is left); measures what that
    /// freed on the image store's filesystem.
    pub(super) async fn collect(&self, images: Vec<ImageInfo>) -> Vec<ObjectOutcome> {
        let started = std::time::Instant::now();
        let users = match self.call("image users", self.runtime.image_users()).await {
            Ok(u) => u,
            Err(e) => {
                return images
                    .iter()
                    .map(|i| ObjectOutcome::failed(format!("image {}", i.name()), &e))
                    .collect()
            }
        };
        let before = self
            .call("image store disk", self.runtime.image_disk())
            .await;
        let mut outcomes = Vec::new();
        let (mut removed, mut failed) = (0, 0);
        for image in &images {
            let object = format!("image {}", image.name());
            if users.contains(&image.id) {
                info!(image = %image.name(), "a container uses it now: kept");
                outcomes.push(ObjectOutcome::ok(object));
                continue;
            }
            let r = self
                .call("image remove", self.runtime.remove_image(image))
                .await;
            match &r {
                Ok(()) => {
                    removed += 1;
                    info!(image = %image.name(), id = %image.id, size = image.size, "image gc: removed");
                }
                Err(e) => {
                    failed += 1;
                    warn!(image = %image.name(), error = %e, "image gc: not removed");
                }
            }
            outcomes.push(ObjectOutcome::from_result(object, r));
        }
        let after = self
            .call("image store disk", self.runtime.image_disk())
            .await;
        let freed = match (before, after) {
            (Ok(b), Ok(a)) => b.used.saturating_sub(a.used),
            _ => 0,
        };
        let took = started.elapsed();
        info!(
            removed,
            failed,
            freed_bytes = freed,
            took_ms = took.as_millis() as u64,
            "image gc done"
        );
        *lock(&self.images.last_gc) = Some(GcRecord {
            removed,
            failed,
            freed,
            took,
            at: SystemTime::now(),
        });
        outcomes
    }

    /// Notes: each listed image's prefetch (done, or the last failure), and the image
    /// store's usage with what the last GC did.
    pub(super) fn image_notes(&self, observed: &Observed) -> Vec<ObjectNote> {
        let mut notes = Vec::new();
        for (image, p) in &observed.prefetch {
            let note = match p {
                PrefetchStatus::Done(d) => d.clone(),
                PrefetchStatus::Pulling(p) => format!("pulling: {p}"),
                PrefetchStatus::Failed { error, .. } => format!("prefetch failed: {error}"),
            };
            notes.push(ObjectNote {
                object: format!("image {image}"),
                note,
            });
        }
        if let Some(Ok(store)) = &observed.store {
            let d = gc_decision(store, &protected(observed));
            let mut note = format!(
                "{:.1}% of {} used (gc from {}% down to {}%)",
                d.disk.percent(),
                human_bytes(d.disk.capacity),
                store.policy.high_percent,
                store.policy.low_percent
            );
            if d.freed < d.to_free {
                note.push_str(&format!(
                    "; only {} of the {} to free is in images nobody needs",
                    human_bytes(d.freed),
                    human_bytes(d.to_free)
                ));
            }
            if let Some(g) = lock(&self.images.last_gc).as_ref() {
                let at = utc(g.at);
                note.push_str(&format!(
                    "; last gc at {at}: removed {} images{}, freed {} in {:.2}s",
                    g.removed,
                    if g.failed > 0 {
                        format!(" ({} failed)", g.failed)
                    } else {
                        String::new()
                    },
                    human_bytes(g.freed),
                    g.took.as_secs_f64()
                ));
            }
            notes.push(ObjectNote {
                object: "image store".into(),
                note,
            });
        }
        notes
    }
}

/// A prefetch as the plan and the status see it.
fn status(p: &Prefetch) -> PrefetchStatus {
    match p {
        Prefetch::Pulling { progress, since } => PrefetchStatus::Pulling(format!(
            "{} ({}s)",
            progress.summary(),
            since.elapsed().as_secs()
        )),
        Prefetch::Failed {
            error,
            at,
            failures,
        } => {
            let delay = PREFETCH_RETRY
                .saturating_mul(1 << failures.saturating_sub(1).min(5))
                .min(PREFETCH_RETRY_MAX);
            PrefetchStatus::Failed {
                error: error.clone(),
                retry_in: delay.saturating_sub(at.elapsed()),
            }
        }
        Prefetch::Done(d) => PrefetchStatus::Done(d.clone()),
    }
}

/// `2026-12-07T10:00:00Z` (UTC, seconds).
fn utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            utc(UNIX_EPOCH + Duration::from_secs(1_796_637_600)),
            "2026-12-07T10:00:00Z"
        );
    }

    #[test]
    fn failed_prefetches_back_off() {
        let at = Instant::now();
        let retry = |failures| match status(&Prefetch::Failed {
            error: "x".into(),
            at,
            failures,
        }) {
            PrefetchStatus::Failed { retry_in, .. } => retry_in,
            other => panic!("{other:?}"),
        };
        assert!(retry(1) <= PREFETCH_RETRY && retry(1) > PREFETCH_RETRY / 2);
        assert!(retry(2) > PREFETCH_RETRY);
        assert!(retry(30) <= PREFETCH_RETRY_MAX);
    }
}
