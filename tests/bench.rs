//! End-to-end: `mover bench` against real agents on loopback, and who may make an agent sink a
//! link test's bytes.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{mixed_tree, Cluster};
use mover::tls::{Identity, TlsPaths};
use mover_protocol::bench::{Bench, Probe, Sink};
use mover_protocol::{FrameHeader, Grant, Message, Outcome, MAX_FRAME_LEN};
use serde_json::Value;

/// Every regular file under `root` with its size and mtime, to show a tree was not touched.
fn listing(root: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.path().symlink_metadata().unwrap();
            if m.is_dir() {
                dirs.push(e.path());
            } else if m.is_file() {
                out.insert(e.path(), (m.len(), m.modified().unwrap()));
            }
        }
    }
    out
}

fn bench(c: &Cluster, args: &[&str]) -> (i32, Value, String) {
    let cluster = c.cluster_file();
    let out = common::mover()
        .args(["bench", "--cluster", cluster.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), json, stderr)
}

fn stage<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no stage {id} in {report:#}"))
}

fn float(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Nothing of the bench is left in a node's state directory.
fn assert_no_scratch(c: &Cluster, node: &str) {
    let state = c.state_dir(node);
    assert!(
        !state.join("bench").exists(),
        "{node} kept its scratch dataset"
    );
    let staging: Vec<_> = std::fs::read_dir(state.join("staging"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        staging.is_empty(),
        "{node} left {staging:?} in its staging area"
    );
}

#[test]
fn bench_measures_every_stage_of_a_chain_and_leaves_nothing_behind() {
    let c = Cluster::start(&["west1", "east1", "east2"]);
    mixed_tree(&c.data("west1"), 32 << 20);
    let before = listing(&c.data("west1"));
    let dataset: u64 = before.values().map(|(len, _)| len).sum();
    let (code, r, stderr) = bench(
        &c,
        &[
            "--from",
            "west1:data",
            "--to",
            "east1,east2",
            "--sample",
            "16M",
            "--link-bytes",
            "32M",
            "--link-seconds",
            "2",
            "--chunk-size",
            "1M",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{stderr}\n{r:#}");
    // Progress on stderr for the long steps.
    for step in ["reading up to", "link west1 -> east1", "end to end"] {
        assert!(stderr.contains(step), "no {step:?} in:\n{stderr}");
    }
    assert_eq!(r["dataset_bytes"].as_u64(), Some(dataset), "{r:#}");
    let sample = r["sample_bytes"].as_u64().unwrap();
    assert!(sample > 8 << 20 && sample <= 16 << 20, "sample {sample}");
    let ratio = float(&r["ratio"]);
    assert!(ratio > 1.2, "the sample tree compresses, ratio {ratio}");

    let ids = [
        "source_read:west1",
        "encode_1core:west1",
        "encode:west1",
        "link:west1->east1",
        "link:east1->east2",
        "decode_1core:east1",
        "decode:east1",
        "disk_write:east1",
        "decode_1core:east2",
        "decode:east2",
        "disk_write:east2",
        "end_to_end:west1->east1->east2",
    ];
    assert_eq!(r["stages"].as_array().unwrap().len(), ids.len(), "{r:#}");
    for id in ids {
        let s = stage(&r, id);
        for field in ["mb_per_s", "dataset_mb_per_s", "seconds"] {
            let v = float(&s[field]);
            assert!(v > 0.0 && v.is_finite(), "{id} {field} = {v}");
        }
        assert!(s["bytes"].as_u64().unwrap() > 0, "{id}");
    }
    // A link carries compressed frames: its dataset rate is its rate times the ratio.
    let link = stage(&r, "link:west1->east1");
    let factor = float(&link["dataset_mb_per_s"]) / float(&link["mb_per_s"]);
    assert!((factor - ratio).abs() < 1e-6, "{factor} vs {ratio}");
    // The end-to-end run sent the sample, for real.
    assert_eq!(
        stage(&r, "end_to_end:west1->east1->east2")["bytes"].as_u64(),
        Some(sample)
    );

    // The bottleneck is the slowest of the stages a transfer goes through at once.
    let b = &r["bottleneck"];
    let limiting: Vec<&Value> = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["limits"] == true)
        .collect();
    let named = limiting
        .iter()
        .find(|s| s["id"] == b["stage"])
        .unwrap_or_else(|| panic!("bottleneck {b} is not a stage"));
    let slowest = limiting
        .iter()
        .map(|s| float(&s["dataset_mb_per_s"]))
        .fold(f64::INFINITY, f64::min);
    assert!(
        (float(&named["dataset_mb_per_s"]) - slowest).abs() < 1e-6 * slowest,
        "{b} is not the slowest of {limiting:#?}"
    );

    // Estimates for the whole dataset, consistent with each other.
    let e = &r["estimates"];
    let secs = |t: &str| float(&e[t]["seconds"]);
    for t in ["chain", "star", "serial", "end_to_end"] {
        assert!(secs(t) > 0.0 && secs(t).is_finite(), "{t}: {e:#}");
    }
    let chain_rate = float(&e["chain"]["mb_per_s"]);
    assert!((secs("chain") - dataset as f64 / 1e6 / chain_rate).abs() < 1e-6 * secs("chain"));
    assert!(secs("serial") >= secs("chain"), "{e:#}");
    assert!(secs("star") >= secs("chain"), "{e:#}");
    assert_eq!(e["chain"]["limited_by"], b["stage"]);

    // No dataset was written on the targets, the source's is as it was, and no agent keeps a
    // scratch file or the scratch dataset.
    for t in ["east1", "east2"] {
        assert!(!c.data(t).exists(), "{t} got a dataset");
    }
    assert_eq!(listing(&c.data("west1")), before);
    for n in ["west1", "east1", "east2"] {
        assert_no_scratch(&c, n);
    }

    // The table names the bottleneck and the estimates.
    let (code, _, _) = bench(&c, &["--from", "west1:data", "--to", "east1", "--json"]);
    assert_eq!(code, 0);
    let out = common::mover()
        .args(["bench", "--cluster"])
        .arg(c.cluster_file())
        .args([
            "--from",
            "west1:data",
            "--to",
            "east1,east2",
            "--topology",
            "star",
        ])
        .args([
            "--sample",
            "8M",
            "--link-bytes",
            "8M",
            "--link-seconds",
            "1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "STAGE",
        "bottleneck:",
        "chain",
        "star",
        "serial",
        "west1 -> east2",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    for n in ["west1", "east1", "east2"] {
        assert_no_scratch(&c, n);
    }
}

#[test]
fn bench_says_what_went_wrong() {
    let mut c = Cluster::start(&["west1", "east1"]);
    std::fs::create_dir_all(c.data("west1")).unwrap();
    std::fs::write(c.data("west1").join("f"), b"some bytes").unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["--from", "west1:data", "--to", "east9"], "east9"),
        (
            &["--from", "west1:nope", "--to", "east1"],
            "unknown dataset \"nope\"",
        ),
        (&["--from", "west1:other", "--to", "east1"], "other"),
    ];
    for (args, says) in cases {
        let (code, _, stderr) = bench(&c, args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains(says),
            "{args:?} does not say {says:?}:\n{stderr}"
        );
    }
    c.stop_agent("east1", common::SIGTERM);
    let (code, _, stderr) = bench(&c, &["--from", "west1:data", "--to", "east1"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("could not reach the agent on east1"),
        "{stderr}"
    );
    assert_no_scratch(&c, "west1");
}

/// Connects to `node`'s agent with the certificate of `me` (a node, or `controller`).
async fn dial(c: &Cluster, me: &str, node: &str) -> (quinn::Endpoint, quinn::Connection, Identity) {
    let certs = c.path().join("certs");
    let id = Identity::load(&TlsPaths {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("{me}.pem")),
        key: certs.join(format!("{me}.key")),
    })
    .unwrap();
    let client = mover::tls::client_config(&id, Arc::new(mover::net::transport_config())).unwrap();
    let ep = mover::net::client_endpoint("127.0.0.1:0".parse().unwrap(), client).unwrap();
    let cluster = mover::config::ClusterConfig::load(&c.cluster_file()).unwrap();
    let addr = cluster.address(node).unwrap().parse().unwrap();
    let conn = mover::net::connect(&ep, None, addr, node).await.unwrap();
    (ep, conn, id)
}

/// A grant of `signer`'s for a link test of `bytes` from `from` to `to` on one connection.
fn sink_request(signer: &Identity, id: u64, from: &str, to: &str, bytes: u64) -> Sink {
    let not_after_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let mut sink = Sink {
        id,
        from: from.into(),
        to: to.into(),
        bytes,
        connections: 1,
        index: 0,
        grant: Grant {
            controller_cert: signer.cert_der().to_vec(),
            not_after_unix,
            signature: Vec::new(),
        },
    };
    sink.grant.signature = mover::tls::sign_grant(signer, &sink.grant_bytes()).unwrap();
    sink
}

/// Sends `first` and then `bytes` of data on a new stream, and returns the agent's answer.
async fn offer(conn: &quinn::Connection, first: Message, bytes: usize) -> Message {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&first.to_frame()).await.unwrap();
    // A refusal stops the stream: later writes may fail, and that is fine.
    let data = vec![0x5a; 64 << 10];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(data.len());
        if send.write_all(&data[..n]).await.is_err() {
            break;
        }
        left -= n;
    }
    let _ = send.finish();
    let answer = recv.read_to_end(1 << 20).await.unwrap();
    let mut buf = bytes::Bytes::from(answer);
    let header = FrameHeader::decode(&mut buf, MAX_FRAME_LEN).unwrap();
    Message::decode(header.kind, &mut buf.split_to(header.len as usize)).unwrap()
}

fn refusal(m: &Message) -> &str {
    match m {
        Message::Report {
            outcome: Outcome::Failed { reason, .. },
            ..
        } => reason,
        other => panic!("not a refusal: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_controller_grant_makes_an_agent_sink_link_test_data() {
    let c = Cluster::start(&["west1", "east1", "east2"]);
    let controller = dial(&c, "controller", "east1").await.2;
    let (_ep, conn, west1) = dial(&c, "west1", "east1").await;
    let mb = 1 << 20;

    // A grant west1 signed itself, in a perfect imitation of the controller's.
    let forged = sink_request(&west1, 1, "west1", "east1", mb);
    let answer = offer(&conn, Message::Sink(forged), mb as usize).await;
    let reason = refusal(&answer);
    assert!(
        reason.contains("not granted by the cluster's controller"),
        "{reason}"
    );

    // Nor may a node ask an agent to run a link test (or any probe) itself.
    let probe = Bench {
        id: 2,
        probe: Probe::Link {
            to: "east2".into(),
            address: "127.0.0.1:1".into(),
            bytes: mb,
            millis: 1000,
            connections: 1,
            grant: sink_request(&west1, 2, "east1", "east2", mb).grant,
        },
    };
    let answer = offer(&conn, Message::Bench(probe), 0).await;
    assert!(
        refusal(&answer).contains("node west1 may not send bench"),
        "{answer:?}"
    );

    // A controller's grant for another upstream does not do for west1.
    let others = sink_request(&controller, 3, "east2", "east1", mb);
    let answer = offer(&conn, Message::Sink(others), 1000).await;
    assert!(refusal(&answer).contains("not from west1"), "{answer:?}");

    // The controller's grant for this very test is taken: the checks above could fail.
    let granted = sink_request(&controller, 4, "west1", "east1", mb);
    match offer(&conn, Message::Sink(granted.clone()), mb as usize).await {
        Message::SinkDone { node, bytes, .. } => {
            assert_eq!((node.as_str(), bytes), ("east1", mb));
        }
        other => panic!("the granted test was refused: {other:?}"),
    }
    // Once.
    let answer = offer(&conn, Message::Sink(granted), 10).await;
    assert!(refusal(&answer).contains("already ran"), "{answer:?}");
    // And never past its bound.
    let small = sink_request(&controller, 5, "west1", "east1", 1000);
    let answer = offer(&conn, Message::Sink(small), 5000).await;
    assert!(
        refusal(&answer).contains("more than the 1000 bytes"),
        "{answer:?}"
    );
    assert_no_scratch(&c, "east1");
}
