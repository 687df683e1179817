//! converge's WireGuard reconciler: one interface whose peers change one by one (never
//! the interface restarted, never another peer's session dropped), its addresses, MTU,
//! link state and routes, over the kernel module or a detached wireguard-go.

pub mod driver;
pub mod plan;
pub mod reconciler;
pub mod rtnl;
pub mod spec;
pub mod sum;

pub use driver::{System, SystemConfig, WgDriver};
pub use plan::{plan, Action, ActionKind, Backend, Observed};
pub use reconciler::{key_dir, key_path, rotate_key, Config, KeyError, WireguardReconciler};
pub use spec::{
    is_interface_name, parse_endpoint, validate, Endpoint, PublicKey, WireguardPeer, WireguardSpec,
};
