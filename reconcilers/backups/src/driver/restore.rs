//! Restores: extraction into a staging directory beside the destination, then the
//! entries moved in, with a journal (`<data-dir>/backups/restores/<id>.json`) so that a
//! restore cut short (kill -9) is finished or undone on the next pass instead of leaving
//! a partial tree where an operator would take it for a restore.
//!
//! Steps, each recorded in the journal before it starts:
//! 1. `extracting` into `.converge-restore-<id>` (beside the destination: same file
//!    system); cut short: the staging directory (and a side-by-side volume) is removed,
//!    the destination was never touched.
//! 2. `moving-aside` (replace only): the target's entries into `.converge-old-<id>`;
//!    cut short: they are moved back, the target is as before.
//! 3. `moving-in`: the staged entries into the destination; cut short: the rest are
//!    moved in, so the restore completes.

use super::{os, Host, Source};
use crate::driver::borg::Progress;
use crate::spec::{BackupRepository, Restore, RestoreMode};
use converge_core::DriverError;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;
use tracing::{info, warn};

/// How far a restore got (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Step {
    Extracting,
    MovingAside,
    MovingIn,
}

/// The journal of one restore under way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Journal {
    step: Step,
    /// Where the archive is extracted first.
    staging: PathBuf,
    /// Where the restored entries end up.
    dest: PathBuf,
    /// Replace mode: where the target's entries are moved aside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    old: Option<PathBuf>,
    /// Side-by-side into a volume: the volume converge created for this restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    volume: Option<String>,
}

/// What cleaning up after an interrupted restore did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cleaned {
    /// The restore was in its last step and has been completed.
    pub completed: bool,
    pub message: String,
}

fn io_err(what: &str, p: &Path, e: std::io::Error) -> DriverError {
    DriverError::io(format!("{what} {}", p.display()), e)
}

/// The names in directory `d`.
fn entries(d: &Path) -> Result<Vec<OsString>, DriverError> {
    std::fs::read_dir(d)
        .map_err(|e| io_err("read", d, e))?
        .map(|e| e.map(|e| e.file_name()).map_err(|e| io_err("read", d, e)))
        .collect()
}

/// Moves every entry of `from` into `to` (same file system: renames).
fn move_entries(from: &Path, to: &Path) -> Result<(), DriverError> {
    for n in entries(from)? {
        std::fs::rename(from.join(&n), to.join(&n))
            .map_err(|e| io_err("move", &from.join(&n), e))?;
    }
    Ok(())
}

fn remove_dir(d: &Path) -> Result<(), DriverError> {
    match std::fs::remove_dir_all(d) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", d, e)),
        _ => Ok(()),
    }
}

impl Host {
    fn journal_dir(&self) -> PathBuf {
        self.cfg.dir.join("restores")
    }

    fn journal_path(&self, id: &str) -> PathBuf {
        self.journal_dir().join(format!("{id}.json"))
    }

    fn write_journal(&self, id: &str, j: &Journal) -> Result<(), DriverError> {
        let dir = self.journal_dir();
        // Under the data directory, which is private (0700).
        std::fs::create_dir_all(&dir).map_err(|e| io_err("create", &dir, e))?;
        let bytes = serde_json::to_vec(j)
            .map_err(|e| DriverError::Failed(format!("restore journal: {e}")))?;
        let p = self.journal_path(id);
        converge_core::fsutil::write_atomic(&p, &bytes, 0o600).map_err(|e| io_err("write", &p, e))
    }

    fn drop_journal(&self, id: &str) -> Result<(), DriverError> {
        let p = self.journal_path(id);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", &p, e)),
            _ => Ok(()),
        }
    }

    /// Ids of restores that have a journal (under way here, or cut short).
    pub(super) fn journaled_restores(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.journal_dir()) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = rd
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(String::from)
            })
            .collect();
        ids.sort();
        ids
    }

    /// Finishes or undoes restore `id` cut short at the step its journal names.
    pub(super) async fn clean_restore(&self, id: &str) -> Result<Cleaned, DriverError> {
        let p = self.journal_path(id);
        let bytes = std::fs::read(&p).map_err(|e| io_err("read", &p, e))?;
        let j: Journal = serde_json::from_slice(&bytes)
            .map_err(|e| DriverError::Failed(format!("{}: {e}", p.display())))?;
        let cleaned = match j.step {
            Step::Extracting => {
                remove_dir(&j.staging)?;
                if let Some(old) = &j.old {
                    remove_dir(old)?;
                }
                if let Some(v) = &j.volume {
                    if let Err(e) = self.runtime()?.remove_volume(v).await {
                        warn!(volume = %v, error = %e, "cannot remove the volume of an interrupted restore");
                    }
                }
                Cleaned {
                    completed: false,
                    message: format!(
                        "interrupted during the extraction: the partial extraction {} is removed; {} is unchanged",
                        j.staging.display(),
                        j.volume.as_deref().map_or_else(|| j.dest.display().to_string(), String::from)
                    ),
                }
            }
            Step::MovingAside => {
                if let Some(old) = &j.old {
                    if old.exists() {
                        std::fs::create_dir_all(&j.dest)
                            .map_err(|e| io_err("create", &j.dest, e))?;
                        move_entries(old, &j.dest)?;
                    }
                    remove_dir(old)?;
                }
                remove_dir(&j.staging)?;
                Cleaned {
                    completed: false,
                    message: format!(
                        "interrupted while moving the target's entries aside: they are back, {} is unchanged",
                        j.dest.display()
                    ),
                }
            }
            Step::MovingIn => {
                std::fs::create_dir_all(&j.dest).map_err(|e| io_err("create", &j.dest, e))?;
                if j.staging.exists() {
                    move_entries(&j.staging, &j.dest)?;
                }
                remove_dir(&j.staging)?;
                if let Some(old) = &j.old {
                    remove_dir(old)?;
                }
                Cleaned {
                    completed: true,
                    message: format!(
                        "interrupted while moving the restored entries in: completed into {}",
                        j.dest.display()
                    ),
                }
            }
        };
        self.drop_journal(id)?;
        info!(restore = %id, completed = cleaned.completed, "interrupted restore cleaned up");
        Ok(cleaned)
    }

    /// The sources recorded in an archive's comment.
    async fn sources(
        &self,
        access: &super::borg::Access,
        archive: &str,
    ) -> Result<Vec<Source>, DriverError> {
        let target = format!("{}::{archive}", access.location);
        let out = self
            .borg
            .run(
                access,
                &os(&["info", "--json", "--lock-wait", "60", &target]),
                None,
                self.cfg.timeouts.init,
                &Progress::default(),
            )
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| DriverError::Failed(format!("borg info: unexpected output: {e}")))?;
        let comment = v["archives"][0]["comment"].as_str().unwrap_or_default();
        let s: super::ArchiveSources = serde_json::from_str(comment).map_err(|_| {
            DriverError::Failed(format!(
                "archive {archive} was not made by converge (no source list in its comment)"
            ))
        })?;
        Ok(s.sources)
    }

    pub(super) async fn restore_inner(
        &self,
        r: &Restore,
        repo: &BackupRepository,
        progress: &Progress,
    ) -> Result<String, DriverError> {
        let access = self.access(repo)?;
        self.clear_stale_lock(&access).await?;
        let sources = self.sources(&access, &r.archive).await?;
        let source = match &r.source {
            Some(want) => sources
                .iter()
                .find(|s| s.volume.as_deref() == Some(want.as_str()) || s.path == *want)
                .ok_or_else(|| {
                    DriverError::Failed(format!("archive {} has no source {want:?}", r.archive))
                })?,
            None if sources.len() == 1 => &sources[0],
            None => {
                let names: Vec<String> = sources
                    .iter()
                    .map(|s| s.volume.clone().unwrap_or_else(|| s.path.clone()))
                    .collect();
                return Err(DriverError::Failed(format!(
                    "archive {} has {} sources ({}): name one in source",
                    r.archive,
                    sources.len(),
                    names.join(", ")
                )));
            }
        };
        let staged = |parent: &Path| parent.join(format!(".converge-restore-{}", r.id));
        let mut j = match (&r.target_volume, &r.target_path, r.mode) {
            (Some(v), _, RestoreMode::Replace) => {
                let dest = self.runtime()?.volume_path(v).await?;
                let parent = dest
                    .parent()
                    .ok_or_else(|| DriverError::Failed("target has no parent".into()))?;
                Journal {
                    step: Step::Extracting,
                    staging: staged(parent),
                    old: Some(parent.join(format!(".converge-old-{}", r.id))),
                    dest,
                    volume: None,
                }
            }
            (Some(v), _, RestoreMode::SideBySide) => {
                let name = format!("{v}-restore-{}", r.id);
                let dest = self.runtime()?.create_volume(&name).await?;
                Journal {
                    step: Step::Extracting,
                    // Inside the new volume: its mount point's parent is the runtime's.
                    staging: staged(&dest),
                    dest,
                    old: None,
                    volume: Some(name),
                }
            }
            (None, Some(p), mode) => {
                let target = PathBuf::from(p);
                let parent = target
                    .parent()
                    .ok_or_else(|| DriverError::Failed("target has no parent".into()))?
                    .to_path_buf();
                std::fs::create_dir_all(&parent).map_err(|e| io_err("create", &parent, e))?;
                match mode {
                    RestoreMode::Replace => Journal {
                        step: Step::Extracting,
                        staging: staged(&parent),
                        old: Some(parent.join(format!(".converge-old-{}", r.id))),
                        dest: target,
                        volume: None,
                    },
                    RestoreMode::SideBySide => {
                        let dest = PathBuf::from(format!("{p}.restore-{}", r.id));
                        if dest.exists() {
                            return Err(DriverError::Failed(format!(
                                "{} exists already",
                                dest.display()
                            )));
                        }
                        Journal {
                            step: Step::Extracting,
                            staging: staged(&parent),
                            dest,
                            old: None,
                            volume: None,
                        }
                    }
                }
            }
            (None, None, _) => return Err(DriverError::Failed("no target".into())),
        };
        let (pattern, strip) = if source.dump {
            (source.path.clone(), 0)
        } else {
            let parts: Vec<String> = Path::new(&source.path)
                .components()
                .filter_map(|c| match c {
                    Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect();
            (parts.join("/"), parts.len())
        };
        let started = Instant::now();
        // Journaled before anything is created, so a kill from here on is cleaned up.
        self.write_journal(&r.id, &j)?;
        for d in [Some(&j.staging), j.old.as_ref()].into_iter().flatten() {
            remove_dir(d)?;
            std::fs::create_dir(d).map_err(|e| io_err("create", d, e))?;
        }
        let target = format!("{}::{}", access.location, r.archive);
        let args = os(&[
            "extract",
            "--log-json",
            "--progress",
            "--lock-wait",
            "60",
            "--strip-components",
            &strip.to_string(),
            &target,
            &pattern,
        ]);
        let extracted = self
            .borg
            .run(
                &access,
                &args,
                Some(&j.staging),
                self.cfg.timeouts.extract,
                progress,
            )
            .await;
        if let Err(e) = extracted {
            // Nothing was moved yet: undo as a cut-short extraction would be.
            if let Err(c) = self.clean_restore(&r.id).await {
                warn!(restore = %r.id, error = %c, "cannot clean up after a failed extraction");
            }
            return Err(e);
        }
        if let Some(old) = &j.old {
            j.step = Step::MovingAside;
            self.write_journal(&r.id, &j)?;
            // The target directory itself stays (a container's mount keeps working).
            std::fs::create_dir_all(&j.dest).map_err(|e| io_err("create", &j.dest, e))?;
            move_entries(&j.dest, old)?;
        }
        j.step = Step::MovingIn;
        self.write_journal(&r.id, &j)?;
        std::fs::create_dir_all(&j.dest).map_err(|e| io_err("create", &j.dest, e))?;
        move_entries(&j.staging, &j.dest)?;
        remove_dir(&j.staging)?;
        if let Some(old) = &j.old {
            remove_dir(old)?;
        }
        self.drop_journal(&r.id)?;
        Ok(format!(
            "archive {} restored into {} ({}) in {:.1} s",
            r.archive,
            j.dest.display(),
            match r.mode {
                RestoreMode::Replace => "replace",
                RestoreMode::SideBySide => "side-by-side",
            },
            started.elapsed().as_secs_f64()
        ))
    }
}
