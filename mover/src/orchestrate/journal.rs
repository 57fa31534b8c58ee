//! The journal: every runbook, each step's start and end, and which runbook holds which site,
//! in one SQLite database in the controller's state directory (`<state>/journal.db`).
//!
//! SQLite because it is an embedded store that several controller processes can share:
//! transactions make taking a site lock atomic, and with `synchronous = FULL` a step recorded
//! as finished stays recorded through a crash or a power cut. A step is recorded as started
//! before it runs and as finished after; `resume` skips what finished and runs again what
//! started but did not finish. That is safe because agents remember the hooks they ran (a
//! repeated hook returns its recorded result instead of running twice) and a transfer run
//! again resumes from what the targets already hold.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

/// The journal's file name in the state directory.
pub const JOURNAL_FILE: &str = "journal.db";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "create the state directory {path} (choose another with --state-dir or MOVER_STATE_DIR)"
    )]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal {path}: {source}")]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("no runbook {id} in the journal {path} (see `mover runbook list`)")]
    Unknown { id: String, path: PathBuf },
    #[error(
        "site {site} is locked by runbook {holder} ({title}; {status} since {since}{by}). \
         Only one runbook may touch a site at a time: wait for it to finish, or if it stopped, \
         resume it with `mover runbook resume {holder}` or give it up with \
         `mover runbook abandon {holder}`"
    )]
    Locked {
        site: String,
        holder: String,
        title: String,
        status: RunStatus,
        since: String,
        by: String,
    },
    #[error("runbook {id} is running now (pid {pid} on {host}): wait for it, or stop it first")]
    Running { id: String, pid: u32, host: String },
    #[error("runbook {id} is {status}: there is nothing to {what}")]
    Finished {
        id: String,
        status: RunStatus,
        what: &'static str,
    },
}

/// Where a runbook is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// A controller is running it (or was, and died: see [`RunbookRecord::effective_status`]).
    Running,
    /// A step failed; the runbook stopped and holds its sites until resumed or abandoned.
    Failed,
    /// Stopped by the operator (Ctrl-C) or its controller died; holds its sites.
    Interrupted,
    /// Every step finished.
    Done,
    /// Given up by the operator; its sites are free.
    Abandoned,
}

impl RunStatus {
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Done => "done",
            RunStatus::Abandoned => "abandoned",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "running" => RunStatus::Running,
            "failed" => RunStatus::Failed,
            "done" => RunStatus::Done,
            "abandoned" => RunStatus::Abandoned,
            _ => RunStatus::Interrupted,
        }
    }

    /// Whether the runbook still holds its sites.
    pub fn holds_sites(self) -> bool {
        !matches!(self, RunStatus::Done | RunStatus::Abandoned)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Started,
    Done,
    Failed,
}

impl StepStatus {
    pub fn name(self) -> &'static str {
        match self {
            StepStatus::Started => "started",
            StepStatus::Done => "done",
            StepStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "done" => StepStatus::Done,
            "failed" => StepStatus::Failed,
            _ => StepStatus::Started,
        }
    }
}

/// A runbook as the journal keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct RunbookRecord {
    pub id: String,
    pub title: String,
    /// The operation, as JSON: what `resume` plans again.
    pub operation: String,
    /// The cluster file it was planned from.
    pub cluster: PathBuf,
    /// The plan, one line per step: `resume` refuses if planning again gives another.
    pub plan: Vec<String>,
    pub sites: Vec<String>,
    pub status: RunStatus,
    /// Unix seconds.
    pub created: i64,
    pub updated: i64,
    /// The controller process that last ran it, and its host.
    pub pid: u32,
    pub host: String,
}

impl RunbookRecord {
    /// The status, except that a runbook recorded as running whose controller process on
    /// this host is gone is shown as interrupted.
    pub fn effective_status(&self) -> RunStatus {
        if self.status == RunStatus::Running && self.host == hostname() && !pid_alive(self.pid) {
            RunStatus::Interrupted
        } else {
            self.status
        }
    }
}

/// One step's record.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: u32,
    pub status: StepStatus,
    /// The host that ran it (a site step runs on one of the site's hosts).
    pub host: Option<String>,
    pub started: i64,
    pub ended: Option<i64>,
    /// How many times it was started (more than once after a resume).
    pub attempts: u32,
    /// What it did, as JSON: the command, exit status and output of a hook; the summary of a
    /// transfer; the error of a step that could not run.
    pub detail: Option<String>,
}

/// What a new runbook is recorded with.
#[derive(Debug, Clone)]
pub struct NewRunbook {
    pub id: String,
    pub title: String,
    pub operation: String,
    pub cluster: PathBuf,
    pub plan: Vec<String>,
    pub sites: Vec<String>,
    /// A stopped runbook whose sites this one takes over (a rollback of it), which is then
    /// abandoned in the same transaction.
    pub takes_over: Option<String>,
}

pub struct Journal {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runbooks (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    operation TEXT NOT NULL,
    cluster TEXT NOT NULL,
    plan TEXT NOT NULL,
    sites TEXT NOT NULL,
    status TEXT NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    runbook TEXT NOT NULL REFERENCES runbooks(id),
    step INTEGER NOT NULL,
    status TEXT NOT NULL,
    host TEXT,
    started INTEGER NOT NULL,
    ended INTEGER,
    attempts INTEGER NOT NULL,
    detail TEXT,
    PRIMARY KEY (runbook, step)
);
CREATE TABLE IF NOT EXISTS locks (
    site TEXT PRIMARY KEY,
    runbook TEXT NOT NULL REFERENCES runbooks(id)
);
";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

/// `2026-11-22 04:12:03Z`.
pub fn format_time(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
}

/// This machine's host name, to tell whose controller a running runbook belongs to.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Whether a process with this pid exists on this host.
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid as i32, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl Journal {
    /// Opens (creating if needed) the journal in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        std::fs::create_dir_all(state_dir).map_err(|source| JournalError::StateDir {
            path: state_dir.to_owned(),
            source,
        })?;
        let path = state_dir.join(JOURNAL_FILE);
        let db = |source| JournalError::Db {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(db)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        Ok(Journal { conn, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self, source: rusqlite::Error) -> JournalError {
        JournalError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// Records a new runbook, run by this process, and takes its sites; refused, with the
    /// holder named, if another unfinished runbook holds one of them.
    pub fn create(&mut self, rb: &NewRunbook) -> Result<RunbookRecord, JournalError> {
        let db = |source| JournalError::Db {
            path: self.path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        for site in &rb.sites {
            let holder: Option<String> = tx
                .query_row(
                    "SELECT runbook FROM locks WHERE site = ?1",
                    params![site],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            let Some(holder) = holder else { continue };
            let rec = get(&tx, &holder).map_err(db)?;
            match rec {
                Some(h) if rb.takes_over.as_deref() == Some(h.id.as_str()) => {
                    if h.effective_status() == RunStatus::Running {
                        return Err(JournalError::Running {
                            id: h.id,
                            pid: h.pid,
                            host: h.host,
                        });
                    }
                    tx.execute("DELETE FROM locks WHERE site = ?1", params![site])
                        .map_err(db)?;
                }
                Some(h) if h.status.holds_sites() => {
                    let status = h.effective_status();
                    let by = if status == RunStatus::Running {
                        format!(", pid {} on {}", h.pid, h.host)
                    } else {
                        String::new()
                    };
                    return Err(JournalError::Locked {
                        site: site.clone(),
                        holder: h.id,
                        title: h.title,
                        status,
                        since: format_time(h.updated),
                        by,
                    });
                }
                _ => {
                    tx.execute("DELETE FROM locks WHERE site = ?1", params![site])
                        .map_err(db)?;
                }
            }
        }
        let t = now();
        if let Some(old) = &rb.takes_over {
            tx.execute(
                "UPDATE runbooks SET status = 'abandoned', updated = ?2 WHERE id = ?1",
                params![old, t],
            )
            .map_err(db)?;
        }
        tx.execute(
            "INSERT INTO runbooks (id, title, operation, cluster, plan, sites, status, created, updated, pid, host)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7, ?7, ?8, ?9)",
            params![
                rb.id,
                rb.title,
                rb.operation,
                rb.cluster.to_string_lossy(),
                rb.plan.join("\n"),
                rb.sites.join(","),
                t,
                std::process::id(),
                hostname(),
            ],
        )
        .map_err(db)?;
        for site in &rb.sites {
            tx.execute(
                "INSERT INTO locks (site, runbook) VALUES (?1, ?2)",
                params![site, rb.id],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        self.get(&rb.id)
    }

    /// Takes over a runbook to resume it in this process: refused while another live
    /// controller runs it, or when it has nothing left to do.
    pub fn claim(&mut self, id: &str) -> Result<RunbookRecord, JournalError> {
        let db = |source| JournalError::Db {
            path: self.path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let rec = get(&tx, id)
            .map_err(db)?
            .ok_or_else(|| JournalError::Unknown {
                id: id.to_owned(),
                path: self.path.clone(),
            })?;
        match rec.effective_status() {
            RunStatus::Running if rec.pid != std::process::id() => {
                return Err(JournalError::Running {
                    id: rec.id,
                    pid: rec.pid,
                    host: rec.host,
                })
            }
            s @ (RunStatus::Done | RunStatus::Abandoned) => {
                return Err(JournalError::Finished {
                    id: rec.id,
                    status: s,
                    what: "resume",
                })
            }
            _ => {}
        }
        tx.execute(
            "UPDATE runbooks SET status = 'running', pid = ?2, host = ?3, updated = ?4 WHERE id = ?1",
            params![id, std::process::id(), hostname(), now()],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        self.get(id)
    }

    /// Sets a runbook's status; `Done` and `Abandoned` free its sites.
    pub fn set_status(&mut self, id: &str, status: RunStatus) -> Result<(), JournalError> {
        let db = |source| JournalError::Db {
            path: self.path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        tx.execute(
            "UPDATE runbooks SET status = ?2, updated = ?3 WHERE id = ?1",
            params![id, status.name(), now()],
        )
        .map_err(db)?;
        if !status.holds_sites() {
            tx.execute("DELETE FROM locks WHERE runbook = ?1", params![id])
                .map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    /// Gives up a runbook that is not running: its sites are free again.
    pub fn abandon(&mut self, id: &str) -> Result<RunbookRecord, JournalError> {
        let rec = self.get(id)?;
        match rec.effective_status() {
            RunStatus::Running => Err(JournalError::Running {
                id: rec.id,
                pid: rec.pid,
                host: rec.host,
            }),
            s @ (RunStatus::Done | RunStatus::Abandoned) => Err(JournalError::Finished {
                id: rec.id,
                status: s,
                what: "abandon",
            }),
            _ => {
                self.set_status(id, RunStatus::Abandoned)?;
                self.get(id)
            }
        }
    }

    /// Records that a step starts (again).
    pub fn step_started(
        &self,
        id: &str,
        step: u32,
        host: Option<&str>,
    ) -> Result<(), JournalError> {
        let t = now();
        self.conn
            .execute(
                "INSERT INTO steps (runbook, step, status, host, started, ended, attempts, detail)
                 VALUES (?1, ?2, 'started', ?3, ?4, NULL, 1, NULL)
                 ON CONFLICT (runbook, step) DO UPDATE SET
                   status = 'started', host = ?3, started = ?4, ended = NULL,
                   attempts = attempts + 1, detail = NULL",
                params![id, step, host, t],
            )
            .map_err(|e| self.db(e))?;
        self.touch(id, t)
    }

    /// Records how a step ended.
    pub fn step_ended(
        &self,
        id: &str,
        step: u32,
        status: StepStatus,
        host: Option<&str>,
        detail: Option<&str>,
    ) -> Result<(), JournalError> {
        let t = now();
        self.conn
            .execute(
                "UPDATE steps SET status = ?3, host = COALESCE(?4, host), ended = ?5, detail = ?6
                 WHERE runbook = ?1 AND step = ?2",
                params![id, step, status.name(), host, t, detail],
            )
            .map_err(|e| self.db(e))?;
        self.touch(id, t)
    }

    fn touch(&self, id: &str, t: i64) -> Result<(), JournalError> {
        self.conn
            .execute(
                "UPDATE runbooks SET updated = ?2 WHERE id = ?1",
                params![id, t],
            )
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<RunbookRecord, JournalError> {
        get(&self.conn, id)
            .map_err(|e| self.db(e))?
            .ok_or_else(|| JournalError::Unknown {
                id: id.to_owned(),
                path: self.path.clone(),
            })
    }

    /// Every runbook, newest first.
    pub fn list(&self) -> Result<Vec<RunbookRecord>, JournalError> {
        let mut stmt = self
            .conn
            .prepare(&format!("{SELECT_RUNBOOK} ORDER BY created DESC, id DESC"))
            .map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([], runbook_row)
            .map_err(|e| self.db(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }

    /// A runbook's steps that have started at least once, by step number.
    pub fn steps(&self, id: &str) -> Result<Vec<StepRecord>, JournalError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT step, status, host, started, ended, attempts, detail FROM steps
                 WHERE runbook = ?1 ORDER BY step",
            )
            .map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map(params![id], |r| {
                Ok(StepRecord {
                    step: r.get(0)?,
                    status: StepStatus::parse(&r.get::<_, String>(1)?),
                    host: r.get(2)?,
                    started: r.get(3)?,
                    ended: r.get(4)?,
                    attempts: r.get(5)?,
                    detail: r.get(6)?,
                })
            })
            .map_err(|e| self.db(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }
}

const SELECT_RUNBOOK: &str = "SELECT id, title, operation, cluster, plan, sites, status, created, updated, pid, host FROM runbooks";

fn runbook_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunbookRecord> {
    let plan: String = r.get(4)?;
    let sites: String = r.get(5)?;
    Ok(RunbookRecord {
        id: r.get(0)?,
        title: r.get(1)?,
        operation: r.get(2)?,
        cluster: PathBuf::from(r.get::<_, String>(3)?),
        plan: plan.lines().map(str::to_owned).collect(),
        sites: sites
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        status: RunStatus::parse(&r.get::<_, String>(6)?),
        created: r.get(7)?,
        updated: r.get(8)?,
        pid: r.get(9)?,
        host: r.get(10)?,
    })
}

fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<RunbookRecord>> {
    conn.query_row(
        &format!("{SELECT_RUNBOOK} WHERE id = ?1"),
        params![id],
        runbook_row,
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(id: &str, sites: &[&str]) -> NewRunbook {
        NewRunbook {
            id: id.into(),
            title: format!("test {id}"),
            operation: "{}".into(),
            cluster: "/etc/mover/cluster.toml".into(),
            plan: vec!["1 site east: policy maintenance".into()],
            sites: sites.iter().map(|s| (*s).to_owned()).collect(),
            takes_over: None,
        }
    }

    #[test]
    fn steps_are_recorded_and_survive_reopening() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(d.path()).unwrap();
            j.create(&new("rb-1", &["east", "west"])).unwrap();
            j.step_started("rb-1", 1, Some("east1")).unwrap();
            j.step_ended("rb-1", 1, StepStatus::Done, None, Some("{\"exit\":0}"))
                .unwrap();
            j.step_started("rb-1", 2, None).unwrap();
        }
        let mut j = Journal::open(d.path()).unwrap();
        let steps = j.steps("rb-1").unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].status, StepStatus::Done);
        assert_eq!(steps[0].host.as_deref(), Some("east1"));
        assert_eq!(steps[0].detail.as_deref(), Some("{\"exit\":0}"));
        assert_eq!(steps[1].status, StepStatus::Started);
        assert!(steps[1].ended.is_none());
        // A step started again counts its attempts.
        j.step_started("rb-1", 2, Some("west1")).unwrap();
        assert_eq!(j.steps("rb-1").unwrap()[1].attempts, 2);
        let rec = j.get("rb-1").unwrap();
        assert_eq!(rec.sites, ["east", "west"]);
        assert_eq!(rec.plan, ["1 site east: policy maintenance"]);
        assert_eq!(rec.status, RunStatus::Running);
        j.set_status("rb-1", RunStatus::Done).unwrap();
        assert_eq!(j.get("rb-1").unwrap().status, RunStatus::Done);
    }

    #[test]
    fn a_site_is_held_by_one_unfinished_runbook() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        j.create(&new("rb-1", &["east", "west"])).unwrap();
        let e = j.create(&new("rb-2", &["east"])).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, JournalError::Locked { .. }), "{msg}");
        assert!(msg.contains("site east is locked by runbook rb-1"), "{msg}");
        assert!(msg.contains("mover runbook resume rb-1"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        // Another site is free; the refused runbook left nothing behind.
        j.create(&new("rb-3", &["north"])).unwrap();
        assert!(matches!(j.get("rb-2"), Err(JournalError::Unknown { .. })));
        // A failed runbook still holds its sites...
        j.set_status("rb-1", RunStatus::Failed).unwrap();
        let e = j.create(&new("rb-4", &["west"])).unwrap_err().to_string();
        assert!(e.contains("failed since"), "{e}");
        // ...unless its rollback takes them over, which abandons it...
        let mut back = new("rb-1-back", &["east"]);
        back.takes_over = Some("rb-1".into());
        j.create(&back).unwrap();
        assert_eq!(j.get("rb-1").unwrap().status, RunStatus::Abandoned);
        j.set_status("rb-1-back", RunStatus::Done).unwrap();
        // ...or it is abandoned or done.
        j.create(&new("rb-4", &["west", "east"])).unwrap();
        j.set_status("rb-4", RunStatus::Done).unwrap();
        j.create(&new("rb-5", &["east"])).unwrap();
    }

    #[test]
    fn a_running_runbook_cannot_be_claimed_twice_but_a_dead_one_can() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        j.create(&new("rb-1", &["east"])).unwrap();
        // Pretend another live process runs it: pid 1 always exists.
        j.conn
            .execute("UPDATE runbooks SET pid = 1 WHERE id = 'rb-1'", [])
            .unwrap();
        let e = j.claim("rb-1").unwrap_err();
        assert!(matches!(e, JournalError::Running { pid: 1, .. }), "{e}");
        assert!(matches!(
            j.abandon("rb-1"),
            Err(JournalError::Running { .. })
        ));
        // Its controller died: a pid that cannot exist.
        j.conn
            .execute("UPDATE runbooks SET pid = 2147483647 WHERE id = 'rb-1'", [])
            .unwrap();
        assert_eq!(
            j.get("rb-1").unwrap().effective_status(),
            RunStatus::Interrupted
        );
        let rec = j.claim("rb-1").unwrap();
        assert_eq!(rec.pid, std::process::id());
        j.set_status("rb-1", RunStatus::Done).unwrap();
        let e = j.claim("rb-1").unwrap_err().to_string();
        assert!(e.contains("is done: there is nothing to resume"), "{e}");
        assert!(matches!(j.claim("rb-9"), Err(JournalError::Unknown { .. })));
    }

    #[test]
    fn times_read_as_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time(1_795_000_000), "2026-11-18 11:06:40Z");
    }
}
