//! End-to-end runbooks: `mover reseed-site` and `mover provision` against six real agents on
//! loopback (two sites), whose `custom` hooks record every action in each host's
//! `actions.log`. Each test checks what the hosts were asked to do, in which order, and that
//! every rebuilt host holds west1's data.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::{assert_same_tree, mover, run};

const HOSTS: [&str; 6] = ["west1", "west2", "west3", "east1", "east2", "east3"];

/// What each host's hooks are asked, in order, by `reseed-site --from west --site east`.
/// Site actions run on the site's primary (east1).
const EAST1: [&str; 10] = [
    "policy_maintenance east",
    "routers_offline east",
    "replicator_offline east",
    "replicator_reset east",
    "database_stop east1",
    "database_start east1",
    "mark_primary east",
    "replicator_online east",
    "routers_online east",
    "policy_automatic east",
];
const EAST_REPLICA: [&str; 5] = [
    "replicator_offline east",
    "replicator_reset east",
    "database_stop {host}",
    "database_start {host}",
    "replicator_online east",
];
const WEST: [&str; 3] = [
    "replicator_offline west_from_east",
    "replicator_reset west_from_east",
    "replicator_online west_from_east",
];

/// The demo's two-site cluster (`mover demo --setup-only`) with its agents running.
struct TwoSites {
    dir: tempfile::TempDir,
    agents: Vec<(String, Child)>,
}

impl TwoSites {
    fn setup(size: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mover-runbook-")
            .tempdir()
            .unwrap();
        let out = run(&[
            "demo",
            "--setup-only",
            "--dir",
            dir.path().to_str().unwrap(),
            "--size",
            size,
            "--small-files",
            "300",
        ]);
        assert!(
            out.status.success(),
            "demo --setup-only: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TwoSites {
            dir,
            agents: Vec::new(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn cluster(&self) -> String {
        self.path().join("cluster.toml").display().to_string()
    }

    fn state(&self) -> String {
        self.path().join("controller").display().to_string()
    }

    fn data(&self, node: &str) -> PathBuf {
        self.path().join(node).join("mysql")
    }

    fn start_agents(&mut self) {
        for node in HOSTS {
            self.start_agent(node);
        }
    }

    fn start_agent(&mut self, node: &str) {
        let log_path = self.path().join(format!("{node}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = mover()
            .args(["agent", "--config"])
            .arg(self.path().join(format!("{node}.toml")))
            .current_dir(self.path().join(node))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.retain(|(n, _)| n != node);
        self.agents.push((node.to_owned(), child));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("agent listening")
        {
            if Instant::now() >= deadline {
                let exited = self
                    .agents
                    .last_mut()
                    .and_then(|(_, c)| c.try_wait().ok().flatten());
                panic!(
                    "agent {node} did not start within 20 s (exited: {exited:?}); its log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_agent(&mut self, node: &str) {
        if let Some(i) = self.agents.iter().position(|(n, _)| n == node) {
            let (_, mut c) = self.agents.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The actions a host's hooks recorded, one per line.
    fn actions(&self, node: &str) -> Vec<String> {
        std::fs::read_to_string(self.path().join(node).join("actions.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// `mover` with the cluster's state directory.
    fn mover(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        let state = self.state();
        all.extend(["--state-dir", &state]);
        run(&all)
    }

    fn reseed(&self, extra: &[&str]) -> Output {
        let cluster = self.cluster();
        let mut args = vec![
            "reseed-site",
            "--cluster",
            &cluster,
            "--from",
            "west",
            "--site",
            "east",
        ];
        args.extend(extra);
        self.mover(&args)
    }

    fn spawn_reseed(&self) -> Child {
        mover()
            .args(["reseed-site", "--cluster", &self.cluster()])
            .args(["--from", "west", "--site", "east", "--json"])
            .args(["--state-dir", &self.state()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Replaces the command of `action` in `node`'s agent config.
    fn set_hook(&self, node: &str, action: &str, argv: &[&str]) {
        let path = self.path().join(format!("{node}.toml"));
        let text = std::fs::read_to_string(&path).unwrap();
        let start = text
            .find(&format!("\n{action} = "))
            .unwrap_or_else(|| panic!("no {action} in {}", path.display()));
        let end = start + 1 + text[start + 1..].find('\n').unwrap();
        let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
        let line = format!("\n{action} = [{}]", argv.join(", "));
        std::fs::write(&path, format!("{}{line}{}", &text[..start], &text[end..])).unwrap();
    }

    /// Writes an executable script into the cluster's bin directory.
    fn script(&self, name: &str, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path().join("bin").join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.display().to_string()
    }

    /// Makes east1's `routers_offline` (step 2 of a reseed) take a few seconds.
    fn slow_second_step(&self) {
        let record = self.record();
        let slow = self.script("slow", &format!("sleep 4\nexec {record} \"$@\""));
        self.set_hook(
            "east1",
            "routers_offline",
            &[&slow, "routers_offline", "{site}"],
        );
    }

    /// Waits until a runbook has run its first step (and so holds its sites).
    fn wait_until_started(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self
            .actions("east1")
            .iter()
            .any(|a| a == "policy_maintenance east")
        {
            assert!(Instant::now() < deadline, "the runbook did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn record(&self) -> String {
        self.path().join("bin/record").display().to_string()
    }

    /// Every east host holds west1's data; every host's actions are the documented ones.
    fn assert_rebuilt(&self) {
        for node in ["east1", "east2", "east3"] {
            assert_same_tree(&self.data("west1"), &self.data(node));
        }
        assert_eq!(self.actions("east1"), EAST1);
        for node in ["east2", "east3"] {
            let expected: Vec<String> = EAST_REPLICA
                .iter()
                .map(|a| a.replace("{host}", node))
                .collect();
            assert_eq!(self.actions(node), expected, "{node}");
        }
        for node in ["west1", "west2", "west3"] {
            assert_eq!(self.actions(node), WEST, "{node}");
        }
    }
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        for (_, c) in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The runbook id a human report names.
fn runbook_id(text: &str) -> String {
    text.split_whitespace()
        .find(|w| w.starts_with("reseed-east-"))
        .unwrap_or_else(|| panic!("no runbook id in {text}"))
        .trim_end_matches(':')
        .to_owned()
}

/// JSON events from `--json` output.
fn events(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn reseed_site_rebuilds_every_east_host_and_runs_each_action_once_in_order() {
    let mut c = TwoSites::setup("48M");
    c.start_agents();
    let out = c.reseed(&[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    c.assert_rebuilt();
    // The report names the runbook, ends done, and shows the transfer summary.
    assert!(text.contains("starting runbook reseed-east-"), "{text}");
    assert!(text.contains("committed"), "{text}");
    let id = runbook_id(&text);
    assert!(text.contains(&format!("runbook {id} done")), "{text}");
    // The journal has it, done, every step with where it ran.
    let list = c.mover(&["runbook", "list"]);
    assert!(stdout(&list).contains(&id), "{}", stdout(&list));
    let show = c.mover(&["runbook", "show", &id, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(v["status"], "done");
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), v["plan"].as_array().unwrap().len());
    assert!(steps.iter().all(|s| s["status"] == "done"), "{v}");
    assert_eq!(steps[0]["host"], "east1");
    assert_eq!(steps[0]["detail"]["exit_code"], 0);
    // The transfer's summary is journalled: east1 and east2 kept their drifted copies but
    // the chunks that differ, east3 (empty) received everything.
    let transfer = steps
        .iter()
        .find(|s| s["detail"]["kind"] == "transfer")
        .unwrap();
    let targets = transfer["detail"]["summary"]["targets"].as_array().unwrap();
    for t in targets {
        let (held, bytes) = (
            t["held_bytes"].as_u64().unwrap(),
            t["bytes"].as_u64().unwrap(),
        );
        if t["node"] == "east3" {
            assert_eq!(held, 0, "{t}");
        } else {
            assert!(held > 0 && held < bytes, "{t}");
        }
    }
    // Done: the sites are free for the next runbook.
    let out = c.reseed(&["--dry-run"]);
    assert!(out.status.success());
}

#[test]
fn a_controller_killed_during_the_transfer_resumes_without_repeating_steps() {
    let mut c = TwoSites::setup("384M");
    c.start_agents();
    let mut child = c.spawn_reseed();
    let reader = BufReader::new(child.stdout.take().unwrap());
    let mut id = String::new();
    let mut transfer_step = 0;
    for l in reader.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&l.unwrap()) else {
            continue;
        };
        if v["event"] == "started" {
            id = v["runbook"].as_str().unwrap().to_owned();
        }
        if v["event"] == "step_started" && v["what"].as_str().unwrap().starts_with("transfer") {
            transfer_step = v["step"].as_u64().unwrap();
            break;
        }
    }
    assert!(transfer_step > 0, "the transfer never started");
    // Let some data flow, then kill the controller outright.
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    let before: Vec<Vec<String>> = HOSTS.iter().map(|h| c.actions(h)).collect();
    // Nothing after the transfer ran; everything before it did.
    assert_eq!(c.actions("east1"), EAST1[..5]);
    assert_eq!(c.actions("west1"), WEST[..2]);

    let list = c.mover(&["runbook", "list"]);
    let line = stdout(&list)
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_default()
        .to_owned();
    assert!(line.contains("interrupted"), "{}", stdout(&list));
    // Another runbook may not touch east meanwhile.
    let cluster = c.cluster();
    let other = c.mover(&[
        "provision",
        "--cluster",
        &cluster,
        "-s",
        "west1",
        "-m",
        "files",
        "east2",
    ]);
    assert_eq!(other.status.code(), Some(1));
    assert!(
        stderr(&other).contains(&format!("site east is locked by runbook {id}")),
        "{}",
        stderr(&other)
    );

    let out = c.mover(&["runbook", "resume", &id, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let ev = events(&stdout(&out));
    let skipped: Vec<u64> = ev
        .iter()
        .filter(|e| e["event"] == "skipped")
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, (1..transfer_step).collect::<Vec<_>>());
    // The transfer ran again (resuming what had arrived) and the rest once each.
    assert!(ev
        .iter()
        .any(|e| e["event"] == "step_done" && e["step"] == transfer_step));
    for (h, earlier) in HOSTS.iter().zip(before) {
        assert!(c.actions(h).starts_with(&earlier), "{h}");
    }
    c.assert_rebuilt();
}

#[test]
fn a_failing_hook_stops_the_runbook_with_its_output_and_resume_finishes_it() {
    let mut c = TwoSites::setup("16M");
    let fail = c.script(
        "reset-fails",
        "echo \"trepctl: replicator $1 is still ONLINE: take it offline first\" >&2\nexit 3",
    );
    c.set_hook("east2", "replicator_reset", &[&fail, "{service}"]);
    c.start_agents();
    let out = c.reseed(&[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(4), "{text}\n{}", stderr(&out));
    assert!(text.contains(" on east2: "), "{text}");
    assert!(text.contains(&format!("command: {fail} east")), "{text}");
    assert!(text.contains("status:  exit status 3"), "{text}");
    assert!(
        text.contains("| trepctl: replicator east is still ONLINE: take it offline first"),
        "{text}"
    );
    assert!(text.contains("mover runbook resume reseed-east-"), "{text}");
    // Nothing that depends on the failed step ran: no data moved, nothing came back online.
    assert!(!c.data("east3").exists());
    for h in HOSTS {
        assert!(
            !c.actions(h).iter().any(|a| a.contains("online")),
            "{h}: {:?}",
            c.actions(h)
        );
    }
    let id = runbook_id(&text);
    let show = stdout(&c.mover(&["runbook", "show", &id]));
    assert!(show.contains("status failed"), "{show}");
    assert!(
        show.contains("| trepctl: replicator east is still ONLINE"),
        "{show}"
    );

    // The operator fixes the hook and resumes: the failed step runs again, then the rest.
    let record = c.record();
    c.set_hook(
        "east2",
        "replicator_reset",
        &[&record, "replicator_reset", "{service}"],
    );
    c.stop_agent("east2");
    c.start_agent("east2");
    let out = c.mover(&["runbook", "resume", &id]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("(attempt 2)"), "{}", stdout(&out));
    c.assert_rebuilt();
}

#[test]
fn a_second_runbook_on_a_site_is_refused_while_one_runs() {
    let mut c = TwoSites::setup("16M");
    // Hold the first runbook in its second step for a while.
    c.slow_second_step();
    c.start_agents();
    let first = c.spawn_reseed();
    c.wait_until_started();
    let out = c.reseed(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("site east is locked by runbook reseed-east-"),
        "{err}"
    );
    assert!(err.contains("running"), "{err}");
    // Rebuilding west from east touches the same sites: refused too.
    let cluster = c.cluster();
    let out = c.mover(&[
        "reseed-site",
        "--cluster",
        &cluster,
        "--from",
        "east",
        "--site",
        "west",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is locked by runbook"));
    // The first one was not disturbed.
    let done = first.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(0), "{}", stderr(&done));
    c.assert_rebuilt();
}

#[test]
fn dry_runs_print_the_plan_and_touch_nothing() {
    let c = TwoSites::setup("1M");
    let out = c.reseed(&["--dry-run"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.starts_with("reseed-site east from west (source west1): 31 steps"),
        "{text}"
    );
    assert!(text.contains("transfer mysql (files) west1 -> east1 -> east2 -> east3"));
    let record = c.record();
    assert!(
        text.contains(&format!("$ {record} replicator_reset west_from_east")),
        "{text}"
    );
    let cluster = c.cluster();
    let out = c.mover(&[
        "provision",
        "--cluster",
        &cluster,
        "-s",
        "west2",
        "-m",
        "files",
        "-c",
        "-t",
        "2",
        "--dry-run",
        "east1",
        "east3",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("transfer mysql (files) west2 -> east1 -> east3"),
        "{text}"
    );
    assert!(text.contains("mark primary for east"), "{text}");
    // No journal, no action: a dry run only plans.
    assert!(!c.path().join("controller").exists());
    for h in HOSTS {
        assert!(c.actions(h).is_empty());
    }
    // Planning errors name what is wrong.
    let out = c.mover(&[
        "reseed-site",
        "--cluster",
        &cluster,
        "--from",
        "west",
        "--site",
        "north",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("north is not a site of the inventory (sites: west, east)"),
        "{}",
        stderr(&out)
    );
    // tprovision's flags are explained.
    let help = stdout(&run(&["provision", "--help"]));
    assert!(help.contains("How tprovision's flags map"), "{help}");
    assert!(help.contains("--create-master"));
}

#[test]
fn rollback_undoes_what_a_failed_runbook_left_changed() {
    let mut c = TwoSites::setup("4M");
    let fail = c.script("reset-fails", "echo 'cannot reset' >&2\nexit 1");
    c.set_hook("east2", "replicator_reset", &[&fail, "{service}"]);
    c.start_agents();
    let out = c.reseed(&[]);
    assert_eq!(out.status.code(), Some(4), "{}", stdout(&out));
    let text = stdout(&out);
    let id = runbook_id(&text);
    assert!(
        text.contains(&format!("undo:    mover runbook rollback {id}")),
        "{text}"
    );
    let dry = stdout(&c.mover(&["runbook", "rollback", &id, "--dry-run"]));
    assert!(dry.contains("routers online"), "{dry}");
    assert!(
        dry.contains("not undone: step 4 (replicator west_from_east reset on west1)"),
        "{dry}"
    );
    let out = c.mover(&["runbook", "rollback", &id]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // Everything taken offline is back; the site policy is automatic again, last.
    let east1 = c.actions("east1");
    assert_eq!(
        east1[east1.len() - 2..],
        ["routers_online east", "policy_automatic east"]
    );
    assert_eq!(c.actions("east2").last().unwrap(), "replicator_online east");
    for w in ["west1", "west2", "west3"] {
        assert_eq!(
            c.actions(w).last().unwrap(),
            "replicator_online west_from_east",
            "{w}"
        );
    }
    // The rolled-back runbook is abandoned and its sites are free.
    let show = stdout(&c.mover(&["runbook", "show", &id]));
    assert!(show.contains("status abandoned"), "{show}");
    let out = c.reseed(&["--dry-run"]);
    assert!(out.status.success());
}

#[test]
fn ctrl_c_interrupts_a_runbook_which_resume_then_finishes() {
    let mut c = TwoSites::setup("4M");
    c.slow_second_step();
    c.start_agents();
    let child = c.spawn_reseed();
    c.wait_until_started();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on a child we started and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let ev = events(&stdout(&out));
    assert!(
        ev.iter()
            .any(|e| e["event"] == "stopping" && e["in_flight"] == serde_json::json!([2])),
        "{ev:?}"
    );
    let id = ev[0]["runbook"].as_str().unwrap().to_owned();
    // Step 2 was cut off at the controller, but its hook finished on east1 and was recorded:
    // resume gets that result back instead of running it again.
    std::thread::sleep(Duration::from_secs(4));
    let out = c.mover(&["runbook", "resume", &id, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let ev = events(&stdout(&out));
    let step2 = ev
        .iter()
        .find(|e| e["event"] == "step_done" && e["step"] == 2)
        .unwrap();
    assert_eq!(step2["detail"]["replayed"], true, "{step2}");
    c.assert_rebuilt();
}

/// Every regular file under `src` is in `dst` with the same contents.
fn assert_contents_within(src: &Path, dst: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let (s, d) = (e.path(), dst.join(e.file_name()));
        let t = e.file_type().unwrap();
        if t.is_dir() {
            n += assert_contents_within(&s, &d);
        } else if t.is_file() {
            assert_eq!(
                mover::compare::b3sum(&s).unwrap(),
                mover::compare::b3sum(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())),
                "{}",
                d.display()
            );
            n += 1;
        }
    }
    n
}

#[test]
fn provision_with_a_backup_method_backs_up_prepares_before_commit_and_restarts() {
    let mut c = TwoSites::setup("24M");
    let record = c.record();
    let backup = c.script(
        "fake-backup",
        &format!(
            "cp -a \"$1/.\" \"$2/\"\necho \"backup of $1\" > \"$2/xtrabackup_checkpoints\"\nexec {record} backup \"$1\""
        ),
    );
    let prepare = c.script(
        "fake-prepare",
        &format!("echo prepared > \"$1/prepared.marker\"\nexec {record} prepare"),
    );
    // The backup hook is the source's; prepare, each target's.
    let path = c.path().join("west1.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "backup = [{backup:?}, \"{{datadir}}\", \"{{staging}}\"]\n"
    ));
    std::fs::write(&path, text).unwrap();
    for node in ["east2", "east3"] {
        c.set_hook(node, "prepare", &[&prepare, "{staging}"]);
    }
    c.start_agents();
    let cluster = c.cluster();
    let out = c.mover(&[
        "provision",
        "--cluster",
        &cluster,
        "-s",
        "west1",
        "-m",
        "xtrabackup",
        "-c",
        "east2",
        "east3",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("transfer mysql (xtrabackup) west1 -> east2 -> east3"),
        "{text}"
    );
    for node in ["east2", "east3"] {
        let n = assert_contents_within(&c.data("west1"), &c.data(node));
        assert!(n > 300, "{n} files");
        assert_eq!(
            std::fs::read_to_string(c.data(node).join("prepared.marker")).unwrap(),
            "prepared\n"
        );
        assert!(c.data(node).join("xtrabackup_checkpoints").exists());
    }
    // The source ran the backup and is unchanged; no backup directory is left behind.
    assert!(!c.data("west1").join("xtrabackup_checkpoints").exists());
    assert_eq!(
        c.actions("west1"),
        [format!("backup {}", c.data("west1").display())]
    );
    assert_eq!(
        c.actions("east2"),
        [
            "replicator_offline east",
            "database_stop east2",
            "prepare",
            "database_start east2",
            "replicator_reset east",
            "mark_primary east",
            "replicator_online east",
        ]
    );
    assert_eq!(
        c.actions("east3"),
        [
            "replicator_offline east",
            "database_stop east3",
            "prepare",
            "database_start east3",
            "replicator_reset east",
            "replicator_online east",
        ]
    );
    // Provision held only east: west is free for another runbook meanwhile, and east is free
    // again now.
    assert!(c.reseed(&["--dry-run"]).status.success());
}
