//! In-memory Caddy for unit tests of the reconciler's logic (not built into release
//! binaries): a configuration with an ETag that changes on every load, and routes it
//! refuses by `@id`.

use super::{CaddyDriver, LoadError};
use crate::plan::{Config, Process, UpstreamStatus};
use converge_core::DriverError;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

#[derive(Clone, Debug, Default)]
pub struct FakeState {
    pub config: Value,
    pub generation: u64,
    /// Successful loads (each one a reload in real Caddy).
    pub loads: usize,
    /// Every load attempt, refused ones included.
    pub attempts: usize,
    /// Route `@id`s whose presence makes a load fail.
    pub refuse: BTreeSet<String>,
    pub running: Vec<u32>,
    pub starts: usize,
    /// Redirects of the public ports put back.
    pub redirects: usize,
    /// The public ports are not redirected to Caddy (a flushed ruleset).
    pub unredirected: bool,
    pub secrets: BTreeMap<String, String>,
}

pub struct FakeCaddy {
    pub state: Mutex<FakeState>,
}

impl Default for FakeCaddy {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeCaddy {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(FakeState {
                config: json!({"admin": {"listen": "unix//fake"}}),
                running: vec![100],
                ..FakeState::default()
            }),
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut guard)
    }
}

fn etag(generation: u64) -> String {
    format!("\"/config/ {generation:x}\"")
}

fn ids(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(id) = m.get("@id").and_then(Value::as_str) {
                out.insert(id.to_string());
            }
            m.values().for_each(|v| ids(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| ids(v, out)),
        _ => {}
    }
}

impl CaddyDriver for FakeCaddy {
    fn process(&self) -> Result<Process, DriverError> {
        Ok(self.with(|s| Process::Managed {
            pids: s.running.clone(),
            missing: false,
            bootstrap: json!({"admin": {"listen": "unix//fake"}}),
        }))
    }

    fn stream_close_delay(&self) -> bool {
        true
    }

    async fn get_config(&self) -> Result<Config, DriverError> {
        self.with(|s| {
            if s.running.is_empty() {
                return Err(DriverError::Transient("not running".into()));
            }
            Ok(Config {
                etag: Some(etag(s.generation)),
                value: s.config.clone(),
                standby: None,
                redirected: !s.unredirected,
            })
        })
    }

    async fn load(&self, config: &Value, if_match: Option<&str>) -> Result<(), LoadError> {
        self.with(|s| {
            s.attempts += 1;
            if if_match.is_some_and(|t| t != etag(s.generation)) {
                return Err(LoadError::Driver(DriverError::Transient("412".into())));
            }
            let mut found = BTreeSet::new();
            ids(config, &mut found);
            if let Some(bad) = found.intersection(&s.refuse).next() {
                return Err(LoadError::Refused(format!("bad route {bad}")));
            }
            s.config = config.clone();
            s.generation += 1;
            s.loads += 1;
            Ok(())
        })
    }

    async fn upstreams(&self) -> Result<Vec<UpstreamStatus>, DriverError> {
        Ok(Vec::new())
    }

    async fn redirect(&self) -> Result<(), DriverError> {
        self.with(|s| {
            s.redirects += 1;
            s.unredirected = false;
        });
        Ok(())
    }

    async fn start(&self, _stop: &[u32]) -> Result<(), DriverError> {
        self.with(|s| {
            s.running = vec![200 + s.starts as u32];
            s.starts += 1;
            s.config = json!({"admin": {"listen": "unix//fake"}});
            s.generation += 1;
        });
        Ok(())
    }

    fn read_secret(&self, name: &str) -> Result<Option<String>, DriverError> {
        Ok(self.with(|s| s.secrets.get(name).cloned()))
    }
}
