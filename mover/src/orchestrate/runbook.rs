//! Runbooks: the steps an operation takes, where each runs and what it waits for, as data
//! that an executor runs, a journal records and `--dry-run` prints.

use std::fmt;
use std::fmt::Write as _;

use super::hooks::{HookAction, HookContext, Scope};
use super::inventory::{Inventory, Method};

/// A step's number in its runbook, from 1, in the order the planner wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StepId(pub u32);

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a step runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A site-wide hook: run by the agent of one live host of the site (its primary first).
    Site(String),
    /// A host's agent; for a transfer, the source's.
    Host(String),
    /// The controller itself: waits.
    Controller,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Site(s) => write!(f, "site {s}"),
            Target::Host(h) => f.write_str(h),
            Target::Controller => f.write_str("controller"),
        }
    }
}

/// One chained transfer: the source sends once, each target relays to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub source: String,
    /// In chain order: `source -> targets[0] -> targets[1] -> …`.
    pub targets: Vec<String>,
    pub dataset: String,
    pub method: Method,
    /// Connections (tprovision's `--threads`); `None` lets the engine choose.
    pub threads: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepAction {
    /// A hook action; `service` is the replication service it is about, if any.
    Hook {
        action: HookAction,
        service: Option<String>,
    },
    /// Done when every target has committed (or the transfer failed).
    Transfer(Transfer),
    /// Runs nothing: done when the steps it depends on are, to join parallel branches.
    Wait { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub id: StepId,
    pub on: Target,
    pub action: StepAction,
    /// Steps that must be done first; always lower ids.
    pub after: Vec<StepId>,
}

impl Step {
    /// What the step does, in a few words.
    pub fn describe(&self) -> String {
        match &self.action {
            StepAction::Hook { action, service } => action.describe(service.as_deref()),
            StepAction::Transfer(t) => format!(
                "transfer {} ({}) {} -> {}",
                t.dataset,
                t.method,
                t.source,
                t.targets.join(" -> ")
            ),
            StepAction::Wait { reason } => format!("wait until {reason}"),
        }
    }
}

/// An operation's plan: steps in an order that respects their dependencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runbook {
    /// The operation, as a person would say it: `reseed-site east from west`.
    pub title: String,
    pub steps: Vec<Step>,
}

impl Runbook {
    /// One line per step, `3 west1: replicator west_from_east offline <- 2`: what the journal
    /// keeps to tell whether planning again gives the same runbook.
    pub fn lines(&self) -> Vec<String> {
        self.steps
            .iter()
            .map(|s| {
                let after: Vec<String> = s.after.iter().map(StepId::to_string).collect();
                let mut line = format!("{} {}: {}", s.id, s.on, s.describe());
                if !after.is_empty() {
                    line.push_str(&format!(" <- {}", after.join(",")));
                }
                line
            })
            .collect()
    }

    pub fn step(&self, id: StepId) -> Option<&Step> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// The plan for people: numbered steps, where each runs, what it runs (hook commands
    /// as the profile renders them; `{staging}` and `{datadir}` are filled in by the agent)
    /// and what it waits for.
    pub fn dry_run(&self, inventory: &Inventory) -> String {
        let width = self
            .steps
            .iter()
            .map(|s| s.on.to_string().len())
            .max()
            .unwrap_or(0);
        let mut out = format!("{}: {} steps\n", self.title, self.steps.len());
        for s in &self.steps {
            let after = if s.after.is_empty() {
                String::new()
            } else {
                let ids: Vec<String> = s.after.iter().map(StepId::to_string).collect();
                format!("  (after {})", ids.join(", "))
            };
            let _ = writeln!(
                out,
                "{:>3}  {:<width$}  {}{after}",
                s.id.0,
                s.on.to_string(),
                s.describe()
            );
            let mut previews = Vec::new();
            match &s.action {
                StepAction::Hook { action, service } => {
                    previews.push((s.on.clone(), *action, service.as_deref(), ""));
                }
                StepAction::Transfer(t) => {
                    if let Some(tool) = t.method.backup_tool() {
                        previews.push((
                            Target::Host(t.source.clone()),
                            HookAction::Backup(tool),
                            None,
                            "  (first, into a directory of its own)",
                        ));
                        for target in &t.targets {
                            previews.push((
                                Target::Host(target.clone()),
                                HookAction::Prepare(tool),
                                None,
                                "  (before the commit)",
                            ));
                        }
                    }
                }
                StepAction::Wait { .. } => {}
            }
            for (on, action, service, note) in previews {
                let line = match command_preview(inventory, &on, action, service) {
                    Ok(cmd) => format!("$ {cmd}{note}"),
                    Err(e) => format!("cannot render: {e}"),
                };
                let who = match &s.action {
                    StepAction::Transfer(_) => format!("{on}:"),
                    _ => String::new(),
                };
                let _ = writeln!(out, "     {who:<width$}  {line}");
            }
        }
        out
    }
}

fn command_preview(
    inventory: &Inventory,
    on: &Target,
    action: HookAction,
    service: Option<&str>,
) -> Result<String, String> {
    let mut ctx = HookContext {
        service,
        ..HookContext::default()
    };
    match (on, action.scope()) {
        (Target::Site(site), Scope::Site) => {
            let s = inventory
                .site(site)
                .ok_or_else(|| format!("unknown site {site}"))?;
            ctx.site = Some(&s.name);
            ctx.service = Some(&s.service);
        }
        (Target::Host(host), Scope::Host) => {
            let h = inventory
                .host(host)
                .ok_or_else(|| format!("unknown host {host}"))?;
            ctx.host = Some(&h.name);
            ctx.site = Some(&h.site);
        }
        _ => return Err(format!("{} cannot run on {on}", action.key())),
    }
    inventory
        .hooks()
        .preview(action, &ctx)
        .map(|c| c.to_string())
        .map_err(|e| e.to_string())
}
