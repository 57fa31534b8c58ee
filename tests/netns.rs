//! End-to-end on real links: each agent in a network namespace of its own, joined by veth
//! pairs and a bridge, uplinks limited by `tc tbf`, links cut with `ip link set down`. Needs
//! root; without it each test says SKIP and passes (CI runs as root).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{assert_same_tree, mixed_tree, target, wait_recorded, Cluster};

const NODES: [&str; 3] = ["west1", "east1", "east2"];

#[test]
fn a_link_down_for_a_few_seconds_is_ridden_out() {
    let Some(c) = Cluster::start_in_netns(&NODES, "200mbit") else {
        return;
    };
    mixed_tree(&c.data("west1"), 192 << 20);
    let mut send = c.spawn_send("west1:data", "east1,east2", &["--chunk-size", "256K"]);
    wait_recorded(&c, "east2", 24 << 20);
    c.set_link("east2", false);
    std::thread::sleep(Duration::from_secs(5));
    c.set_link("east2", true);
    assert!(
        send.try_wait().unwrap().is_none(),
        "the transfer was still running when the link came back"
    );
    let (code, summary) = Cluster::finish_send(send);
    assert_eq!(code, Some(0), "{summary}");
    for t in ["east1", "east2"] {
        assert_eq!(target(&summary, t)["result"], "committed", "{summary}");
        assert_same_tree(&c.data("west1"), &c.data(t));
    }
    assert!(
        !c.log("east1").contains("link to child failed"),
        "no link was given up:\n{}",
        c.log("east1")
    );
}

#[test]
fn a_relay_whose_link_is_cut_for_good_is_linked_around() {
    let Some(c) = Cluster::start_in_netns(&NODES, "200mbit") else {
        return;
    };
    mixed_tree(&c.data("west1"), 192 << 20);
    let send = c.spawn_send("west1:data", "east1,east2", &["--chunk-size", "256K"]);
    wait_recorded(&c, "east2", 24 << 20);
    let cut = Instant::now();
    c.set_link("east1", false);
    let (code, summary) = Cluster::finish_send(send);
    eprintln!(
        "finished {:.1} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    assert_eq!(code, Some(3), "partial: {summary}");
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
        reason.contains("east1") && reason.contains("timed out"),
        "{reason}"
    );
    assert!(!c.data("east1").exists());
    assert!(c.log("west1").contains("linking past a dead relay"));
}
