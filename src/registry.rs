//! Which reconcilers this build runs, bound to their document sections.

use crate::document::Document;
use crate::engine::{Bound, Section};
use converge_dns::driver::Dnsmasq;
use converge_dns::{Dns, Layout};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Every section of the document, in document order.
pub const ALL: [&str; 7] = [
    "containers",
    "wireguard",
    "firewall",
    "dns",
    "routes",
    "backups",
    "metadata",
];

/// The dnsmasq binary: `$CONVERGE_DNSMASQ`, else Debian's path, else `dnsmasq` on PATH.
fn dnsmasq_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CONVERGE_DNSMASQ") {
        return PathBuf::from(p);
    }
    let debian = Path::new("/usr/sbin/dnsmasq");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("dnsmasq")
    }
}

/// The reconcilers of this build with their real drivers, rooted at `data_dir`.
pub fn sections(data_dir: &Path) -> Vec<Arc<dyn Section>> {
    let dns = Dns::new(Dnsmasq::new(
        Layout::new(data_dir.join("dns")),
        dnsmasq_binary(),
    ));
    vec![Arc::new(Bound::new(dns, |d: &Document| d.dns.as_ref()))]
}

/// Whether the document has a section for `name`.
pub fn has_section(doc: &Document, name: &str) -> bool {
    match name {
        "containers" => doc.containers.is_some(),
        "wireguard" => doc.wireguard.is_some(),
        "firewall" => doc.firewall.is_some(),
        "dns" => doc.dns.is_some(),
        "routes" => doc.routes.is_some(),
        "backups" => doc.backups.is_some(),
        "metadata" => doc.metadata.is_some(),
        _ => false,
    }
}
