//! A rogue parent with a valid node certificate feeds a real agent hostile input: the agent
//! refuses it with a clear error, writes nothing outside its staging area, and leaves no
//! staging behind.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mover::config::{AgentConfig, DatasetConfig};
use mover::tls::{Identity, TlsPaths};
use mover_protocol::{
    Chunk, Encoding, Entry, EntryKind, FrameHeader, Message, Open, Outcome, Plan, PlanNode,
    FRAME_HEADER_LEN,
};

struct Agent {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

fn tls(dir: &Path, node: &str) -> TlsPaths {
    TlsPaths {
        ca: dir.join("certs/ca.pem"),
        cert: dir.join(format!("certs/{node}.pem")),
        key: dir.join(format!("certs/{node}.key")),
    }
}

async fn start_east1() -> Agent {
    let dir = tempfile::tempdir().unwrap();
    mover::certs::init(&dir.path().join("certs"), &["west1".into(), "east1".into()]).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut datasets = BTreeMap::new();
    datasets.insert(
        "data".to_owned(),
        DatasetConfig {
            path: dir.path().join("east1/data"),
        },
    );
    std::fs::create_dir_all(dir.path().join("east1")).unwrap();
    let cfg = AgentConfig {
        node: "east1".into(),
        listen: addr,
        state_dir: dir.path().join("east1/state"),
        tls: tls(dir.path(), "east1"),
        datasets,
        workers: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        mover::agent::run(cfg, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    Agent {
        dir,
        addr,
        stop: Some(tx),
        task,
    }
}

impl Agent {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    async fn stop(mut self) -> tempfile::TempDir {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("agent stops")
            .unwrap();
        self.dir
    }
}

/// Connects to east1 as west1, a legitimate node that behaves badly.
async fn rogue(agent: &Agent) -> (quinn::Endpoint, quinn::Connection) {
    let id = Identity::load(&tls(agent.path(), "west1")).unwrap();
    let client = mover::tls::client_config(&id, Arc::new(mover::net::transport_config())).unwrap();
    let ep = mover::net::client_endpoint("127.0.0.1:0".parse().unwrap(), client).unwrap();
    let conn = mover::net::connect(&ep, agent.addr, "east1").await.unwrap();
    (ep, conn)
}

fn open_frame(chunk_size: u32) -> Bytes {
    let node = |name: &str, parent| PlanNode {
        name: name.into(),
        address: "127.0.0.1:1".into(),
        dataset: "data".into(),
        parent,
    };
    let plan = Plan::from_nodes(vec![node("west1", None), node("east1", Some(0))]).unwrap();
    Message::Open(Open {
        transfer_id: 7,
        chunk_size,
        connections: 1,
        plan,
    })
    .to_frame()
}

async fn read_message(recv: &mut quinn::RecvStream) -> Option<Message> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut head).await.ok()?;
    let h = FrameHeader::decode(&mut &head[..], 1 << 20).ok()?;
    let mut body = vec![0u8; h.len as usize];
    recv.read_exact(&mut body).await.ok()?;
    Message::decode(h.kind, &mut Bytes::from(body)).ok()
}

/// Reads until east1 reports, and returns the failure reason.
async fn failure_reason(recv: &mut quinn::RecvStream) -> String {
    let read = async {
        loop {
            match read_message(recv).await {
                Some(Message::Report {
                    outcome: Outcome::Failed { reason, .. },
                    ..
                }) => return reason,
                Some(Message::Report { outcome, .. }) => panic!("unexpected outcome {outcome:?}"),
                Some(_) => continue,
                None => panic!("stream ended without a report"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("a report in time")
}

fn entry(path: &str, kind: EntryKind) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind,
        mode: 0o644,
        mtime_sec: 0,
        mtime_nsec: 0,
    }
}

fn dir(path: &str) -> Entry {
    entry(path, EntryKind::Dir)
}

fn file(path: &str, size: u64) -> Entry {
    entry(path, EntryKind::File { size })
}

fn staging_is_empty(root: &Path) -> bool {
    let s: PathBuf = root.join("east1/state/staging");
    std::fs::read_dir(&s)
        .map(|d| d.count() == 0)
        .unwrap_or(true)
}

async fn send_manifest(entries: Vec<Entry>) -> (String, tempfile::TempDir) {
    let agent = start_east1().await;
    let (_ep, conn) = rogue(&agent).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&open_frame(1 << 20)).await.unwrap();
    let total = entries.iter().map(Entry::size).sum();
    let n = entries.len() as u64;
    send.write_all(&Message::ManifestPart(entries).to_frame())
        .await
        .unwrap();
    send.write_all(
        &Message::ManifestEnd {
            entries: n,
            total_bytes: total,
        }
        .to_frame(),
    )
    .await
    .unwrap();
    let reason = failure_reason(&mut recv).await;
    let dir = agent.stop().await;
    (reason, dir)
}

fn assert_nothing_written(root: &Path) {
    assert!(!root.join("east1/data").exists(), "the dataset was created");
    assert!(!root.join("escape").exists() && !root.join("east1/escape").exists());
    assert!(staging_is_empty(root), "staging left behind");
}

#[tokio::test]
async fn manifest_with_dot_dot_is_refused() {
    let (reason, dir) = send_manifest(vec![dir(""), dir("a"), file("a/../../escape", 5)]).await;
    assert!(reason.contains("'..' component"), "{reason}");
    assert_nothing_written(dir.path());
}

#[tokio::test]
async fn manifest_with_absolute_path_is_refused() {
    let target = tempfile::tempdir().unwrap();
    let abs = target.path().join("planted");
    let (reason, dir) = send_manifest(vec![dir(""), file(abs.to_str().unwrap(), 5)]).await;
    assert!(reason.contains("absolute path"), "{reason}");
    assert!(!abs.exists());
    assert_nothing_written(dir.path());
}

#[tokio::test]
async fn manifest_through_a_symlink_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let link = entry(
        "l",
        EntryKind::Symlink {
            target: outside.path().as_os_str().as_encoded_bytes().to_vec(),
        },
    );
    let (reason, dir) = send_manifest(vec![dir(""), link, file("l/planted", 5)]).await;
    assert!(
        reason.contains("no directory") && reason.contains("l/planted"),
        "{reason}"
    );
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "wrote through the link"
    );
    assert_nothing_written(dir.path());
}

#[tokio::test]
async fn manifest_with_duplicate_paths_is_refused() {
    let (reason, dir) = send_manifest(vec![dir(""), file("x", 1), file("x", 2)]).await;
    assert!(reason.contains("listed twice"), "{reason}");
    assert_nothing_written(dir.path());
}

#[tokio::test]
async fn a_chunk_for_a_file_not_in_the_manifest_fails_the_transfer_and_cleans_up() {
    let agent = start_east1().await;
    let (_ep, conn) = rogue(&agent).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&open_frame(1 << 16)).await.unwrap();
    send.write_all(&Message::ManifestPart(vec![dir(""), file("f", 10)]).to_frame())
        .await
        .unwrap();
    send.write_all(
        &Message::ManifestEnd {
            entries: 2,
            total_bytes: 10,
        }
        .to_frame(),
    )
    .await
    .unwrap();
    let ready = tokio::time::timeout(Duration::from_secs(10), read_message(&mut recv))
        .await
        .unwrap();
    assert_eq!(ready, Some(Message::Ready));
    assert!(
        !staging_is_empty(agent.path()),
        "staging exists while receiving"
    );
    let mut data = conn.open_uni().await.unwrap();
    data.write_all(&Message::Attach { transfer_id: 7 }.to_frame())
        .await
        .unwrap();
    let bogus = Chunk {
        file: 99,
        offset: 0,
        raw_len: 10,
        encoding: Encoding::Raw,
        hash: [0; 32],
        payload: Bytes::from_static(b"0123456789"),
    };
    data.write_all(&Message::Chunk(bogus).to_frame())
        .await
        .unwrap();
    data.finish().unwrap();
    send.write_all(
        &Message::End {
            chunks: 1,
            digest: [0; 32],
        }
        .to_frame(),
    )
    .await
    .unwrap();
    let reason = failure_reason(&mut recv).await;
    assert!(
        reason.contains("file id 99 is not in the manifest"),
        "{reason}"
    );
    let dir = agent.stop().await;
    assert_nothing_written(dir.path());
}

#[tokio::test]
async fn a_frame_larger_than_allowed_is_refused_before_it_is_read() {
    let agent = start_east1().await;
    let (_ep, conn) = rogue(&agent).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&open_frame(1 << 16)).await.unwrap();
    // A manifest part declaring a 3 GiB body: refused from its header alone.
    let mut head = Vec::new();
    FrameHeader {
        kind: 5,
        len: 3 << 30,
    }
    .encode(&mut head);
    send.write_all(&head).await.unwrap();
    let reason = failure_reason(&mut recv).await;
    assert!(reason.contains("frame body is"), "{reason}");
    let dir = agent.stop().await;
    assert_nothing_written(dir.path());
}
