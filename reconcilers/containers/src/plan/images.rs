//! The `images` section's part of the plan, pure: prefetch pulls (and the waits of
//! those under way or failed), and image GC's choice, the kubelet's: above
//! `highPercent`, the least recently used images nobody needs, until `lowPercent`.

use super::{Action, Observed};
use crate::driver::{human_bytes, DiskUsage, ImageInfo};
use crate::registry;
use crate::spec::{parse_duration, ImageGc, ImagesSpec, Registry};
use converge_core::{Change, FieldChange, Op, Plan, Waiting};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How often a pass looks at a prefetch under way (its progress in the status); its
/// end starts a pass by itself.
pub const PREFETCH_POLL: Duration = Duration::from_secs(2);

/// When a pass looks again after the image store could not be read.
pub const STORE_RETRY: Duration = Duration::from_secs(60);

/// What image GC reads from the node (only when the section has `gc`).
#[derive(Clone, Debug, Default)]
pub struct ImageStore {
    /// Every image on the node.
    pub images: Vec<ImageInfo>,
    /// Ids of the images any container uses (converge's or not, running or not).
    pub users: BTreeSet<String>,
    /// The filesystem holding the image store.
    pub disk: DiskUsage,
    /// Per image id: how long this agent has known it.
    pub known_for: BTreeMap<String, Duration>,
    /// Per image id: when (Unix seconds) this agent last saw a container use it.
    pub last_used: BTreeMap<String, i64>,
    /// The section's policy, for the status notes (which see no spec).
    pub policy: ImageGc,
}

/// A prefetch pull of this agent.
#[derive(Clone, Debug, PartialEq)]
pub enum PrefetchStatus {
    /// Under way, with its progress (`12.3 MB of 45.6 MB, 2 of 5 layers`).
    Pulling(String),
    /// Failed; the next try is due in `retry_in` (zero: now).
    Failed { error: String, retry_in: Duration },
    /// Done: what it fetched and how long it took.
    Done(String),
}

/// What image GC decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GcDecision {
    pub disk: DiskUsage,
    /// Bytes to free to get down to `lowPercent` (zero below `highPercent`).
    pub to_free: u64,
    /// Oldest first.
    pub remove: Vec<ImageInfo>,
    /// What `remove` frees by the runtime's sizes (shared layers make it an upper
    /// bound).
    pub freed: u64,
}

/// Whether `name` (a reference the runtime lists) is what `keep` names: the same
/// reference when `keep` has a tag or digest, else any reference of that repository.
fn keeps(keep: &str, name: &str) -> bool {
    if registry::repository(keep) != registry::repository(name) {
        return false;
    }
    match suffix(keep) {
        None => true,
        Some(k) => suffix(name) == Some(k),
    }
}

/// The tag or digest of a reference, if it has one.
fn suffix(r: &str) -> Option<&str> {
    if let Some((_, d)) = r.split_once('@') {
        return Some(d);
    }
    let last = r.rfind('/').map_or(0, |i| i + 1);
    r[last..].rfind(':').map(|i| &r[last + i + 1..])
}

/// Image GC's choice over what was observed: nothing below `highPercent`; above it,
/// the images that no container uses, that are not `protected` (ids the document's
/// containers and prefetch list resolve to) nor kept, and that this agent has known
/// for `minAge`, least recently used first (never used: oldest built first), until
/// their sizes add up to what brings usage down to `lowPercent`.
pub fn gc_decision(store: &ImageStore, protected: &BTreeSet<String>) -> GcDecision {
    let policy = &store.policy;
    let disk = store.disk;
    let mut d = GcDecision {
        disk,
        ..Default::default()
    };
    let cap = u128::from(disk.capacity);
    if cap == 0 || u128::from(disk.used) * 100 < cap * u128::from(policy.high_percent) {
        return d;
    }
    let low = u64::try_from(cap * u128::from(policy.low_percent) / 100).unwrap_or(u64::MAX);
    d.to_free = disk.used.saturating_sub(low);
    let min_age = parse_duration(&policy.min_age).unwrap_or(Duration::MAX);
    let mut candidates: Vec<&ImageInfo> = store
        .images
        .iter()
        .filter(|i| !i.in_use && !store.users.contains(&i.id) && !protected.contains(&i.id))
        .filter(|i| {
            !policy
                .keep
                .iter()
                .any(|k| i.tags.iter().chain(&i.digests).any(|n| keeps(k, n)))
        })
        .filter(|i| store.known_for.get(&i.id).is_some_and(|t| *t >= min_age))
        .collect();
    let last_used = |i: &ImageInfo| store.last_used.get(&i.id).copied().unwrap_or(i.created);
    candidates
        .sort_by(|a, b| (last_used(a), a.created, &a.id).cmp(&(last_used(b), b.created, &b.id)));
    for i in candidates {
        if d.freed >= d.to_free {
            break;
        }
        d.freed += i.size;
        d.remove.push(i.clone());
    }
    d
}

/// The image ids the document needs (its containers' and the prefetch list's
/// references, as resolved on the node).
pub fn protected(observed: &Observed) -> BTreeSet<String> {
    observed
        .images
        .values()
        .flatten()
        .map(|i| i.id.clone())
        .collect()
}

/// Adds the section's prefetch pulls and GC removals to `plan`.
pub fn plan(
    spec: &ImagesSpec,
    observed: &Observed,
    registries: &[Registry],
    plan: &mut Plan<Action>,
) {
    for image in &spec.prefetch {
        let pulled_anyway = plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::Pull { image: i, .. } if i == image));
        if pulled_anyway || observed.images.get(image).is_some_and(Option::is_some) {
            continue;
        }
        match observed.prefetch.get(image) {
            Some(PrefetchStatus::Pulling(progress)) => plan.waiting.push(
                Waiting::new("image", image, format!("pulling: {progress}"))
                    .retry_after(PREFETCH_POLL)
                    .in_progress(),
            ),
            Some(PrefetchStatus::Failed { error, retry_in }) if !retry_in.is_zero() => {
                plan.waiting.push(
                    Waiting::new(
                        "image",
                        image,
                        format!(
                            "prefetch failed: {error}; next try in {}s",
                            retry_in.as_secs().max(1)
                        ),
                    )
                    .retry_after(*retry_in)
                    .failed(),
                )
            }
            _ => {
                plan.changes
                    .push(
                        Change::new(Op::Create, "image", image).with_field(FieldChange::new(
                            "prefetch",
                            None,
                            Some("pull ahead of need".into()),
                        )),
                    );
                plan.actions.push(Action::Prefetch {
                    image: image.clone(),
                    registry: registry::for_image(registries, image).cloned(),
                });
            }
        }
    }
    let store = match &observed.store {
        None => return,
        Some(Ok(store)) => store,
        Some(Err(e)) => {
            plan.waiting.push(
                Waiting::new(
                    "image",
                    "store",
                    format!("cannot read the image store: {e}"),
                )
                .retry_after(STORE_RETRY)
                .failed(),
            );
            return;
        }
    };
    let d = gc_decision(store, &protected(observed));
    let why = format!(
        "image store {:.1}% full (collected from {}% down to {}%: {} to free)",
        d.disk.percent(),
        store.policy.high_percent,
        store.policy.low_percent,
        human_bytes(d.to_free)
    );
    for image in d.remove {
        plan.changes.push(
            Change::new(Op::Delete, "image", image.name())
                .with_field(FieldChange::new(
                    "size",
                    Some(human_bytes(image.size)),
                    None,
                ))
                .with_field(FieldChange::new("why", None, Some(why.clone()))),
        );
        plan.actions.push(Action::RemoveImage { image });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::LocalImage;

    const MB: u64 = 1_000_000;

    fn image(id: &str, tag: &str, size_mb: u64, created: i64) -> ImageInfo {
        ImageInfo {
            id: format!("sha256:{id}"),
            tags: if tag.is_empty() {
                Vec::new()
            } else {
                vec![tag.to_string()]
            },
            digests: Vec::new(),
            size: size_mb * MB,
            created,
            in_use: false,
        }
    }

    fn policy(high: u8, low: u8, keep: &[&str], min_age: &str) -> ImageGc {
        ImageGc {
            high_percent: high,
            low_percent: low,
            keep: keep.iter().map(|s| s.to_string()).collect(),
            min_age: min_age.into(),
        }
    }

    /// 100 MB filesystem with `used_mb` used; every image known for an hour.
    fn store(images: Vec<ImageInfo>, used_mb: u64, policy: ImageGc) -> ImageStore {
        ImageStore {
            known_for: images
                .iter()
                .map(|i| (i.id.clone(), Duration::from_secs(3600)))
                .collect(),
            images,
            disk: DiskUsage {
                capacity: 100 * MB,
                used: used_mb * MB,
            },
            policy,
            ..Default::default()
        }
    }

    fn removed(d: &GcDecision) -> Vec<String> {
        d.remove.iter().map(ImageInfo::name).collect()
    }

    fn node_images() -> Vec<ImageInfo> {
        vec![
            image("a", "localhost/old:1", 10, 100),
            image("b", "localhost/older:1", 10, 50),
            image("c", "localhost/new:1", 10, 300),
            image("d", "", 5, 200),
        ]
    }

    #[test]
    fn below_high_nothing_is_collected() {
        let s = store(node_images(), 84, policy(85, 80, &[], "0s"));
        let d = gc_decision(&s, &BTreeSet::new());
        assert_eq!((d.to_free, d.remove.len()), (0, 0));
    }

    #[test]
    fn from_high_down_to_low_oldest_first() {
        // 90% used, down to 80%: 10 MB to free; the oldest built is enough.
        let s = store(node_images(), 90, policy(85, 80, &[], "0s"));
        let d = gc_decision(&s, &BTreeSet::new());
        assert_eq!(d.to_free, 10 * MB);
        assert_eq!(removed(&d), ["localhost/older:1"]);
        assert_eq!(d.freed, 10 * MB);
        // Exactly at high counts (the kubelet's `>=`); 25 MB to free takes three.
        let s = store(node_images(), 85, policy(85, 60, &[], "0s"));
        assert_eq!(
            removed(&gc_decision(&s, &BTreeSet::new())),
            ["localhost/older:1", "localhost/old:1", "sha256:d"]
        );
    }

    #[test]
    fn used_kept_protected_and_young_images_stay() {
        let mut images = node_images();
        images[3].in_use = true; // a build container (Podman counts it)
        images.push(image("e", "ghcr.io/acme/api:2", 10, 1));
        images.push(image("f", "docker.io/library/nginx:1.27", 10, 2));
        images.push(image("g", "localhost/fresh:1", 10, 3));
        let mut s = store(
            images,
            99,
            policy(85, 1, &["ghcr.io/acme/api", "nginx:1.27"], "10m"),
        );
        s.users.insert("sha256:b".into()); // a foreign container, even stopped
        s.known_for
            .insert("sha256:g".into(), Duration::from_secs(60));
        let protected = BTreeSet::from(["sha256:a".to_string()]); // a document image
        let d = gc_decision(&s, &protected);
        assert_eq!(removed(&d), ["localhost/new:1"]);
        assert!(d.freed < d.to_free, "everything else is needed");
        // A keep entry with another tag keeps nothing.
        s.policy.keep = vec!["nginx:1.28".into()];
        assert!(removed(&gc_decision(&s, &protected))
            .contains(&"docker.io/library/nginx:1.27".to_string()));
    }

    #[test]
    fn last_use_orders_before_build_time() {
        let mut s = store(node_images(), 90, policy(85, 80, &[], "0s"));
        // older:1 ran a container a moment ago: old:1 goes first.
        s.last_used.insert("sha256:b".into(), 10_000);
        assert_eq!(
            removed(&gc_decision(&s, &BTreeSet::new())),
            ["localhost/old:1"]
        );
    }

    #[test]
    fn unknown_images_and_bad_ages_are_not_collected() {
        let mut s = store(node_images(), 90, policy(85, 80, &[], "0s"));
        s.known_for.clear();
        assert!(gc_decision(&s, &BTreeSet::new()).remove.is_empty());
        let s = store(node_images(), 90, policy(85, 80, &[], "bad"));
        assert!(gc_decision(&s, &BTreeSet::new()).remove.is_empty());
    }

    #[test]
    fn references_keep_by_repository_or_exact_reference() {
        assert!(keeps("nginx", "docker.io/library/nginx:1.27"));
        assert!(keeps("nginx:1.27", "nginx:1.27"));
        assert!(!keeps("nginx:1.27", "nginx:1.28"));
        assert!(keeps("r:5000/a/b", "r:5000/a/b:7"));
        assert!(!keeps("r:5000/a", "r:5000/a/b:7"));
        assert!(keeps("r/a@sha256:ab", "r/a@sha256:ab"));
        assert!(!keeps("r/a@sha256:ab", "r/a:1"));
    }

    fn observed_with(images: &[(&str, Option<&str>)]) -> Observed {
        Observed {
            images: images
                .iter()
                .map(|(r, id)| {
                    (
                        r.to_string(),
                        id.map(|id| LocalImage {
                            id: id.into(),
                            digests: Vec::new(),
                        }),
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn prefetch_pulls_what_is_missing_and_waits_on_what_runs_or_failed() {
        let spec = ImagesSpec {
            prefetch: vec![
                "r:5000/a:1".into(),
                "r:5000/b:1".into(),
                "r:5000/c:1".into(),
                "r:5000/d:1".into(),
            ],
            gc: None,
        };
        let mut o = observed_with(&[
            ("r:5000/a:1", Some("sha256:a")),
            ("r:5000/b:1", None),
            ("r:5000/c:1", None),
            ("r:5000/d:1", None),
        ]);
        o.prefetch.insert(
            "r:5000/c:1".into(),
            PrefetchStatus::Pulling("1.0 MB of 2.0 MB, 1 of 2 layers".into()),
        );
        o.prefetch.insert(
            "r:5000/d:1".into(),
            PrefetchStatus::Failed {
                error: "unauthorized".into(),
                retry_in: Duration::from_secs(20),
            },
        );
        let registries = vec![Registry {
            server: "r:5000".into(),
            username: "u".into(),
            password_secret: "p".into(),
        }];
        let mut p = Plan::default();
        plan(&spec, &o, &registries, &mut p);
        assert_eq!(
            p.actions,
            [Action::Prefetch {
                image: "r:5000/b:1".into(),
                registry: Some(registries[0].clone())
            }]
        );
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].to_string(), "+ image r:5000/b:1");
        assert_eq!(p.waiting.len(), 2);
        assert!(p.waiting[0].in_progress && p.waiting[0].reason.contains("1 of 2 layers"));
        assert!(p.waiting[1].failed && p.waiting[1].reason.contains("next try in 20s"));
        // A failure whose delay is over is pulled again.
        o.prefetch.insert(
            "r:5000/d:1".into(),
            PrefetchStatus::Failed {
                error: "unauthorized".into(),
                retry_in: Duration::ZERO,
            },
        );
        let mut p = Plan::default();
        plan(&spec, &o, &registries, &mut p);
        assert_eq!(p.actions.len(), 2);
    }

    #[test]
    fn gc_removals_are_shown_with_size_and_reason() {
        let mut o = observed_with(&[("localhost/old:1", Some("sha256:a"))]);
        o.store = Some(Ok(store(node_images(), 90, policy(85, 80, &[], "0s"))));
        let mut p = Plan::default();
        plan(&ImagesSpec::default(), &o, &[], &mut p);
        assert_eq!(p.changes.len(), 1);
        let c = &p.changes[0];
        assert_eq!(c.to_string(), "- image localhost/older:1");
        assert_eq!(c.fields[0].old.as_deref(), Some("10.0 MB"));
        assert!(c.fields[1]
            .new
            .as_deref()
            .unwrap_or("")
            .contains("90.0% full"));
        assert!(matches!(&p.actions[0], Action::RemoveImage { image } if image.id == "sha256:b"));
    }
}
