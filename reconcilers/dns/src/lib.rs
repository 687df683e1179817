//! DNS reconciler: serves the document's service-discovery zone through a dnsmasq
//! instance that converge starts, configures and owns (files under its own directory).
//!
//! How each record type reaches dnsmasq, and what a change costs:
//! - A/AAAA with the zone TTL: a hosts file in `--hostsdir`, re-read by dnsmasq on
//!   inotify within milliseconds. No restart, no failed query.
//! - CNAME, TXT, SRV, A/AAAA with their own TTL, and the server settings (zone, listen,
//!   port, upstreams, ttl): dnsmasq reads these only from its configuration at start-up
//!   (SIGHUP re-reads hosts files, not configuration). converge writes them to a
//!   content-addressed config file and restarts dnsmasq once per pass, however many of
//!   them changed; a pass with no config change never restarts it.

pub mod driver;
pub mod plan;
pub mod reconciler;
pub mod render;
pub mod spec;

pub use plan::{plan, Action, Observed};
pub use reconciler::Dns;
pub use render::Layout;
pub use spec::{validate, DnsSpec, Record, RecordType};
