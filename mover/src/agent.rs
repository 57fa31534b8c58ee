//! The agent: one long-running process per database host that sends, receives and relays
//! transfers for the datasets its own configuration names.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mover_protocol::{manifest_frame_budget, Message, Open, Outcome};
use quinn::RecvStream;
use rustls::pki_types::UnixTime;
use rustls::RootCertStore;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::config::AgentConfig;
use crate::frame::read_message;
use crate::link::close;
use crate::tls::{Identity, Peer};

/// How long shutdown waits for in-flight transfers to clean up their staging areas.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long the socket stays open after every connection is closed (see [`run`]).
const SHUTDOWN_LINGER: Duration = Duration::from_millis(1500);

/// Why the agent could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Net(#[from] crate::net::NetError),
    #[error("certificate {cert} names {cert_name}, but the config says node = {node:?}: use the certificate made for {node}")]
    NameMismatch {
        cert: String,
        cert_name: String,
        node: String,
    },
    #[error("create state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Disk(#[from] crate::disk::DiskError),
    #[error("choose the disk I/O back end: {0}")]
    IoChoice(String),
}

/// A receiver waiting for its parent's data streams.
pub(crate) struct Registration {
    pub parent: String,
    pub streams: mpsc::Sender<RecvStream>,
    /// Connections the parent opens for the transfer (each gets a share of the window).
    pub connections: u8,
    /// Which receive registered (a transfer may be received again after a re-link).
    pub generation: u64,
}

/// A receive in progress into one of this agent's datasets.
pub(crate) struct Active {
    pub generation: u64,
    pub transfer_id: u64,
    /// The parent's connection: closing it stops that receive.
    pub conn: quinn::Connection,
    /// Resolves when that receive has let go of its staging area.
    pub released: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// What every task of this agent shares.
pub(crate) struct Ctx {
    pub node: String,
    pub cfg: AgentConfig,
    /// The cluster CA, which the controller's grants must chain to.
    pub roots: Arc<RootCertStore>,
    pub endpoint: quinn::Endpoint,
    /// How to dial agents on this host (see [`crate::net::loopback_transport_config`]).
    pub loopback_client: Option<quinn::ClientConfig>,
    pub registry: Mutex<HashMap<u64, Registration>>,
    /// Receives in progress, by dataset name: one at a time per dataset.
    pub active: Mutex<HashMap<String, Active>>,
    /// Transfers replaced by a newer one into the same dataset (the latest few): their
    /// senders may not bring them back.
    pub replaced: Mutex<std::collections::VecDeque<u64>>,
    generations: std::sync::atomic::AtomicU64,
    /// Transfers this agent committed since it started, with what it reported: a replayed
    /// grant cannot run one again, and a node linking in again past a dead relay learns that
    /// this one finished.
    committed: Mutex<HashMap<u64, Outcome>>,
    pub faults: crate::fault::Faults,
    /// The hook steps run for the controller, recorded under the state directory.
    pub ledger: crate::hookrun::Ledger,
    /// Reads source chunks and writes received ones.
    pub disk: Arc<dyn crate::disk::Disk>,
    /// What `mover bench` probes share.
    pub bench: crate::bench::AgentBench,
}

impl Ctx {
    /// A number no other receive of this agent has.
    pub fn next_generation(&self) -> u64 {
        self.generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Checks that the cluster's controller granted the transfer `open` belongs to; the reason
    /// to refuse it otherwise. A valid certificate lets a node send `Open`, but only the
    /// controller may start a transfer.
    pub fn check_grant(&self, open: &Open) -> Result<(), String> {
        crate::tls::verify_grant(
            &self.roots,
            &open.grant,
            &open.grant_bytes(),
            UnixTime::now(),
        )
        .map_err(|e| {
            format!(
                "{} refused: the transfer is not signed by the cluster's controller: {e}",
                self.node
            )
        })
    }

    /// What this agent reported when it committed `transfer_id`, if it did. A rerun gets a new
    /// transfer id from the controller, and a re-link reuses the id: a node that kept the grant
    /// of a committed transfer gets this report back instead of running it again.
    pub fn committed(&self, transfer_id: u64) -> Option<Outcome> {
        self.committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&transfer_id)
            .cloned()
    }

    /// Records that this agent committed `transfer_id`, and what it reported.
    pub fn note_committed(&self, transfer_id: u64, outcome: &Outcome) {
        self.committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(transfer_id, outcome.clone());
    }
}

/// Runs the agent until `shutdown` completes, then closes every connection (in-flight
/// transfers fail on their controllers with "agent shutting down") and waits, bounded, for
/// transfers to remove their staging areas.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let identity = Identity::load(&cfg.tls)?;
    if identity.name() != cfg.node {
        return Err(AgentError::NameMismatch {
            cert: cfg.tls.cert.display().to_string(),
            cert_name: identity.name().to_owned(),
            node: cfg.node.clone(),
        });
    }
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| AgentError::StateDir {
        path: cfg.state_dir.display().to_string(),
        source,
    })?;
    crate::backup::remove_leftovers(&cfg.state_dir);
    let mut cfg = cfg;
    crate::bench::install(&mut cfg);
    let disk = crate::disk::open(cfg.io_choice().map_err(AgentError::IoChoice)?)?;
    if cfg.source_cache == crate::disk::SourceCache::Drop {
        tracing::info!(
            "source_cache = \"drop\": source reads try RWF_DONTCACHE, else posix_fadvise(DONTNEED)"
        );
    }
    match cfg.staging_writes {
        crate::staging::StagingWrites::Direct => {
            tracing::info!("staging writes: O_DIRECT where the filesystem takes it")
        }
        crate::staging::StagingWrites::Cached => {
            tracing::info!("staging writes: through the page cache, as configured")
        }
    }
    match cfg.staging_verify {
        crate::staging::StagingVerify::Memory => {
            tracing::info!("staging checks: each chunk hashed in memory before it is written")
        }
        crate::staging::StagingVerify::ReadBack => tracing::info!(
            "staging checks: each chunk read back from staging after it is written, as configured"
        ),
    }
    let transport = Arc::new(crate::net::transport_config());
    let server = crate::tls::server_config(&identity, transport.clone())?;
    let client = crate::tls::client_config(&identity, transport)?;
    let loopback_client = match crate::net::loopback_transport_config() {
        Some(t) => Some(crate::tls::client_config(&identity, Arc::new(t))?),
        None => None,
    };
    let mut endpoint = crate::net::server_endpoint(cfg.listen, server)?;
    endpoint.set_default_client_config(client);
    tracing::info!(node = %cfg.node, listen = %cfg.listen, "agent listening");
    let ledger = crate::hookrun::Ledger::new(&cfg.state_dir);
    let ctx = Arc::new(Ctx {
        node: cfg.node.clone(),
        cfg,
        roots: identity.roots(),
        endpoint: endpoint.clone(),
        loopback_client,
        registry: Mutex::new(HashMap::new()),
        active: Mutex::new(HashMap::new()),
        replaced: Mutex::new(std::collections::VecDeque::new()),
        generations: std::sync::atomic::AtomicU64::new(1),
        committed: Mutex::new(HashMap::new()),
        faults: crate::fault::Faults::from_env(),
        ledger,
        disk,
        bench: crate::bench::AgentBench::default(),
    });
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => { tasks.spawn(serve_connection(ctx.clone(), incoming)); }
                None => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    tracing::info!("agent shutting down");
    endpoint.close(close::SHUTDOWN.into(), b"agent shutting down");
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    // A peer busy receiving may have dropped our one CONNECTION_CLOSE. Keep the socket open a
    // little longer: its next packets are answered (by a close, or a stateless reset once the
    // connection is gone), so it learns now rather than after its idle timeout.
    tokio::time::sleep(SHUTDOWN_LINGER).await;
    drop(endpoint);
    Ok(())
}

async fn serve_connection(ctx: Arc<Ctx>, incoming: quinn::Incoming) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "refused a connection");
            return;
        }
    };
    let peer = match crate::tls::peer_of(&conn) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "refused a peer without a usable certificate");
            conn.close(close::FAILED.into(), b"unusable certificate");
            return;
        }
    };
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => { tasks.spawn(serve_control(ctx.clone(), conn.clone(), peer.clone(), send, recv)); }
                Err(_) => break,
            },
            uni = conn.accept_uni() => match uni {
                Ok(recv) => { tasks.spawn(serve_data(ctx.clone(), conn.clone(), peer.clone(), recv)); }
                Err(_) => break,
            },
        }
    }
    tracing::debug!(%peer, reason = ?conn.close_reason(), "connection ended");
    while tasks.join_next().await.is_some() {}
}

async fn serve_control(
    ctx: Arc<Ctx>,
    conn: quinn::Connection,
    peer: Peer,
    mut send: quinn::SendStream,
    mut recv: RecvStream,
) {
    let first = match read_message(&mut recv, manifest_frame_budget()).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "bad first frame on a control stream");
            return;
        }
    };
    match (first, peer) {
        (Message::Start(start), Peer::Controller) => {
            if start.plan.source().name != ctx.node {
                crate::link::refuse(
                    &mut send,
                    &ctx.node,
                    format!(
                        "this agent is {}, not the plan's source {}",
                        ctx.node,
                        start.plan.source().name
                    ),
                )
                .await;
                return;
            }
            tracing::info!(transfer = start.transfer_id, dataset = %start.plan.source().dataset, "starting transfer as source");
            let (up_tx, up_rx) = mpsc::channel(1024);
            let pump = tokio::spawn(crate::link::pump_up(up_rx, send));
            crate::source::run(ctx, start, up_tx).await;
            let _ = pump.await;
        }
        (Message::Hook(hook), Peer::Controller) => {
            tracing::info!(runbook = %hook.runbook, step = hook.step, action = %hook.action, "hook asked for");
            crate::hookrun::serve(ctx, conn, hook, send).await;
        }
        (Message::Bench(bench), Peer::Controller) => {
            crate::bench::serve(ctx, conn, bench, send).await;
        }
        (Message::Sink(sink), Peer::Node(from)) => {
            crate::bench::sink(ctx, from, sink, send, recv).await;
        }
        (Message::Open(open), Peer::Node(parent)) => {
            tracing::info!(transfer = open.transfer_id, %parent, "receiving transfer");
            crate::receiver::run(ctx, open, parent, conn, send, recv).await;
        }
        (m, p) => {
            crate::link::refuse(
                &mut send,
                &ctx.node,
                format!("{p} may not send {} here", m.name()),
            )
            .await;
        }
    }
}

async fn serve_data(ctx: Arc<Ctx>, conn: quinn::Connection, peer: Peer, mut recv: RecvStream) {
    let transfer_id = match read_message(&mut recv, 64).await {
        Ok(Message::Attach { transfer_id }) => transfer_id,
        Ok(m) => {
            tracing::warn!(%peer, got = m.name(), "data stream did not start with attach");
            return;
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "bad data stream");
            return;
        }
    };
    let tx = {
        let reg = ctx.registry.lock().unwrap_or_else(|p| p.into_inner());
        match reg.get(&transfer_id) {
            Some(r) if Peer::Node(r.parent.clone()) == peer => {
                Some((r.streams.clone(), r.connections))
            }
            _ => None,
        }
    };
    match tx {
        Some((tx, connections)) => {
            tracing::debug!(%peer, transfer_id, "data stream attached");
            // What this node holds unread, over all the connections from its parent.
            let window = crate::net::window_for(usize::from(connections));
            conn.set_receive_window(quinn::VarInt::from_u32(window));
            let _ = tx.send(recv).await;
        }
        None => {
            tracing::warn!(%peer, transfer_id, "refused a data stream for a transfer it does not feed");
            let _ = recv.stop(close::FAILED.into());
        }
    }
}
