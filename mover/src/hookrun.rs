//! Hook actions that agents run for the controller: the controller's call ([`call_hook`]) and
//! the agent's side (rendering, running and recording the command).
//!
//! Nothing received from the network is a command line. The controller names an abstract
//! action ([`HookAction`]), a site, and optionally a service and a dataset; the agent renders
//! the command from its own configuration (`[hooks]` in its config file), runs it only if that
//! allows the action, and answers with the command, its exit status and the end of its output.
//!
//! Each call belongs to a step of a runbook, and the agent runs a `(runbook, step)` at most
//! once: it records each finished step durably under its state directory and answers a
//! repeated call with the record (`replayed`), without running anything; a duplicate that
//! arrives while the step runs waits for it. A step that started but whose end was never
//! recorded (the agent stopped while it ran) is refused until an operator has checked it.

mod ledger;
pub(crate) mod process;

use std::sync::Arc;
use std::time::Duration;

use mover_protocol::{manifest_frame_budget, Hook, HookRan, HookReply, Message, Outcome};
use serde::{Deserialize, Serialize};

use crate::agent::Ctx;
use crate::config::ClusterConfig;
use crate::error::LinkError;
use crate::frame::{read_message, write_message};
use crate::orchestrate::hooks::Placeholder;
use crate::orchestrate::{HookAction, HookCommand, HookContext};

pub(crate) use ledger::Ledger;
use ledger::{Finished, Prior, Request, Started};

/// Longest runbook id: it names files in the agent's state directory.
pub const MAX_RUNBOOK_ID: usize = 64;

/// One hook action asked of one agent, as step `step` of runbook `runbook`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookCall {
    /// Letters, digits, `-` and `_`, at most 64 (see [`validate_runbook_id`]).
    pub runbook: String,
    pub step: u32,
    pub action: HookAction,
    /// The replication or data service, for the actions that address one (`{service}`).
    pub service: Option<String>,
    pub site: String,
    /// One of the agent's datasets, for actions on its directory (`{datadir}`) or staging area
    /// (`{staging}`).
    pub dataset: Option<String>,
}

/// How a hook command ended on an agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HookResult {
    pub node: String,
    /// The command line as the agent rendered it (shell-quoted, for people).
    pub command: String,
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// It ran past the agent's `[hooks] timeout`, and its process group was killed.
    pub timed_out: bool,
    /// Standard output and error, interleaved: the last 64 KiB.
    pub output: String,
    pub seconds: f64,
    /// It ran earlier; this is the agent's record of it and nothing ran now.
    pub replayed: bool,
}

impl HookResult {
    /// Exit status 0, within the timeout.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    /// `exit status 1`, `killed by signal 9`, `timed out`: for messages.
    pub fn status(&self) -> String {
        if self.timed_out {
            "timed out and was killed".into()
        } else if let Some(code) = self.exit_code {
            format!("exit status {code}")
        } else if let Some(sig) = self.signal {
            format!("killed by signal {sig}")
        } else {
            "ended without a status".into()
        }
    }

    /// The last `max_lines` lines of the output, for messages.
    pub fn output_tail(&self, max_lines: usize) -> &str {
        tail_lines(&self.output, max_lines)
    }
}

/// The end of `text`: its last `max_lines` lines (a final newline does not count as a line).
pub(crate) fn tail_lines(text: &str, max_lines: usize) -> &str {
    if max_lines == 0 {
        return "";
    }
    let trimmed = text.trim_end_matches('\n');
    let start = trimmed
        .rmatch_indices('\n')
        .nth(max_lines.saturating_sub(1))
        .map_or(0, |(i, _)| i + 1);
    &trimmed[start..]
}

/// Why a hook call did not give a result. A command that ran and failed is not an error: it
/// is a [`HookResult`] that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HookCallError {
    /// The agent will not run it: no `[hooks]` table, an action its config does not allow, an
    /// unknown dataset, an unsafe value, or a step of the same id that already ran differently
    /// or was cut short. Nothing ran; fix the config or the call.
    #[error("{node} refused the hook: {reason}")]
    Refused { node: String, reason: String },
    /// The agent could not be reached, or the connection was lost before it answered: the
    /// caller may try again, or another host. (A retry of a step that did run is answered
    /// from the agent's record.)
    #[error("could not get an answer from the agent on {node}: {reason}")]
    Unreachable { node: String, reason: String },
    /// The agent could not start the command (no such program, say). Nothing ran.
    #[error("{node} could not start `{command}`: {reason}")]
    NotStarted {
        node: String,
        command: String,
        reason: String,
    },
    /// The agent answered something that is not an answer to a hook.
    #[error("{node} broke the protocol: {reason}")]
    Protocol { node: String, reason: String },
    #[error("node {node:?} is not in the cluster file (known: {known})")]
    UnknownNode { node: String, known: String },
    #[error("invalid hook call: {0}")]
    Invalid(String),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl HookCallError {
    /// Whether calling again (on this host or another) may succeed without changing anything.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

/// Runbook ids name files in each agent's state directory: letters, digits, `-` and `_`, 1 to
/// 64 of them, not starting with `-`.
pub fn validate_runbook_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_RUNBOOK_ID
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "runbook id {id:?} must be 1-{MAX_RUNBOOK_ID} letters, digits, '-' or '_', not starting with '-'"
        ))
    }
}

/// Asks `node`'s agent to run `call` and waits for its answer (as long as the command runs:
/// the agent's `[hooks] timeout` bounds it).
pub async fn call_hook(
    cluster: &ClusterConfig,
    node: &str,
    call: &HookCall,
) -> Result<HookResult, HookCallError> {
    validate_runbook_id(&call.runbook).map_err(HookCallError::Invalid)?;
    let unreachable = |reason: String| HookCallError::Unreachable {
        node: node.to_owned(),
        reason,
    };
    let (endpoint, conn) = crate::controller::dial(cluster, node)
        .await
        .map_err(|e| match e {
            crate::controller::DialError::UnknownNode { node, known } => {
                HookCallError::UnknownNode { node, known }
            }
            crate::controller::DialError::Tls(e) => HookCallError::Tls(e),
            other => unreachable(other.to_string()),
        })?;
    let hook = Hook {
        runbook: call.runbook.clone(),
        step: call.step,
        action: call.action.key().to_owned(),
        tool: call.action.tool().map(|t| t.name().to_owned()),
        service: call.service.clone(),
        site: call.site.clone(),
        dataset: call.dataset.clone(),
    };
    let answer = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(LinkError::from)?;
        write_message(&mut send, &Message::Hook(hook)).await?;
        let _ = send.finish();
        read_message(&mut recv, manifest_frame_budget()).await
    }
    .await;
    crate::net::close_done(&endpoint, &conn).await;
    let protocol = |reason: String| HookCallError::Protocol {
        node: node.to_owned(),
        reason,
    };
    match answer {
        Ok(Message::HookDone { reply, .. }) => match reply {
            HookReply::Ran(r) => Ok(result_of(node, r)),
            HookReply::Refused { reason } => Err(HookCallError::Refused {
                node: node.to_owned(),
                reason,
            }),
            HookReply::NotStarted { command, reason } => Err(HookCallError::NotStarted {
                node: node.to_owned(),
                command,
                reason,
            }),
        },
        // How an agent refuses any request it will not take (or cannot decode).
        Ok(Message::Report {
            outcome: Outcome::Failed { reason, .. },
            ..
        }) => Err(HookCallError::Refused {
            node: node.to_owned(),
            reason,
        }),
        Ok(other) => Err(protocol(format!(
            "it answered a hook with a {} message",
            other.name()
        ))),
        Err(LinkError::Closed) => Err(protocol(
            "it closed the stream without answering (does it run the same mover version? its log says why)"
                .into(),
        )),
        Err(e @ (LinkError::Decode(_) | LinkError::Unexpected { .. })) => {
            Err(protocol(e.to_string()))
        }
        Err(e) => Err(unreachable(e.to_string())),
    }
}

fn result_of(node: &str, r: HookRan) -> HookResult {
    HookResult {
        node: node.to_owned(),
        command: r.command,
        exit_code: r.exit_code,
        signal: r.signal,
        timed_out: r.timed_out,
        output: r.output,
        seconds: r.elapsed_ms as f64 / 1000.0,
        replayed: r.replayed,
    }
}

/// The agent's side: answers a `Hook` from the controller on its control stream.
///
/// A command runs to its end even if the controller goes away (a retry gets the record), but
/// not past the agent's shutdown: its process group is killed, and the step stays marked as
/// started.
pub(crate) async fn serve(
    ctx: Arc<Ctx>,
    conn: quinn::Connection,
    hook: Hook,
    mut send: quinn::SendStream,
) {
    let (runbook, step) = (hook.runbook.clone(), hook.step);
    let reply = tokio::select! {
        reply = answer(&ctx, hook) => reply,
        () = agent_shutdown(&conn) => {
            tracing::warn!(%runbook, step, "agent shutting down: stopped a running hook");
            return;
        }
    };
    match &reply {
        HookReply::Ran(r) => tracing::info!(%runbook, step, command = %r.command,
            exit_code = ?r.exit_code, timed_out = r.timed_out, replayed = r.replayed, "hook ran"),
        HookReply::Refused { reason } => {
            tracing::warn!(%runbook, step, %reason, "refused a hook")
        }
        HookReply::NotStarted { command, reason } => {
            tracing::warn!(%runbook, step, %command, %reason, "could not start a hook")
        }
    }
    let done = Message::HookDone {
        node: ctx.node.clone(),
        reply,
    };
    if let Err(e) = write_message(&mut send, &done).await {
        // The result is recorded: a retry gets it.
        tracing::warn!(%runbook, step, error = %e, "could not send a hook's answer");
        return;
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(10), send.stopped()).await;
}

/// Resolves when this agent closes the connection (it does so to all of them as it shuts
/// down); never when the peer closes it or goes away.
pub(crate) async fn agent_shutdown(conn: &quinn::Connection) {
    if matches!(conn.closed().await, quinn::ConnectionError::LocallyClosed) {
        return;
    }
    std::future::pending().await
}

async fn answer(ctx: &Ctx, hook: Hook) -> HookReply {
    match run_step(ctx, &hook).await {
        Ok(reply) => reply,
        Err(reason) => HookReply::Refused { reason },
    }
}

/// Checks the call, answers from the record if the step ran, or runs it; `Err` is a refusal.
async fn run_step(ctx: &Ctx, hook: &Hook) -> Result<HookReply, String> {
    validate_runbook_id(&hook.runbook)?;
    let action =
        HookAction::from_key_and_tool(&hook.action, hook.tool.as_deref()).ok_or_else(|| {
            format!(
                "{:?}{} is not a hook action (actions: {})",
                hook.action,
                hook.tool
                    .as_deref()
                    .map(|t| format!(" with tool {t:?}"))
                    .unwrap_or_default(),
                HookAction::keys().collect::<Vec<_>>().join(", ")
            )
        })?;
    if let HookAction::Backup(tool) = action {
        return Err(format!(
            "backup runs only inside a transfer: send with the {tool} method instead"
        ));
    }
    let request = Request::of(hook);
    let _step = ctx.ledger.lock(&hook.runbook, hook.step).await;
    let what = format!("step {} of runbook {}", hook.step, hook.runbook);
    match ctx.ledger.prior(&hook.runbook, hook.step) {
        Err(e) => return Err(format!("{what}: {e}")),
        // A step that failed runs again when asked again: the runbook stopped at it, and the
        // operator resumed after fixing the cause.
        Ok(Prior::Finished(f)) if f.request == request && !f.result.succeeded() => {}
        Ok(Prior::Finished(f)) if f.request == request => {
            return Ok(HookReply::Ran(HookRan {
                command: f.result.command,
                exit_code: f.result.exit_code,
                signal: f.result.signal,
                timed_out: f.result.timed_out,
                output: f.result.output,
                elapsed_ms: (f.result.seconds * 1000.0) as u64,
                replayed: true,
            }))
        }
        Ok(Prior::Finished(f)) => {
            return Err(format!(
                "{what} already ran here as {}, not {}: a step id names one action",
                f.request.describe(),
                request.describe()
            ))
        }
        Ok(Prior::Interrupted(marker)) => {
            return Err(format!(
                "{what} started here but its end was never recorded (the agent stopped while it \
                 ran), so it may have done part of its work: check by hand, then remove {} to \
                 let it run again",
                marker.display()
            ))
        }
        Ok(Prior::Never) => {}
    }
    let (command, timeout) = render(ctx, hook, action)?;
    let shown = command.to_string();
    ctx.ledger
        .start(&Started {
            runbook: hook.runbook.clone(),
            step: hook.step,
            request: request.clone(),
            command: shown.clone(),
        })
        .map_err(|e| format!("{what}: cannot record that it starts, so it does not: {e}"))?;
    tracing::info!(runbook = %hook.runbook, step = hook.step, command = %shown, "running hook");
    let ran = match process::run(&command, timeout).await {
        Ok(r) => r,
        Err(e) => {
            if let Err(e) = ctx.ledger.abandon(&hook.runbook, hook.step) {
                tracing::warn!(error = %e, "could not remove the start record of a hook that never ran");
            }
            return Ok(HookReply::NotStarted {
                reason: not_started_reason(&command, &e),
                command: shown,
            });
        }
    };
    let result = HookResult {
        node: ctx.node.clone(),
        command: shown,
        exit_code: ran.exit_code,
        signal: ran.signal,
        timed_out: ran.timed_out,
        output: ran.output,
        seconds: ran.seconds,
        replayed: false,
    };
    let finished = Finished {
        runbook: hook.runbook.clone(),
        step: hook.step,
        request,
        result,
    };
    if let Err(e) = ctx.ledger.finish(&finished) {
        // The start record stays: a retry is refused rather than run twice.
        tracing::error!(%what, error = %e, "could not record how a hook ended");
    }
    let r = finished.result;
    Ok(HookReply::Ran(HookRan {
        command: r.command,
        exit_code: r.exit_code,
        signal: r.signal,
        timed_out: r.timed_out,
        output: r.output,
        elapsed_ms: (r.seconds * 1000.0) as u64,
        replayed: false,
    }))
}

/// Why a command could not start, with what to do about it.
pub(crate) fn not_started_reason(command: &HookCommand, e: &std::io::Error) -> String {
    let program = command.argv.first().map_or("", String::as_str);
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("{program}: no such program (is it installed, and on the agent's PATH?)")
        }
        std::io::ErrorKind::PermissionDenied => {
            format!("{program}: permission denied (is it executable by the agent's user?)")
        }
        _ => format!("{program}: {e}"),
    }
}

/// The command the agent's config gives for `action`, with this call's values, and its
/// timeout; `Err` says why it will not run.
fn render(ctx: &Ctx, hook: &Hook, action: HookAction) -> Result<(HookCommand, Duration), String> {
    let Some(hooks) = &ctx.cfg.hooks else {
        return Err(format!(
            "{} runs no hooks: add a [hooks] table (profile = \"tungsten\" or \"custom\") to its agent config",
            ctx.node
        ));
    };
    if !hooks.allows(action) {
        return Err(format!(
            "the agent config of {} does not allow {}: add \"{}\" to allow in its [hooks] table",
            ctx.node,
            action.key(),
            action.key()
        ));
    }
    let needs = |p| hooks.profile.uses(action, p);
    let dataset = match &hook.dataset {
        Some(name) => {
            crate::config::validate_dataset_name(name)?;
            let d = ctx.cfg.datasets.get(name).ok_or_else(|| {
                format!(
                    "unknown dataset {name:?}: add [datasets.{name}] to the agent config of {}",
                    ctx.node
                )
            })?;
            Some((name.as_str(), d.path.clone()))
        }
        None => None,
    };
    let text = |p: &std::path::Path| {
        p.to_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("path {} is not UTF-8", p.display()))
    };
    let datadir = match &dataset {
        Some((_, path)) if needs(Placeholder::Datadir) => Some(text(path)?),
        _ => None,
    };
    let staging = match &dataset {
        Some((name, path)) if needs(Placeholder::Staging) => Some(text(
            &crate::staging::Staging::locate(&ctx.cfg.state_dir, path, name)
                .map_err(|e| format!("staging area of dataset {name}: {e}"))?,
        )?),
        _ => None,
    };
    let values = HookContext {
        site: Some(&hook.site),
        service: hook.service.as_deref(),
        host: Some(&ctx.node),
        staging: staging.as_deref(),
        datadir: datadir.as_deref(),
    };
    let command = hooks
        .profile
        .render(action, &values)
        .map_err(|e| format!("cannot run {}: {e}", action.key()))?;
    Ok((command, hooks.timeout))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn runbook_ids_are_plain_file_names() {
        for ok in ["reseed-west-1", "a", "R_2024-01-01T10-00Z", &"x".repeat(64)] {
            assert!(validate_runbook_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../x", "a/b", "a.b", "-x", "a b", &"x".repeat(65), "é"] {
            assert!(validate_runbook_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tails_of_output() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a\nb\nc", 5), "a\nb\nc");
        assert_eq!(tail_lines("a\nb\nc", 0), "");
        assert_eq!(tail_lines("", 3), "");
    }

    #[test]
    fn only_an_unreachable_agent_is_worth_another_try() {
        let n = || "east1".to_owned();
        assert!(HookCallError::Unreachable {
            node: n(),
            reason: "x".into()
        }
        .retryable());
        assert!(!HookCallError::Refused {
            node: n(),
            reason: "x".into()
        }
        .retryable());
        let r = HookResult {
            node: n(),
            command: "x".into(),
            exit_code: Some(0),
            signal: None,
            timed_out: true,
            output: String::new(),
            seconds: 1.0,
            replayed: false,
        };
        assert!(!r.succeeded(), "a command that timed out did not succeed");
        assert!(HookResult {
            timed_out: false,
            ..r.clone()
        }
        .succeeded());
        assert!(!HookResult {
            timed_out: false,
            exit_code: Some(1),
            ..r
        }
        .succeeded());
    }
}
