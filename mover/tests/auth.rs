//! Who may do what to a real agent: certificates bind node names, only the controller starts
//! a transfer, only a target's parent in the plan feeds it, and no peer can make an agent send
//! one of its own datasets without the controller's `Start`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use mover_protocol::{Chunk, Message, Outcome, Plan, Start};

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
        connections: open.connections,
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
    let err = mover::net::connect(&ep, agent.addr, "east2")
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
    let conn = mover::net::connect(&ctl, agent.addr, "east1")
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
        reason.contains("east2 is not this node's parent in the plan"),
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

/// A node may name itself the parent in a plan of its own making, and then replace any
/// dataset of any agent: targets check the parent against the plan, but nothing shows that a
/// controller made the plan.
#[tokio::test]
#[ignore = "needs controller-authorized Open: see report"]
async fn a_node_cannot_push_a_dataset_that_no_controller_started() {
    let agent = start_east1().await;
    let secret = secret(&agent);
    let plan = Plan::from_nodes(vec![
        plan_node("east2", "127.0.0.1:1", None),
        plan_node("east1", &agent.addr.to_string(), Some(0)),
    ])
    .unwrap();
    let (_ep, conn) = connect_as(&agent, "east2").await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&open_with(&agent, TRANSFER, 1 << 16, plan))
        .await
        .unwrap();
    let f = one_file("planted", b"planted by east2");
    send_manifest_frames(&mut send, f.entries.clone()).await;
    let ready = wait_ready(&mut recv).await;
    if ready.is_ok() {
        feed(&conn, &mut send, &mut recv, TRANSFER, &f).await;
        let outcome = outcome_of(&mut recv, "east1").await;
        panic!("east2 pushed a dataset no controller started: east1 {outcome:?}");
    }
    assert_eq!(std::fs::read(&secret).unwrap(), b"east1's own data");
    agent.stop().await;
}
