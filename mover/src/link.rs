//! Links to children in a transfer plan: dialing, the control stream, data streams, and the
//! events that flow back up.
//!
//! The source and every relay use the same code to send downstream: open the connections,
//! send `Open` and the manifest, wait for `Ready`, attach one data stream per connection, and
//! forward each child's progress and reports upstream. When a child's link fails, every node
//! below it that has not reported is reported failed, by name, and the rest go on.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mover_protocol::manifest::Manifest;
use mover_protocol::{manifest_frame_budget, Message, Open, Outcome, Plan};
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;

use crate::agent::Ctx;
use crate::error::{LinkError, TransferError};
use crate::frame::{read_message, write_message, write_parts};

/// How long a child may take to prepare its staging area (and its own children) before it
/// says `Ready`. Creating millions of files takes a while.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// Bytes of manifest per part, well under the frame bound.
const MANIFEST_PART_BYTES: usize = 1 << 20;
/// How long a child that stopped reading the `Open` has to say why.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Connection close codes.
pub(crate) mod close {
    pub const DONE: u32 = 0;
    pub const SHUTDOWN: u32 = 1;
    pub const FAILED: u32 = 2;
    pub const SUPERSEDED: u32 = 3;
}

/// An open link to one child, ready for data.
pub(crate) struct Downlink {
    pub node: String,
    pub idx: usize,
    conns: Vec<quinn::Connection>,
    pub control: SendStream,
    pub events: Option<RecvStream>,
    pub data: Vec<SendStream>,
    /// Reports of nodes below the child that already failed, said before `Ready`. (What the
    /// subtree holds, its `Have` lists, went to the `haves` channel as they came.)
    pub early: Vec<Message>,
}

/// A boxed future that may move between threads (what recursive async code needs).
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where upstream messages go: the parent's control stream or the controller's.
pub(crate) type Up = mpsc::Sender<Message>;

impl Drop for Downlink {
    fn drop(&mut self) {
        // What each connection to the child saw, for whoever looks into a slow or lossy hop.
        for c in &self.conns {
            let s = c.stats();
            tracing::debug!(child = %self.node, mtu = s.path.current_mtu,
                rtt_us = s.path.rtt.as_micros() as u64, lost_packets = s.path.lost_packets,
                congestion_events = s.path.congestion_events, datagrams = s.udp_tx.datagrams,
                send_calls = s.udp_tx.ios, bytes = s.udp_tx.bytes, "connection to a child");
        }
    }
}

impl Downlink {
    /// Dials child `idx` of `open.plan`, hands it the transfer and the manifest, and waits
    /// until it is ready for data. What its subtree holds goes to `haves` as it comes, one
    /// `Have` message at a time: on a reseed onto an older copy those lists name nearly every
    /// chunk, too many to keep here until the child is ready.
    pub async fn open(
        ctx: &Ctx,
        open: &Open,
        idx: usize,
        manifest: &Manifest,
        haves: &Up,
    ) -> Result<Self, TransferError> {
        let node = &open.plan.nodes()[idx];
        let addr = crate::config::resolve_address(&node.address)
            .await
            .map_err(|e| {
                TransferError::Refused(format!(
                    "resolve address {} of {}: {e}",
                    node.address, node.name
                ))
            })?;
        // One dial after another: each is a single round trip on a LAN.
        let mut conns = Vec::with_capacity(usize::from(open.connections));
        let window = crate::net::window_for(usize::from(open.connections));
        for _ in 0..open.connections {
            let conn = crate::net::connect(
                &ctx.endpoint,
                ctx.loopback_client.as_ref(),
                addr,
                &node.name,
            )
            .await
            .map_err(LinkError::from)?;
            // What this hop keeps unacknowledged, over all its connections to the child.
            conn.set_send_window(u64::from(window));
            conns.push(conn);
        }
        let (mut control, mut events) = conns[0].open_bi().await.map_err(LinkError::from)?;
        let sent = match write_message(&mut control, &Message::Open(open.clone())).await {
            Ok(()) => send_manifest(&mut control, manifest).await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            // A child that refuses, or had committed, answers and stops reading: its answer
            // says more than the failed write.
            let answer = tokio::time::timeout(
                ANSWER_WAIT,
                read_message(&mut events, manifest_frame_budget()),
            )
            .await;
            return Err(match answer {
                Ok(Ok(Message::Report { node: n, outcome })) if n == node.name => match outcome {
                    Outcome::Failed { reason, .. } => TransferError::Refused(reason),
                    committed => TransferError::AlreadyCommitted(committed),
                },
                _ => e.into(),
            });
        }
        let subtree: HashSet<&str> = std::iter::once(idx)
            .chain(open.plan.descendants(idx))
            .map(|i| open.plan.nodes()[i].name.as_str())
            .collect();
        let mut early = Vec::new();
        let node_name = node.name.as_str();
        // What the subtree may claim to hold is bounded by the manifest: every chunk, once
        // per node.
        let mut chunks = 0u64;
        for e in manifest.iter() {
            chunks += mover_protocol::hash::chunk_count(e?.size(), open.chunk_size);
        }
        let max_held = (chunks + 1).saturating_mul(subtree.len() as u64);
        let mut held = 0u64;
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let msg = tokio::time::timeout_at(
                deadline,
                read_message(&mut events, manifest_frame_budget()),
            )
            .await
            .map_err(|_| LinkError::Timeout {
                what: "the child to prepare its staging area",
                secs: READY_TIMEOUT.as_secs(),
            })??;
            match msg {
                Message::Ready => break,
                m @ Message::Have { .. } => {
                    let Message::Have { node, chunks } = &m else {
                        continue;
                    };
                    held += chunks.len() as u64;
                    if held > max_held {
                        return Err(LinkError::Unexpected {
                            got: "more have entries than the manifest has chunks",
                            expected: "ready",
                        }
                        .into());
                    }
                    if !subtree.contains(node.as_str()) {
                        return Err(LinkError::Unexpected {
                            got: "have for a node outside its subtree",
                            expected: "ready",
                        }
                        .into());
                    }
                    let _ = haves.send(m).await;
                }
                Message::Report {
                    node,
                    outcome: Outcome::Failed { reason, .. },
                } if node == node_name => return Err(TransferError::Refused(reason)),
                Message::Report {
                    node,
                    outcome: outcome @ Outcome::Committed { .. },
                } if node == node_name => return Err(TransferError::AlreadyCommitted(outcome)),
                m @ Message::Report { .. } => {
                    let Message::Report { node, .. } = &m else {
                        continue;
                    };
                    if !subtree.contains(node.as_str()) {
                        return Err(LinkError::Unexpected {
                            got: "report for a node outside its subtree",
                            expected: "ready",
                        }
                        .into());
                    }
                    early.push(m);
                }
                other => {
                    return Err(LinkError::Unexpected {
                        got: other.name(),
                        expected: "ready",
                    }
                    .into())
                }
            }
        }
        let mut data = Vec::with_capacity(conns.len());
        for c in &conns {
            let mut s = c.open_uni().await.map_err(LinkError::from)?;
            write_message(
                &mut s,
                &Message::Attach {
                    transfer_id: open.transfer_id,
                },
            )
            .await?;
            data.push(s);
        }
        Ok(Self {
            node: node.name.clone(),
            idx,
            conns,
            control,
            events: Some(events),
            data,
            early,
        })
    }

    /// Closes every connection of this link.
    pub fn close(&self, code: u32, reason: &str) {
        for c in &self.conns {
            c.close(code.into(), reason.as_bytes());
        }
    }
}

/// Sends the manifest in parts of bounded size, then its totals.
pub(crate) async fn send_manifest(send: &mut SendStream, m: &Manifest) -> Result<(), LinkError> {
    let mut part = Vec::new();
    let mut bytes = 0;
    for e in m.iter() {
        let e = e?;
        let len = e.encoded_len();
        if !part.is_empty()
            && (bytes + len > MANIFEST_PART_BYTES
                || part.len() >= mover_protocol::message::MAX_PART_ENTRIES as usize)
        {
            write_message(send, &Message::ManifestPart(std::mem::take(&mut part))).await?;
            bytes = 0;
        }
        bytes += len;
        part.push(e);
    }
    if !part.is_empty() {
        write_message(send, &Message::ManifestPart(part)).await?;
    }
    write_message(
        send,
        &Message::ManifestEnd {
            entries: m.len() as u64,
            total_bytes: m.total_bytes(),
        },
    )
    .await
}

/// Answers a request this node will not serve with a failed report naming why, and ends the
/// stream.
pub(crate) async fn refuse(send: &mut SendStream, node: &str, reason: String) {
    tracing::warn!(%reason, "refused a request");
    answer(
        send,
        node,
        Outcome::Failed {
            reason,
            retryable: false,
        },
    )
    .await;
}

/// Answers a request with this node's `outcome` alone, and ends the stream.
pub(crate) async fn answer(send: &mut SendStream, node: &str, outcome: Outcome) {
    let _ = write_message(
        send,
        &Message::Report {
            node: node.to_owned(),
            outcome,
        },
    )
    .await;
    let _ = send.finish();
}

/// Reports every node in `nodes` as failed with `reason`.
pub(crate) async fn report_failed(
    up: &Up,
    plan: &Plan,
    nodes: &[usize],
    reason: &str,
    retryable: bool,
) {
    for &i in nodes {
        let _ = up
            .send(Message::Report {
                node: plan.nodes()[i].name.clone(),
                outcome: Outcome::Failed {
                    reason: reason.to_owned(),
                    retryable,
                },
            })
            .await;
    }
}

/// The data streams of every child, per stream index: what a sender writes each frame to.
pub(crate) type Streams = Vec<Option<(String, SendStream)>>;

/// Opened links, split for sending: one events task per child (relaying its subtree's reports
/// upstream), the children's data streams grouped by stream index, and the links themselves
/// (for End and closing).
pub(crate) struct Fanout {
    pub events: Vec<tokio::task::JoinHandle<()>>,
    pub streams: Vec<Streams>,
    pub links: Vec<Downlink>,
}

impl Fanout {
    /// `relinker` takes over the children of a child that dies.
    pub fn new(
        links: Vec<Downlink>,
        connections: u8,
        plan: &Arc<Plan>,
        up: &Up,
        relinker: &Arc<Relinker>,
    ) -> Self {
        let mut events = Vec::new();
        let mut streams: Vec<Streams> = (0..connections).map(|_| Vec::new()).collect();
        let mut kept = Vec::new();
        for mut l in links {
            if let Some(ev) = l.events.take() {
                events.push(tokio::spawn(relay_events(
                    ev,
                    plan.clone(),
                    l.idx,
                    up.clone(),
                    Some(relinker.clone()),
                )));
            }
            for (i, s) in std::mem::take(&mut l.data).into_iter().enumerate() {
                streams[i].push(Some((l.node.clone(), s)));
            }
            kept.push(l);
        }
        Self {
            events,
            streams,
            links: kept,
        }
    }
}

/// Forwards a child's progress and reports upstream until its stream ends. Nodes of its
/// subtree that never reported are then reported failed (or, with a `relinker`, linked to
/// past it).
pub(crate) async fn relay_events(
    mut events: RecvStream,
    plan: Arc<Plan>,
    child: usize,
    up: Up,
    relinker: Option<Arc<Relinker>>,
) {
    let mut subtree = vec![child];
    subtree.extend(plan.descendants(child));
    let names: HashSet<&str> = subtree
        .iter()
        .map(|&i| plan.nodes()[i].name.as_str())
        .collect();
    let mut reported = HashSet::new();
    let end = loop {
        match read_message(&mut events, manifest_frame_budget()).await {
            Ok(Message::Progress { node, bytes, files }) if names.contains(node.as_str()) => {
                // Progress is advisory: drop it rather than wait when the controller is slow.
                let _ = up.try_send(Message::Progress { node, bytes, files });
            }
            // From a node linked in after a relay died: the source ignores it by then.
            Ok(m @ Message::Have { .. }) => {
                let Message::Have { node, .. } = &m else {
                    continue;
                };
                if !names.contains(node.as_str()) {
                    break format!(
                        "protocol error: {} sent a have for {node}, outside its subtree",
                        plan.nodes()[child].name
                    );
                }
                let _ = up.send(m).await;
            }
            Ok(m @ Message::Need { .. }) => {
                let Message::Need { node, .. } = &m else {
                    continue;
                };
                if !names.contains(node.as_str()) {
                    break format!(
                        "protocol error: {} sent a need for {node}, outside its subtree",
                        plan.nodes()[child].name
                    );
                }
                let _ = up.send(m).await;
            }
            Ok(Message::Report { node, outcome }) if names.contains(node.as_str()) => {
                let committed_report = matches!(outcome, Outcome::Committed { .. });
                if committed_report
                    && relinker
                        .as_ref()
                        .is_some_and(|r| r.ctx.faults.drop_commit_report())
                {
                    tracing::warn!(%node, "TEST FAULT: dropping a commit report");
                    continue;
                }
                reported.insert(node.clone());
                let _ = up.send(Message::Report { node, outcome }).await;
            }
            Ok(other) => {
                break format!(
                    "protocol error: {} sent an unexpected {} message",
                    plan.nodes()[child].name,
                    other.name()
                )
            }
            Err(LinkError::Closed) => break "stream closed before it reported".to_owned(),
            Err(e) => break e.to_string(),
        }
        if reported.len() == subtree.len() {
            return;
        }
    };
    let child_name = &plan.nodes()[child].name;
    let missing: Vec<usize> = subtree
        .iter()
        .copied()
        .filter(|&i| !reported.contains(&plan.nodes()[i].name))
        .collect();
    if let Some(r) = relinker.filter(|r| !r.is_cancelled()) {
        let lost = format!("link to {child_name} failed: {end}");
        r.recover(plan.clone(), child, lost, missing).await;
        return;
    }
    for i in missing {
        let reason = if i == child {
            format!("link to {child_name} failed: {end}")
        } else {
            format!("upstream relay {child_name} failed: {end}")
        };
        report_failed(&up, &plan, &[i], &reason, true).await;
    }
}

/// Writes one frame to every live child's data stream; a child whose write fails is dropped
/// (its events task reports it) and the others go on.
pub(crate) async fn forward(parts: &[Bytes], streams: &mut [Option<(String, SendStream)>]) {
    for slot in streams.iter_mut() {
        if let Some((node, s)) = slot {
            if let Err(e) = write_parts(s, parts).await {
                tracing::warn!(%node, error = %e, "dropping child after a failed write");
                *slot = None;
            }
        }
    }
}

/// Finishes every live data stream.
pub(crate) fn finish_all(streams: &mut [Option<(String, SendStream)>]) {
    for (_, s) in streams.iter_mut().flatten() {
        let _ = s.finish();
    }
}

/// Writes messages from `rx` to `send` until every sender is gone, then finishes the stream.
pub(crate) async fn pump_up(mut rx: mpsc::Receiver<Message>, mut send: SendStream) {
    while let Some(m) = rx.recv().await {
        if let Err(e) = write_message(&mut send, &m).await {
            tracing::warn!(error = %e, "upstream link failed; events are lost");
            return;
        }
    }
    let _ = send.finish();
    // Wait until the peer has everything so that closing the connection loses nothing.
    let _ = tokio::time::timeout(Duration::from_secs(30), send.stopped()).await;
}

/// How long a parent keeps trying to reach a child again after its link failed.
const REDIAL_WINDOW: Duration = Duration::from_secs(10);

/// Takes over when a child's link fails mid-transfer: dials the child again (a link that was
/// down for longer than the idle timeout), and if it cannot be reached, reports it failed and
/// links this node directly to the nodes below it (with the same plan: a node accepts an
/// `Open` from any node above it), which go on from what they hold. New links
/// join the running transfer: their data streams through `joiners` (one per stream index),
/// their control streams through `new_links`.
pub(crate) struct Relinker {
    pub ctx: Arc<crate::agent::Ctx>,
    pub open: Open,
    pub manifest: Arc<Manifest>,
    pub up: Up,
    pub joiners: Vec<mpsc::UnboundedSender<(String, SendStream)>>,
    pub new_links: mpsc::UnboundedSender<Downlink>,
    /// Re-links under way; while any is, senders keep waiting for joiners.
    pub pending: std::sync::atomic::AtomicUsize,
    /// Set when this node's own part has failed: it no longer takes over anything.
    cancelled: std::sync::atomic::AtomicBool,
}

/// The receiving ends of a [`Relinker`]'s channels.
pub(crate) struct Joining {
    pub joiners: Vec<mpsc::UnboundedReceiver<(String, SendStream)>>,
    pub new_links: mpsc::UnboundedReceiver<Downlink>,
}

impl Relinker {
    pub fn new(
        ctx: Arc<crate::agent::Ctx>,
        open: Open,
        manifest: Arc<Manifest>,
        up: Up,
    ) -> (Arc<Self>, Joining) {
        let (mut joiners, mut rxs) = (Vec::new(), Vec::new());
        for _ in 0..open.connections {
            let (tx, rx) = mpsc::unbounded_channel();
            joiners.push(tx);
            rxs.push(rx);
        }
        let (new_links, links_rx) = mpsc::unbounded_channel();
        let r = Arc::new(Self {
            ctx,
            open,
            manifest,
            up,
            joiners,
            new_links,
            pending: std::sync::atomic::AtomicUsize::new(0),
            cancelled: std::sync::atomic::AtomicBool::new(false),
        });
        (
            r,
            Joining {
                joiners: rxs,
                new_links: links_rx,
            },
        )
    }

    /// Stops taking over children: this node is failing (or being replaced) itself.
    pub fn cancel(&self) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn relinking(&self) -> bool {
        self.pending.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// Child `failed` lost its link for `reason`; `unreported` are the nodes of its subtree
    /// that have not reported. Returns once every node it links to has reported.
    ///
    /// Boxed (as `Send`) because it is recursive: it follows the links it makes, whose own
    /// children may fail in turn.
    fn recover(
        self: Arc<Self>,
        plan: Arc<Plan>,
        failed: usize,
        reason: String,
        unreported: Vec<usize>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(self.recover_inner(plan, failed, reason, unreported))
    }

    async fn recover_inner(
        self: Arc<Self>,
        plan: Arc<Plan>,
        failed: usize,
        reason: String,
        unreported: Vec<usize>,
    ) {
        use std::sync::atomic::Ordering;
        // Counted only while links are being made: senders hold their data back meanwhile.
        self.pending.fetch_add(1, Ordering::Relaxed);
        let linked = self.establish(&plan, failed, reason, unreported).await;
        self.pending.fetch_sub(1, Ordering::Relaxed);
        let follow: Vec<_> = linked
            .into_iter()
            .map(|(events, node)| {
                tokio::spawn(relay_events(
                    events,
                    plan.clone(),
                    node,
                    self.up.clone(),
                    Some(self.clone()),
                ))
            })
            .collect();
        for f in follow {
            let _ = f.await;
        }
    }

    /// Links this node again to `failed`, or else past it to the nodes below it (and past
    /// those that cannot be reached either), reporting each node it gives up on. Returns the
    /// events streams of the nodes it linked to.
    fn establish<'a>(
        self: &'a Arc<Self>,
        plan: &'a Arc<Plan>,
        failed: usize,
        reason: String,
        unreported: Vec<usize>,
    ) -> BoxFuture<'a, Vec<(RecvStream, usize)>> {
        Box::pin(self.establish_inner(plan, failed, reason, unreported))
    }

    async fn establish_inner(
        self: &Arc<Self>,
        plan: &Arc<Plan>,
        failed: usize,
        reason: String,
        unreported: Vec<usize>,
    ) -> Vec<(RecvStream, usize)> {
        let name = plan.nodes()[failed].name.clone();
        if reason.contains("replaced by a newer transfer") {
            // A newer transfer took this one's place below: nothing to take over.
            report_failed(&self.up, plan, &unreported, &reason, true).await;
            return Vec::new();
        }
        // A child that is shutting down or refused will not be back soon; one whose link timed
        // out may have been cut for a while.
        let gone = ["agent shutting down", "refused"]
            .iter()
            .any(|w| reason.contains(w));
        if unreported.contains(&failed) && !gone {
            tracing::warn!(child = %name, %reason, "link to child failed; dialing it again");
            let deadline = tokio::time::Instant::now() + REDIAL_WINDOW;
            let mut wait = Duration::from_secs(1);
            loop {
                if self.is_cancelled() {
                    break;
                }
                match self.connect(failed).await {
                    Ok(events) => return events.map(|e| (e, failed)).into_iter().collect(),
                    Err(TransferError::AlreadyCommitted(outcome)) => {
                        return self
                            .committed_before(plan, failed, outcome, reason, unreported)
                            .await;
                    }
                    Err(e) if e.endpoint_stopping() => {
                        // This agent is stopping: its parent takes over the nodes below it,
                        // so it reports none of them failed.
                        tracing::debug!(child = %name, "this agent is stopping; not dialing again");
                        return Vec::new();
                    }
                    Err(e) if tokio::time::Instant::now() + wait < deadline => {
                        // (A dial to a dead host takes the handshake timeout itself.)
                        tracing::debug!(child = %name, error = %e, "child still unreachable");
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                    Err(e) => {
                        tracing::warn!(child = %name, error = %e, "child unreachable");
                        break;
                    }
                }
            }
        }
        if unreported.contains(&failed) {
            report_failed(&self.up, plan, &[failed], &reason, true).await;
        }
        // A relay that had reported (committed, say) did not fail: only the link through it
        // did.
        let upstream = if unreported.contains(&failed) {
            format!("upstream relay {name} failed")
        } else {
            format!("the link through relay {name} was lost")
        };
        let mut linked = Vec::new();
        for below in topmost(plan, failed, &unreported) {
            let b = plan.nodes()[below].name.clone();
            let rest: Vec<usize> = std::iter::once(below)
                .chain(plan.descendants(below))
                .filter(|i| unreported.contains(i))
                .collect();
            if self.is_cancelled() {
                let why = format!("{upstream}: {reason}");
                report_failed(&self.up, plan, &rest, &why, true).await;
                continue;
            }
            tracing::warn!(node = %b, dead = %name, "linking past a dead relay");
            match self.connect(below).await {
                Ok(events) => linked.extend(events.map(|e| (e, below))),
                Err(e) if e.endpoint_stopping() => return linked,
                Err(TransferError::AlreadyCommitted(outcome)) => {
                    let why = format!("{upstream}: {reason}");
                    let more = self.committed_before(plan, below, outcome, why, rest).await;
                    linked.extend(more);
                }
                Err(e) => {
                    let why = format!("{upstream} ({reason}) and {b} could not be reached: {e}");
                    let more = self.establish(plan, below, why, rest).await;
                    linked.extend(more);
                }
            }
        }
        linked
    }

    /// `node`, linked to again, had committed already: its report went to a link that was
    /// lost. Reports it, then links to the unreported nodes below it (each of which may have
    /// committed too, and says so when linked to). Returns their events streams.
    async fn committed_before(
        self: &Arc<Self>,
        plan: &Arc<Plan>,
        node: usize,
        outcome: Outcome,
        reason: String,
        unreported: Vec<usize>,
    ) -> Vec<(RecvStream, usize)> {
        let name = plan.nodes()[node].name.clone();
        tracing::info!(node = %name, "linked to again, it had committed already");
        let _ = self
            .up
            .send(Message::Report {
                node: name,
                outcome,
            })
            .await;
        let rest: Vec<usize> = unreported.into_iter().filter(|&i| i != node).collect();
        if rest.is_empty() {
            return Vec::new();
        }
        self.establish(plan, node, reason, rest).await
    }

    /// Links this node to `node` (its parent from now on, with the same signed plan: a node
    /// accepts an `Open` from any node above it) and joins the link to the running transfer.
    /// Returns its events stream.
    async fn connect(self: &Arc<Self>, node: usize) -> Result<Option<RecvStream>, TransferError> {
        let mut l = Downlink::open(&self.ctx, &self.open, node, &self.manifest, &self.up).await?;
        tracing::info!(node = %l.node, "linked into the running transfer");
        for m in std::mem::take(&mut l.early) {
            let _ = self.up.send(m).await;
        }
        for (i, s) in std::mem::take(&mut l.data).into_iter().enumerate() {
            if let Some(j) = self.joiners.get(i) {
                if let Err(mpsc::error::SendError((_, mut s))) = j.send((l.node.clone(), s)) {
                    // The main pass is over: this stream carries nothing.
                    let _ = s.finish();
                }
            }
        }
        let events = l.events.take();
        if self.new_links.send(l).is_err() {
            return Err(TransferError::Internal("the transfer has ended".into()));
        }
        Ok(events)
    }
}

/// The highest nodes below `failed` that have not reported: the ones to link to directly.
fn topmost(plan: &Plan, failed: usize, unreported: &[usize]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut stack = plan.children(failed);
    while let Some(c) = stack.pop() {
        if unreported.contains(&c) {
            out.push(c);
        } else {
            stack.extend(plan.children(c));
        }
    }
    out.sort_unstable();
    out
}

/// Waits for the subtrees' events tasks, which follow any re-link under way, while taking in
/// the links that join meanwhile. After `End` went down (`end`), each such link (made past a
/// dead child) gets it too, so that the node it reaches finishes from what it holds instead of
/// waiting for an `End` that has gone by.
pub(crate) async fn await_subtrees(
    events: Vec<tokio::task::JoinHandle<()>>,
    end: Option<&Message>,
    joined: &mut mpsc::UnboundedReceiver<Downlink>,
    links: &mut Vec<Downlink>,
) {
    let mut all = tokio::spawn(async move {
        for t in events {
            let _ = t.await;
        }
    });
    loop {
        tokio::select! {
            _ = &mut all => break,
            Some(mut l) = joined.recv() => {
                if let Some(end) = end {
                    tracing::info!(node = %l.node, "passing End to a node linked in after it");
                    let _ = write_message(&mut l.control, end).await;
                    let _ = l.control.finish();
                }
                links.push(l);
            }
        }
    }
    take_new_links(joined, links);
}

/// Adds links that joined the transfer to `links`.
pub(crate) fn take_new_links(
    rx: &mut mpsc::UnboundedReceiver<Downlink>,
    links: &mut Vec<Downlink>,
) {
    while let Ok(l) = rx.try_recv() {
        links.push(l);
    }
}

/// With no child left on a data stream, waits while a re-link is under way for one to join.
/// Returns whether one did.
pub(crate) async fn wait_for_joiner(
    relinker: &Relinker,
    join: &mut mpsc::UnboundedReceiver<(String, SendStream)>,
    streams: &mut Streams,
) -> bool {
    // The events task that starts a re-link may learn of the failure a little after the
    // write that failed: give it a moment before giving up.
    let mut idle = Duration::ZERO;
    let step = Duration::from_millis(200);
    while relinker.relinking() || idle < Duration::from_secs(3) {
        match tokio::time::timeout(step, join.recv()).await {
            Ok(Some(s)) => {
                streams.push(Some(s));
                return true;
            }
            Ok(None) => return false,
            Err(_) if relinker.relinking() => idle = Duration::ZERO,
            Err(_) => idle += step,
        }
    }
    false
}

/// Longest a sender holds the data back while a child is being linked in again.
const RELINK_PAUSE: Duration = Duration::from_secs(30);

/// While a re-link is under way, holds this stream's data back (up to [`RELINK_PAUSE`]) so
/// that the node being linked in gets the rest of the main pass rather than all of it in the
/// slower repair rounds; takes in any stream that joins meanwhile.
pub(crate) async fn pause_for_relink(
    relinker: &Relinker,
    join: &mut mpsc::UnboundedReceiver<(String, SendStream)>,
    streams: &mut Streams,
) {
    let deadline = tokio::time::Instant::now() + RELINK_PAUSE;
    while relinker.relinking() && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(100), join.recv()).await {
            Ok(Some(s)) => streams.push(Some(s)),
            Ok(None) => return,
            Err(_) => {}
        }
    }
    while let Ok(s) = join.try_recv() {
        streams.push(Some(s));
    }
}
