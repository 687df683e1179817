//! The glue: observe (netlink, the device, keys, secrets, DNS) → plan → apply through
//! the driver, and the facts it publishes. What is kept between passes is in `cache`,
//! key files in `keys`, the record of created interfaces in `created`, status notes in
//! `notes`.
//!
//! Between passes converge keeps the device as last read (and patched by its own
//! writes) and its routes (kept current by route notifications): reading 10,000 peers
//! from wireguard-go takes ~150 ms, which a one-peer change must not pay. The device is
//! read in full again when it is older than `Config::full_read_after` (so every engine
//! resync re-reads it), when the interface is new or was re-created, after a failed
//! write, and when the device watch (`devwatch`, a cheap read every second) finds it
//! differs from converge's copy: a peer changed by hand is repaired within seconds. The
//! link and the addresses are read on every pass (one netlink round trip each).

use crate::driver::{RouteChange, WgDriver};
use crate::plan::{
    self, Action, ActionKind, Backend, Device, Inputs, Observed, PeerUpdate, SecretKey,
};
use crate::spec::{Endpoint, PublicKey, WireguardSpec};
use converge_core::SecretSource;
use converge_core::{
    with_timeout, DriverError, Facts, FactsUpdate, HostEvent, ObjectNote, ObjectOutcome, Plan,
    Reconciler,
};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, info, info_span, warn};

mod cache;
mod created;
mod devwatch;
mod keys;
mod keywatch;
mod notes;

use cache::Cache;
use created::{created, record_created};
pub use keys::{key_dir, key_path, rotate_key, KeyError};

/// Settings of the reconciler.
#[derive(Clone, Debug)]
pub struct Config {
    /// converge's data directory; keys live in `<data_dir>/wireguard/<iface>.key`.
    pub data_dir: PathBuf,
    /// Secrets for `privateKeySecret`, `presharedKeySecret`: a local file
    /// `<secrets dir>/<name>` overrides the document's sealed value.
    pub secrets: SecretSource,
    /// Bound of each call that may block (device reads and writes, starting wireguard-go).
    pub call_timeout: Duration,
    /// The device is read in full again when the last full read is older than this.
    pub full_read_after: Duration,
    /// How long a resolved endpoint name is used before it is resolved again.
    pub resolve_ttl: Duration,
    /// Peers per device write (one UAPI request); a failing batch is retried peer by peer.
    pub batch: usize,
    /// How often the device watch compares the device with converge's copy; `None`: no
    /// watch (a peer changed by hand is then repaired at the next full read).
    pub watch_every: Option<Duration>,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>, secrets_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            secrets: SecretSource::new(secrets_dir.into()),
            call_timeout: Duration::from_secs(30),
            // Below the engine's resync (60 s minus 10 %), so that every resync re-reads.
            full_read_after: Duration::from_secs(50),
            resolve_ttl: Duration::from_secs(60),
            batch: 512,
            watch_every: Some(Duration::from_secs(1)),
        }
    }
}

/// The WireGuard reconciler.
pub struct WireguardReconciler<D: WgDriver> {
    driver: Arc<D>,
    config: Config,
    /// Shared with the device watch.
    cache: Arc<Mutex<Cache>>,
    notes: notes::Notes,
}

fn short_err(e: &DriverError) -> String {
    e.to_string()
}

impl<D: WgDriver> WireguardReconciler<D> {
    pub fn new(driver: D, config: Config) -> Self {
        Self {
            driver: Arc::new(driver),
            config,
            cache: Arc::default(),
            notes: notes::Notes::default(),
        }
    }

    pub fn driver(&self) -> &D {
        &self.driver
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a call that may block on a blocking thread, under the call deadline.
    async fn slow<T: Send + 'static>(
        &self,
        op: &str,
        f: impl FnOnce(&D) -> Result<T, DriverError> + Send + 'static,
    ) -> Result<T, DriverError> {
        let d = self.driver.clone();
        with_timeout(op, self.config.call_timeout, async move {
            tokio::task::spawn_blocking(move || f(&d))
                .await
                .map_err(|e| DriverError::Failed(format!("driver call panicked: {e}")))?
        })
        .await
    }

    /// Pre-shared keys and endpoint names of the peers that have them.
    async fn inputs(&self, spec: &WireguardSpec) -> Inputs {
        let parsed = spec.peers.parsed();
        let mut psks = BTreeMap::new();
        let mut names: Vec<(String, String, u16)> = Vec::new();
        for &i in &parsed.with_inputs {
            let Some(w) = &parsed.wants[i] else { continue };
            if let Some(s) = &w.psk_secret {
                if !psks.contains_key(s) {
                    let v = match keys::secret_key(&self.config.secrets, s) {
                        Ok(Some(k)) => Ok(k),
                        Ok(None) => Err(format!("{} not found", self.config.secrets.describe(s))),
                        Err(e) => Err(e.to_string()),
                    };
                    psks.insert(s.clone(), v);
                }
            }
            if let Some(Endpoint::Host(h, port)) = &w.endpoint {
                names.push((format!("{h}:{port}"), h.clone(), *port));
            }
        }
        let mut resolved = BTreeMap::new();
        for (key, host, port) in names {
            if resolved.contains_key(&key) {
                continue;
            }
            let cached = self.cache().resolved.get(&key).copied();
            if let Some((at, addr)) = cached {
                if at.elapsed() < self.config.resolve_ttl {
                    resolved.insert(key, Ok(addr));
                    continue;
                }
            }
            let r = with_timeout("resolve endpoint", Duration::from_secs(5), async {
                tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(|e| DriverError::io(format!("resolve {host}"), e))
            })
            .await;
            let r = match r {
                Ok(mut addrs) => addrs.next().ok_or_else(|| "no address".to_string()),
                Err(e) => Err(short_err(&e)),
            };
            if let Ok(a) = r {
                self.cache()
                    .resolved
                    .insert(key.clone(), (Instant::now(), a));
            }
            resolved.insert(key, r);
        }
        Inputs {
            private_key: keys::private_key(&self.config.data_dir, &self.config.secrets, spec),
            psks,
            resolved,
        }
    }

    async fn observe_inner(&self, spec: &WireguardSpec) -> Result<Observed, DriverError> {
        let iface = spec.interface.clone();
        let now = SystemTime::now();
        let link = self.driver.link(&iface)?;
        self.driver.watch(&iface, link.as_ref().map(|l| l.index));
        let addresses = match &link {
            Some(l) => self.driver.addresses(l.index)?,
            None => Vec::new(),
        };

        // Routes: the notifications since the last pass, or a full list.
        let changes = self.driver.route_changes()?;
        let stale_device = {
            let mut c = self.cache();
            let c = &mut *c;
            match changes {
                Some(changes) if c.routes_listed => {
                    let mut foreign = false;
                    let state = Arc::make_mut(&mut c.state);
                    for ch in changes {
                        foreign |= match ch {
                            RouteChange::Added(r) => state.routes.insert(r),
                            RouteChange::Removed(r) => state.routes.remove(&r),
                        };
                    }
                    if foreign {
                        // Someone else changed our routes: compare everything.
                        state.baseline = None;
                    }
                }
                _ => c.routes_listed = false,
            }
            // The watch saw the link go down or lose an address since the last pass
            // (also when it came back up before this pass), or this pass sees it.
            let flushed = self.driver.routes_flushed()
                || link.as_ref().is_some_and(|l| !l.up)
                || c.seen_addresses.iter().any(|a| !addresses.contains(a));
            if flushed {
                c.routes_listed = false;
            }
            c.seen_addresses.clone_from(&addresses);
            let peers = spec.peers.parsed();
            let same = c
                .watched
                .as_ref()
                .is_some_and(|w| w.iface == iface && Arc::ptr_eq(&w.peers, peers));
            if !same {
                c.watched = Some(devwatch::Watched {
                    iface: iface.clone(),
                    peers: peers.clone(),
                });
                c.device_version += 1;
            }
            let due = c
                .device_read_at
                .is_none_or(|t| t.elapsed() >= self.config.full_read_after);
            due || c.link.as_ref().map(|l| (l.index, l.backend))
                != link.as_ref().map(|l| (l.index, l.backend))
        };
        let relist = stale_device || !self.cache().routes_listed;
        if relist {
            // Drop queued notifications first: the list is newer than all of them.
            let _ = self.driver.route_changes()?;
            let routes = self.driver.routes()?;
            let mut c = self.cache();
            let state = Arc::make_mut(&mut c.state);
            state.routes = routes;
            state.baseline = None;
            c.routes_listed = true;
        }
        if stale_device {
            let device = match &link {
                Some(l) => {
                    let (i, b) = (iface.clone(), l.backend);
                    Some(
                        self.slow("read device", move |d| d.read_device(&i, b))
                            .await?,
                    )
                }
                None => None,
            };
            let mut c = self.cache();
            let state = Arc::make_mut(&mut c.state);
            state.device = device;
            state.baseline = None;
            c.owners = None;
            c.device_version += 1;
            c.device_read_at = link.as_ref().map(|_| Instant::now());
            c.link = link.clone();
        } else {
            // Same device; keep the fresh link state (MTU, up).
            self.cache().link = link.clone();
        }

        let inputs = self.inputs(spec).await;
        let mut stale = Vec::new();
        for name in created(&self.config.data_dir) {
            if name != iface && self.driver.link(&name).ok().flatten().is_some() {
                stale.push(name);
            }
        }
        let mut obs = Observed {
            interface: iface,
            now,
            link,
            addresses,
            state: self.cache().state.clone(),
            inputs,
            peers: spec.peers.parsed().clone(),
            stale,
        };
        if obs.state.baseline.is_none() && obs.link.is_some() {
            // Find out once whether the host already matches this document, so that
            // the passes after this one compare only what changes.
            let p = plan::plan(spec, &obs);
            if p.actions.is_empty() {
                let parsed = spec.peers.parsed();
                let baseline = plan::Baseline {
                    digests: parsed.digests.clone(),
                    keys: parsed.keys.clone(),
                    routing: spec.routing_digest(),
                    oif: obs.link.as_ref().map_or(0, |l| l.index),
                };
                // Release our snapshot first so the cache is not copied.
                obs.state = Arc::default();
                let mut c = self.cache();
                Arc::make_mut(&mut c.state).baseline = Some(baseline);
                obs.state = c.state.clone();
            }
        }
        Ok(obs)
    }

    /// The interface's index and backend; the cache lock is released on return, so
    /// this may be called inside a statement that locks it again.
    fn backend(&self) -> Result<(u32, Backend), DriverError> {
        self.cache().backend()
    }

    async fn create(&self, iface: &str) -> Result<(), DriverError> {
        let i = iface.to_string();
        let backend = self.slow("create interface", move |d| d.create(&i)).await?;
        let link = self.driver.link(iface)?.ok_or_else(|| {
            DriverError::Failed(format!("interface {iface} vanished after it was created"))
        })?;
        info!(interface = iface, backend = %backend, "created the WireGuard interface");
        record_created(&self.config.data_dir, iface, true)?;
        let mut c = self.cache();
        c.link = Some(link);
        // A new device is empty: known without reading it.
        c.device_read_at = Some(Instant::now());
        c.owners = None;
        c.device_version += 1;
        Arc::make_mut(&mut c.state).device = Some(Device::default());
        Ok(())
    }

    async fn set_key(&self, iface: &str, key: SecretKey) -> Result<(), DriverError> {
        let (_, backend) = self.backend()?;
        let public = key.public();
        let i = iface.to_string();
        self.slow("set private key", move |d| {
            d.configure(&i, backend, Some(&key), None)
        })
        .await?;
        self.cache().patch_device(|d| d.public_key = Some(public));
        info!(interface = iface, public_key = %public, "private key set");
        Ok(())
    }

    async fn generate_key(&self, iface: &str) -> Result<(), DriverError> {
        let key = keys::read_or_generate(&key_path(&self.config.data_dir, iface))
            .map_err(|e| DriverError::Failed(e.to_string()))?;
        self.set_key(iface, key).await
    }

    /// Applies a run of peer updates in batches; a failed batch is retried peer by
    /// peer so that each peer gets its own outcome.
    async fn set_peers(
        &self,
        iface: &str,
        ups: Vec<PeerUpdate>,
        out: &mut Vec<ObjectOutcome>,
    ) -> bool {
        let mut ok = true;
        let backend = match self.backend() {
            Ok((_, b)) => b,
            Err(e) => {
                for u in &ups {
                    out.push(ObjectOutcome::failed(format!("peer {}", u.label), &e));
                }
                return false;
            }
        };
        for chunk in ups.chunks(self.config.batch.max(1)) {
            let batch: Vec<PeerUpdate> = chunk.to_vec();
            let i = iface.to_string();
            let r = self
                .slow("set peers", move |d| {
                    let refs: Vec<&PeerUpdate> = batch.iter().collect();
                    d.set_peers(&i, backend, &refs)
                })
                .await;
            match r {
                Ok(()) => {
                    for u in chunk {
                        let _s = info_span!("peer", peer = %u.label).entered();
                        debug!(fields = ?fields_of(u), "peer set");
                        out.push(ObjectOutcome::ok(format!("peer {}", u.label)));
                    }
                    self.cache().patch_peers(chunk, &[]);
                }
                Err(e) if chunk.len() > 1 => {
                    warn!(error = %e, peers = chunk.len(), "batch failed; retrying peer by peer");
                    self.cache().invalidate_device();
                    for u in chunk {
                        let one = u.clone();
                        let i = iface.to_string();
                        let r = self
                            .slow("set peer", move |d| d.set_peers(&i, backend, &[&one]))
                            .await;
                        let _s = info_span!("peer", peer = %u.label).entered();
                        if let Err(e) = &r {
                            warn!(error = %e, "peer not set");
                            ok = false;
                        }
                        out.push(ObjectOutcome::from_result(format!("peer {}", u.label), r));
                    }
                }
                Err(e) => {
                    let _s = info_span!("peer", peer = %chunk[0].label).entered();
                    warn!(error = %e, "peer not set");
                    self.cache().invalidate_device();
                    ok = false;
                    out.push(ObjectOutcome::from_result(
                        format!("peer {}", chunk[0].label),
                        Err(e),
                    ));
                }
            }
        }
        ok
    }

    async fn remove_peers(
        &self,
        iface: &str,
        keys: Vec<PublicKey>,
        out: &mut Vec<ObjectOutcome>,
    ) -> bool {
        let backend = match self.backend() {
            Ok((_, b)) => b,
            Err(e) => {
                for k in &keys {
                    out.push(ObjectOutcome::failed(format!("peer {}", k.short()), &e));
                }
                return false;
            }
        };
        let i = iface.to_string();
        let ks = keys.clone();
        let r = self
            .slow("remove peers", move |d| d.remove_peers(&i, backend, &ks))
            .await;
        let ok = r.is_ok();
        if ok {
            self.cache().patch_peers(&[], &keys);
        } else {
            self.cache().invalidate_device();
        }
        for k in &keys {
            let _s = info_span!("peer", peer = %k.short()).entered();
            match &r {
                Ok(()) => info!("peer removed"),
                Err(e) => warn!(error = %e, "peer not removed"),
            }
            out.push(ObjectOutcome::from_result(
                format!("peer {}", k.short()),
                r.as_ref()
                    .map(|_| ())
                    .map_err(|e| DriverError::Failed(e.to_string())),
            ));
        }
        ok
    }

    async fn apply_one(&self, a: &Action) -> Result<(), DriverError> {
        let iface = a.iface.as_str();
        match &a.kind {
            ActionKind::CreateInterface => self.create(iface).await,
            ActionKind::GenerateKey => self.generate_key(iface).await,
            ActionKind::SetPrivateKey(k) => self.set_key(iface, k.clone()).await,
            ActionKind::SetListenPort(p) => {
                let (_, backend) = self.backend()?;
                let (i, p) = (iface.to_string(), *p);
                self.slow("set listen port", move |d| {
                    d.configure(&i, backend, None, Some(p))
                })
                .await?;
                self.cache().patch_device(|d| d.listen_port = p);
                Ok(())
            }
            ActionKind::DeleteInterface => {
                info!(interface = %a.iface, "deleting the interface the document renamed");
                self.driver.delete(&a.iface)?;
                record_created(&self.config.data_dir, &a.iface, false)
            }
            ActionKind::SetMtu(m) => self.driver.set_mtu(self.backend()?.0, *m),
            ActionKind::SetUp => self.driver.set_up(self.backend()?.0),
            ActionKind::AddAddress(n) => {
                self.driver.add_address(self.backend()?.0, *n)?;
                self.cache().seen_addresses.push(*n);
                Ok(())
            }
            // Left in `seen_addresses`: the next pass lists the routes again, as the
            // kernel may have flushed some with the address.
            ActionKind::DelAddress(n) => self.driver.del_address(self.backend()?.0, *n),
            ActionKind::AddRoute(dst) => {
                let oif = self.backend()?.0;
                self.driver.add_route(*dst, oif)?;
                let r = plan::Route { dst: *dst, oif };
                Arc::make_mut(&mut self.cache().state).routes.insert(r);
                Ok(())
            }
            ActionKind::DelRoute(r) => {
                self.driver.del_route(*r)?;
                Arc::make_mut(&mut self.cache().state).routes.remove(r);
                Ok(())
            }
            // Handled by apply.
            ActionKind::SetPeer(_) | ActionKind::RemovePeer { .. } | ActionKind::Settle(_) => {
                Ok(())
            }
        }
    }
}

/// Marks apply as writing to the device for as long as it lives (also when apply is
/// abandoned at its deadline): the device watch compares nothing meanwhile.
struct Writing<'a>(&'a Mutex<Cache>);

impl<'a> Writing<'a> {
    fn start(cache: &'a Mutex<Cache>) -> Self {
        cache.lock().unwrap_or_else(|p| p.into_inner()).writing = true;
        Writing(cache)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        c.writing = false;
        c.device_version += 1;
    }
}

fn fields_of(u: &PeerUpdate) -> Vec<&'static str> {
    let mut f = Vec::new();
    if u.allowed.is_some() {
        f.push("allowedIps");
    }
    if u.endpoint.is_some() {
        f.push("endpoint");
    }
    if u.keepalive.is_some() {
        f.push("persistentKeepalive");
    }
    if u.psk.is_some() {
        f.push("presharedKey");
    }
    f
}

impl<D: WgDriver> Reconciler for WireguardReconciler<D> {
    type Spec = WireguardSpec;
    type Observed = Observed;
    type Action = Action;

    fn name(&self) -> &'static str {
        "wireguard"
    }

    async fn observe(&self, spec: &WireguardSpec) -> Result<Observed, DriverError> {
        self.observe_inner(spec).await
    }

    fn plan(&self, spec: &WireguardSpec, observed: &Observed, _facts: &Facts) -> Plan<Action> {
        plan::plan(spec, observed)
    }

    async fn apply(&self, plan: Plan<Action>) -> Vec<ObjectOutcome> {
        let _writing = Writing::start(&self.cache);
        let mut out = Vec::with_capacity(plan.actions.len());
        let mut ok = true;
        let mut actions = plan.actions.into_iter().peekable();
        while let Some(a) = actions.next() {
            let iface = a.iface.clone();
            match a.kind {
                ActionKind::SetPeer(first) => {
                    let mut run = vec![first];
                    while let Some(Action {
                        kind: ActionKind::SetPeer(_),
                        ..
                    }) = actions.peek()
                    {
                        if let Some(Action {
                            kind: ActionKind::SetPeer(u),
                            ..
                        }) = actions.next()
                        {
                            run.push(u);
                        }
                    }
                    ok &= self.set_peers(&iface, run, &mut out).await;
                }
                ActionKind::RemovePeer { key } => {
                    let mut run = vec![key];
                    while let Some(Action {
                        kind: ActionKind::RemovePeer { .. },
                        ..
                    }) = actions.peek()
                    {
                        if let Some(Action {
                            kind: ActionKind::RemovePeer { key },
                            ..
                        }) = actions.next()
                        {
                            run.push(key);
                        }
                    }
                    ok &= self.remove_peers(&iface, run, &mut out).await;
                }
                ActionKind::Settle(mut baseline) => {
                    // Bookkeeping only: no outcome of its own.
                    if ok {
                        if let Ok((index, _)) = self.backend() {
                            baseline.oif = index;
                            Arc::make_mut(&mut self.cache().state).baseline = Some(baseline);
                        }
                    }
                }
                kind => {
                    let a = Action { iface, kind };
                    let object = a.object();
                    let r = self.apply_one(&a).await;
                    if let Err(e) = &r {
                        warn!(object = %object, error = %e, "wireguard change failed");
                        ok = false;
                        if matches!(a.kind, ActionKind::CreateInterface) {
                            // Nothing else can be done on a missing interface.
                            out.push(ObjectOutcome::from_result(object, r));
                            for rest in actions.by_ref() {
                                if !matches!(rest.kind, ActionKind::Settle(_)) {
                                    out.push(ObjectOutcome::failed(
                                        rest.object(),
                                        "the interface could not be created",
                                    ));
                                }
                            }
                            break;
                        }
                    } else {
                        debug!(object = %object, "applied");
                    }
                    out.push(ObjectOutcome::from_result(object, r));
                }
            }
        }
        if !ok {
            Arc::make_mut(&mut self.cache().state).baseline = None;
        }
        out
    }

    fn publish(&self, observed: &Observed) -> Option<FactsUpdate> {
        let link = observed.link.as_ref()?;
        let key = observed.state.device.as_ref()?.public_key?;
        Some(FactsUpdate::Wireguard(Some(
            converge_core::facts::WireguardFacts {
                interface: observed.interface.clone(),
                public_key: key.to_base64(),
                backend: match link.backend {
                    Backend::Kernel => "kernel".into(),
                    Backend::Userspace => "userspace".into(),
                },
            },
        )))
    }

    /// Peers on the interface.
    fn owned(&self, observed: &Observed) -> Option<u64> {
        Some(
            observed
                .state
                .device
                .as_ref()
                .map_or(0, |d| d.peers.len() as u64),
        )
    }

    fn notes(&self, observed: &Observed) -> Vec<ObjectNote> {
        self.notes.notes(observed, || {
            keys::written_at(&self.config.data_dir, &observed.interface)
        })
    }

    fn host_events(&self) -> Option<BoxStream<'static, HostEvent>> {
        // A key written while the agent runs (a rotation) is applied at once.
        let dir = key_dir(&self.config.data_dir);
        let key_events = match keys::make_key_dir(&dir).and_then(|()| keywatch::watch(&dir)) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot watch the key directory; a rotated key is applied at the next resync");
                None
            }
        };
        // A peer changed by hand (no netlink event) is noticed by the device watch.
        let device_events = self
            .config
            .watch_every
            .map(|every| devwatch::watch(self.driver.clone(), self.cache.clone(), every));
        let streams: Vec<_> = [self.driver.host_events(), key_events, device_events]
            .into_iter()
            .flatten()
            .collect();
        (!streams.is_empty()).then(|| futures::stream::select_all(streams).boxed())
    }
}

#[cfg(test)]
mod tests;
