//! A real agent (east1) in this process, and rogue peers that hold valid certificates of its
//! cluster (west1, east2) and speak the protocol by hand, well or badly. The `Open`s they send
//! carry a grant signed with the cluster controller's key (unless a test says otherwise), as a
//! plan's parent would pass it on from the controller's `Start`.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mover::config::{AgentConfig, DatasetConfig};
use mover::tls::{Identity, TlsPaths};
use mover_protocol::hash::{chunk_hash, file_root, tree_digest};
use mover_protocol::{
    Chunk, Encoding, Entry, EntryKind, FrameHeader, Grant, Message, Method, Open, Outcome, Plan,
    PlanNode, FRAME_HEADER_LEN,
};

/// Nodes with certificates from the cluster CA; only east1 runs an agent.
pub const NODES: [&str; 3] = ["west1", "east1", "east2"];

/// The transfer id most tests use.
pub const TRANSFER: u64 = 7;

pub struct Agent {
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

pub fn tls(dir: &Path, node: &str) -> TlsPaths {
    TlsPaths {
        ca: dir.join("certs/ca.pem"),
        cert: dir.join(format!("certs/{node}.pem")),
        key: dir.join(format!("certs/{node}.key")),
    }
}

#[path = "../../../tests/common/port.rs"]
mod port;

pub fn free_addr() -> SocketAddr {
    format!("127.0.0.1:{}", port::free_port()).parse().unwrap()
}

/// Starts east1 with one dataset, `data`, at `DIR/east1/data` (not created).
pub async fn start_east1() -> Agent {
    start_east1_with(|_, _| {}).await
}

/// Starts east1 as [`start_east1`] does, with its config changed by `edit` first (which gets
/// the test's directory).
pub async fn start_east1_with(edit: impl FnOnce(&Path, &mut AgentConfig)) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<String> = NODES.iter().map(|n| n.to_string()).collect();
    mover::certs::init(&dir.path().join("certs"), &nodes).unwrap();
    let addr = free_addr();
    let mut datasets = BTreeMap::new();
    datasets.insert(
        "data".to_owned(),
        DatasetConfig {
            path: dir.path().join("east1/data"),
        },
    );
    std::fs::create_dir_all(dir.path().join("east1")).unwrap();
    let mut cfg = AgentConfig {
        node: "east1".into(),
        listen: addr,
        state_dir: dir.path().join("east1/state"),
        tls: tls(dir.path(), "east1"),
        datasets,
        workers: None,
        hooks: None,
        io: None,
        source_cache: Default::default(),
        staging_writes: Default::default(),
        staging_verify: Default::default(),
    };
    edit(dir.path(), &mut cfg);
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
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The agent's `data` dataset.
    pub fn data(&self) -> PathBuf {
        self.path().join("east1/data")
    }

    pub async fn stop(mut self) -> tempfile::TempDir {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("agent stops")
            .unwrap();
        self.dir
    }
}

/// A client endpoint holding `node`'s certificate and key.
pub fn client(agent: &Agent, node: &str) -> quinn::Endpoint {
    let id = Identity::load(&tls(agent.path(), node)).unwrap();
    let client = mover::tls::client_config(&id, Arc::new(mover::net::transport_config())).unwrap();
    mover::net::client_endpoint("127.0.0.1:0".parse().unwrap(), client).unwrap()
}

/// Connects to east1 as `node`, a legitimate member of the cluster that may behave badly.
pub async fn connect_as(agent: &Agent, node: &str) -> (quinn::Endpoint, quinn::Connection) {
    let ep = client(agent, node);
    let conn = mover::net::connect(&ep, None, agent.addr, "east1")
        .await
        .unwrap();
    (ep, conn)
}

/// Connects to east1 as west1, the parent in [`plan_to_east1`].
pub async fn rogue(agent: &Agent) -> (quinn::Endpoint, quinn::Connection) {
    connect_as(agent, "west1").await
}

/// A server endpoint holding `node`'s certificate, listening where a plan may send the agent.
pub fn listener(agent: &Agent, node: &str) -> quinn::Endpoint {
    let id = Identity::load(&tls(agent.path(), node)).unwrap();
    let server = mover::tls::server_config(&id, Arc::new(mover::net::transport_config())).unwrap();
    mover::net::server_endpoint("127.0.0.1:0".parse().unwrap(), server).unwrap()
}

/// Counts the connection attempts an endpoint receives, and how many complete the handshake.
pub struct Watcher {
    attempts: Arc<AtomicUsize>,
    established: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

pub fn watch(ep: &quinn::Endpoint) -> Watcher {
    let attempts = Arc::new(AtomicUsize::new(0));
    let established = Arc::new(AtomicUsize::new(0));
    let (ep, a, e) = (ep.clone(), attempts.clone(), established.clone());
    let task = tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let e = e.clone();
            tokio::spawn(async move {
                if incoming.await.is_ok() {
                    e.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    Watcher {
        attempts,
        established,
        task,
    }
}

impl Watcher {
    pub fn attempts(&self) -> usize {
        self.attempts.load(Ordering::SeqCst)
    }

    pub fn established(&self) -> usize {
        self.established.load(Ordering::SeqCst)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn plan_node(name: &str, address: &str, parent: Option<u16>) -> PlanNode {
    PlanNode {
        name: name.into(),
        address: address.into(),
        dataset: "data".into(),
        parent,
    }
}

/// west1 -> east1, both on the `data` dataset.
pub fn plan_to_east1() -> Plan {
    Plan::from_nodes(vec![
        plan_node("west1", "127.0.0.1:1", None),
        plan_node("east1", "127.0.0.1:1", Some(0)),
    ])
    .unwrap()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Signs `open`'s grant as it stands (certificate and expiry) with `signer`'s key.
pub fn sign(agent: &Agent, signer: &str, open: &mut Open) {
    let id = Identity::load(&tls(agent.path(), signer)).unwrap();
    open.grant.signature = mover::tls::sign_grant(&id, &open.grant_bytes()).unwrap();
}

/// The grant's certificate and expiry, not yet signed: `cert_of`'s certificate (the file stem
/// in the cluster's certificates, `controller` for the controller), valid for an hour.
pub fn unsigned_grant(agent: &Agent, cert_of: &str) -> Grant {
    let id = Identity::load(&tls(agent.path(), cert_of)).unwrap();
    Grant {
        controller_cert: id.cert_der().to_vec(),
        not_after_unix: unix_now() + 3600,
        signature: Vec::new(),
    }
}

/// An `Open` with a grant the cluster's controller signed.
pub fn granted_open(agent: &Agent, transfer_id: u64, chunk_size: u32, plan: Plan) -> Open {
    let mut open = Open {
        transfer_id,
        chunk_size,
        connections: 1,
        method: Method::Files,
        plan,
        grant: unsigned_grant(agent, "controller"),
    };
    sign(agent, "controller", &mut open);
    open
}

pub fn open_with(agent: &Agent, transfer_id: u64, chunk_size: u32, plan: Plan) -> Bytes {
    Message::Open(granted_open(agent, transfer_id, chunk_size, plan)).to_frame()
}

/// Open for transfer [`TRANSFER`] along [`plan_to_east1`].
pub fn open_frame(agent: &Agent, chunk_size: u32) -> Bytes {
    open_with(agent, TRANSFER, chunk_size, plan_to_east1())
}

/// Reads the next message; the error says why there is none (end of stream, lost connection,
/// bad frame).
pub async fn next_message(recv: &mut quinn::RecvStream) -> Result<Message, String> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut head)
        .await
        .map_err(|e| e.to_string())?;
    let h = FrameHeader::decode(&mut &head[..], 1 << 20).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; h.len as usize];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Message::decode(h.kind, &mut Bytes::from(body)).map_err(|e| e.to_string())
}

pub async fn read_message(recv: &mut quinn::RecvStream) -> Option<Message> {
    next_message(recv).await.ok()
}

/// Reads until east1 reports, within `secs`, and returns the failure reason.
pub async fn failure_reason_within(recv: &mut quinn::RecvStream, secs: u64) -> String {
    let read = async {
        loop {
            match next_message(recv).await {
                Ok(Message::Report {
                    outcome: Outcome::Failed { reason, .. },
                    ..
                }) => return reason,
                Ok(Message::Report { outcome, .. }) => panic!("unexpected outcome {outcome:?}"),
                Ok(_) => continue,
                Err(e) => panic!("no report: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(secs), read)
        .await
        .expect("a report in time")
}

/// Reads until east1 reports, and returns the failure reason.
pub async fn failure_reason(recv: &mut quinn::RecvStream) -> String {
    failure_reason_within(recv, 20).await
}

/// Waits for `Ready` and returns what east1 sent before it (what it holds, reports of nodes
/// below it); east1's own failure report is returned as its reason.
pub async fn wait_ready(recv: &mut quinn::RecvStream) -> Result<Vec<Message>, String> {
    let read = async {
        let mut early = Vec::new();
        loop {
            match read_message(recv).await {
                Some(Message::Ready) => return Ok(early),
                Some(Message::Report {
                    node,
                    outcome: Outcome::Failed { reason, .. },
                }) if node == "east1" => return Err(reason),
                Some(m @ Message::Report { .. }) if !matches!(&m, Message::Report { node, .. } if node == "east1") => {
                    early.push(m)
                }
                Some(Message::Report { outcome, .. }) => panic!("report before ready: {outcome:?}"),
                Some(m) => early.push(m),
                None => panic!("stream ended before ready"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("ready in time")
}

/// Reads until `node` reports and returns its outcome, skipping everything else.
pub async fn outcome_of(recv: &mut quinn::RecvStream, node: &str) -> Outcome {
    let read = async {
        loop {
            match read_message(recv).await {
                Some(Message::Report { node: n, outcome }) if n == node => return outcome,
                Some(_) => continue,
                None => panic!("stream ended before {node} reported"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("a report in time")
}

pub fn entry(path: &str, kind: EntryKind) -> Entry {
    Entry {
        path: path.as_bytes().to_vec().into(),
        kind,
        mode: 0o644,
        mtime_sec: 0,
        mtime_nsec: 0,
    }
}

pub fn dir(path: &str) -> Entry {
    Entry {
        mode: 0o755,
        ..entry(path, EntryKind::Dir)
    }
}

pub fn file(path: &str, size: u64) -> Entry {
    entry(path, EntryKind::File { size })
}

/// A dataset of one file, as a well-behaved parent sends it: the manifest, the file's one
/// chunk, and the tree digest for `End`.
pub struct OneFile {
    pub name: String,
    pub content: &'static [u8],
    pub entries: Vec<Entry>,
    pub chunk: Chunk,
    pub digest: [u8; 32],
}

/// `content` must be at most one chunk long.
pub fn one_file(name: &str, content: &'static [u8]) -> OneFile {
    let len = content.len() as u64;
    let hash = chunk_hash(content, 0, len);
    let root = file_root(&[hash]);
    OneFile {
        name: name.to_owned(),
        content,
        entries: vec![dir(""), file(name, len)],
        chunk: Chunk {
            file: 1,
            offset: 0,
            raw_len: content.len() as u32,
            encoding: Encoding::Raw,
            hash,
            payload: Bytes::from_static(content),
        },
        digest: tree_digest([(1u32, &root)]),
    }
}

/// Sends a manifest and its totals, as declared by the entries themselves.
pub async fn send_manifest_frames(send: &mut quinn::SendStream, entries: Vec<Entry>) {
    let n = entries.len() as u64;
    let total_bytes = entries.iter().map(Entry::size).sum();
    send.write_all(&Message::ManifestPart(entries).to_frame())
        .await
        .unwrap();
    send.write_all(
        &Message::ManifestEnd {
            entries: n,
            total_bytes,
        }
        .to_frame(),
    )
    .await
    .unwrap();
}

/// After `Ready`: one data stream with the file's chunk; once east1 says what it needs (here:
/// nothing), `End` on the control stream.
pub async fn feed(
    conn: &quinn::Connection,
    control: &mut quinn::SendStream,
    events: &mut quinn::RecvStream,
    transfer_id: u64,
    f: &OneFile,
) {
    let mut data = conn.open_uni().await.unwrap();
    data.write_all(&Message::Attach { transfer_id }.to_frame())
        .await
        .unwrap();
    data.write_all(&Message::Chunk(f.chunk.clone()).to_frame())
        .await
        .unwrap();
    data.finish().unwrap();
    let needs = async {
        loop {
            match read_message(events).await {
                Some(Message::Need { done: true, .. }) => return,
                Some(Message::Report { outcome, .. }) => panic!("report before needs: {outcome:?}"),
                Some(_) => continue,
                None => panic!("stream ended before east1 said what it needs"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), needs)
        .await
        .expect("needs in time");
    control
        .write_all(
            &Message::End {
                chunks: 1,
                digest: f.digest,
            }
            .to_frame(),
        )
        .await
        .unwrap();
}

/// Proves the agent still serves: a whole valid transfer from west1 commits, and the dataset
/// then holds exactly what was sent.
pub async fn prove_alive(agent: &Agent, transfer_id: u64) {
    let f = one_file("alive", b"still serving valid requests");
    let (_ep, conn) = rogue(agent).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&open_with(agent, transfer_id, 1 << 16, plan_to_east1()))
        .await
        .unwrap();
    send_manifest_frames(&mut send, f.entries.clone()).await;
    wait_ready(&mut recv).await.expect("east1 gets ready");
    feed(&conn, &mut send, &mut recv, transfer_id, &f).await;
    let outcome = outcome_of(&mut recv, "east1").await;
    assert!(
        matches!(outcome, Outcome::Committed { files: 1, .. }),
        "the agent no longer serves a valid transfer: {outcome:?}"
    );
    assert_eq!(
        std::fs::read(agent.data().join(&f.name)).unwrap(),
        f.content
    );
    let names: Vec<_> = std::fs::read_dir(agent.data()).unwrap().collect();
    assert_eq!(names.len(), 1, "only what was sent: {names:?}");
    assert!(staging_is_empty(agent.path()), "staging left after commit");
}

pub fn staging_is_empty(root: &Path) -> bool {
    let s: PathBuf = root.join("east1/state/staging");
    std::fs::read_dir(&s)
        .map(|d| d.count() == 0)
        .unwrap_or(true)
}

/// Nothing was created: no dataset, no file beside it, no staging area (in the state
/// directory or beside the dataset).
pub fn assert_nothing_written(root: &Path) {
    assert!(!root.join("east1/data").exists(), "the dataset was created");
    assert!(!root.join("escape").exists() && !root.join("east1/escape").exists());
    let east1: Vec<_> = std::fs::read_dir(root.join("east1"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "state")
        .collect();
    assert!(east1.is_empty(), "written beside the dataset: {east1:?}");
    assert!(staging_is_empty(root), "staging left behind");
}
