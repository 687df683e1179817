//! The metadata reconciler: node labels and annotations, and the projects whose metadata
//! the node serves to its containers (stored in SQLite, read over a token-scoped HTTP API
//! with blocking watches).

pub mod api;
pub mod driver;
pub mod plan;
pub mod reconciler;
pub mod snapshot;
pub mod spec;

pub use driver::db::inspect;
pub use driver::{db_path, Host, MetadataDriver};
pub use plan::Served;
pub use reconciler::Metadata;
pub use spec::*;
