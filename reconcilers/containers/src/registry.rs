//! Private registries: which registry an image reference names, the credentials a pull
//! sends to it (a password read from a secret at pull time, never kept, logged or shown),
//! and what a pulled image must prove (the digest it was asked for).

use crate::spec::Registry;
use converge_core::Zeroizing;

/// The registry server an image reference names: its first path component when that
/// looks like a host (has a `.` or `:`, or is `localhost`), `docker.io` otherwise, as
/// Docker and Podman resolve short names.
pub fn server_of(image: &str) -> &str {
    let name = image.split('@').next().unwrap_or(image);
    match name.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// The `registries` entry whose server an image reference names.
pub fn for_image<'a>(registries: &'a [Registry], image: &str) -> Option<&'a Registry> {
    let server = server_of(image);
    registries.iter().find(|r| r.server == server)
}

/// The repository an image reference names, without tag or digest, spelled the same
/// way whatever the daemon reports (`docker.io/library/` dropped): `nginx:1` and
/// `docker.io/library/nginx@sha256:…` are both `nginx`.
pub fn repository(image: &str) -> &str {
    let name = image.split('@').next().unwrap_or(image);
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let name = match name[last_slash..].rfind(':') {
        Some(i) => &name[..last_slash + i],
        None => name,
    };
    let name = name.strip_prefix("docker.io/").unwrap_or(name);
    name.strip_prefix("library/").unwrap_or(name)
}

/// The digest an image reference pins (`name@sha256:…`), if any.
pub fn pinned_digest(image: &str) -> Option<&str> {
    image.split_once('@').map(|(_, d)| d)
}

/// Credentials for one pull. `Debug` never shows the password.
#[derive(Clone)]
pub struct RegistryAuth {
    pub server: String,
    pub username: String,
    pub password: Zeroizing<String>,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("server", &self.server)
            .field("username", &self.username)
            .field("password", &converge_core::redact(&self.password))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_of_image_references() {
        assert_eq!(server_of("nginx:1.27"), "docker.io");
        assert_eq!(server_of("library/nginx:1.27"), "docker.io");
        assert_eq!(server_of("docker.io/library/nginx:1.27"), "docker.io");
        assert_eq!(
            server_of("registry.internal:5000/cache/redis:7"),
            "registry.internal:5000"
        );
        assert_eq!(server_of("10.0.0.5:5000/app@sha256:00"), "10.0.0.5:5000");
        assert_eq!(server_of("localhost/busybox:test"), "localhost");
        assert_eq!(server_of("ghcr.io/acme/api@sha256:ab"), "ghcr.io");
        assert_eq!(
            pinned_digest("ghcr.io/acme/api@sha256:ab"),
            Some("sha256:ab")
        );
        assert_eq!(pinned_digest("ghcr.io/acme/api:1"), None);
        assert_eq!(repository("nginx:1.27"), "nginx");
        assert_eq!(repository("docker.io/library/nginx@sha256:ab"), "nginx");
        assert_eq!(repository("r:5000/a/b:1"), "r:5000/a/b");
        assert_eq!(repository("r:5000/a/b"), "r:5000/a/b");
    }

    #[test]
    fn auth_debug_redacts() {
        let a = RegistryAuth {
            server: "r:5000".into(),
            username: "ci".into(),
            password: Zeroizing::new("hunter2".into()),
        };
        assert!(!format!("{a:?}").contains("hunter2"));
    }
}
