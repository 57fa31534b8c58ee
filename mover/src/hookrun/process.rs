//! Runs one hook command: no shell, its own process group, standard output and error
//! captured together (the last [`MAX_OUTPUT`] bytes), and a deadline after which the whole
//! group is killed.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::orchestrate::HookCommand;

/// Output kept of a command: its end, where errors are.
pub(crate) const MAX_OUTPUT: usize = mover_protocol::message::MAX_HOOK_OUTPUT;
/// After the timeout the group gets SIGTERM, then SIGKILL this much later.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long output is waited for after the command exited. A command that left a process
/// behind holding its output (a daemon it started) is not waited for beyond this.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// How a command ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ran {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Standard output and error as written, interleaved: the last [`MAX_OUTPUT`] bytes.
    pub output: String,
    pub seconds: f64,
}

/// The last bytes written, bounded.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
        // Trim in batches rather than on every read.
        if self.0.len() > 2 * MAX_OUTPUT {
            let cut = self.0.len() - MAX_OUTPUT;
            self.0.drain(..cut);
        }
    }

    fn text(&self) -> String {
        let b = &self.0[self.0.len().saturating_sub(MAX_OUTPUT)..];
        let s = String::from_utf8_lossy(b);
        // Replacement characters are longer than the bytes they replace.
        let mut from = s.len().saturating_sub(MAX_OUTPUT);
        while !s.is_char_boundary(from) {
            from += 1;
        }
        s[from..].to_owned()
    }
}

/// Kills the process group when dropped, unless the command finished: a run abandoned half
/// way (the agent shutting down) leaves nothing running.
struct GroupGuard {
    pgid: Option<i32>,
}

impl GroupGuard {
    fn kill(&self, signal: i32) {
        if let Some(pgid) = self.pgid {
            // SAFETY: kill(2) with a negative pid signals that process group; it touches no
            // memory of ours. ESRCH (the group is gone) is fine.
            unsafe {
                libc::kill(-pgid, signal);
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill(libc::SIGKILL);
    }
}

/// A pipe whose write end becomes both stdout and stderr of the command, so that their
/// lines interleave as they were written.
fn output_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass; each is owned once below.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Runs `cmd` to its end or its timeout. An error means it could not be started.
pub(crate) async fn run(cmd: &HookCommand, timeout: Duration) -> std::io::Result<Ran> {
    let started = Instant::now();
    let (program, args) = cmd
        .argv
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"))?;
    let (read_end, write_end) = output_pipe()?;
    let mut child = {
        // The command (which holds the pipe's write end) is dropped as soon as the child
        // exists, so that the output ends when the child's group has let go of it.
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .stdin(if cmd.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::from(write_end.try_clone()?))
            .stderr(Stdio::from(write_end))
            .process_group(0)
            .kill_on_drop(false);
        command.spawn()?
    };
    let mut guard = GroupGuard {
        pgid: child.id().and_then(|p| i32::try_from(p).ok()),
    };
    if let (Some(mut stdin), Some(text)) = (child.stdin.take(), cmd.stdin.clone()) {
        // A command that does not read its input must not hold up the run.
        tokio::spawn(async move {
            let _ = stdin.write_all(text.as_bytes()).await;
        });
    }
    let tail = Arc::new(Mutex::new(Tail::default()));
    let mut reader = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end)?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    {
        let tail = tail.clone();
        // Reads until every holder of the write end is gone, even past the run, so that a
        // process left behind never dies of SIGPIPE for writing to a closed pipe.
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(&buf[..n]);
            }
            let _ = done_tx.send(());
        });
    }
    let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => (status?, false),
        Err(_) => {
            guard.kill(libc::SIGTERM);
            let status = match tokio::time::timeout(KILL_GRACE, child.wait()).await {
                Ok(status) => status?,
                Err(_) => {
                    guard.kill(libc::SIGKILL);
                    child.wait().await?
                }
            };
            // Whatever of the group outlived its leader goes too.
            guard.kill(libc::SIGKILL);
            (status, true)
        }
    };
    let _ = tokio::time::timeout(OUTPUT_DRAIN, done_rx).await;
    // Finished: what the command left running (a daemon it started) is its business.
    guard.pgid = None;
    let output = tail.lock().unwrap_or_else(|p| p.into_inner()).text();
    Ok(Ran {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out,
        output,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sh(script: &str) -> HookCommand {
        HookCommand {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            stdin: None,
        }
    }

    const LONG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn output_and_exit_status() {
        let r = run(&sh("echo out; echo err >&2; exit 3"), LONG)
            .await
            .unwrap();
        assert_eq!(r.exit_code, Some(3));
        assert_eq!(r.signal, None);
        assert!(!r.timed_out);
        assert_eq!(r.output, "out\nerr\n");
        let r = run(&sh("kill -USR1 $$"), LONG).await.unwrap();
        assert_eq!((r.exit_code, r.signal), (None, Some(libc::SIGUSR1)));
    }

    #[tokio::test]
    async fn stdin_is_written_and_closed() {
        let mut c = HookCommand {
            argv: vec!["cat".into()],
            stdin: Some("use east\nrouter * offline\n".into()),
        };
        let r = run(&c, LONG).await.unwrap();
        assert_eq!(r.exit_code, Some(0), "{r:?}");
        assert_eq!(r.output, "use east\nrouter * offline\n");
        // Without stdin the command reads an empty input, never the agent's.
        c.stdin = None;
        let r = run(&c, LONG).await.unwrap();
        assert_eq!((r.exit_code, r.output.as_str()), (Some(0), ""));
    }

    #[tokio::test]
    async fn only_the_end_of_long_output_is_kept() {
        let r = run(
            &sh("echo first; head -c 300000 /dev/zero | tr '\\0' x; echo; echo last"),
            LONG,
        )
        .await
        .unwrap();
        assert_eq!(r.output.len(), MAX_OUTPUT);
        assert!(r.output.ends_with("x\nlast\n"));
        assert!(!r.output.contains("first"));
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("pid");
        // A child of the command, in its group, that would outlive it.
        let script = format!(
            "sleep 300 & echo $! > {}; echo started; wait",
            pidfile.display()
        );
        let r = run(&sh(&script), Duration::from_millis(500)).await.unwrap();
        assert!(r.timed_out, "{r:?}");
        assert_eq!(r.exit_code, None, "killed, not exited");
        assert_eq!(r.output, "started\n");
        assert!(r.seconds < 10.0, "{}", r.seconds);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The sleep was killed (a zombie until reaped by init, so look at its state).
        let gone = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
        };
        for _ in 0..50 {
            if gone() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            gone(),
            "the group's other process {pid} survived the timeout"
        );
    }

    #[tokio::test]
    async fn a_daemon_left_behind_does_not_hold_up_the_run() {
        let started = Instant::now();
        let r = run(&sh("sleep 5 & echo spawned"), LONG).await.unwrap();
        assert_eq!((r.exit_code, r.timed_out), (Some(0), false), "{r:?}");
        assert_eq!(r.output, "spawned\n");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error() {
        let c = HookCommand {
            argv: vec!["/nonexistent/program".into()],
            stdin: None,
        };
        let e = run(&c, LONG).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
