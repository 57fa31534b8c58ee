//! The receiving side of a transfer: a target, and a relay when the plan gives it children.
//!
//! A relay forwards every chunk frame to its children exactly as it arrived, before and
//! independently of its own decoding, so the hops below never wait for its disk. Its own copy
//! is decoded, verified and written on worker threads into a staging area, which replaces the
//! dataset only after every chunk and the whole tree's digest check out.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mover_protocol::manifest::{display_path, ManifestBuilder};
use mover_protocol::{manifest_frame_budget, max_frame_len, Message, Open, Outcome, Tracker};
use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, Semaphore};

use crate::agent::Ctx;
use crate::error::{LinkError, TransferError};
use crate::frame::{read_frame_pooled, read_message, write_message};
use crate::link::{self, Up};
use crate::pool::Pool;
use crate::staging::Staging;

/// How long to wait for the parent's data streams after saying `Ready`.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// How often progress goes upstream.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// The parent's connection and control stream.
pub(crate) struct ParentLink<'a> {
    conn: quinn::Connection,
    recv: &'a mut RecvStream,
}

/// Handles an `Open` from our parent on its control stream.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    open: Open,
    parent: String,
    parent_conn: quinn::Connection,
    mut control: SendStream,
    mut from_parent: RecvStream,
) {
    let started = Instant::now();
    let plan = Arc::new(open.plan.clone());
    let Some(me) = plan.index_of(&ctx.node).filter(|&i| i > 0) else {
        link::refuse(
            &mut control,
            &ctx.node,
            format!("{} is not a target in this transfer's plan", ctx.node),
        )
        .await;
        return;
    };
    let expected_parent = plan.nodes()[me]
        .parent
        .map(|p| plan.nodes()[usize::from(p)].name.clone());
    if expected_parent.as_deref() != Some(parent.as_str()) {
        link::refuse(
            &mut control,
            &ctx.node,
            format!("{parent} is not this node's parent in the plan"),
        )
        .await;
        return;
    }
    let (up_tx, up_rx) = mpsc::channel::<Message>(1024);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    // The control stream to the parent carries Ready first, then every event from this
    // subtree.
    let pump = tokio::spawn(async move {
        // Failing before Ready, the node's Report is what the parent reads instead.
        if let Ok(Ok(())) = ready_rx.await {
            if write_message(&mut control, &Message::Ready).await.is_err() {
                return;
            }
        }
        link::pump_up(up_rx, control).await;
    });
    let mut ready = Some(ready_tx);
    let link = ParentLink {
        conn: parent_conn,
        recv: &mut from_parent,
    };
    let result = receive(&ctx, &open, &plan, me, link, &up_tx, &mut ready, started).await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "transfer failed on this node");
        let _ = up_tx
            .send(Message::Report {
                node: ctx.node.clone(),
                outcome: Outcome::Failed {
                    reason: format!("{}: {e}", ctx.node),
                    retryable: e.retryable(),
                },
            })
            .await;
        if let Some(r) = ready.take() {
            // Failed before Ready: the Report above is what the parent reads instead.
            let _ = r.send(Err(e.to_string()));
        }
    }
    drop(up_tx);
    let _ = pump.await;
    ctx.registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&open.transfer_id);
}

#[allow(clippy::too_many_arguments)]
async fn receive(
    ctx: &Arc<Ctx>,
    open: &Open,
    plan: &Arc<mover_protocol::Plan>,
    me: usize,
    mut from_parent: ParentLink<'_>,
    up: &Up,
    ready: &mut Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    started: Instant,
) -> Result<(), TransferError> {
    let dataset = &plan.nodes()[me].dataset;
    let dest = ctx
        .cfg
        .datasets
        .get(dataset)
        .ok_or_else(|| TransferError::UnknownDataset {
            node: ctx.node.clone(),
            dataset: dataset.clone(),
        })?
        .path
        .clone();

    // The manifest, checked entry by entry as it arrives.
    let mut builder = ManifestBuilder::new();
    let manifest = loop {
        match read_message(from_parent.recv, manifest_frame_budget()).await? {
            Message::ManifestPart(entries) => builder.push(entries)?,
            Message::ManifestEnd {
                entries,
                total_bytes,
            } => break builder.finish(entries, total_bytes)?,
            other => {
                return Err(LinkError::Unexpected {
                    got: other.name(),
                    expected: "manifest",
                }
                .into())
            }
        }
    };
    let manifest = Arc::new(manifest);
    let label = format!("{dataset}-{:016x}", open.transfer_id);
    let (state_dir, m2, d2) = (ctx.cfg.state_dir.clone(), manifest.clone(), dest.clone());
    let staging = tokio::task::spawn_blocking(move || Staging::create(&state_dir, &d2, &label, m2))
        .await
        .map_err(|e| TransferError::Internal(e.to_string()))??;
    // The one long-lived reference: commit takes it out of this slot; on failure it is still
    // here and the staging area is removed.
    let mut slot = Some(Arc::new(staging));
    let outcome = receive_into(
        ctx,
        open,
        plan,
        me,
        &mut from_parent,
        up,
        ready,
        started,
        &manifest,
        &mut slot,
    )
    .await;
    if outcome.is_err() {
        if let Some(s) = slot.take() {
            abort_staging(s).await;
        }
    }
    outcome
}

/// Removes a staging area once the last worker has let go of it.
async fn abort_staging(mut staging: Arc<Staging>) {
    for _ in 0..100 {
        match Arc::try_unwrap(staging) {
            Ok(s) => {
                let path = s.path().to_owned();
                match tokio::task::spawn_blocking(move || s.abort()).await {
                    Ok(Ok(())) => tracing::info!(path = %path.display(), "removed staging area"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not remove staging area"),
                    Err(e) => tracing::warn!(error = %e, "could not remove staging area"),
                }
                return;
            }
            Err(s) => staging = s,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!(path = %staging.path().display(), "staging area still in use; left in place");
}

#[allow(clippy::too_many_arguments)]
async fn receive_into(
    ctx: &Arc<Ctx>,
    open: &Open,
    plan: &Arc<mover_protocol::Plan>,
    me: usize,
    from_parent: &mut ParentLink<'_>,
    up: &Up,
    ready: &mut Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    started: Instant,
    manifest: &Arc<mover_protocol::Manifest>,
    slot: &mut Option<Arc<Staging>>,
) -> Result<(), TransferError> {
    let staging = slot
        .clone()
        .ok_or_else(|| TransferError::Internal("no staging area".into()))?;
    // Children first, so that they are ready when data starts to flow.
    let links = crate::source::open_children(ctx, open, me, manifest, plan, up).await;
    let link::Fanout {
        events: events_tasks,
        streams: per_stream,
        links: mut controls,
    } = link::Fanout::new(links, open.connections, plan, up);

    let (attach_tx, mut attach_rx) = mpsc::channel::<RecvStream>(usize::from(open.connections));
    ctx.registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            open.transfer_id,
            crate::agent::Registration {
                parent: plan.nodes()[usize::from(plan.nodes()[me].parent.unwrap_or(0))]
                    .name
                    .clone(),
                streams: attach_tx,
            },
        );
    if let Some(r) = ready.take() {
        let _ = r.send(Ok(()));
    }
    tracing::debug!(children = controls.len(), "ready");

    let tracker = Arc::new(Mutex::new(Tracker::new(manifest, open.chunk_size)));
    let workers = Arc::new(Semaphore::new(ctx.cfg.workers()));
    // Buffers in use at once: a frame being read, forwarded or decoded per stream, and a
    // frame and its decompressed copy per worker.
    let pool = Pool::new(
        crate::chunk::buffer_capacity(open.chunk_size),
        2 * ctx.cfg.workers() + 3 * usize::from(open.connections),
    );
    let failure: Arc<Mutex<Option<TransferError>>> = Arc::new(Mutex::new(None));
    let progress = spawn_progress(ctx.node.clone(), tracker.clone(), up.clone());

    let mut data_tasks = Vec::new();
    for streams in per_stream {
        let attach = tokio::time::timeout(ATTACH_TIMEOUT, attach_rx.recv());
        let recv = tokio::select! {
            r = attach => r.map_err(|_| LinkError::Timeout {
                what: "the parent's data streams",
                secs: ATTACH_TIMEOUT.as_secs(),
            })?
            .ok_or(LinkError::Closed)?,
            e = from_parent.conn.closed() => return Err(LinkError::Connection(e).into()),
        };
        let job = DataJob {
            tracker: tracker.clone(),
            workers: workers.clone(),
            staging: staging.clone(),
            failure: failure.clone(),
            pool: pool.clone(),
            max_len: max_frame_len(open.chunk_size),
        };
        data_tasks.push(tokio::spawn(job.run(recv, streams)));
    }
    tracing::debug!("data streams attached");
    // The parent sends End on the control stream after finishing its data streams.
    let end = read_message(from_parent.recv, manifest_frame_budget()).await;
    tracing::debug!(ok = end.is_ok(), "control stream ended");
    let mut link_error = None;
    if end.is_err() {
        // The parent is gone: a data stream on another of its connections may never see the
        // close (packets drop under load), so stop reading rather than wait for idle timeouts.
        for t in &data_tasks {
            t.abort();
        }
    }
    for t in data_tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => link_error = Some(e.into()),
            Err(e) if e.is_cancelled() => {}
            Err(e) => link_error = Some(TransferError::Internal(e.to_string())),
        }
    }
    // Pass End on (or close) to the children once their data streams are finished.
    let end = end.map_err(TransferError::from);
    for l in &mut controls {
        if let Ok(m @ Message::End { .. }) = &end {
            let _ = write_message(&mut l.control, m).await;
            let _ = l.control.finish();
        } else {
            l.close(link::close::FAILED, "upstream failed");
        }
    }
    tracing::debug!("data streams done");
    drop(staging);
    let local = finish_local(
        ctx, &workers, &tracker, &failure, slot, end, link_error, started,
    )
    .await;
    progress.abort();
    tracing::debug!(ok = local.is_ok(), "local copy finished");
    let result = match local {
        Ok(outcome) => {
            let _ = up
                .send(Message::Report {
                    node: ctx.node.clone(),
                    outcome,
                })
                .await;
            Ok(())
        }
        Err(e) => Err(e),
    };
    for t in events_tasks {
        let _ = t.await;
    }
    for l in &controls {
        l.close(link::close::DONE, "done");
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn finish_local(
    ctx: &Arc<Ctx>,
    workers: &Arc<Semaphore>,
    tracker: &Arc<Mutex<Tracker>>,
    failure: &Arc<Mutex<Option<TransferError>>>,
    slot: &mut Option<Arc<Staging>>,
    end: Result<Message, TransferError>,
    link_error: Option<TransferError>,
    started: Instant,
) -> Result<Outcome, TransferError> {
    // Every write job holds a permit; taking them all waits for the last one.
    let _all = workers
        .acquire_many(ctx.cfg.workers() as u32)
        .await
        .map_err(|e| TransferError::Internal(e.to_string()))?;
    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    if let Some(e) = link_error {
        return Err(e);
    }
    let digest = match end? {
        Message::End { digest, .. } => digest,
        other => {
            return Err(LinkError::Unexpected {
                got: other.name(),
                expected: "end",
            }
            .into())
        }
    };
    let (ours, bytes, files) = {
        let t = tracker.lock().unwrap_or_else(|p| p.into_inner());
        if !t.is_complete() {
            return Err(TransferError::Incomplete {
                missing: t.missing_chunks(),
            });
        }
        (t.digest(), t.bytes_done(), t.files_done())
    };
    if ours != Some(digest) {
        return Err(TransferError::DigestMismatch);
    }
    let staging = slot
        .take()
        .ok_or_else(|| TransferError::Internal("no staging area".into()))?;
    let staging = match Arc::try_unwrap(staging) {
        Ok(s) => s,
        Err(s) => {
            *slot = Some(s);
            return Err(TransferError::Internal(
                "staging area still in use at commit".into(),
            ));
        }
    };
    let done = tokio::task::spawn_blocking(move || -> Result<(), TransferError> {
        staging.finalize()?;
        staging.commit()?;
        Ok(())
    })
    .await
    .map_err(|e| TransferError::Internal(e.to_string()))?;
    done?;
    tracing::info!(bytes, files, "committed");
    Ok(Outcome::Committed {
        bytes,
        files,
        elapsed_ms: started.elapsed().as_millis() as u64,
        digest,
    })
}

fn spawn_progress(
    node: String,
    tracker: Arc<Mutex<Tracker>>,
    up: Up,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        loop {
            tick.tick().await;
            let (bytes, files) = {
                let t = tracker.lock().unwrap_or_else(|p| p.into_inner());
                (t.bytes_done(), t.files_done())
            };
            let _ = up.try_send(Message::Progress {
                node: node.clone(),
                bytes,
                files,
            });
        }
    })
}

/// Reads one data stream: forwards each frame to the children, then decodes and writes our
/// own copy on a worker thread.
struct DataJob {
    tracker: Arc<Mutex<Tracker>>,
    workers: Arc<Semaphore>,
    staging: Arc<Staging>,
    failure: Arc<Mutex<Option<TransferError>>>,
    pool: Arc<Pool>,
    max_len: u32,
}

impl DataJob {
    async fn run(
        self,
        mut recv: RecvStream,
        mut children: Vec<Option<(String, SendStream)>>,
    ) -> Result<(), LinkError> {
        let result = self.pump(&mut recv, &mut children).await;
        link::finish_all(&mut children);
        result
    }

    async fn pump(
        &self,
        recv: &mut RecvStream,
        children: &mut [Option<(String, SendStream)>],
    ) -> Result<(), LinkError> {
        while let Some(frame) = read_frame_pooled(recv, self.max_len, &self.pool).await? {
            link::forward(std::slice::from_ref(&frame.bytes), children).await;
            let chunk = match frame.decode()? {
                Message::Chunk(c) => c,
                other => {
                    return Err(LinkError::Unexpected {
                        got: other.name(),
                        expected: "chunk",
                    })
                }
            };
            if self
                .failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
            {
                // Our own copy already failed; keep forwarding for the nodes below.
                continue;
            }
            let admitted = self
                .tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .admit(&chunk);
            if let Err(e) = admitted {
                self.fail(e.into());
                continue;
            }
            let permit = self
                .workers
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| LinkError::Closed)?;
            let (tracker, staging, failure, pool) = (
                self.tracker.clone(),
                self.staging.clone(),
                self.failure.clone(),
                self.pool.clone(),
            );
            tokio::task::spawn_blocking(move || {
                let entry = &staging.manifest().entries[chunk.file as usize];
                let path = display_path(&entry.path);
                let result = crate::chunk::decode(&chunk, entry.size(), &pool)
                    .map_err(|source| TransferError::ChunkCodec { path, source })
                    .and_then(|raw| Ok(staging.write_at(chunk.file, chunk.offset, &raw)?));
                match result {
                    Ok(()) => {
                        tracker.lock().unwrap_or_else(|p| p.into_inner()).verified(
                            chunk.file,
                            chunk.offset,
                            chunk.hash,
                        );
                    }
                    Err(e) => {
                        tracker
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .failed(chunk.file, chunk.offset);
                        let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                        f.get_or_insert(e);
                    }
                }
                // Let go of the staging area before the permit: whoever takes every permit
                // may then own it.
                drop(staging);
                drop(permit);
            });
        }
        Ok(())
    }

    fn fail(&self, e: TransferError) {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }
}
