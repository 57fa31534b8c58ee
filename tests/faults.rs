//! End-to-end faults: processes killed with SIGKILL, a drifted replica, corruption in transit
//! and on disk, a full disk, a source that changes underneath. Each test asserts what
//! committed, what did not, how much was sent again, and that what committed equals the
//! source.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{
    assert_same_tree, mixed_tree, num, recorded_bytes, target, wait_recorded, Cluster, Tmpfs,
    SIGKILL, SIGTERM,
};

const CHUNK: u64 = 256 << 10;

/// What the rerun must show: it committed everything, and of what had arrived before the
/// interruption at most a tenth crossed the network again.
fn assert_resumed(summary: &serde_json::Value, targets: &[&str], arrived: u64) {
    for t in targets {
        assert_eq!(target(summary, t)["result"], "committed", "{t}: {summary}");
        assert!(
            num(&target(summary, t)["held_bytes"]) >= arrived,
            "{t} kept less than had arrived ({arrived}): {summary}"
        );
    }
    let total = num(&summary["source"]["total_bytes"]);
    let skipped = num(&summary["source"]["skipped_bytes"]);
    assert!(
        skipped >= arrived * 9 / 10,
        "resent more than a tenth of the {arrived} bytes that had arrived: {summary}"
    );
    eprintln!(
        "resume: {arrived} of {total} bytes had arrived; rerun skipped {skipped}, sent {}",
        total - skipped
    );
}

#[test]
fn a_target_killed_mid_transfer_resumes_from_what_it_verified() {
    let mut c = Cluster::start(&["west1", "east1"]);
    mixed_tree(&c.data("west1"), 256 << 20);
    let send = c.spawn_send("west1:data", "east1", &["--chunk-size", "256K"]);
    wait_recorded(&c, "east1", 64 << 20);
    c.stop_agent("east1", SIGKILL);
    let arrived = recorded_bytes(&c, "east1");
    let (code, summary) = Cluster::finish_send(send);
    assert_eq!(code, Some(4), "{summary}");
    assert!(!c.data("east1").exists(), "nothing committed");
    assert_eq!(c.staging_count("east1"), 1, "staging kept to resume from");

    c.start_agent("east1");
    let (code, summary, stderr) = c.send("west1:data", "east1", &["--chunk-size", "256K"]);
    assert_eq!(code, 0, "{stderr}\n{summary}");
    assert_resumed(&summary, &["east1"], arrived);
    assert_same_tree(&c.data("west1"), &c.data("east1"));
    assert_eq!(c.staging_count("east1"), 0);
}

#[test]
fn staging_from_an_older_source_version_never_mixes_into_the_new_one() {
    let mut c = Cluster::start(&["west1", "east1"]);
    mixed_tree(&c.data("west1"), 128 << 20);
    let send = c.spawn_send("west1:data", "east1", &["--chunk-size", "256K"]);
    wait_recorded(&c, "east1", 48 << 20);
    c.stop_agent("east1", SIGKILL);
    let _ = Cluster::finish_send(send);

    // The source moves on while east1 is down: every file it had verified part of changes.
    let root = c.data("west1");
    let mut changed = 0;
    for (len, path) in files(&root) {
        if len >= CHUNK {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(b"version two", len / 2).unwrap();
            changed += 1;
        }
    }
    assert!(changed > 3);
    c.start_agent("east1");
    let (code, summary, stderr) = c.send("west1:data", "east1", &["--chunk-size", "256K"]);
    assert_eq!(code, 0, "{stderr}\n{summary}");
    assert_same_tree(&root, &c.data("east1"));
    // The unchanged chunks it had were kept; the changed ones were sent.
    assert!(
        num(&target(&summary, "east1")["held_bytes"]) > 0,
        "{summary}"
    );
}

#[test]
fn a_source_killed_mid_transfer_resumes_on_every_target() {
    let mut c = Cluster::start(&["west1", "east1", "east2"]);
    mixed_tree(&c.data("west1"), 256 << 20);
    let send = c.spawn_send("west1:data", "east1,east2", &["--chunk-size", "256K"]);
    wait_recorded(&c, "east2", 64 << 20);
    c.stop_agent("west1", SIGKILL);
    let arrived = recorded_bytes(&c, "east1").min(recorded_bytes(&c, "east2"));
    let (code, summary) = Cluster::finish_send(send);
    assert_eq!(code, Some(4), "{summary}");

    c.start_agent("west1");
    let (code, summary, stderr) = c.send("west1:data", "east1,east2", &["--chunk-size", "256K"]);
    assert_eq!(code, 0, "{stderr}\n{summary}");
    assert_resumed(&summary, &["east1", "east2"], arrived);
    for t in ["east1", "east2"] {
        assert_same_tree(&c.data("west1"), &c.data(t));
        assert_eq!(c.staging_count(t), 0);
    }
}

#[test]
fn a_controller_killed_mid_transfer_is_resumed_by_running_it_again() {
    let c = Cluster::start(&["west1", "east1", "east2"]);
    mixed_tree(&c.data("west1"), 256 << 20);
    let mut send = c.spawn_send("west1:data", "east1,east2", &["--chunk-size", "256K"]);
    wait_recorded(&c, "east2", 64 << 20);
    send.kill().unwrap();
    let _ = send.wait();
    let arrived = recorded_bytes(&c, "east1").min(recorded_bytes(&c, "east2"));

    // At once: the transfer the dead controller started may still be running; the new one
    // replaces it on every target and goes on from what they hold.
    let (code, summary, stderr) = c.send("west1:data", "east1,east2", &["--chunk-size", "256K"]);
    assert_eq!(code, 0, "{stderr}\n{summary}");
    assert_resumed(&summary, &["east1", "east2"], arrived);
    for t in ["east1", "east2"] {
        assert_same_tree(&c.data("west1"), &c.data(t));
    }
}

#[test]
fn a_drifted_replica_gets_only_the_chunks_that_differ() {
    let c = Cluster::start(&["west1", "east1"]);
    mixed_tree(&c.data("west1"), 64 << 20);
    let (code, summary, stderr) = c.send("west1:data", "east1", &["--chunk-size", "256K"]);
    assert_eq!(code, 0, "{stderr}\n{summary}");

    // The replica drifts: three chunks of the largest file change, one small file goes, one
    // file appears that the source does not have.
    let data = c.data("east1");
    let big = largest_file(&data);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
        for off in [0, 3 * CHUNK + 5, 9 * CHUNK + 77] {
            f.write_all_at(b"drift drift drift", off).unwrap();
        }
    }
    let small = smallest_file(&data);
    let small_len = std::fs::metadata(&small).unwrap().len();
    std::fs::remove_file(&small).unwrap();
    std::fs::write(data.join("not-on-the-source"), b"extra").unwrap();
    let changed = 3 * CHUNK + small_len;

    let (code, summary, stderr) = c.send("west1:data", "east1", &["--chunk-size", "256K"]);
    assert_eq!(code, 0, "{stderr}\n{summary}");
    assert_same_tree(&c.data("west1"), &data);
    let total = num(&summary["source"]["total_bytes"]);
    let sent = total - num(&summary["source"]["skipped_bytes"]);
    let wire = num(&summary["source"]["wire_bytes"]);
    eprintln!("delta: {changed} bytes changed of {total}; {sent} bytes sent, {wire} on the wire");
    assert_eq!(
        sent, changed,
        "exactly the chunks that differ are sent: {summary}"
    );
    assert!(wire <= changed + 4096, "{summary}");
    assert_eq!(
        num(&target(&summary, "east1")["held_bytes"]),
        total - changed
    );
}

#[test]
fn corrupted_chunks_in_transit_and_in_staging_are_fetched_again() {
    let mut c = Cluster::start(&["west1", "east1", "east2"]);
    c.stop_agent("east1", SIGTERM);
    c.start_agent_with_env("east1", &[("MOVER_TEST_FLIP_CHUNKS", "3")]);
    c.stop_agent("east2", SIGTERM);
    c.start_agent_with(
        "east2",
        &["--staging-verify", "read-back"],
        &[("MOVER_TEST_FLIP_STAGING", "2")],
    );
    mixed_tree(&c.data("west1"), 32 << 20);
    let (code, summary, stderr) = c.send("west1:data", "east1,east2", &["--chunk-size", "256K"]);
    assert_eq!(code, 0, "{stderr}\n{summary}");
    for t in ["east1", "east2"] {
        assert_same_tree(&c.data("west1"), &c.data(t));
    }
    assert_eq!(num(&target(&summary, "east1")["repaired"]), 3, "{summary}");
    assert_eq!(num(&target(&summary, "east2")["repaired"]), 2, "{summary}");
    assert!(num(&summary["source"]["resent_chunks"]) >= 3, "{summary}");
    // east1 checks each chunk in memory before writing it (the default), east2 reads each one
    // back from staging after writing it: each catches the damage it was given.
    let log = c.log("east1");
    assert!(log.contains("failed verification: as received"), "{log}");
    let log = c.log("east2");
    assert!(
        log.contains("staging checks: each chunk read back"),
        "{log}"
    );
    assert!(
        log.contains("failed verification: read back from staging"),
        "{log}"
    );
}

#[test]
fn a_full_disk_fails_that_target_only_and_keeps_its_old_data() {
    let mut c = Cluster::start(&["west1", "east1", "east2"]);
    // east1, the relay in the middle of the chain, has a 24 MiB filesystem.
    c.stop_agent("east1", SIGTERM);
    let Some(_fs) = Tmpfs::mount(&c.path().join("east1"), "24m") else {
        return;
    };
    let old = c.data("east1");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("old"), b"old data").unwrap();
    c.start_agent("east1");
    mixed_tree(&c.data("west1"), 64 << 20);

    let (code, summary, stderr) = c.send("west1:data", "east1,east2", &["--chunk-size", "256K"]);
    assert_eq!(code, 3, "partial\n{stderr}\n{summary}");
    assert_eq!(
        target(&summary, "east2")["result"],
        "committed",
        "{summary}"
    );
    assert_same_tree(&c.data("west1"), &c.data("east2"));
    let e1 = target(&summary, "east1");
    assert_eq!(e1["result"], "failed");
    let reason = e1["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("east1: ")
            && reason.contains("no space left on device")
            && reason.contains(c.path().join("east1").to_str().unwrap()),
        "names the host and the path: {reason}"
    );
    assert_eq!(std::fs::read(old.join("old")).unwrap(), b"old data");
    assert_eq!(
        std::fs::read_dir(&old).unwrap().count(),
        1,
        "old data as it was"
    );
    let staging = c.state_dir("east1").join("staging");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "staging cleaned up: {left:?}");
}

#[test]
fn a_source_file_modified_during_the_transfer_is_never_committed() {
    let c = Cluster::start(&["west1", "east1"]);
    let root = c.data("west1");
    mixed_tree(&root, 64 << 20);
    // Read last (manifest order is by name), after the 64 MiB before it.
    let late = root.join("zzz-late.ibd");
    std::fs::write(&late, vec![7u8; 3 << 20]).unwrap();
    let old = c.data("east1");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("old"), b"old").unwrap();

    let send = c.spawn_send("west1:data", "east1", &["--chunk-size", "64K"]);
    c.wait_for_staging("east1");
    // Same size, new contents: only the modification time tells.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&late).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        f.write_all_at(b"torn", 4096).unwrap();
    }
    let (code, summary) = Cluster::finish_send(send);
    assert_eq!(code, Some(4), "{summary}");
    let reason = target(&summary, "east1")["reason"].as_str().unwrap();
    assert!(
        reason.contains("zzz-late.ibd") && reason.contains("modified after the scan"),
        "{reason}"
    );
    assert_eq!(std::fs::read(old.join("old")).unwrap(), b"old");
    assert!(!old.join("zzz-late.ibd").exists());
}

fn files(root: &std::path::Path) -> Vec<(u64, std::path::PathBuf)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                dirs.push(e.path());
            } else if t.is_file() {
                out.push((e.metadata().unwrap().len(), e.path()));
            }
        }
    }
    out.sort();
    out
}

fn largest_file(root: &std::path::Path) -> std::path::PathBuf {
    files(root).pop().unwrap().1
}

fn smallest_file(root: &std::path::Path) -> std::path::PathBuf {
    files(root).into_iter().find(|(len, _)| *len > 0).unwrap().1
}

/// Kills `dead` (SIGKILL) in the chain west1 -> east1 -> east2 -> east3 once data flows to
/// the end of it, and checks the others go on around it.
fn a_dead_hop_is_linked_around(dead: &str) {
    let nodes = ["west1", "east1", "east2", "east3"];
    let mut c = Cluster::start(&nodes);
    mixed_tree(&c.data("west1"), 192 << 20);
    let send = c.spawn_send("west1:data", "east1,east2,east3", &["--chunk-size", "256K"]);
    wait_recorded(&c, "east3", 32 << 20);
    c.stop_agent(dead, SIGKILL);
    let (code, summary) = Cluster::finish_send(send);
    assert_eq!(code, Some(3), "partial: {summary}");
    let after = nodes.iter().position(|n| *n == dead).unwrap();
    for (i, t) in nodes
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, t)| **t != dead)
    {
        assert_eq!(target(&summary, t)["result"], "committed", "{t}: {summary}");
        assert_same_tree(&c.data("west1"), &c.data(t));
        if i > after {
            // Linked in again past the dead node, it went on from what it had.
            assert!(
                num(&target(&summary, t)["held_bytes"]) > 0,
                "{t}: {summary}"
            );
        }
    }
    let total = num(&summary["source"]["total_bytes"]);
    let resent = num(&summary["source"]["resent_chunks"]) * CHUNK;
    assert!(resent < total, "resent less than the dataset: {summary}");
    let d = target(&summary, dead);
    assert_eq!(d["result"], "failed", "{summary}");
    let reason = d["reason"].as_str().unwrap();
    assert!(reason.contains(dead), "names the dead node: {reason}");
    assert!(!c.data(dead).exists());
    eprintln!(
        "dead hop {dead}: {} chunks resent; reason: {reason}",
        num(&summary["source"]["resent_chunks"])
    );
}

#[test]
fn a_dead_relay_in_the_middle_is_linked_around() {
    a_dead_hop_is_linked_around("east2");
}

#[test]
fn a_dead_first_hop_is_linked_around() {
    a_dead_hop_is_linked_around("east1");
}

#[test]
fn a_commit_report_lost_on_the_way_up_is_asked_for_again() {
    let mut c = Cluster::start(&["west1", "east1", "east2"]);
    // east1 loses east2's commit report, as if the link broke just before it arrived.
    c.stop_agent("east1", SIGTERM);
    c.start_agent_with_env("east1", &[("MOVER_TEST_DROP_COMMIT_REPORTS", "1")]);
    mixed_tree(&c.data("west1"), 4 << 20);
    let send = c.spawn_send("west1:data", "east1,east2", &[]);
    let (code, summary) = Cluster::finish_send(send);
    assert_eq!(code, Some(0), "{summary}");
    for t in ["east1", "east2"] {
        assert_eq!(target(&summary, t)["result"], "committed", "{t}: {summary}");
        assert_same_tree(&c.data("west1"), &c.data(t));
    }
    assert_eq!(
        target(&summary, "east2")["digest"],
        target(&summary, "east1")["digest"],
        "{summary}"
    );
    // east1 dialed east2 again, and east2 answered with its report rather than run the
    // transfer a second time.
    let log = c.log("east1");
    assert!(
        log.contains("TEST FAULT: dropping a commit report"),
        "{log}"
    );
    assert!(
        log.contains("linked to again, it had committed already"),
        "{log}"
    );
    let log = c.log("east2");
    assert!(
        log.contains("transfer committed here already; reporting it again"),
        "{log}"
    );
}

#[test]
fn a_relay_stopped_while_passing_end_on_is_linked_past_and_its_child_still_commits() {
    let mut c = Cluster::start(&["west1", "east1", "east2", "east3"]);
    // east2 holds the source's End back for a while before passing it on to east3.
    c.stop_agent("east2", SIGTERM);
    c.start_agent_with_env("east2", &[("MOVER_TEST_HOLD_END_MS", "8000")]);
    mixed_tree(&c.data("west1"), 16 << 20);
    let send = c.spawn_send("west1:data", "east1,east2,east3", &[]);
    // east1 commits once it has passed End on; east2 is then holding it, and east3, which
    // has everything, waits for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !c.data("east1").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "east1 never committed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopping = std::time::Instant::now();
    c.stop_agent("east2", SIGTERM);
    // A stopping agent does not keep dialing its lost child (it used to, for 10 s).
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "east2 took {:?} to stop",
        stopping.elapsed()
    );
    let (code, summary) = Cluster::finish_send(send);
    // east1 links past east2 after End went by, and passes End on to east3 itself.
    assert_eq!(code, Some(3), "partial: {summary}");
    for t in ["east1", "east3"] {
        assert_eq!(target(&summary, t)["result"], "committed", "{t}: {summary}");
        assert_same_tree(&c.data("west1"), &c.data(t));
    }
    assert_eq!(target(&summary, "east2")["result"], "failed", "{summary}");
    // Either east1 linked past east2 first and passed End on, or east2, stopping, passed End
    // on itself and east3 committed, its report lost with east2: east1 then learns of the
    // commit when it links to east3.
    let log = c.log("east1");
    assert!(
        log.contains("passing End to a node linked in after it")
            || log.contains("linked to again, it had committed already"),
        "{log}"
    );
    // east2 had End in hand when it was stopped: if it committed on its way down, its copy
    // is whole.
    if c.data("east2").exists() {
        assert_same_tree(&c.data("west1"), &c.data("east2"));
    }
}
