//! The `routes` section of the document: the HTTP(S) reverse-proxy routes a `--proxy`
//! node serves through the Caddy converge runs, and their semantic validation. The
//! reconciler itself (rendering and reloading Caddy's config) lands in a later issue.

pub mod spec;

pub use spec::*;
