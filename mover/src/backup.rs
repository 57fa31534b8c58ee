//! The backup-tool methods (`xtrabackup`, `mariabackup`) in the data path: the source runs its
//! own `backup` hook into a fresh directory and sends that instead of the dataset's directory;
//! each target runs its own `prepare` hook on its verified copy before it commits.
//!
//! Both commands come from the agent's own `[hooks]` config (see [`crate::config::AgentHooks`]),
//! which must allow them; the transfer only names the tool. Inside a transfer the placeholders
//! `{host}` (the agent), `{staging}` and `{datadir}` (the dataset's directory) have values;
//! `{site}` and `{service}` do not.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mover_protocol::Method;

use crate::agent::Ctx;
use crate::error::TransferError;
use crate::hookrun::process;
use crate::orchestrate::hooks::BackupTool;
use crate::orchestrate::{HookAction, HookCommand, HookContext};

/// Where sources put their backups, under the state directory.
const BACKUPS: &str = "backups";
/// Lines of a failed command's output quoted in its error (the whole reason is bounded).
const TAIL_LINES: usize = 12;
const TAIL_BYTES: usize = 1500;

/// The backup tool of a transfer's method, if it has one.
pub(crate) fn tool(method: Method) -> Option<BackupTool> {
    match method {
        Method::Files => None,
        Method::Xtrabackup => Some(BackupTool::Xtrabackup),
        Method::Mariabackup => Some(BackupTool::Mariabackup),
    }
}

/// A hook command ready to run inside a transfer, with the agent's timeout.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    action: HookAction,
    command: HookCommand,
    timeout: Duration,
}

/// The command the agent's config gives for `action` with these values; why not otherwise.
fn command(
    ctx: &Ctx,
    action: HookAction,
    staging: &Path,
    datadir: &Path,
) -> Result<Prepared, TransferError> {
    let unavailable = |reason: String| TransferError::HookUnavailable {
        action: describe(action),
        reason,
    };
    let hooks = ctx.cfg.hooks.as_ref().ok_or_else(|| {
        unavailable(format!(
            "{} runs no hooks: add a [hooks] table to its agent config (profile = \"tungsten\", \
             or \"custom\" with a {} command)",
            ctx.node,
            action.key()
        ))
    })?;
    if !hooks.allows(action) {
        return Err(unavailable(format!(
            "the agent config of {} does not allow {}: add \"{}\" to allow in its [hooks] table",
            ctx.node,
            action.key(),
            action.key()
        )));
    }
    let text = |p: &Path| {
        p.to_str()
            .map(str::to_owned)
            .ok_or_else(|| unavailable(format!("path {} is not UTF-8", p.display())))
    };
    let (staging, datadir) = (text(staging)?, text(datadir)?);
    let values = HookContext {
        host: Some(&ctx.node),
        staging: Some(&staging),
        datadir: Some(&datadir),
        ..HookContext::default()
    };
    let command = hooks
        .profile
        .render(action, &values)
        .map_err(|e| unavailable(format!("in the agent config of {}: {e}", ctx.node)))?;
    Ok(Prepared {
        action,
        command,
        timeout: hooks.timeout,
    })
}

/// `prepare (xtrabackup)`: for messages.
fn describe(action: HookAction) -> String {
    match action.tool() {
        Some(t) => format!("{} ({t})", action.key()),
        None => action.key().to_owned(),
    }
}

impl Prepared {
    /// Runs the command; a failure says what ran, how it ended and how its output ended, and
    /// `consequence` (what it means for the transfer).
    pub async fn run(&self, consequence: &'static str) -> Result<(), TransferError> {
        let shown = self.command.to_string();
        tracing::info!(command = %shown, "running {}", describe(self.action));
        let ran = process::run(&self.command, self.timeout)
            .await
            .map_err(|e| TransferError::HookNotStarted {
                action: describe(self.action),
                command: shown.clone(),
                reason: crate::hookrun::not_started_reason(&self.command, &e),
            })?;
        if ran.exit_code == Some(0) && !ran.timed_out {
            tracing::info!(seconds = ran.seconds, "{} done", describe(self.action));
            return Ok(());
        }
        let status = if ran.timed_out {
            format!(
                "ran past the [hooks] timeout of {} s and was killed",
                self.timeout.as_secs()
            )
        } else if let Some(code) = ran.exit_code {
            format!("exited with status {code}")
        } else if let Some(sig) = ran.signal {
            format!("was killed by signal {sig}")
        } else {
            "ended without a status".into()
        };
        Err(TransferError::HookFailed {
            action: describe(self.action),
            command: shown,
            status,
            output: output_tail(&ran.output),
            consequence,
        })
    }
}

/// The last lines of `output`, at most [`TAIL_BYTES`].
fn output_tail(output: &str) -> String {
    let t = crate::hookrun::tail_lines(output, TAIL_LINES);
    let mut from = t.len().saturating_sub(TAIL_BYTES);
    while !t.is_char_boundary(from) {
        from += 1;
    }
    t[from..].to_owned()
}

/// What a target runs on its copy before it commits: its `prepare` command for the method's
/// tool, with `{staging}` its staging area for `dataset` at `dest`. Checked before any data
/// arrives, so that a target that cannot prepare says so at once.
pub(crate) fn prepare_command(
    ctx: &Ctx,
    tool: BackupTool,
    dataset: &str,
    dest: &Path,
) -> Result<Prepared, TransferError> {
    let staging = crate::staging::Staging::locate(&ctx.cfg.state_dir, dest, dataset)?;
    command(ctx, HookAction::Prepare(tool), &staging, dest)
}

/// A backup made by the source's `backup` hook; [`Backup::remove`] removes it.
pub(crate) struct Backup {
    pub dir: PathBuf,
}

impl Backup {
    /// Runs this agent's `backup` hook for `tool` into a fresh directory for `transfer_id`.
    pub async fn take(
        ctx: &Ctx,
        tool: BackupTool,
        datadir: &Path,
        transfer_id: u64,
    ) -> Result<Backup, TransferError> {
        let dir = ctx
            .cfg
            .state_dir
            .join(BACKUPS)
            .join(format!("{transfer_id:016x}"));
        // Checked before anything is created.
        let backup = command(ctx, HookAction::Backup(tool), &dir, datadir)?;
        let make = dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::os::unix::fs::DirBuilderExt;
            crate::staging::remove_tree_if_present(&make).map_err(std::io::Error::other)?;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&make)
        })
        .await
        .map_err(|e| TransferError::Internal(e.to_string()))?
        .map_err(|source| TransferError::Read {
            path: dir.display().to_string(),
            source,
        })?;
        let b = Backup { dir };
        if let Err(e) = backup
            .run("nothing was sent: fix the backup command (or the database) and run again")
            .await
        {
            b.remove().await;
            return Err(e);
        }
        Ok(b)
    }

    /// Removes the backup (the transfer is over, whatever its outcome).
    pub async fn remove(self) {
        let dir = self.dir;
        let path = dir.clone();
        match tokio::task::spawn_blocking(move || crate::staging::remove_tree_if_present(&path))
            .await
        {
            Ok(Ok(())) => tracing::debug!(path = %dir.display(), "removed the backup"),
            Ok(Err(e)) => {
                tracing::warn!(path = %dir.display(), error = %e, "could not remove the backup")
            }
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "could not remove the backup")
            }
        }
    }
}

/// Removes backups left by transfers that were running when the agent last stopped.
pub(crate) fn remove_leftovers(state_dir: &Path) {
    let dir = state_dir.join(BACKUPS);
    if let Err(e) = crate::staging::remove_tree_if_present(&dir) {
        tracing::warn!(path = %dir.display(), error = %e, "could not remove old backups");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_backup_methods_have_a_tool() {
        assert_eq!(tool(Method::Files), None);
        assert_eq!(tool(Method::Xtrabackup), Some(BackupTool::Xtrabackup));
        assert_eq!(tool(Method::Mariabackup), Some(BackupTool::Mariabackup));
    }

    #[test]
    fn a_failures_output_is_quoted_by_its_end() {
        let out: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let t = output_tail(&out);
        assert!(t.starts_with("line 88\n") && t.ends_with("line 99"), "{t}");
        let long = "é".repeat(5000);
        let t = output_tail(&long);
        assert!(t.len() <= TAIL_BYTES && !t.is_empty());
    }
}
