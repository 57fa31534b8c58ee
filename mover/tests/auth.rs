//! Who may do what to a real agent: certificates bind node names, only the controller starts
//! a transfer (with `Start` at the source, with its signed grant in every `Open`), only a
//! target's parent in the plan feeds it, and no peer can make an agent send one of its own
//! datasets without the controller's `Start`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use mover_protocol::{Chunk, Grant, Message, Method, Open, Outcome, Plan, Start};

/// Puts a file in east1's `data` dataset, for tests that check nothing of it leaks.
fn secret(agent: &Agent) -> std::path::PathBuf {
    std::fs::create_dir_all(agent.data()).unwrap();
    let p = agent.data().join("secret");
    std::fs::write(&p, b"east1's own data").unwrap();
    p
}

/// A plan in which east1 is the source of its `data` dataset and `to` at `addr` the target.
fn plan_from_east1(agent: &Agent, to: &str, addr: std::net::SocketAddr) -> Plan {
    Plan::from_nodes(vec![
        plan_node("east1", &agent.addr.to_string(), None),
        plan_node(to, &addr.to_string(), Some(0)),
    ])
    .unwrap()
}

/// A `Start` as the controller sends it, grant included.
fn start_frame(agent: &Agent, plan: Plan) -> Bytes {
    let open = granted_open(agent, TRANSFER, 1 << 16, plan);
    Message::Start(Start {
        transfer_id: open.transfer_id,
        chunk_size: open.chunk_size,
        compress: 1,
        compress_auto: false,
        connections: open.connections,
        max_rate: 0,
        method: Method::Files,
        plan: open.plan,
        grant: open.grant,
    })
    .to_frame()
}

#[tokio::test]
async fn an_agent_dialled_by_another_nodes_name_fails_the_handshake() {
    let agent = start_east1().await;
    // east1's certificate answers at this address; a peer that means to reach east2 must not
    // accept it.
    let ep = client(&agent, "west1");
    let err = mover::net::connect(&ep, None, agent.addr, "east2")
        .await
        .expect_err("east1's certificate passed for east2");
    let text = err.to_string();
    assert!(
        text.contains("east2") && text.contains("certificate"),
        "{text}"
    );
    assert!(!err.is_retryable(), "{text}");
    assert_nothing_written(agent.path());
    prove_alive(&agent, TRANSFER + 1).await;
    agent.stop().await;
}

#[tokio::test]
async fn a_relay_refuses_a_child_whose_certificate_names_another_node() {
    let agent = start_east1().await;
    // east1's own key, stolen, answering at the address the plan gives east2.
    let impostor = listener(&agent, "east1");
    let watcher = watch(&impostor);
    let plan = Plan::from_nodes(vec![
        plan_node("west1", "127.0.0.1:1", None),
        plan_node("east1", &agent.addr.to_string(), Some(0)),
        plan_node(
            "east2",
            &impostor.local_addr().unwrap().to_string(),
            Some(1),
        ),
    ])
    .unwrap();
    let f = one_file("f", b"legitimate");
    let (_ep, conn) = rogue(&agent).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&open_with(&agent, TRANSFER, 1 << 16, plan))
        .await
        .unwrap();
    send_manifest_frames(&mut send, f.entries.clone()).await;
    // east1 could not reach its child: it says so (before Ready) and still serves its own.
    let early = wait_ready(&mut recv).await.expect("east1 gets ready");
    let east2 = early.into_iter().find_map(|m| match m {
        Message::Report { node, outcome } if node == "east2" => Some(outcome),
        _ => None,
    });
    match east2.expect("east2 reported before Ready") {
        Outcome::Failed { reason, .. } => assert!(
            reason.contains("east2") && reason.contains("certificate"),
            "{reason}"
        ),
        other => panic!("east2 {other:?}"),
    }
    assert!(
        watcher.attempts() > 0,
        "east1 never dialled east2's address"
    );
    assert_eq!(watcher.established(), 0, "east1 accepted the impostor");
    // The rest of the plan goes on.
    feed(&conn, &mut send, &mut recv, TRANSFER, &f).await;
    let outcome = outcome_of(&mut recv, "east1").await;
    assert!(matches!(outcome, Outcome::Committed { .. }), "{outcome:?}");
    agent.stop().await;
}

#[tokio::test]
async fn a_node_certificate_cannot_start_a_transfer() {
    let agent = start_east1().await;
    let secret = secret(&agent);
    // west1 asks east1 to send its dataset to west1's own listener.
    let west1 = listener(&agent, "west1");
    let watcher = watch(&west1);
    let plan = plan_from_east1(&agent, "west1", west1.local_addr().unwrap());
    let (_ep, conn) = rogue(&agent).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&start_frame(&agent, plan.clone()))
        .await
        .unwrap();
    let reason = failure_reason(&mut recv).await;
    assert!(reason.contains("node west1 may not send start"), "{reason}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(watcher.attempts(), 0, "east1 dialled the node that asked");
    assert_eq!(std::fs::read(&secret).unwrap(), b"east1's own data");
    assert!(staging_is_empty(agent.path()));

    // The same Start from the controller does reach the listener: the check above could fail.
    let ctl = client(&agent, "controller");
    let conn = mover::net::connect(&ctl, None, agent.addr, "east1")
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&start_frame(&agent, plan)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while watcher.established() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the controller's Start makes east1 dial its target");
    agent.stop().await;
}

#[tokio::test]
async fn an_open_that_would_make_the_agent_a_source_is_refused() {
    let agent = start_east1().await;
    let secret = secret(&agent);
    let west1 = listener(&agent, "west1");
    let watcher = watch(&west1);
    let plan = plan_from_east1(&agent, "west1", west1.local_addr().unwrap());
    let (_ep, conn) = rogue(&agent).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&open_with(&agent, TRANSFER, 1 << 16, plan))
        .await
        .unwrap();
    let reason = failure_reason(&mut recv).await;
    assert!(
        reason.contains("east1 is not a target in this transfer's plan"),
        "{reason}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(watcher.attempts(), 0, "east1 dialled the node that asked");
    assert_eq!(std::fs::read(&secret).unwrap(), b"east1's own data");
    assert!(staging_is_empty(agent.path()));
    prove_alive(&agent, TRANSFER + 1).await;
    agent.stop().await;
}

#[tokio::test]
async fn an_open_from_a_node_that_is_not_the_parent_is_refused() {
    let agent = start_east1().await;
    // east2 sends the plan west1 -> east1: its certificate says east2, not west1.
    let (_ep, conn) = connect_as(&agent, "east2").await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&open_frame(&agent, 1 << 16)).await.unwrap();
    send_manifest_frames(&mut send, one_file("planted", b"planted").entries).await;
    let reason = failure_reason(&mut recv).await;
    assert!(
        reason.contains("east2 is not above this node in the plan"),
        "{reason}"
    );
    assert_nothing_written(agent.path());
    prove_alive(&agent, TRANSFER + 1).await;
    agent.stop().await;
}

#[tokio::test]
async fn a_data_stream_from_a_node_that_does_not_feed_the_transfer_is_stopped() {
    let agent = start_east1().await;
    let f = one_file("f", b"legitimate");
    let (_ep, conn) = rogue(&agent).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&open_frame(&agent, 1 << 16)).await.unwrap();
    send_manifest_frames(&mut send, f.entries.clone()).await;
    wait_ready(&mut recv).await.expect("east1 gets ready");

    // east2 attaches to west1's transfer with a chunk that would verify.
    let evil: &'static [u8] = b"malicious!";
    let chunk = Chunk {
        hash: mover_protocol::hash::chunk_hash(evil, 0, evil.len() as u64),
        payload: Bytes::from_static(evil),
        ..f.chunk.clone()
    };
    let (_ep2, east2) = connect_as(&agent, "east2").await;
    let mut data = east2.open_uni().await.unwrap();
    let _ = data
        .write_all(
            &Message::Attach {
                transfer_id: TRANSFER,
            }
            .to_frame(),
        )
        .await;
    let _ = data.write_all(&Message::Chunk(chunk).to_frame()).await;
    let stopped = tokio::time::timeout(Duration::from_secs(10), data.stopped())
        .await
        .expect("east1 stops east2's stream");
    assert!(matches!(stopped, Ok(Some(_))), "{stopped:?}");

    // Nor may the parent attach to a transfer that does not exist.
    let mut stray = conn.open_uni().await.unwrap();
    let _ = stray
        .write_all(&Message::Attach { transfer_id: 999 }.to_frame())
        .await;
    let stopped = tokio::time::timeout(Duration::from_secs(10), stray.stopped())
        .await
        .expect("east1 stops a stream for an unknown transfer");
    assert!(matches!(stopped, Ok(Some(_))), "{stopped:?}");

    // Had east2's chunk been taken, west1's would be a duplicate and the digest would differ.
    feed(&conn, &mut send, &mut recv, TRANSFER, &f).await;
    let outcome = outcome_of(&mut recv, "east1").await;
    assert!(matches!(outcome, Outcome::Committed { .. }), "{outcome:?}");
    assert_eq!(std::fs::read(agent.data().join("f")).unwrap(), f.content);
    agent.stop().await;
}

/// east2 -> east1 on the `data` dataset: a plan no controller made.
fn plan_from_east2(agent: &Agent) -> Plan {
    Plan::from_nodes(vec![
        plan_node("east2", "127.0.0.1:1", None),
        plan_node("east1", &agent.addr.to_string(), Some(0)),
    ])
    .unwrap()
}

/// Sends `open` to east1 as `node`, then a manifest, and returns why east1 refused it; checks
/// that east1 wrote nothing and still serves a valid transfer.
async fn assert_refused_as_ungranted(agent: &Agent, node: &str, open: Open) -> String {
    let secret = secret(agent);
    let (_ep, conn) = connect_as(agent, node).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&Message::Open(open).to_frame())
        .await
        .unwrap();
    let f = one_file("planted", b"planted without a grant");
    send_manifest_frames(&mut send, f.entries.clone()).await;
    let reason = match wait_ready(&mut recv).await {
        Ok(_) => {
            feed(&conn, &mut send, &mut recv, TRANSFER, &f).await;
            let outcome = outcome_of(&mut recv, "east1").await;
            panic!("{node} pushed a dataset no controller granted: east1 {outcome:?}");
        }
        Err(reason) => reason,
    };
    assert!(
        reason.contains("east1 refused: the transfer is not signed by the cluster's controller"),
        "{reason}"
    );
    assert_eq!(std::fs::read(&secret).unwrap(), b"east1's own data");
    assert!(!agent.data().join("planted").exists());
    assert!(staging_is_empty(agent.path()));
    std::fs::remove_file(&secret).unwrap();
    // A new transfer id each time: an agent does not run a committed transfer again.
    static PROOFS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(100);
    let id = PROOFS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    prove_alive(agent, id).await;
    reason
}

/// A node names itself the parent in a plan of its own making: without the controller's
/// grant, nothing shows that a controller made the plan, and the target refuses it.
#[tokio::test]
async fn a_node_cannot_push_a_dataset_that_no_controller_started() {
    let agent = start_east1().await;
    let open = Open {
        transfer_id: TRANSFER,
        chunk_size: 1 << 16,
        connections: 1,
        method: Method::Files,
        plan: plan_from_east2(&agent),
        grant: Grant::default(),
    };
    let reason = assert_refused_as_ungranted(&agent, "east2", open).await;
    assert!(reason.contains("does not parse"), "{reason}");
    agent.stop().await;
}

#[tokio::test]
async fn a_grant_signed_by_a_node_key_is_refused() {
    let agent = start_east1().await;
    let ungranted = || Open {
        transfer_id: TRANSFER,
        chunk_size: 1 << 16,
        connections: 1,
        method: Method::Files,
        plan: plan_from_east2(&agent),
        grant: Grant::default(),
    };
    // east2's own certificate and signature: a grant, but not the controller's.
    let mut own = Open {
        grant: unsigned_grant(&agent, "east2"),
        ..ungranted()
    };
    sign(&agent, "east2", &mut own);
    let reason = assert_refused_as_ungranted(&agent, "east2", own).await;
    assert!(
        reason.contains("names east2, not the controller"),
        "{reason}"
    );
    // The controller's certificate (which every node sees in grants) with east2's signature.
    let mut posing = Open {
        grant: unsigned_grant(&agent, "controller"),
        ..ungranted()
    };
    sign(&agent, "east2", &mut posing);
    let reason = assert_refused_as_ungranted(&agent, "east2", posing).await;
    assert!(reason.contains("signature does not match"), "{reason}");
    agent.stop().await;
}

#[tokio::test]
async fn a_grant_of_another_clusters_controller_is_refused() {
    let agent = start_east1().await;
    let other = tempfile::tempdir().unwrap();
    mover::certs::init(other.path(), &["east2".to_owned()]).unwrap();
    let foreign = mover::tls::Identity::load(&mover::tls::TlsPaths {
        ca: other.path().join("ca.pem"),
        cert: other.path().join("controller.pem"),
        key: other.path().join("controller.key"),
    })
    .unwrap();
    let mut open = Open {
        transfer_id: TRANSFER,
        chunk_size: 1 << 16,
        connections: 1,
        method: Method::Files,
        plan: plan_from_east2(&agent),
        grant: Grant {
            controller_cert: foreign.cert_der().to_vec(),
            not_after_unix: unix_now() + 3600,
            signature: Vec::new(),
        },
    };
    open.grant.signature = mover::tls::sign_grant(&foreign, &open.grant_bytes()).unwrap();
    let reason = assert_refused_as_ungranted(&agent, "east2", open).await;
    assert!(reason.contains("not one of the cluster ca's"), "{reason}");
    agent.stop().await;
}

#[tokio::test]
async fn an_expired_grant_is_refused() {
    let agent = start_east1().await;
    let mut open = Open {
        grant: Grant {
            not_after_unix: unix_now() - 1,
            ..unsigned_grant(&agent, "controller")
        },
        ..granted_open(&agent, TRANSFER, 1 << 16, plan_to_east1())
    };
    sign(&agent, "controller", &mut open);
    let reason = assert_refused_as_ungranted(&agent, "west1", open).await;
    assert!(reason.contains("expired"), "{reason}");
    agent.stop().await;
}

#[tokio::test]
async fn a_granted_plan_altered_by_its_parent_is_refused() {
    let agent = start_east1().await;
    // The controller sends west1's dataset to east1's `other`; west1 aims it at `data`.
    let mut other = plan_to_east1().nodes().to_vec();
    other[1].dataset = "other".into();
    let granted = granted_open(&agent, TRANSFER, 1 << 16, Plan::from_nodes(other).unwrap());
    let redirected = Open {
        plan: plan_to_east1(),
        ..granted.clone()
    };
    let reason = assert_refused_as_ungranted(&agent, "west1", redirected).await;
    assert!(reason.contains("signature does not match"), "{reason}");

    // The controller sends west1's dataset to east2; west1 adds east1.
    let to_east2 = Plan::from_nodes(vec![
        plan_node("west1", "127.0.0.1:1", None),
        plan_node("east2", "127.0.0.1:1", Some(0)),
    ])
    .unwrap();
    let granted = granted_open(&agent, TRANSFER, 1 << 16, to_east2.clone());
    let mut nodes = to_east2.nodes().to_vec();
    nodes.push(plan_node("east1", &agent.addr.to_string(), Some(0)));
    let widened = Open {
        plan: Plan::from_nodes(nodes).unwrap(),
        ..granted.clone()
    };
    let reason = assert_refused_as_ungranted(&agent, "west1", widened).await;
    assert!(reason.contains("signature does not match"), "{reason}");

    // Nor may it keep the plan and change the transfer's parameters.
    let bigger = Open {
        chunk_size: 1 << 17,
        ..granted_open(&agent, TRANSFER, 1 << 16, plan_to_east1())
    };
    let reason = assert_refused_as_ungranted(&agent, "west1", bigger).await;
    assert!(reason.contains("signature does not match"), "{reason}");
    agent.stop().await;
}

/// A relay that links past a dead node sends the same granted plan: west1 feeds east1 itself
/// when east3, east1's parent, is gone. A node below may not.
#[tokio::test]
async fn a_granted_plan_linked_past_a_dead_relay_still_commits() {
    let agent = start_east1().await;
    let chain = Plan::from_nodes(vec![
        plan_node("west1", "127.0.0.1:1", None),
        plan_node("east3", "127.0.0.1:1", Some(0)),
        plan_node("east1", &agent.addr.to_string(), Some(1)),
        plan_node("east2", "127.0.0.1:1", Some(2)),
    ])
    .unwrap();
    let granted = granted_open(&agent, TRANSFER, 1 << 16, chain.clone());

    // east2, below east1, sends it: refused.
    let (_ep, below) = connect_as(&agent, "east2").await;
    let (mut send, mut recv) = below.open_bi().await.unwrap();
    send.write_all(&Message::Open(granted.clone()).to_frame())
        .await
        .unwrap();
    let reason = failure_reason(&mut recv).await;
    assert!(reason.contains("east2 is not above this node"), "{reason}");

    // A changed parent is not what was granted.
    let mut nodes = chain.nodes().to_vec();
    nodes[2].parent = Some(0);
    let reparented = Open {
        plan: Plan::from_nodes(nodes).unwrap(),
        ..granted.clone()
    };
    let reason = assert_refused_as_ungranted(&agent, "west1", reparented).await;
    assert!(reason.contains("signature does not match"), "{reason}");

    // west1, above east1's dead parent, sends the granted plan: it commits.
    let f = one_file("f", b"linked past a dead relay");
    let (_ep, conn) = rogue(&agent).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&Message::Open(granted).to_frame())
        .await
        .unwrap();
    send_manifest_frames(&mut send, f.entries.clone()).await;
    wait_ready(&mut recv).await.expect("east1 gets ready");
    feed(&conn, &mut send, &mut recv, TRANSFER, &f).await;
    let outcome = outcome_of(&mut recv, "east1").await;
    assert!(matches!(outcome, Outcome::Committed { .. }), "{outcome:?}");
    assert_eq!(std::fs::read(agent.data().join("f")).unwrap(), f.content);
    agent.stop().await;
}

/// A node of a granted plan that kept the `Open` sends it again after the target committed: the
/// target does not run that transfer twice, and answers with the report of its commit.
#[tokio::test]
async fn a_replayed_grant_of_a_committed_transfer_is_not_run_again() {
    let agent = start_east1().await;
    prove_alive(&agent, TRANSFER).await;
    let kept = granted_open(&agent, TRANSFER, 1 << 16, plan_to_east1());
    let (_ep, conn) = rogue(&agent).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&Message::Open(kept).to_frame())
        .await
        .unwrap();
    send_manifest_frames(&mut send, one_file("planted", b"replayed").entries).await;
    // It answers with what it reported when it committed, and runs nothing.
    let outcome = outcome_of(&mut recv, "east1").await;
    let alive = b"still serving valid requests".len() as u64;
    assert!(
        matches!(outcome, Outcome::Committed { files: 1, bytes, .. } if bytes == alive),
        "{outcome:?}"
    );
    assert!(!agent.data().join("planted").exists());
    assert!(agent.data().join("alive").exists());
    assert!(staging_is_empty(agent.path()));
    // A new transfer, as the controller's rerun would be, still runs.
    prove_alive(&agent, TRANSFER + 1).await;
    agent.stop().await;
}
