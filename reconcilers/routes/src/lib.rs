//! The routes reconciler: the HTTP(S) reverse-proxy routes a `--proxy` node serves,
//! through a Caddy converge runs (or an existing one), changed over Caddy's admin API
//! at most once per pass.

pub mod driver;
pub mod plan;
pub mod reconciler;
pub mod spec;

pub use reconciler::Routes;
pub use spec::*;
