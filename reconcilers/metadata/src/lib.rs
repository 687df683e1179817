//! The metadata reconciler: node labels and annotations, and the projects whose metadata
//! the node serves to its containers (stored in SQLite, read over a token-scoped HTTP API
//! with blocking watches).

pub mod spec;

pub use spec::*;
