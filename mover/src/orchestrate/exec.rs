//! The executor: runs a runbook's steps, each as soon as the steps it depends on are done
//! (so the hooks on every host of a site run at once), journals each step's start and end,
//! and reports what happens as [`ExecEvent`]s.
//!
//! A failed step stops the runbook: nothing new starts, the steps already running finish,
//! and the runbook is left `failed`, holding its sites, until it is resumed or abandoned.
//! A stop request (Ctrl-C) stops at once: the steps in flight stay `started` in the journal
//! (a hook may still finish on its host; its agent remembers the result) and `resume` runs
//! them again.
//!
//! How a step runs is behind [`Actions`], so the scheduling and the journal are tested
//! without agents; [`super::cluster::ClusterActions`] is the real thing.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::hooks::Scope;
use super::inventory::Inventory;
use super::journal::{Journal, JournalError, RunStatus, StepStatus};
use super::runbook::{Runbook, Step, StepAction, Target, Transfer};
use crate::controller::Summary;

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub use crate::hookrun::{HookCall, HookResult};

/// Why an action could not be run at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActionError {
    pub message: String,
    /// The host could not be reached: a site action may try another host of the site.
    pub unreachable: bool,
}

/// Something that happened to a transfer step, for progress displays.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TransferProgress {
    Scanned { total_bytes: u64 },
    Progress { node: String, bytes: u64 },
    Finished { node: String, committed: bool },
}

/// How steps act on the cluster.
pub trait Actions: Send + Sync + 'static {
    fn hook(&self, host: &str, req: HookCall) -> BoxFuture<'_, Result<HookResult, ActionError>>;

    fn transfer(
        &self,
        t: &Transfer,
        progress: mpsc::UnboundedSender<TransferProgress>,
    ) -> BoxFuture<'_, Result<Summary, ActionError>>;
}

/// What a finished step did, as journalled.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepDetail {
    Hook {
        host: String,
        #[serde(flatten)]
        run: HookResult,
    },
    Transfer {
        summary: Summary,
    },
    Wait,
}

/// Why a step failed, as journalled and reported.
#[derive(Debug, Clone, Serialize)]
pub struct StepFailure {
    /// The host it ran on (or was to run on).
    pub host: Option<String>,
    pub error: String,
    /// The hook's command, status and output, if it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookResult>,
    /// The transfer's summary, if it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
}

/// What the executor reports as it goes.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ExecEvent {
    Started {
        runbook: String,
        title: String,
        steps: usize,
        resumed: bool,
    },
    /// Finished in an earlier run: not run again.
    Skipped { step: u32, on: String, what: String },
    StepStarted {
        step: u32,
        on: String,
        what: String,
        attempt: u32,
    },
    StepDone {
        step: u32,
        on: String,
        what: String,
        seconds: f64,
        detail: StepDetail,
    },
    StepFailed {
        step: u32,
        on: String,
        what: String,
        seconds: f64,
        failure: StepFailure,
    },
    Transfer {
        step: u32,
        #[serde(flatten)]
        progress: TransferProgress,
    },
    /// A stop was requested: nothing new starts.
    Stopping { in_flight: Vec<u32> },
    Finished {
        runbook: String,
        status: RunStatus,
        done: usize,
        steps: usize,
    },
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: RunStatus,
    /// Failed steps, in the order they failed.
    pub failed: Vec<(u32, StepFailure)>,
    /// Steps that were running when a stop was requested.
    pub interrupted: Vec<u32>,
}

/// A runbook id: what it does and when, plus a few random letters. Safe in file names.
pub fn new_runbook_id(what: &str) -> String {
    let now = std::time::SystemTime::now();
    let stamp = humantime::format_rfc3339_seconds(now).to_string();
    let digits: String = stamp.chars().filter(char::is_ascii_digit).collect();
    let mut id: String = what
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() {
                c
            } else {
                '-'
            }
        })
        .collect();
    id.truncate(32);
    let tag: String = (0..4)
        .map(|_| char::from(b"abcdefghjkmnpqrstuvwxyz23456789"[fastrand::usize(..31)]))
        .collect();
    format!(
        "{}-{}-{}-{tag}",
        id.trim_matches('-'),
        &digits[..8.min(digits.len())],
        &digits[8.min(digits.len())..14.min(digits.len())]
    )
}

/// The sites a runbook changes: those of its site steps, of the hosts its hooks run on and
/// of its transfers' targets (a transfer's source is only read).
pub fn touched_sites(runbook: &Runbook, inventory: &Inventory) -> Vec<String> {
    let mut sites = BTreeSet::new();
    let site_of = |h: &str| inventory.host(h).map(|h| h.site.clone());
    for s in &runbook.steps {
        match (&s.on, &s.action) {
            (Target::Site(site), _) => {
                sites.insert(site.clone());
            }
            (_, StepAction::Transfer(t)) => {
                sites.extend(t.targets.iter().filter_map(|h| site_of(h)))
            }
            (Target::Host(h), _) => sites.extend(site_of(h)),
            (Target::Controller, _) => {}
        }
    }
    sites.into_iter().collect()
}

/// Where a step runs, as people read it: the host, or `site east`.
fn on(step: &Step) -> String {
    step.on.to_string()
}

/// Runs `runbook` (journalled as `id`, already created or claimed in `journal`) to its end,
/// a failed step, or `stop`.
pub async fn execute(
    id: &str,
    runbook: &Runbook,
    inventory: &Inventory,
    journal: &mut Journal,
    actions: Arc<dyn Actions>,
    stop: impl Future<Output = ()>,
    mut on_event: impl FnMut(&ExecEvent),
) -> Result<Outcome, JournalError> {
    let records = journal.steps(id)?;
    let resumed = !records.is_empty();
    let attempts: BTreeMap<u32, u32> = records.iter().map(|r| (r.step, r.attempts)).collect();
    let mut done: BTreeSet<u32> = records
        .iter()
        .filter(|r| r.status == StepStatus::Done)
        .map(|r| r.step)
        .collect();
    on_event(&ExecEvent::Started {
        runbook: id.to_owned(),
        title: runbook.title.clone(),
        steps: runbook.steps.len(),
        resumed,
    });
    for s in &runbook.steps {
        if done.contains(&s.id.0) {
            on_event(&ExecEvent::Skipped {
                step: s.id.0,
                on: on(s),
                what: s.describe(),
            });
        }
    }

    let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<(u32, TransferProgress)>();
    let mut running: BTreeMap<u32, Instant> = BTreeMap::new();
    let mut task_steps: BTreeMap<tokio::task::Id, u32> = BTreeMap::new();
    let mut tasks: JoinSet<(u32, Result<StepDetail, StepFailure>)> = JoinSet::new();
    let mut failed: Vec<(u32, StepFailure)> = Vec::new();
    let mut interrupted = Vec::new();
    let mut stopping = false;
    tokio::pin!(stop);

    loop {
        if !stopping && failed.is_empty() {
            for s in &runbook.steps {
                let n = s.id.0;
                if done.contains(&n)
                    || running.contains_key(&n)
                    || !s.after.iter().all(|a| done.contains(&a.0))
                {
                    continue;
                }
                let host = match &s.on {
                    Target::Host(h) => Some(h.as_str()),
                    _ => None,
                };
                journal.step_started(id, n, host)?;
                on_event(&ExecEvent::StepStarted {
                    step: n,
                    on: on(s),
                    what: s.describe(),
                    attempt: attempts.get(&n).copied().unwrap_or(0) + 1,
                });
                running.insert(n, Instant::now());
                let job = StepJob::new(id, s, inventory);
                let actions = actions.clone();
                let progress = progress_tx.clone();
                let handle =
                    tasks.spawn(async move { (n, job.run(actions.as_ref(), progress).await) });
                task_steps.insert(handle.id(), n);
            }
        }
        if running.is_empty() {
            break;
        }
        tokio::select! {
            joined = tasks.join_next_with_id() => {
                let Some(joined) = joined else { break };
                let (n, result) = match joined {
                    Ok((task, r)) => {
                        task_steps.remove(&task);
                        r
                    }
                    // A step's task panicked: a bug, reported as that step failing.
                    Err(e) => {
                        let n = task_steps.remove(&e.id()).unwrap_or(0);
                        (n, Err(StepFailure { host: None, error: format!("internal error: {e}"), hook: None, summary: None }))
                    }
                };
                let seconds = running.remove(&n).map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
                let Some(step) = runbook.step(super::runbook::StepId(n)) else { continue };
                match result {
                    Ok(detail) => {
                        let host = match &detail {
                            StepDetail::Hook { host, .. } => Some(host.clone()),
                            _ => None,
                        };
                        let json = serde_json::to_string(&detail).ok();
                        journal.step_ended(id, n, StepStatus::Done, host.as_deref(), json.as_deref())?;
                        done.insert(n);
                        on_event(&ExecEvent::StepDone { step: n, on: on(step), what: step.describe(), seconds, detail });
                    }
                    Err(failure) => {
                        let json = serde_json::to_string(&failure).ok();
                        journal.step_ended(id, n, StepStatus::Failed, failure.host.as_deref(), json.as_deref())?;
                        on_event(&ExecEvent::StepFailed { step: n, on: on(step), what: step.describe(), seconds, failure: failure.clone() });
                        failed.push((n, failure));
                    }
                }
            }
            Some((step, progress)) = progress_rx.recv() => {
                on_event(&ExecEvent::Transfer { step, progress });
            }
            () = &mut stop, if !stopping => {
                stopping = true;
                interrupted = running.keys().copied().collect();
                on_event(&ExecEvent::Stopping { in_flight: interrupted.clone() });
                tasks.abort_all();
                running.clear();
            }
        }
    }

    let status = if !failed.is_empty() {
        RunStatus::Failed
    } else if done.len() == runbook.steps.len() {
        RunStatus::Done
    } else {
        RunStatus::Interrupted
    };
    journal.set_status(id, status)?;
    on_event(&ExecEvent::Finished {
        runbook: id.to_owned(),
        status,
        done: done.len(),
        steps: runbook.steps.len(),
    });
    Ok(Outcome {
        status,
        failed,
        interrupted,
    })
}

/// Everything a step needs, owned, to run in its own task.
struct StepJob {
    runbook: String,
    step: u32,
    action: StepAction,
    /// Hosts to try in order: the host itself, or a site's primary then its other hosts.
    hosts: Vec<String>,
    site: String,
    dataset: String,
}

impl StepJob {
    fn new(runbook: &str, step: &Step, inventory: &Inventory) -> Self {
        let (hosts, site) = match &step.on {
            Target::Host(h) => (
                vec![h.clone()],
                inventory
                    .host(h)
                    .map(|h| h.site.clone())
                    .unwrap_or_default(),
            ),
            Target::Site(s) => {
                let mut hosts: Vec<String> =
                    inventory.hosts_of(s).map(|h| h.name.clone()).collect();
                if let Some(site) = inventory.site(s) {
                    hosts.sort_by_key(|h| *h != site.primary);
                }
                (hosts, s.clone())
            }
            Target::Controller => (Vec::new(), String::new()),
        };
        StepJob {
            runbook: runbook.to_owned(),
            step: step.id.0,
            action: step.action.clone(),
            hosts,
            site,
            dataset: inventory.database().name.clone(),
        }
    }

    async fn run(
        self,
        actions: &dyn Actions,
        progress: mpsc::UnboundedSender<(u32, TransferProgress)>,
    ) -> Result<StepDetail, StepFailure> {
        match &self.action {
            StepAction::Wait { .. } => Ok(StepDetail::Wait),
            StepAction::Hook { action, service } => {
                let req = HookCall {
                    runbook: self.runbook.clone(),
                    step: self.step,
                    action: *action,
                    service: service.clone(),
                    site: self.site.clone(),
                    dataset: (action.scope() == Scope::Host).then(|| self.dataset.clone()),
                };
                self.hook(actions, req).await
            }
            StepAction::Transfer(t) => {
                let (tx, mut rx) = mpsc::unbounded_channel();
                let step = self.step;
                let forward = tokio::spawn(async move {
                    while let Some(p) = rx.recv().await {
                        if progress.send((step, p)).is_err() {
                            break;
                        }
                    }
                });
                let result = actions.transfer(t, tx).await;
                let _ = forward.await;
                let source = Some(t.source.clone());
                match result {
                    Err(e) => Err(StepFailure {
                        host: source,
                        error: e.message,
                        hook: None,
                        summary: None,
                    }),
                    Ok(summary) if summary.committed() == t.targets.len() => {
                        Ok(StepDetail::Transfer { summary })
                    }
                    Ok(summary) => {
                        let failed: Vec<String> = summary
                            .targets
                            .iter()
                            .filter(|r| r.result != "committed")
                            .map(|r| {
                                format!(
                                    "{}: {}",
                                    r.node,
                                    r.reason.as_deref().unwrap_or("did not commit")
                                )
                            })
                            .collect();
                        Err(StepFailure {
                            host: source,
                            error: format!(
                                "{} of {} targets did not commit: {}",
                                failed.len(),
                                t.targets.len(),
                                failed.join("; ")
                            ),
                            hook: None,
                            summary: Some(summary),
                        })
                    }
                }
            }
        }
    }

    /// Runs a hook on the step's host, or on the first reachable host of its site.
    async fn hook(&self, actions: &dyn Actions, req: HookCall) -> Result<StepDetail, StepFailure> {
        let mut unreachable = Vec::new();
        for host in &self.hosts {
            match actions.hook(host, req.clone()).await {
                Ok(run) if run.succeeded() => {
                    return Ok(StepDetail::Hook {
                        host: host.clone(),
                        run,
                    })
                }
                Ok(run) => {
                    return Err(StepFailure {
                        host: Some(host.clone()),
                        error: format!("{} on {host}: {}", run.command, run.status()),
                        hook: Some(run),
                        summary: None,
                    })
                }
                Err(e) if e.unreachable && self.hosts.len() > 1 => {
                    unreachable.push(format!("{host}: {}", e.message));
                }
                Err(e) => {
                    return Err(StepFailure {
                        host: Some(host.clone()),
                        error: e.message,
                        hook: None,
                        summary: None,
                    })
                }
            }
        }
        Err(StepFailure {
            host: None,
            error: format!(
                "no host of site {} could be reached ({})",
                self.site,
                unreachable.join("; ")
            ),
            hook: None,
            summary: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrate::plan::{plan, Operation};
    use std::path::Path;
    use std::sync::Mutex;
    use std::time::Duration;

    /// A cluster with sites west and east of `n` hosts each, files method.
    fn cluster(n: usize) -> Inventory {
        let mut t = String::from(
            "[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n\
             [sites.west]\nreplication = { west = \"west\", west_from_east = \"east\" }\n\
             [sites.east]\nreplication = { east = \"east\", east_from_west = \"west\" }\n",
        );
        for (k, site) in ["west", "east"].into_iter().enumerate() {
            for i in 1..=n {
                let role = if i == 1 { "primary" } else { "replica" };
                t.push_str(&format!(
                    "[nodes.{site}{i}]\naddress = \"127.0.0.1:{}\"\nsite = \"{site}\"\nrole = \"{role}\"\n",
                    7000 + 100 * k + i
                ));
            }
        }
        t.push_str("[datasets.mysql]\nmethod = \"files\"\n[hooks]\nprofile = \"tungsten\"\n");
        Inventory::parse(&t, Path::new("cluster.toml")).unwrap()
    }

    fn reseed() -> Operation {
        Operation::ReseedSite {
            from_site: "west".into(),
            site: "east".into(),
            source: None,
        }
    }

    /// Records what it was asked to do; fails or cannot reach what it is told to.
    #[derive(Default)]
    struct Fake {
        /// (host, step, started, ended) of every call.
        calls: Mutex<Vec<(String, u32, Instant, Instant)>>,
        fail_step: Option<u32>,
        unreachable: Vec<String>,
        /// Never finishes this step.
        hang_step: Option<u32>,
    }

    impl Fake {
        fn steps(&self) -> Vec<u32> {
            self.calls.lock().unwrap().iter().map(|c| c.1).collect()
        }
    }

    impl Actions for Fake {
        fn hook(
            &self,
            host: &str,
            req: HookCall,
        ) -> BoxFuture<'_, Result<HookResult, ActionError>> {
            let host = host.to_owned();
            Box::pin(async move {
                if self.unreachable.contains(&host) {
                    return Err(ActionError {
                        message: "connection refused".into(),
                        unreachable: true,
                    });
                }
                let start = Instant::now();
                if self.hang_step == Some(req.step) {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
                self.calls
                    .lock()
                    .unwrap()
                    .push((host.clone(), req.step, start, Instant::now()));
                let fail = self.fail_step == Some(req.step);
                Ok(HookResult {
                    node: host.clone(),
                    command: format!("{} {}", req.action.key(), req.service.unwrap_or_default()),
                    exit_code: Some(if fail { 3 } else { 0 }),
                    signal: None,
                    timed_out: false,
                    output: if fail {
                        "replicator is busy\n".into()
                    } else {
                        String::new()
                    },
                    seconds: 0.03,
                    replayed: false,
                })
            })
        }

        fn transfer(
            &self,
            t: &Transfer,
            progress: mpsc::UnboundedSender<TransferProgress>,
        ) -> BoxFuture<'_, Result<Summary, ActionError>> {
            let t = t.clone();
            Box::pin(async move {
                let start = Instant::now();
                let _ = progress.send(TransferProgress::Scanned { total_bytes: 10 });
                self.calls
                    .lock()
                    .unwrap()
                    .push((t.source.clone(), 0, start, Instant::now()));
                let targets = t
                    .targets
                    .iter()
                    .map(|n| crate::controller::TargetSummary {
                        node: n.clone(),
                        dataset: t.dataset.clone(),
                        result: "committed",
                        bytes: 10,
                        files: 1,
                        seconds: 0.0,
                        mb_per_s: 0.0,
                        held_bytes: 0,
                        repaired: 0,
                        digest: None,
                        reason: None,
                        retryable: false,
                    })
                    .collect();
                Ok(Summary {
                    transfer_id: "1".into(),
                    topology: "chain".into(),
                    seconds: 0.0,
                    source: Default::default(),
                    targets,
                })
            })
        }
    }

    struct Run {
        outcome: Outcome,
        events: Vec<ExecEvent>,
    }

    async fn run(
        dir: &Path,
        id: &str,
        inv: &Inventory,
        fake: Arc<Fake>,
        stop: impl Future<Output = ()>,
        create: bool,
    ) -> Run {
        let rb = plan(&reseed(), inv).unwrap();
        let mut j = Journal::open(dir).unwrap();
        if create {
            j.create(&super::super::journal::NewRunbook {
                id: id.into(),
                title: rb.title.clone(),
                operation: "{}".into(),
                cluster: "c.toml".into(),
                plan: vec![],
                sites: touched_sites(&rb, inv),
                takes_over: None,
            })
            .unwrap();
        } else {
            j.claim(id).unwrap();
        }
        let mut events = Vec::new();
        let outcome = execute(id, &rb, inv, &mut j, fake, stop, |e| events.push(e.clone()))
            .await
            .unwrap();
        Run { outcome, events }
    }

    /// Creates runbook `rb-1` and runs it to its end.
    async fn fresh(dir: &Path, inv: &Inventory, fake: Arc<Fake>) -> Run {
        run(dir, "rb-1", inv, fake, std::future::pending(), true).await
    }

    /// Resumes runbook `rb-1` and runs it to its end.
    async fn resumed(dir: &Path, inv: &Inventory, fake: Arc<Fake>) -> Run {
        run(dir, "rb-1", inv, fake, std::future::pending(), false).await
    }

    #[tokio::test]
    async fn steps_run_in_dependency_order_and_parallel_where_allowed() {
        let d = tempfile::tempdir().unwrap();
        let inv = cluster(3);
        let fake = Arc::new(Fake::default());
        let r = fresh(d.path(), &inv, fake.clone()).await;
        assert_eq!(r.outcome.status, RunStatus::Done);
        let rb = plan(&reseed(), &inv).unwrap();
        let calls = fake.calls.lock().unwrap().clone();
        // Every hook step ran exactly once (the transfer is recorded as step 0).
        let mut hooks: Vec<u32> = calls.iter().map(|c| c.1).filter(|&s| s != 0).collect();
        hooks.sort();
        let expected: Vec<u32> = rb
            .steps
            .iter()
            .filter(|s| matches!(s.action, StepAction::Hook { .. }))
            .map(|s| s.id.0)
            .collect();
        assert_eq!(hooks, expected);
        // No step started before the steps it depends on ended.
        let when: BTreeMap<u32, (Instant, Instant)> =
            calls.iter().map(|c| (c.1, (c.2, c.3))).collect();
        for s in &rb.steps {
            let Some((start, _)) = when.get(&s.id.0) else {
                continue;
            };
            for a in &s.after {
                if let Some((_, end)) = when.get(&a.0) {
                    assert!(end <= start, "step {} started before {} ended", s.id, a);
                }
            }
        }
        // The three west hosts' replicators went offline at the same time (steps 3, 5, 7).
        let (_, e3) = when[&3];
        let (s5, _) = when[&5];
        let (s7, _) = when[&7];
        assert!(s5 < e3 && s7 < e3, "west hosts ran one after the other");
        // Site steps ran on the site's primary.
        assert_eq!(calls.iter().find(|c| c.1 == 1).unwrap().0, "east1");
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.get("rb-1").unwrap().status, RunStatus::Done);
        assert!(j
            .steps("rb-1")
            .unwrap()
            .iter()
            .all(|s| s.status == StepStatus::Done));
        assert!(matches!(
            r.events.last(),
            Some(ExecEvent::Finished {
                status: RunStatus::Done,
                ..
            })
        ));
        assert!(r.events.iter().any(|e| matches!(
            e,
            ExecEvent::Transfer {
                progress: TransferProgress::Scanned { .. },
                ..
            }
        )));
    }

    #[tokio::test]
    async fn a_failed_step_stops_the_runbook_and_resume_goes_on_from_it() {
        let d = tempfile::tempdir().unwrap();
        let inv = cluster(2);
        // Step 9: east1's replicator reset.
        let fake = Arc::new(Fake {
            fail_step: Some(9),
            ..Fake::default()
        });
        let r = fresh(d.path(), &inv, fake.clone()).await;
        assert_eq!(r.outcome.status, RunStatus::Failed);
        let (n, failure) = &r.outcome.failed[0];
        assert_eq!(*n, 9);
        assert_eq!(failure.host.as_deref(), Some("east1"));
        assert!(failure.error.contains("exit status 3"), "{}", failure.error);
        assert_eq!(
            failure.hook.as_ref().unwrap().output,
            "replicator is busy\n"
        );
        // Nothing after step 9 started; east2's branch (11, 12) may have run beside it.
        let ran = fake.steps();
        assert!(ran.iter().all(|&s| s != 0 && s != 10 && s < 13), "{ran:?}");
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.get("rb-1").unwrap().status, RunStatus::Failed);
        drop(j);

        // Fixed: resume runs step 9 and what follows, and nothing that finished.
        let before: BTreeSet<u32> = ran.iter().copied().filter(|&s| s != 9).collect();
        let fake2 = Arc::new(Fake::default());
        let r = resumed(d.path(), &inv, fake2.clone()).await;
        assert_eq!(r.outcome.status, RunStatus::Done);
        let again: BTreeSet<u32> = fake2.steps().into_iter().collect();
        assert!(again.contains(&9));
        assert!(
            again.is_disjoint(&before),
            "ran again: {:?}",
            again.intersection(&before)
        );
        let skipped = r
            .events
            .iter()
            .filter(|e| matches!(e, ExecEvent::Skipped { .. }))
            .count();
        assert!(skipped >= 8, "{skipped} skipped");
        let j = Journal::open(d.path()).unwrap();
        let s9 = &j.steps("rb-1").unwrap()[8];
        assert_eq!((s9.step, s9.attempts, s9.status), (9, 2, StepStatus::Done));
    }

    #[tokio::test]
    async fn a_site_step_moves_on_to_another_host_when_the_primary_is_unreachable() {
        let d = tempfile::tempdir().unwrap();
        let inv = cluster(2);
        let fake = Arc::new(Fake {
            unreachable: vec!["east1".into()],
            fail_step: None,
            ..Fake::default()
        });
        let r = fresh(d.path(), &inv, fake.clone()).await;
        // Steps 1 and 2 ran on east2; step 8 (east1's own replicator) could not run anywhere.
        let calls = fake.calls.lock().unwrap().clone();
        assert_eq!(calls.iter().find(|c| c.1 == 1).unwrap().0, "east2");
        assert_eq!(r.outcome.status, RunStatus::Failed);
        assert_eq!(r.outcome.failed[0].0, 8);
        assert!(r.outcome.failed[0].1.error.contains("connection refused"));
    }

    #[tokio::test]
    async fn a_stop_leaves_steps_in_flight_started_for_resume() {
        let d = tempfile::tempdir().unwrap();
        let inv = cluster(1);
        let fake = Arc::new(Fake {
            hang_step: Some(3),
            ..Fake::default()
        });
        let stop = tokio::time::sleep(Duration::from_millis(300));
        let r = run(d.path(), "rb-1", &inv, fake, stop, true).await;
        assert_eq!(r.outcome.status, RunStatus::Interrupted);
        assert_eq!(r.outcome.interrupted, [3]);
        let j = Journal::open(d.path()).unwrap();
        let steps = j.steps("rb-1").unwrap();
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[2].status, StepStatus::Started);
        // Still holds its sites.
        assert_eq!(j.get("rb-1").unwrap().status, RunStatus::Interrupted);
        drop(j);
        let fake = Arc::new(Fake::default());
        let r = resumed(d.path(), &inv, fake.clone()).await;
        assert_eq!(r.outcome.status, RunStatus::Done);
        assert_eq!(fake.steps()[0], 3);
    }

    #[test]
    fn ids_are_safe_and_say_what_they_are() {
        let id = new_runbook_id("reseed east");
        assert!(id.starts_with("reseed-east-20"), "{id}");
        assert!(id.len() <= 64);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        assert_ne!(id, new_runbook_id("reseed east"));
    }

    #[test]
    fn a_reseed_touches_both_sites_a_provision_only_its_targets() {
        let inv = cluster(2);
        let rb = plan(&reseed(), &inv).unwrap();
        assert_eq!(touched_sites(&rb, &inv), ["east", "west"]);
        let rb = plan(
            &Operation::Provision {
                source: "west1".into(),
                method: super::super::Method::Files,
                create_master: false,
                threads: None,
                targets: vec!["east2".into()],
            },
            &inv,
        )
        .unwrap();
        assert_eq!(touched_sites(&rb, &inv), ["east"]);
    }
}
