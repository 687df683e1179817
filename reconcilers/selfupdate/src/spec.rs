//! The `agent` section of the document: the build of converge this node should run.

use converge_core::Problems;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The converge build this node runs. The document is signed, so `sha256` authenticates
/// the download whatever `url` serves it (the control plane's `/v1/artifacts/NAME`, a
/// mirror). Absent section: the agent never replaces itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentSpec {
    /// Release, as `converge --version` prints it first (e.g. `0.2.0`): shown in status
    /// and checked against the new binary before it is installed.
    pub version: String,
    /// Where the binary is downloaded from (`https://`, or `http://` since the checksum
    /// is what is trusted).
    pub url: String,
    /// Hex SHA-256 of the binary.
    pub sha256: String,
    /// Seconds the restarted agent has to become ready (every first pass done) before
    /// the update is rolled back.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_timeout() -> u64 {
    300
}

pub fn validate(spec: &AgentSpec, path: &str, problems: &mut Problems) {
    let version_ok = !spec.version.is_empty()
        && spec.version.len() <= 64
        && spec
            .version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
    if !version_ok {
        problems.push(
            format!("{path}.version"),
            "a release such as 0.2.0 (letters, digits, . _ + -)",
        );
    }
    let scheme_ok = spec.url.starts_with("https://") || spec.url.starts_with("http://");
    if !scheme_ok || spec.url.len() > 2048 || spec.url.chars().any(char::is_whitespace) {
        problems.push(format!("{path}.url"), "an http:// or https:// URL");
    }
    if spec.sha256.len() != 64 || !spec.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        problems.push(format!("{path}.sha256"), "64 hex digits (SHA-256)");
    }
    if !(30..=3600).contains(&spec.timeout_secs) {
        problems.push(format!("{path}.timeoutSecs"), "30 to 3600 seconds");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fields_are_named() {
        let spec = AgentSpec {
            version: "0.2 0".into(),
            url: "ftp://x".into(),
            sha256: "abc".into(),
            timeout_secs: 5,
        };
        let mut p = Problems::default();
        validate(&spec, "$.agent", &mut p);
        let paths: Vec<_> = p.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "$.agent.version",
                "$.agent.url",
                "$.agent.sha256",
                "$.agent.timeoutSecs"
            ]
        );
    }
}
