//! The agent's durable record of the hook steps it ran, so that each `(runbook, step)` runs at
//! most once, and of the steps it started whose end it never saw.
//!
//! `<state_dir>/hooks/<runbook>.<step>.json` holds a finished step: what was asked and how the
//! command ended. It is written atomically (a temporary file, fsync, rename, fsync of the
//! directory) once the command has ended. Before the command starts, the same request goes to
//! `<runbook>.<step>.started`, removed once the result is recorded: a step found started but
//! not finished was cut short by the agent stopping (or the host failing) and may have done
//! part of its work, so it is not run again without an operator's say. A step whose command
//! failed is run again when asked again (its record replaced): the runbook stopped there, and
//! asking again is the operator resuming it after fixing the cause.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::HookResult;

/// What a `Hook` asked for, as recorded: a repeated request must ask for the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Request {
    pub action: String,
    pub tool: Option<String>,
    pub service: Option<String>,
    pub site: String,
    pub dataset: Option<String>,
}

impl Request {
    pub fn of(h: &mover_protocol::Hook) -> Self {
        Self {
            action: h.action.clone(),
            tool: h.tool.clone(),
            service: h.service.clone(),
            site: h.site.clone(),
            dataset: h.dataset.clone(),
        }
    }

    /// `prepare (mariabackup) on site east, dataset mysql`: for messages.
    pub fn describe(&self) -> String {
        let mut s = self.action.clone();
        if let Some(t) = &self.tool {
            s.push_str(&format!(" ({t})"));
        }
        if let Some(svc) = &self.service {
            s.push_str(&format!(" of service {svc}"));
        }
        s.push_str(&format!(" on site {}", self.site));
        if let Some(d) = &self.dataset {
            s.push_str(&format!(", dataset {d}"));
        }
        s
    }
}

/// A step that started: what was asked and the command that was about to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Started {
    pub runbook: String,
    pub step: u32,
    pub request: Request,
    pub command: String,
}

/// A finished step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Finished {
    pub runbook: String,
    pub step: u32,
    pub request: Request,
    pub result: HookResult,
}

/// What the record says of a step.
#[derive(Debug)]
pub(crate) enum Prior {
    Never,
    Finished(Box<Finished>),
    /// Started, never finished; the marker's path.
    Interrupted(PathBuf),
}

type Key = (String, u32);

pub(crate) struct Ledger {
    dir: PathBuf,
    /// One lock per step in progress: a duplicate request waits for the running one.
    locks: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while a step is looked up and run.
pub(crate) struct StepLock<'a> {
    ledger: &'a Ledger,
    key: Key,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for StepLock<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.ledger.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map holds it: nobody runs or waits for this step.
        if locks
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

impl Ledger {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("hooks"),
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until no other request for the step is in progress here.
    pub async fn lock(&self, runbook: &str, step: u32) -> StepLock<'_> {
        let key = (runbook.to_owned(), step);
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let guard = lock.lock_owned().await;
        StepLock {
            ledger: self,
            key,
            guard: Some(guard),
        }
    }

    fn path(&self, runbook: &str, step: u32, ext: &str) -> PathBuf {
        // Runbook ids are checked to be plain names: the file stays in the directory.
        self.dir.join(format!("{runbook}.{step}.{ext}"))
    }

    /// What the record says of a step.
    pub fn prior(&self, runbook: &str, step: u32) -> Result<Prior, String> {
        let done = self.path(runbook, step, "json");
        match std::fs::read(&done) {
            Ok(bytes) => {
                return serde_json::from_slice(&bytes)
                    .map(|f| Prior::Finished(Box::new(f)))
                    .map_err(|e| {
                        format!(
                            "the record of its earlier run, {}, is unreadable ({e}): check the \
                             step by hand, then remove the file to let it run again",
                            done.display()
                        )
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("read {}: {e}", done.display())),
        }
        let started = self.path(runbook, step, "started");
        match std::fs::symlink_metadata(&started) {
            Ok(_) => Ok(Prior::Interrupted(started)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Prior::Never),
            Err(e) => Err(format!("inspect {}: {e}", started.display())),
        }
    }

    /// Records, durably, that the step is about to run.
    pub fn start(&self, s: &Started) -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let bytes = serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?;
        write_atomic(&self.dir, &self.path(&s.runbook, s.step, "started"), &bytes)
    }

    /// Records, durably, how the step ended, and forgets that it started.
    pub fn finish(&self, f: &Finished) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(f).map_err(std::io::Error::other)?;
        write_atomic(&self.dir, &self.path(&f.runbook, f.step, "json"), &bytes)?;
        std::fs::remove_file(self.path(&f.runbook, f.step, "started"))?;
        sync_dir(&self.dir)
    }

    /// Forgets that a step started whose command never ran (it could not be started).
    pub fn abandon(&self, runbook: &str, step: u32) -> std::io::Result<()> {
        std::fs::remove_file(self.path(runbook, step, "started"))?;
        sync_dir(&self.dir)
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `path` so that it holds either its old content or all of `bytes`, even across a
/// crash: a temporary file beside it, fsync, rename over it, fsync of the directory.
fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            action: "replicator_reset".into(),
            tool: None,
            service: Some("east".into()),
            site: "east".into(),
            dataset: None,
        }
    }

    fn result() -> HookResult {
        HookResult {
            node: "east1".into(),
            command: "trepctl -service east reset -all -y".into(),
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            output: "ok\n".into(),
            seconds: 0.25,
            replayed: false,
        }
    }

    #[test]
    fn a_step_is_never_then_started_then_finished() {
        let d = tempfile::tempdir().unwrap();
        let l = Ledger::new(d.path());
        assert!(matches!(l.prior("rb-1", 3).unwrap(), Prior::Never));
        let started = Started {
            runbook: "rb-1".into(),
            step: 3,
            request: request(),
            command: "x".into(),
        };
        l.start(&started).unwrap();
        match l.prior("rb-1", 3).unwrap() {
            Prior::Interrupted(p) => assert_eq!(p, d.path().join("hooks/rb-1.3.started")),
            other => panic!("{other:?}"),
        }
        // Another step of the same runbook is its own.
        assert!(matches!(l.prior("rb-1", 4).unwrap(), Prior::Never));
        l.finish(&Finished {
            runbook: "rb-1".into(),
            step: 3,
            request: request(),
            result: result(),
        })
        .unwrap();
        match l.prior("rb-1", 3).unwrap() {
            Prior::Finished(f) => {
                assert_eq!(f.result, result());
                assert_eq!(f.request, request());
            }
            other => panic!("{other:?}"),
        }
        assert!(!d.path().join("hooks/rb-1.3.started").exists());
        let names: Vec<_> = std::fs::read_dir(d.path().join("hooks"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["rb-1.3.json"], "no temporary file left");
        // Abandoning a start forgets it.
        l.start(&Started { step: 5, ..started }).unwrap();
        l.abandon("rb-1", 5).unwrap();
        assert!(matches!(l.prior("rb-1", 5).unwrap(), Prior::Never));
    }

    #[test]
    fn an_unreadable_record_is_not_taken_for_no_record() {
        let d = tempfile::tempdir().unwrap();
        let l = Ledger::new(d.path());
        std::fs::create_dir_all(d.path().join("hooks")).unwrap();
        std::fs::write(d.path().join("hooks/rb.1.json"), b"{ half").unwrap();
        let e = l.prior("rb", 1).unwrap_err();
        assert!(e.contains("rb.1.json") && e.contains("unreadable"), "{e}");
    }

    #[tokio::test]
    async fn a_second_request_for_a_step_waits_for_the_first() {
        let d = tempfile::tempdir().unwrap();
        let l = Arc::new(Ledger::new(d.path()));
        let first = l.lock("rb", 1).await;
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move {
                let _second = l.lock("rb", 1).await;
            })
        };
        // Another step does not wait.
        let other = tokio::time::timeout(std::time::Duration::from_secs(1), l.lock("rb", 2)).await;
        assert!(other.is_ok());
        drop(other);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "the duplicate did not wait");
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(l.locks.lock().unwrap().is_empty(), "locks are forgotten");
    }
}
