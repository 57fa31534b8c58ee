//! `mover reseed-site`, `mover provision` and `mover runbook …`: plan an operation against the
//! inventory, print it (`--dry-run`) or run it journalled, and look after past runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use mover::orchestrate::cluster::{ClusterActions, TransferTuning};
use mover::orchestrate::exec::{
    self, ExecEvent, Outcome, StepDetail, StepFailure, TransferProgress,
};
use mover::orchestrate::journal::{self, Journal, NewRunbook, RunStatus, StepStatus};
use mover::orchestrate::{plan, rollback, Inventory, Method, Operation, Runbook};

use crate::exit;
use crate::report::{human_bytes, line};

/// Where the journal lives, and how to report.
#[derive(Args, Clone)]
pub struct Common {
    /// The controller's state directory, which holds the journal (journal.db). Default:
    /// $MOVER_STATE_DIR, else /var/lib/mover for root, else ~/.local/state/mover.
    #[arg(long, value_name = "DIR", env = "MOVER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// One JSON object per event on stdout instead of the human report.
    #[arg(long)]
    pub json: bool,
}

/// How fast a runbook's transfers may go.
#[derive(Args, Clone, Copy, Default)]
pub struct Pace {
    /// Most bytes per second the source of each transfer sends, as 100M (MiB/s) or 800mbit;
    /// see `mover send --max-rate`. No limit by default.
    #[arg(long, value_name = "RATE", value_parser = crate::parse_rate)]
    pub max_rate: Option<u64>,
}

#[derive(Args)]
pub struct ReseedSiteArgs {
    /// The inventory (cluster file with sites, hosts, datasets and hooks).
    #[arg(long, value_name = "FILE")]
    pub cluster: PathBuf,
    /// The site that holds the right data.
    #[arg(long, value_name = "SITE")]
    pub from: String,
    /// The site to rebuild.
    #[arg(long, value_name = "SITE")]
    pub site: String,
    /// The host of --from to copy from (default: that site's primary).
    #[arg(long, value_name = "HOST")]
    pub source: Option<String>,
    /// Print the plan (steps, hosts, commands) and stop.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub pace: Pace,
    #[command(flatten)]
    pub common: Common,
}

pub const PROVISION_HELP: &str = "\
How tprovision's flags map:
  tprovision                  mover provision
  -s HOST, --source HOST      -s, --source HOST: any host of the inventory
  -m METHOD, --method METHOD  -m, --method files|xtrabackup|mariabackup (physical copies
                              only; mysqldump is not offered)
  -c (as in a site rebuild)   -c, --create-master: the first target becomes its site's
                              primary (mark_primary) before its replicator goes online
  -t N, --threads N           -t, --threads N: QUIC connections per hop
  (runs on the one target)    runs from any host; several targets are one chained
                              transfer, in the order given

On each target: replicator offline, database stop; one chained transfer (a backup
method is prepared on each target before its commit; the old data stays until then);
then database start, replicator reset, mark primary (-c, first target), replicator
online. Every step is journalled: see `mover runbook`.

Example:
  mover provision --cluster cluster.toml -s west1 -m xtrabackup -c east1 east2 east3";

#[derive(Args)]
pub struct ProvisionArgs {
    /// The inventory (cluster file with sites, hosts, datasets and hooks).
    #[arg(long, value_name = "FILE")]
    pub cluster: PathBuf,
    /// The host to copy from.
    #[arg(short = 's', long, value_name = "HOST")]
    pub source: String,
    /// files (the stopped data directory), xtrabackup or mariabackup (a backup taken on the
    /// source, prepared on each target before its commit).
    #[arg(short = 'm', long, value_name = "METHOD", value_parser = parse_method)]
    pub method: Method,
    /// Make the first target its site's primary.
    #[arg(short = 'c', long)]
    pub create_master: bool,
    /// QUIC connections per hop.
    #[arg(short = 't', long, value_name = "N")]
    pub threads: Option<u32>,
    /// Print the plan (steps, hosts, commands) and stop.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub pace: Pace,
    #[command(flatten)]
    pub common: Common,
    /// The hosts to rebuild, in chain order.
    #[arg(required = true, value_name = "TARGET")]
    pub targets: Vec<String>,
}

fn parse_method(s: &str) -> Result<Method, String> {
    Method::from_name(s).ok_or_else(|| format!("{s:?}: use files, xtrabackup or mariabackup"))
}

#[derive(Subcommand)]
pub enum RunbookCommand {
    /// Past and running runbooks, newest first.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// A runbook's steps: what ran where, when, and how it ended.
    Show {
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Go on with a failed or interrupted runbook from its first unfinished step.
    Resume {
        id: String,
        /// The inventory, if it moved since the runbook started.
        #[arg(long, value_name = "FILE")]
        cluster: Option<PathBuf>,
        #[command(flatten)]
        pace: Pace,
        #[command(flatten)]
        common: Common,
    },
    /// Undo what a failed or interrupted runbook left changed (maintenance, routers and
    /// replicators offline, databases stopped), newest first, as a runbook of its own.
    Rollback {
        id: String,
        /// Print the steps and stop.
        #[arg(long)]
        dry_run: bool,
        /// The inventory, if it moved since the runbook started.
        #[arg(long, value_name = "FILE")]
        cluster: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Give up a failed or interrupted runbook: its sites are free for another.
    Abandon {
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

fn state_dir(common: &Common) -> PathBuf {
    if let Some(d) = &common.state_dir {
        return d.clone();
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/mover");
    }
    match std::env::var_os("HOME") {
        Some(h) => Path::new(&h).join(".local/state/mover"),
        None => PathBuf::from(".mover"),
    }
}

fn load_inventory(path: &Path) -> anyhow::Result<Inventory> {
    Ok(Inventory::load(path)?)
}

/// The cluster file `mover send` takes: a plain one (identity and addresses), or an
/// inventory, whose hosts are the nodes.
pub fn load_cluster(path: &Path) -> anyhow::Result<mover::config::ClusterConfig> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let inventory = text
        .lines()
        .any(|l| l.trim_start().starts_with("[sites.") || l.trim() == "[hooks]");
    if inventory {
        Ok(load_inventory(path)?.cluster_config())
    } else {
        Ok(mover::config::ClusterConfig::load(path)?)
    }
}

pub fn reseed_site(args: ReseedSiteArgs) -> anyhow::Result<u8> {
    let op = Operation::ReseedSite {
        from_site: args.from,
        site: args.site,
        source: args.source,
    };
    start(op, &args.cluster, args.dry_run, &args.common, args.pace)
}

pub fn provision(args: ProvisionArgs) -> anyhow::Result<u8> {
    let op = Operation::Provision {
        source: args.source,
        method: args.method,
        create_master: args.create_master,
        threads: args.threads,
        targets: args.targets,
    };
    start(op, &args.cluster, args.dry_run, &args.common, args.pace)
}

/// What the journal keeps to plan a runbook again: an operation, or the rollback of a
/// runbook (planned from that runbook's journal).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Journalled {
    Rollback { rollback_of: String },
    Operation(Operation),
}

/// Plans a journalled runbook again, and checks it is the runbook that was journalled.
fn replan(
    journal: &Journal,
    rec: &journal::RunbookRecord,
    cluster: Option<PathBuf>,
) -> anyhow::Result<(Runbook, Inventory)> {
    let id = &rec.id;
    let what: Journalled = serde_json::from_str(&rec.operation)
        .with_context(|| format!("runbook {id}: the journalled operation cannot be read"))?;
    let path = cluster.unwrap_or_else(|| rec.cluster.clone());
    let inventory = load_inventory(&path)?;
    let runbook = match what {
        Journalled::Operation(op) => plan(&op, &inventory)?,
        Journalled::Rollback { rollback_of } => {
            let original = journal.get(&rollback_of)?;
            let (orig, _) = replan(journal, &original, Some(path.clone()))?;
            let done = done_steps(journal, &rollback_of)?;
            rollback(&orig, &done, rec.title.clone()).0
        }
    };
    let lines = runbook.lines();
    if lines != rec.plan {
        let at = lines
            .iter()
            .zip(&rec.plan)
            .position(|(a, b)| a != b)
            .unwrap_or(lines.len().min(rec.plan.len()));
        bail!(
            "{} now plans runbook {id} differently (step {}: was {:?}, now {:?}): the \
             inventory changed since it started. Put the inventory back, or abandon the \
             runbook (mover runbook abandon {id}) and start a new one",
            path.display(),
            at + 1,
            rec.plan.get(at).map(String::as_str).unwrap_or("nothing"),
            lines.get(at).map(String::as_str).unwrap_or("nothing"),
        );
    }
    Ok((runbook, inventory))
}

fn done_steps(journal: &Journal, id: &str) -> anyhow::Result<Vec<mover::orchestrate::StepId>> {
    Ok(journal
        .steps(id)?
        .iter()
        .filter(|s| s.status == StepStatus::Done)
        .map(|s| mover::orchestrate::StepId(s.step))
        .collect())
}

fn rollback_cmd(
    id: &str,
    dry_run: bool,
    cluster: Option<PathBuf>,
    common: &Common,
) -> anyhow::Result<u8> {
    let mut journal = Journal::open(&state_dir(common))?;
    let rec = journal.get(id)?;
    if let Ok(Journalled::Rollback { .. }) = serde_json::from_str(&rec.operation) {
        bail!("{id} is itself a rollback: resume it (mover runbook resume {id}) instead");
    }
    match rec.effective_status() {
        RunStatus::Running => bail!(
            "runbook {id} is running (pid {} on {}): stop it first",
            rec.pid,
            rec.host
        ),
        RunStatus::Done => bail!("runbook {id} finished: there is nothing half-done to roll back"),
        _ => {}
    }
    let (original, inventory) = replan(&journal, &rec, cluster)?;
    let done = done_steps(&journal, id)?;
    let (back, kept) = rollback(&original, &done, format!("rollback of {id}"));
    if dry_run || back.steps.is_empty() {
        if back.steps.is_empty() {
            line(&format!("runbook {id} left nothing that can be undone"));
        } else {
            for l in back.dry_run(&inventory).lines() {
                line(l);
            }
        }
        for k in &kept {
            line(&format!("not undone: {k}"));
        }
        return Ok(exit::OK);
    }
    let new_id = exec::new_runbook_id("rollback");
    journal.create(&NewRunbook {
        id: new_id.clone(),
        title: back.title.clone(),
        operation: serde_json::to_string(&Journalled::Rollback {
            rollback_of: id.to_owned(),
        })?,
        cluster: rec.cluster.clone(),
        plan: back.lines(),
        sites: exec::touched_sites(&back, &inventory),
        takes_over: Some(id.to_owned()),
    })?;
    for k in &kept {
        line(&format!("not undone: {k}"));
    }
    run(
        &new_id,
        &back,
        &inventory,
        &mut journal,
        common,
        Pace::default(),
    )
}

fn id_prefix(op: &Operation) -> String {
    match op {
        Operation::ReseedSite { site, .. } => format!("reseed-{site}"),
        Operation::Provision { targets, .. } => format!("provision-{}", targets[0]),
    }
}

pub(crate) fn start(
    op: Operation,
    cluster: &Path,
    dry_run: bool,
    common: &Common,
    pace: Pace,
) -> anyhow::Result<u8> {
    let inventory = load_inventory(cluster)?;
    let runbook = plan(&op, &inventory)?;
    if dry_run {
        if common.json {
            let steps: Vec<_> = runbook.lines();
            line(&serde_json::to_string_pretty(&serde_json::json!({
                "title": runbook.title,
                "operation": op,
                "steps": steps,
            }))?);
        } else {
            for l in runbook.dry_run(&inventory).lines() {
                line(l);
            }
        }
        return Ok(exit::OK);
    }
    let cluster =
        std::fs::canonicalize(cluster).with_context(|| format!("resolve {}", cluster.display()))?;
    let dir = state_dir(common);
    let mut journal = Journal::open(&dir)?;
    let id = exec::new_runbook_id(&id_prefix(&op));
    journal.create(&NewRunbook {
        id: id.clone(),
        title: runbook.title.clone(),
        operation: serde_json::to_string(&op)?,
        cluster,
        plan: runbook.lines(),
        sites: exec::touched_sites(&runbook, &inventory),
        takes_over: None,
    })?;
    run(&id, &runbook, &inventory, &mut journal, common, pace)
}

fn resume(id: &str, cluster: Option<PathBuf>, common: &Common, pace: Pace) -> anyhow::Result<u8> {
    let mut journal = Journal::open(&state_dir(common))?;
    let rec = journal.get(id)?;
    let (runbook, inventory) = replan(&journal, &rec, cluster)?;
    journal.claim(id)?;
    run(id, &runbook, &inventory, &mut journal, common, pace)
}

fn run(
    id: &str,
    runbook: &Runbook,
    inventory: &Inventory,
    journal: &mut Journal,
    common: &Common,
    pace: Pace,
) -> anyhow::Result<u8> {
    let actions = Arc::new(ClusterActions {
        cluster: inventory.cluster_config(),
        tuning: TransferTuning {
            max_rate: pace.max_rate.unwrap_or(0),
            ..TransferTuning::default()
        },
    });
    let started = Instant::now();
    let mut report = Reporter::new(common.json, runbook.steps.len());
    let journal_path = journal.path().to_owned();
    let outcome = crate::runtime()?.block_on(exec::execute(
        id,
        runbook,
        inventory,
        journal,
        actions,
        crate::shutdown_signal(),
        |e| report.event(e),
    ))?;
    if !common.json {
        report.finish(id, &outcome, started, &journal_path, common);
    }
    Ok(match outcome.status {
        RunStatus::Done => exit::OK,
        RunStatus::Interrupted => exit::INTERRUPTED,
        _ => exit::FAILED,
    })
}

/// Prints events as they come: a line per step that starts or ends, transfer progress.
struct Reporter {
    json: bool,
    steps: usize,
    summaries: Vec<mover::controller::Summary>,
    width: usize,
    /// A transfer's size, each target's bytes so far, and when progress was last printed.
    total: u64,
    arrived: std::collections::BTreeMap<String, u64>,
    printed: Instant,
}

/// How often a running transfer's progress is printed.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl Reporter {
    fn new(json: bool, steps: usize) -> Self {
        Reporter {
            json,
            steps,
            summaries: Vec::new(),
            width: steps.to_string().len(),
            total: 0,
            arrived: Default::default(),
            printed: Instant::now(),
        }
    }

    fn event(&mut self, e: &ExecEvent) {
        if self.json {
            line(&serde_json::to_string(e).unwrap_or_default());
        }
        if let ExecEvent::StepDone {
            detail: StepDetail::Transfer { summary },
            ..
        } = e
        {
            self.summaries.push(summary.clone());
        }
        if let ExecEvent::StepFailed {
            failure:
                StepFailure {
                    summary: Some(summary),
                    ..
                },
            ..
        } = e
        {
            self.summaries.push(summary.clone());
        }
        if self.json {
            return;
        }
        let w = self.width;
        let n = self.steps;
        match e {
            ExecEvent::Started {
                runbook,
                title,
                steps,
                resumed,
            } => {
                line(&format!(
                    "{} runbook {runbook}: {title}, {steps} steps",
                    if *resumed { "resuming" } else { "starting" }
                ));
            }
            ExecEvent::Skipped { step, on, what } => {
                line(&format!(
                    "  [{step:>w$}/{n}] {on:<10} {what:<46} done before"
                ));
            }
            ExecEvent::StepStarted {
                step,
                on,
                what,
                attempt,
            } => {
                if *attempt > 1 || what.starts_with("transfer") {
                    let again = if *attempt > 1 {
                        format!(" (attempt {attempt})")
                    } else {
                        String::new()
                    };
                    line(&format!(
                        "  [{step:>w$}/{n}] {on:<10} {what}: started{again}"
                    ));
                }
            }
            ExecEvent::StepDone {
                step,
                on,
                what,
                seconds,
                detail,
            } => {
                let extra = match detail {
                    StepDetail::Hook { host, run } => {
                        let mut s = String::new();
                        if on != host {
                            s.push_str(&format!(" on {host}"));
                        }
                        if run.replayed {
                            s.push_str(" (had already run: result replayed by the agent)");
                        }
                        s
                    }
                    StepDetail::Transfer { summary } => format!(
                        " {} to {} targets",
                        human_bytes(summary.source.total_bytes),
                        summary.targets.len()
                    ),
                    StepDetail::Wait => String::new(),
                };
                line(&format!(
                    "  [{step:>w$}/{n}] {on:<10} {what:<46} ok {seconds:>6.1} s{extra}"
                ));
            }
            ExecEvent::StepFailed {
                step,
                on,
                what,
                seconds,
                failure,
            } => {
                line(&format!(
                    "  [{step:>w$}/{n}] {on:<10} {what:<46} FAILED {seconds:.1} s"
                ));
                let _ = failure;
            }
            ExecEvent::Transfer { step, progress } => match progress {
                TransferProgress::Finished { node, committed } => line(&format!(
                    "  [{step:>w$}/{n}]   {node} {}",
                    if *committed { "committed" } else { "FAILED" }
                )),
                TransferProgress::Scanned { total_bytes } => {
                    self.total = *total_bytes;
                    self.arrived.clear();
                    self.printed = Instant::now();
                    line(&format!(
                        "  [{step:>w$}/{n}]   source scanned: {}",
                        human_bytes(*total_bytes)
                    ))
                }
                TransferProgress::Progress { node, bytes } => {
                    self.arrived.insert(node.clone(), *bytes);
                    if self.printed.elapsed() >= PROGRESS_EVERY {
                        self.printed = Instant::now();
                        let each: Vec<String> = self
                            .arrived
                            .iter()
                            .map(|(node, b)| {
                                let pct = (100 * b).checked_div(self.total).unwrap_or(100);
                                format!("{node} {} ({pct}%)", human_bytes(*b))
                            })
                            .collect();
                        line(&format!(
                            "  [{step:>w$}/{n}]   of {}: {}",
                            human_bytes(self.total),
                            each.join(", ")
                        ));
                    }
                }
            },
            ExecEvent::Stopping { in_flight } => {
                let steps: Vec<String> = in_flight.iter().map(u32::to_string).collect();
                line(&format!(
                    "stopping: nothing new starts; step(s) {} were running",
                    steps.join(", ")
                ));
            }
            ExecEvent::Finished { .. } => {}
        }
    }

    fn finish(
        &self,
        id: &str,
        outcome: &Outcome,
        started: Instant,
        journal_path: &Path,
        common: &Common,
    ) {
        for s in &self.summaries {
            line("");
            crate::report::print_summary(s, false);
        }
        line("");
        let state = match &common.state_dir {
            Some(d) => format!(" --state-dir {}", d.display()),
            None => String::new(),
        };
        let resume = format!("mover runbook resume {id}{state}");
        let abandon = format!("mover runbook abandon {id}{state}");
        match outcome.status {
            RunStatus::Done => line(&format!(
                "runbook {id} done in {:.1} s (journal: {})",
                started.elapsed().as_secs_f64(),
                journal_path.display()
            )),
            RunStatus::Interrupted => {
                line(&format!(
                    "runbook {id} interrupted; it still holds its sites. Steps that were \
                     running may finish on their hosts: their agents keep the result."
                ));
                line(&format!("  resume:  {resume}"));
                line(&format!("  undo:    mover runbook rollback {id}{state}"));
                line(&format!("  give up: {abandon}"));
            }
            _ => {
                for (step, f) in &outcome.failed {
                    line(&format!(
                        "runbook {id} FAILED at step {step}{}: {}",
                        f.host
                            .as_deref()
                            .map(|h| format!(" on {h}"))
                            .unwrap_or_default(),
                        f.error
                    ));
                    if let Some(h) = &f.hook {
                        line(&format!("  command: {}", h.command));
                        line(&format!("  status:  {}", h.status()));
                        if h.output.trim().is_empty() {
                            line("  output:  (none)");
                        } else {
                            line("  output:");
                            for l in h.output.lines() {
                                line(&format!("    | {l}"));
                            }
                        }
                    }
                }
                line(
                    "Nothing after the failed step was started; the runbook holds its sites. \
                     Fix the cause, then:",
                );
                line(&format!("  resume:  {resume}"));
                line(&format!("  undo:    mover runbook rollback {id}{state}"));
            }
        }
    }
}

pub fn runbook(cmd: RunbookCommand) -> anyhow::Result<u8> {
    match cmd {
        RunbookCommand::List { common } => {
            let journal = Journal::open(&state_dir(&common))?;
            let all = journal.list()?;
            if common.json {
                let v: Vec<_> = all
                    .iter()
                    .map(|r| {
                        let mut v = serde_json::to_value(r).unwrap_or_default();
                        v["status"] = r.effective_status().name().into();
                        v
                    })
                    .collect();
                line(&serde_json::to_string_pretty(&v)?);
                return Ok(exit::OK);
            }
            if all.is_empty() {
                line(&format!("no runbooks in {}", journal.path().display()));
                return Ok(exit::OK);
            }
            line(&format!(
                "{:<40} {:<12} {:<21} {}",
                "ID", "STATUS", "STARTED", "WHAT"
            ));
            for r in all {
                line(&format!(
                    "{:<40} {:<12} {:<21} {}",
                    r.id,
                    r.effective_status().name(),
                    journal::format_time(r.created),
                    r.title
                ));
            }
            Ok(exit::OK)
        }
        RunbookCommand::Show { id, common } => {
            let journal = Journal::open(&state_dir(&common))?;
            let rec = journal.get(&id)?;
            let steps = journal.steps(&id)?;
            if common.json {
                let steps: Vec<serde_json::Value> = steps
                    .iter()
                    .map(|s| {
                        let mut v = serde_json::to_value(s).unwrap_or_default();
                        if let Some(d) = &s.detail {
                            v["detail"] = serde_json::from_str(d).unwrap_or_default();
                        }
                        v
                    })
                    .collect();
                let mut v = serde_json::to_value(&rec)?;
                v["status"] = rec.effective_status().name().into();
                v["steps"] = steps.into();
                line(&serde_json::to_string_pretty(&v)?);
                return Ok(exit::OK);
            }
            line(&format!("runbook {}: {}", rec.id, rec.title));
            line(&format!(
                "status {}, started {}, last change {}, controller pid {} on {}",
                rec.effective_status(),
                journal::format_time(rec.created),
                journal::format_time(rec.updated),
                rec.pid,
                rec.host
            ));
            line(&format!(
                "sites held: {}; cluster file: {}",
                if rec.status.holds_sites() {
                    rec.sites.join(", ")
                } else {
                    "none".into()
                },
                rec.cluster.display()
            ));
            for (i, planned) in rec.plan.iter().enumerate() {
                let n = i as u32 + 1;
                let s = steps.iter().find(|s| s.step == n);
                let status = match s {
                    None => "pending".to_owned(),
                    Some(s) => {
                        let mut t = s.status.name().to_owned();
                        if let Some(h) = &s.host {
                            t.push_str(&format!(" on {h}"));
                        }
                        if s.attempts > 1 {
                            t.push_str(&format!(", {} attempts", s.attempts));
                        }
                        if let Some(end) = s.ended {
                            t.push_str(&format!(", {} s", end - s.started));
                        }
                        t
                    }
                };
                line(&format!("  {planned:<60} {status}"));
                if let Some(s) = s.filter(|s| s.status == StepStatus::Failed) {
                    if let Some(d) = s
                        .detail
                        .as_deref()
                        .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                    {
                        if let Some(err) = d["error"].as_str() {
                            line(&format!("      error: {err}"));
                        }
                        if let Some(out) = d["hook"]["output"].as_str() {
                            for l in out.lines() {
                                line(&format!("      | {l}"));
                            }
                        }
                    }
                }
            }
            Ok(exit::OK)
        }
        RunbookCommand::Resume {
            id,
            cluster,
            pace,
            common,
        } => resume(&id, cluster, &common, pace),
        RunbookCommand::Rollback {
            id,
            dry_run,
            cluster,
            common,
        } => rollback_cmd(&id, dry_run, cluster, &common),
        RunbookCommand::Abandon { id, common } => {
            let mut journal = Journal::open(&state_dir(&common))?;
            let rec = journal.abandon(&id)?;
            line(&format!(
                "runbook {id} abandoned: sites {} are free. Steps that ran stay done; check the \
                 hosts before starting another runbook.",
                rec.sites.join(", ")
            ));
            Ok(exit::OK)
        }
    }
}
