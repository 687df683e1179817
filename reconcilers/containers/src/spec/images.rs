//! The `images` section: images pulled ahead of need (`prefetch`) and image garbage
//! collection when the image store's filesystem fills up (`gc`, kubelet's model), with
//! their semantic validation.

use super::{check_image, parse_duration};
use converge_core::vocab::Unique;
use converge_core::Problems;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Images the node keeps ready, and how the image store is kept from filling up.
/// Absent: converge pulls only what containers need and never removes an image.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImagesSpec {
    /// Images pulled ahead of need, before any container uses them (with the
    /// credentials of `registries`), e.g. the next release of an application. Each is
    /// a reference with a tag or digest; its pull's progress (bytes, layers) is in the
    /// status. A listed image is never collected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetch: Vec<String>,
    /// Image garbage collection; absent: converge never removes an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc: Option<ImageGc>,
}

/// Image garbage collection, as the kubelet does it: once the filesystem holding the
/// image store is `highPercent` full, images no container uses are removed, least
/// recently used first, until it is at most `lowPercent` full. Never removed: an image
/// any container on the node uses (converge's or not, running or stopped), one a
/// document container names, one in `prefetch` or `keep`, one first seen less than
/// `minAge` ago.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImageGc {
    /// Disk usage (percent of the image store's filesystem, 1-100) at which
    /// collection starts.
    #[serde(default = "default_high")]
    #[schemars(range(min = 1, max = 100))]
    pub high_percent: u8,
    /// Disk usage (percent, 1-100, below `highPercent`) collection brings the
    /// filesystem down to.
    #[serde(default = "default_low")]
    #[schemars(range(min = 1, max = 100))]
    pub low_percent: u8,
    /// Images never collected: a reference with a tag or digest (`nginx:1.27`) keeps
    /// that image, a repository (`ghcr.io/acme/api`) every image of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<String>,
    /// An image this agent first saw less than this long ago is not collected (one
    /// pulled by hand just before its `run`), e.g. `2m`, `1h`, `0s`. The clock starts
    /// again when the agent starts.
    #[serde(default = "default_min_age")]
    pub min_age: String,
}

/// Default `highPercent`, the kubelet's.
pub const DEFAULT_HIGH_PERCENT: u8 = 85;
/// Default `lowPercent`, the kubelet's.
pub const DEFAULT_LOW_PERCENT: u8 = 80;
/// Default `minAge`, the kubelet's.
pub const DEFAULT_MIN_AGE: &str = "2m";

impl Default for ImageGc {
    fn default() -> Self {
        Self {
            high_percent: DEFAULT_HIGH_PERCENT,
            low_percent: DEFAULT_LOW_PERCENT,
            keep: Vec::new(),
            min_age: default_min_age(),
        }
    }
}

fn default_high() -> u8 {
    DEFAULT_HIGH_PERCENT
}

fn default_low() -> u8 {
    DEFAULT_LOW_PERCENT
}

fn default_min_age() -> String {
    DEFAULT_MIN_AGE.to_string()
}

/// Semantic checks of the `images` section; `path` is its JSON path.
pub fn validate_images(spec: &ImagesSpec, path: &str, problems: &mut Problems) {
    let mut seen = Unique::new("image", format!("{path}.prefetch"));
    for (i, image) in spec.prefetch.iter().enumerate() {
        let p = format!("{path}.prefetch[{i}]");
        match check_image(image) {
            Ok(()) => seen.check(image, i, p, problems),
            Err(e) => problems.push_hint(p, e, "an image reference with a tag or digest"),
        }
    }
    let Some(gc) = &spec.gc else {
        return;
    };
    let gp = format!("{path}.gc");
    for (field, v) in [
        ("highPercent", gc.high_percent),
        ("lowPercent", gc.low_percent),
    ] {
        if !(1..=100).contains(&v) {
            problems.push(
                format!("{gp}.{field}"),
                format!("{v} is not a percentage from 1 to 100"),
            );
        }
    }
    if gc.low_percent >= gc.high_percent {
        problems.push_hint(
            format!("{gp}.lowPercent"),
            format!(
                "lowPercent {} must be below highPercent {}",
                gc.low_percent, gc.high_percent
            ),
            "collection starts at highPercent and stops at lowPercent",
        );
    }
    for (i, k) in gc.keep.iter().enumerate() {
        if let Err(e) = check_keep(k) {
            problems.push_hint(
                format!("{gp}.keep[{i}]"),
                e,
                "an image reference (nginx:1.27) or a repository (ghcr.io/acme/api)",
            );
        }
    }
    if parse_duration(&gc.min_age).is_none() {
        problems.push_hint(
            format!("{gp}.minAge"),
            format!("invalid duration {:?}", gc.min_age),
            "e.g. 0s, 2m, 1h30m",
        );
    }
}

/// A `keep` entry: an image reference, or a repository (a reference without tag or
/// digest).
fn check_keep(entry: &str) -> Result<(), String> {
    if check_image(entry).is_ok() {
        return Ok(());
    }
    // A repository is what a reference is without its tag.
    check_image(&format!("{entry}:latest")).map_err(|e| e.replace(":latest", ""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(v: serde_json::Value) -> Vec<String> {
        let spec: ImagesSpec = serde_json::from_value(v).unwrap();
        let mut p = Problems::default();
        validate_images(&spec, "$.images", &mut p);
        p.0.iter().map(|p| p.path.clone()).collect()
    }

    #[test]
    fn defaults_are_the_kubelets() {
        let spec: ImagesSpec = serde_json::from_value(json!({"gc": {}})).unwrap();
        let gc = spec.gc.unwrap();
        assert_eq!((gc.high_percent, gc.low_percent), (85, 80));
        assert_eq!(gc.min_age, "2m");
        assert!(gc.keep.is_empty());
        assert!(problems(json!({"gc": {}})).is_empty());
    }

    #[test]
    fn good_sections_pass() {
        assert!(problems(json!({
            "prefetch": ["nginx:1.27", "ghcr.io/acme/api@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"],
            "gc": {"highPercent": 90, "lowPercent": 70, "keep": ["nginx", "registry.internal:5000/base/debian:12"], "minAge": "0s"}
        }))
        .is_empty());
    }

    #[test]
    fn every_problem_has_its_path() {
        assert_eq!(
            problems(json!({
                "prefetch": ["nginx", "nginx:1", "nginx:1", "Bad:1"],
                "gc": {"highPercent": 0, "lowPercent": 101, "keep": ["ok", "no good", "x@sha256:12"], "minAge": "soon"}
            })),
            [
                "$.images.prefetch[0]",
                "$.images.prefetch[2]",
                "$.images.prefetch[3]",
                "$.images.gc.highPercent",
                "$.images.gc.lowPercent",
                "$.images.gc.lowPercent",
                "$.images.gc.keep[1]",
                "$.images.gc.keep[2]",
                "$.images.gc.minAge",
            ]
        );
        assert_eq!(
            problems(json!({"gc": {"highPercent": 80, "lowPercent": 80}})),
            ["$.images.gc.lowPercent"]
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_value::<ImagesSpec>(json!({"gc": {"high": 1}})).is_err());
        assert!(serde_json::from_value::<ImagesSpec>(json!({"pull": []})).is_err());
    }
}
