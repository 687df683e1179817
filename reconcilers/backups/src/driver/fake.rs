//! A fake driver for unit tests: the record in memory, runs that succeed or fail on
//! demand, a clock the test moves.

use super::borg::Progress;
use super::{BackupsDriver, Cleaned, ExportDone};
use crate::plan::{BackupRun, RepoObserved, State};
use crate::spec::{BackupRepository, Export, Restore};
use chrono::{DateTime, Utc};
use converge_core::DriverError;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

#[derive(Default)]
pub struct Fake {
    pub now: Mutex<DateTime<Utc>>,
    pub start: DateTime<Utc>,
    pub state: Mutex<State>,
    pub repos: Mutex<BTreeSet<String>>,
    /// Archives created, in order.
    pub archives: Mutex<Vec<String>>,
    pub restores: Mutex<Vec<String>>,
    pub fail: Mutex<bool>,
    /// `borg init` fails with this message.
    pub init_error: Mutex<Option<String>>,
    /// Repositories converge must not initialise, with why.
    pub unusable: Mutex<BTreeMap<String, String>>,
    /// Restores with a journal left (cut short); cleaned ones are removed.
    pub journaled: Mutex<Vec<String>>,
}

impl Fake {
    pub fn at(now: DateTime<Utc>) -> Self {
        Self {
            now: Mutex::new(now),
            start: now,
            ..Default::default()
        }
    }

    pub fn set_now(&self, t: DateTime<Utc>) {
        *self.now.lock().unwrap() = t;
    }
}

impl BackupsDriver for Fake {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap()
    }
    fn agent_start(&self) -> DateTime<Utc> {
        self.start
    }
    fn read_state(&self) -> Result<State, DriverError> {
        Ok(self.state.lock().unwrap().clone())
    }
    fn write_state(&self, s: &State) -> Result<(), DriverError> {
        *self.state.lock().unwrap() = s.clone();
        Ok(())
    }
    fn repository(&self, r: &BackupRepository, _: &State) -> Result<RepoObserved, DriverError> {
        Ok(RepoObserved {
            initialised: self.repos.lock().unwrap().contains(&r.name),
            foreign_borg: None,
            unusable: self.unusable.lock().unwrap().get(&r.name).cloned(),
        })
    }
    async fn init(&self, r: &BackupRepository) -> Result<(), DriverError> {
        if let Some(e) = self.init_error.lock().unwrap().clone() {
            return Err(DriverError::Failed(e));
        }
        self.repos.lock().unwrap().insert(r.name.clone());
        Ok(())
    }
    async fn backup(&self, run: &BackupRun, _: &Progress) -> Result<String, DriverError> {
        if *self.fail.lock().unwrap() {
            return Err(DriverError::Failed("borg create failed".into()));
        }
        self.archives.lock().unwrap().push(run.archive.clone());
        Ok(format!("archive {}", run.archive))
    }
    async fn restore(
        &self,
        r: &Restore,
        _: &BackupRepository,
        _: &Progress,
    ) -> Result<String, DriverError> {
        self.restores.lock().unwrap().push(r.id.clone());
        Ok("restored".into())
    }
    async fn export(
        &self,
        e: &Export,
        _: &BackupRepository,
        _: &Progress,
    ) -> Result<ExportDone, DriverError> {
        Ok(ExportDone {
            message: "uploaded".into(),
            url: format!("http://s3/{}", e.s3.key),
            expires_at: self.now(),
        })
    }
    fn journaled_restores(&self) -> Vec<String> {
        self.journaled.lock().unwrap().clone()
    }
    async fn clean_restore(&self, id: &str) -> Result<Cleaned, DriverError> {
        self.journaled.lock().unwrap().retain(|j| j != id);
        Ok(Cleaned {
            completed: false,
            message: "partial extraction removed".into(),
        })
    }
}
