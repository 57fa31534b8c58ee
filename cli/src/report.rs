//! What people (and machines) see: live progress on a terminal, the summary table, JSON.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use mover::config::ClusterConfig;
use mover::controller::{self, Event, SendRequest, Summary};

use crate::exit;

/// Prints a line to stdout; a closed stdout (`| head`) ends the program quietly.
pub fn line(s: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{s}").is_err() {
        std::process::exit(i32::from(exit::OK));
    }
}

/// Runs the transfer, drawing one progress bar per target when stderr is a terminal.
pub async fn send_with_progress(
    cluster: &ClusterConfig,
    req: &SendRequest,
    quiet: bool,
) -> Result<Summary, controller::ControlError> {
    let draw = !quiet && std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if draw {
        ProgressDrawTarget::stderr_with_hz(4)
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template(
        "{prefix:>10} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta:>4} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let bars: HashMap<String, ProgressBar> = req
        .targets
        .iter()
        .map(|t| {
            let b = multi.add(ProgressBar::new(0));
            b.set_style(style.clone());
            b.set_prefix(t.node.clone());
            b.set_message("scanning source");
            b.enable_steady_tick(Duration::from_millis(250));
            (t.node.clone(), b)
        })
        .collect();
    let result = controller::send(cluster, req, |ev| match ev {
        Event::Scanned { total_bytes, .. } => {
            for b in bars.values() {
                b.set_length(*total_bytes);
                b.set_message("");
            }
        }
        Event::Progress { node, bytes, .. } => {
            if let Some(b) = bars.get(node) {
                b.set_position(*bytes);
            }
        }
        Event::Finished { node, committed } => {
            if let Some(b) = bars.get(node) {
                if *committed {
                    b.set_position(b.length().unwrap_or(0));
                    b.finish_with_message("committed");
                } else {
                    b.abandon_with_message("FAILED");
                }
            }
        }
        Event::Sent { .. } => {}
    })
    .await;
    for b in bars.values() {
        if !b.is_finished() {
            b.abandon();
        }
    }
    let _ = multi.clear();
    result
}

/// `1.0 GiB`, `512.0 MiB`, `42 B`: one formatting for every report.
pub use mover::bench::human_bytes;

pub fn print_summary(s: &Summary, json: bool) {
    if json {
        let mut v = serde_json::to_value(s).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("exit_code".into(), exit_code(s).into());
        }
        line(&serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    let src = &s.source;
    let ratio = if src.wire_bytes > 0 {
        src.total_bytes as f64 / src.wire_bytes as f64
    } else {
        1.0
    };
    line(&format!(
        "transfer {} ({} topology): {}:{} {} in {} entries, {} on the wire per first hop ({ratio:.2}x), {:.1} s",
        s.transfer_id,
        s.topology,
        src.node,
        src.dataset,
        human_bytes(src.total_bytes),
        src.entries,
        human_bytes(src.wire_bytes),
        s.seconds
    ));
    if src.skipped_bytes > 0 || src.resent_chunks > 0 {
        line(&format!(
            "not sent (every target already held it): {}; chunks resent in repair rounds: {}",
            human_bytes(src.skipped_bytes),
            src.resent_chunks
        ));
    }
    line(&format!(
        "{:<12} {:<12} {:<10} {:>11} {:>11} {:>8} {:>7} {:>8} {:>9}  {}",
        "TARGET",
        "DATASET",
        "RESULT",
        "BYTES",
        "HELD",
        "FILES",
        "REPAIRS",
        "SECONDS",
        "MB/S",
        "DIGEST"
    ));
    for t in &s.targets {
        line(&format!(
            "{:<12} {:<12} {:<10} {:>11} {:>11} {:>8} {:>7} {:>8.1} {:>9.1}  {}",
            t.node,
            t.dataset,
            t.result,
            human_bytes(t.bytes),
            human_bytes(t.held_bytes),
            t.files,
            t.repaired,
            t.seconds,
            t.mb_per_s,
            t.digest.as_deref().map_or("-", |d| &d[..16.min(d.len())])
        ));
    }
    for t in s.targets.iter().filter(|t| t.result != "committed") {
        line(&format!(
            "FAILED {}: {}{}",
            t.node,
            t.reason.as_deref().unwrap_or("unknown"),
            if t.retryable {
                " (may succeed if run again)"
            } else {
                ""
            }
        ));
    }
    let code = exit_code(s);
    if code != exit::OK {
        line(&format!(
            "{} of {} targets committed",
            s.committed(),
            s.targets.len()
        ));
    }
}

pub fn exit_code(s: &Summary) -> u8 {
    match s.committed() {
        n if n == s.targets.len() => exit::OK,
        0 => exit::FAILED,
        _ => exit::PARTIAL,
    }
}
