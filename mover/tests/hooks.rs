//! The controller asks a real agent to run hook actions: the agent renders the command from its
//! own config, runs it only if that allows it, runs each (runbook, step) once, and refuses
//! hostile values and peers other than the controller.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use mover::config::{AgentConfig, ClusterConfig, NodeEntry};
use mover::hookrun::{call_hook, HookCall, HookCallError};
use mover::orchestrate::hooks::BackupTool;
use mover::orchestrate::HookAction;
use mover_protocol::{Hook, HookReply, Message, Outcome};

/// Appends its arguments and standard input as one line to `log` beside it, then says so.
const REC: &str = r#"#!/bin/sh
input=$(cat)
printf '%s|%s\n' "$*" "$input" >> "$(dirname "$0")/log"
echo "did $1"
echo "to stderr" >&2
"#;

/// As REC, after a second.
const SLOW: &str = r#"#!/bin/sh
sleep 1
printf '%s|\n' "$*" >> "$(dirname "$0")/log"
echo slow done
"#;

/// Starts a child in its group that would outlive it, notes its pid, and waits forever.
const HANG: &str = r#"#!/bin/sh
sleep 300 &
echo $! > "$(dirname "$0")/hang.pid"
echo hanging
wait
"#;

fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A custom profile: most actions record themselves, `replicator_online` is slow,
/// `database_start` hangs, `mark_primary` names a program that does not exist.
fn hooks_table(dir: &Path, extra: &str) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let rec = script(&bin, "rec", REC);
    let slow = script(&bin, "slow", SLOW);
    let hang = script(&bin, "hang", HANG);
    let (rec, slow, hang) = (rec.display(), slow.display(), hang.display());
    format!(
        r#"[hooks]
profile = "custom"
{extra}
[hooks.commands]
policy_maintenance = ["{rec}", "policy_maintenance", "{{site}}", "{{service}}"]
policy_automatic = ["{rec}", "policy_automatic", "{{site}}"]
routers_offline = ["{rec}", "routers_offline", "{{site}}"]
routers_online = ["{rec}", "routers_online", "{{site}}"]
replicator_offline = ["{rec}", "replicator_offline", "{{service}}"]
replicator_reset = ["{rec}", "replicator_reset", "{{service}}", "{{host}}", "{{site}}"]
replicator_online = ["{slow}", "replicator_online", "{{service}}"]
database_stop = ["{rec}", "database_stop", "--datadir={{datadir}}"]
database_start = ["{hang}"]
prepare = {{ argv = ["{rec}", "prepare"], stdin = "target-dir={{staging}}" }}
mark_primary = ["/nonexistent/mover-test-program", "{{host}}"]
"#
    )
}

/// Loads `table` as the `[hooks]` of an agent config, as `mover agent` would.
fn load_hooks(dir: &Path, table: &str) -> mover::config::AgentHooks {
    let p = dir.join("hooks-agent.toml");
    std::fs::write(
        &p,
        format!(
            "node = \"east1\"\nlisten = \"127.0.0.1:1\"\nstate_dir = \"s\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n{table}"
        ),
    )
    .unwrap();
    AgentConfig::load(&p).unwrap().hooks.unwrap()
}

/// east1 with the custom profile and `extra` keys in its `[hooks]` table.
async fn agent_with(extra: &'static str) -> Agent {
    start_east1_with(move |dir, cfg| {
        cfg.hooks = Some(load_hooks(dir, &hooks_table(dir, extra)));
    })
    .await
}

fn cluster(agent: &Agent) -> ClusterConfig {
    ClusterConfig {
        tls: tls(agent.path(), "controller"),
        nodes: BTreeMap::from([(
            "east1".to_owned(),
            NodeEntry {
                address: agent.addr.to_string(),
            },
        )]),
    }
}

fn call(step: u32, action: HookAction) -> HookCall {
    HookCall {
        runbook: "reseed-east-1".into(),
        step,
        action,
        service: Some("east_from_west".into()),
        site: "east".into(),
        dataset: None,
    }
}

/// The lines the recording scripts wrote (none if they never ran).
fn log(agent: &Agent) -> Vec<String> {
    std::fs::read_to_string(agent.path().join("bin/log"))
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn refusal(e: HookCallError) -> String {
    match e {
        HookCallError::Refused { node, reason } => {
            assert_eq!(node, "east1");
            reason
        }
        other => panic!("not a refusal: {other}"),
    }
}

#[tokio::test]
async fn a_custom_command_runs_with_its_argv_and_stdin_and_its_output_comes_back() {
    let agent = agent_with("").await;
    let c = cluster(&agent);
    let r = call_hook(&c, "east1", &call(1, HookAction::ReplicatorReset))
        .await
        .unwrap();
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(r.node, "east1");
    assert_eq!(r.exit_code, Some(0));
    assert!(!r.replayed && !r.timed_out);
    assert_eq!(r.output, "did replicator_reset\nto stderr\n");
    let rec = agent.path().join("bin/rec");
    assert_eq!(
        r.command,
        format!(
            "{} replicator_reset east_from_west east1 east",
            rec.display()
        )
    );
    assert_eq!(log(&agent), ["replicator_reset east_from_west east1 east|"]);

    // {datadir} and {staging} come from the agent's own config for the named dataset; the
    // prepare command gets its stdin.
    let mut prepare = call(2, HookAction::Prepare(BackupTool::Xtrabackup));
    prepare.dataset = Some("data".into());
    let r = call_hook(&c, "east1", &prepare).await.unwrap();
    assert!(r.succeeded(), "{r:?}");
    let staging =
        mover::staging::Staging::locate(&agent.path().join("east1/state"), &agent.data(), "data")
            .unwrap();
    let mut stop = call(3, HookAction::DatabaseStop);
    stop.dataset = Some("data".into());
    call_hook(&c, "east1", &stop).await.unwrap();
    assert_eq!(
        log(&agent)[1..],
        [
            format!("prepare|target-dir={}", staging.display()),
            format!("database_stop --datadir={}|", agent.data().display()),
        ]
    );
    agent.stop().await;
}

#[tokio::test]
async fn an_action_the_agent_does_not_allow_is_refused_and_nothing_runs() {
    let agent = agent_with("allow = [\"replicator_reset\", \"prepare\"]").await;
    let c = cluster(&agent);
    let mut stop = call(1, HookAction::DatabaseStop);
    stop.dataset = Some("data".into());
    let reason = refusal(call_hook(&c, "east1", &stop).await.unwrap_err());
    assert!(
        reason.contains("does not allow database_stop") && reason.contains("allow"),
        "{reason}"
    );
    assert!(
        log(&agent).is_empty(),
        "a refused action ran: {:?}",
        log(&agent)
    );
    // What it allows runs.
    let r = call_hook(&c, "east1", &call(2, HookAction::ReplicatorReset))
        .await
        .unwrap();
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(log(&agent).len(), 1);
    agent.stop().await;
}

#[tokio::test]
async fn an_agent_without_hooks_refuses_every_hook() {
    let agent = start_east1().await;
    let c = cluster(&agent);
    let e = call_hook(&c, "east1", &call(1, HookAction::RoutersOffline))
        .await
        .unwrap_err();
    assert!(!e.retryable());
    let reason = refusal(e);
    assert!(
        reason.contains("[hooks]") && reason.contains("agent config"),
        "{reason}"
    );
    assert!(!agent.path().join("east1/state/hooks").exists());
    agent.stop().await;
}

fn hook_frame(runbook: &str, action: &str, service: Option<&str>) -> bytes::Bytes {
    Message::Hook(Hook {
        runbook: runbook.into(),
        step: 1,
        action: action.into(),
        tool: None,
        service: service.map(str::to_owned),
        site: "east".into(),
        dataset: None,
    })
    .to_frame()
}

/// Sends one frame on a new control stream as `node` and returns the answer.
async fn ask_as(agent: &Agent, node: &str, frame: bytes::Bytes) -> Message {
    let (_ep, conn) = connect_as(agent, node).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame).await.unwrap();
    send.finish().unwrap();
    tokio::time::timeout(Duration::from_secs(20), next_message(&mut recv))
        .await
        .expect("an answer in time")
        .expect("an answer")
}

#[tokio::test]
async fn a_node_certificate_cannot_run_a_hook() {
    let agent = agent_with("").await;
    for node in ["west1", "east2"] {
        let m = ask_as(
            &agent,
            node,
            hook_frame("rb", "replicator_reset", Some("east")),
        )
        .await;
        match m {
            Message::Report {
                outcome: Outcome::Failed { reason, .. },
                ..
            } => assert!(reason.contains("may not send hook"), "{reason}"),
            other => panic!("{node}: {other:?}"),
        }
    }
    assert!(log(&agent).is_empty(), "a node's hook ran");
    // The controller's certificate, with the same request, is obeyed.
    match ask_as(
        &agent,
        "controller",
        hook_frame("rb", "replicator_reset", Some("east")),
    )
    .await
    {
        Message::HookDone {
            node,
            reply: HookReply::Ran(r),
        } => {
            assert_eq!(node, "east1");
            assert_eq!(r.exit_code, Some(0));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(log(&agent).len(), 1);
    agent.stop().await;
}

#[tokio::test]
async fn a_command_past_its_timeout_is_killed_with_its_whole_group() {
    let agent = agent_with("timeout = 1").await;
    let started = std::time::Instant::now();
    let r = call_hook(
        &cluster(&agent),
        "east1",
        &call(1, HookAction::DatabaseStart),
    )
    .await
    .unwrap();
    assert!(r.timed_out && !r.succeeded(), "{r:?}");
    assert_eq!(r.exit_code, None);
    assert_eq!(r.output, "hanging\n");
    assert!(started.elapsed() < Duration::from_secs(15));
    let pid: i32 = std::fs::read_to_string(agent.path().join("bin/hang.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        dead(pid).await,
        "the hook's child {pid} outlived the timeout"
    );
    agent.stop().await;
}

/// Whether `pid` is gone (or a zombie) within a few seconds.
async fn dead(pid: i32) -> bool {
    for _ in 0..50 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
        if stat.map_or(true, |s| s.split_whitespace().nth(2) == Some("Z")) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn a_repeated_step_is_answered_from_the_record_and_runs_once() {
    let agent = agent_with("").await;
    let c = cluster(&agent);
    let reset = call(4, HookAction::ReplicatorReset);
    let first = call_hook(&c, "east1", &reset).await.unwrap();
    let again = call_hook(&c, "east1", &reset).await.unwrap();
    assert!(!first.replayed);
    assert!(again.replayed);
    assert_eq!(
        (
            again.command.as_str(),
            again.exit_code,
            again.output.as_str()
        ),
        (
            first.command.as_str(),
            first.exit_code,
            first.output.as_str()
        )
    );
    assert_eq!(log(&agent).len(), 1, "the step ran twice");
    // The record is on disk, in the state directory.
    let record = agent.path().join("east1/state/hooks/reseed-east-1.4.json");
    assert!(record.is_file());

    // Two calls at once for a slow step: one runs it, the other waits and gets its record.
    let online = call(5, HookAction::ReplicatorOnline);
    let (a, b) = tokio::join!(
        call_hook(&c, "east1", &online),
        call_hook(&c, "east1", &online)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.succeeded() && b.succeeded(), "{a:?} {b:?}");
    assert_eq!(
        [a.replayed, b.replayed].iter().filter(|r| **r).count(),
        1,
        "{a:?} {b:?}"
    );
    assert_eq!(a.output, "slow done\n");
    assert_eq!(b.output, a.output);
    let online_runs = log(&agent)
        .iter()
        .filter(|l| l.starts_with("replicator_online"))
        .count();
    assert_eq!(online_runs, 1, "the duplicate ran the step again");

    // The same step id for another action is a mistake, not a replay.
    let reason = refusal(
        call_hook(&c, "east1", &call(4, HookAction::ReplicatorOffline))
            .await
            .unwrap_err(),
    );
    assert!(
        reason.contains("already ran here as replicator_reset"),
        "{reason}"
    );
    assert_eq!(log(&agent).len(), 2);
    agent.stop().await;
}

#[tokio::test]
async fn a_step_whose_end_was_never_recorded_is_not_run_again() {
    let agent = agent_with("").await;
    // What a crash while the step ran leaves behind.
    let hooks = agent.path().join("east1/state/hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    let marker = hooks.join("reseed-east-1.7.started");
    std::fs::write(&marker, b"{}").unwrap();
    let c = cluster(&agent);
    let reset = call(7, HookAction::ReplicatorReset);
    let reason = refusal(call_hook(&c, "east1", &reset).await.unwrap_err());
    assert!(
        reason.contains("never recorded") && reason.contains(&marker.display().to_string()),
        "{reason}"
    );
    assert!(log(&agent).is_empty());
    // Once the operator removes the marker, it runs.
    std::fs::remove_file(&marker).unwrap();
    assert!(call_hook(&c, "east1", &reset).await.unwrap().succeeded());
    assert_eq!(log(&agent).len(), 1);
    agent.stop().await;
}

#[tokio::test]
async fn a_program_that_cannot_start_is_not_recorded_as_run() {
    let agent = agent_with("").await;
    let c = cluster(&agent);
    let primary = call(1, HookAction::MarkPrimary);
    for _ in 0..2 {
        match call_hook(&c, "east1", &primary).await.unwrap_err() {
            HookCallError::NotStarted {
                node,
                command,
                reason,
            } => {
                assert_eq!(node, "east1");
                assert_eq!(command, "/nonexistent/mover-test-program east1");
                assert!(reason.contains("no such program"), "{reason}");
            }
            other => panic!("{other}"),
        }
    }
    assert!(!agent
        .path()
        .join("east1/state/hooks/reseed-east-1.1.json")
        .exists());
    agent.stop().await;
}

#[tokio::test]
async fn hostile_values_are_refused_and_nothing_runs() {
    let agent = agent_with("").await;
    let c = cluster(&agent);
    for (i, service) in ["east;id", "..", "../etc", "-x", "a b", "$(id)"]
        .into_iter()
        .enumerate()
    {
        let mut reset = call(10 + i as u32, HookAction::ReplicatorReset);
        reset.service = Some(service.into());
        let reason = refusal(call_hook(&c, "east1", &reset).await.unwrap_err());
        assert!(reason.contains("refusing {service}"), "{service}: {reason}");
    }
    let mut bad_site = call(20, HookAction::RoutersOffline);
    bad_site.site = "east\nrouter * online".into();
    let reason = refusal(call_hook(&c, "east1", &bad_site).await.unwrap_err());
    assert!(reason.contains("refusing {site}"), "{reason}");
    for dataset in ["../data", "nope"] {
        let mut stop = call(21, HookAction::DatabaseStop);
        stop.dataset = Some(dataset.into());
        let reason = refusal(call_hook(&c, "east1", &stop).await.unwrap_err());
        assert!(reason.contains("dataset"), "{dataset}: {reason}");
    }
    // {datadir} with no dataset named has no value.
    let reason = refusal(
        call_hook(&c, "east1", &call(22, HookAction::DatabaseStop))
            .await
            .unwrap_err(),
    );
    assert!(reason.contains("no value for {datadir}"), "{reason}");
    // A runbook id that is no plain file name: refused by the controller before it sends,
    // and by the agent when sent anyway.
    let mut escape = call(23, HookAction::ReplicatorReset);
    escape.runbook = "../../x".into();
    assert!(matches!(
        call_hook(&c, "east1", &escape).await.unwrap_err(),
        HookCallError::Invalid(_)
    ));
    match ask_as(
        &agent,
        "controller",
        hook_frame("../../x", "replicator_reset", Some("east")),
    )
    .await
    {
        Message::HookDone {
            reply: HookReply::Refused { reason },
            ..
        } => assert!(reason.contains("runbook id"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // An action the agent does not know, and a tool where none belongs.
    for (action, tool) in [("reboot", None), ("replicator_reset", Some("xtrabackup"))] {
        let h = Hook {
            runbook: "rb".into(),
            step: 30,
            action: action.into(),
            tool: tool.map(str::to_owned),
            service: Some("east".into()),
            site: "east".into(),
            dataset: None,
        };
        match ask_as(&agent, "controller", Message::Hook(h).to_frame()).await {
            Message::HookDone {
                reply: HookReply::Refused { reason },
                ..
            } => assert!(reason.contains("is not a hook action"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
    // A backup runs only inside a transfer of a backup method.
    let mut backup = call(31, HookAction::Backup(BackupTool::Xtrabackup));
    backup.dataset = Some("data".into());
    let reason = refusal(call_hook(&c, "east1", &backup).await.unwrap_err());
    assert!(reason.contains("only inside a transfer"), "{reason}");
    assert!(log(&agent).is_empty(), "something ran: {:?}", log(&agent));
    assert!(!agent.path().join("x").exists());
    agent.stop().await;
}

#[tokio::test]
async fn an_agent_that_does_not_answer_is_unreachable_and_worth_another_try() {
    let agent = agent_with("").await;
    let mut c = cluster(&agent);
    // A port nothing listens on.
    c.nodes.get_mut("east1").unwrap().address = common::free_addr().to_string();
    let e = call_hook(&c, "east1", &call(1, HookAction::ReplicatorReset))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, HookCallError::Unreachable { node, .. } if node == "east1"),
        "{e}"
    );
    assert!(e.retryable());
    let e = call_hook(&c, "west9", &call(1, HookAction::ReplicatorReset))
        .await
        .unwrap_err();
    assert!(matches!(e, HookCallError::UnknownNode { .. }), "{e}");
    assert!(log(&agent).is_empty());
    agent.stop().await;
}

#[tokio::test]
async fn stopping_the_agent_kills_a_running_hook() {
    let agent = agent_with("").await;
    let c = cluster(&agent);
    let running =
        tokio::spawn(
            async move { call_hook(&c, "east1", &call(1, HookAction::DatabaseStart)).await },
        );
    let pidfile = agent.path().join("bin/hang.pid");
    for _ in 0..100 {
        if pidfile.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give the script a moment to finish writing it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let dir = agent.stop().await;
    assert!(dead(pid).await, "the hook's child {pid} outlived the agent");
    let e = running.await.unwrap().unwrap_err();
    assert!(e.retryable(), "{e}");
    // The step stays marked as started: run again, it would be refused until checked.
    assert!(dir
        .path()
        .join("east1/state/hooks/reseed-east-1.1.started")
        .exists());
}
