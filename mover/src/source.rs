//! The source side of a transfer: scan the dataset, read, hash and compress chunks on worker
//! threads, and stream them to the plan's first hops.
//!
//! A chunk that every target already holds with the same hash (they said so with `Have`) is
//! read and hashed but not sent. After the main pass the source collects every target's
//! `Need`, resends those chunks on the control streams, and repeats until no target needs
//! anything (or the rounds run out), then sends `End`.

use std::collections::{BTreeSet, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mover_protocol::have::{HaveMerge, Skips};
use mover_protocol::manifest::{display_path, EntryKind, Manifest};
use mover_protocol::message::MAX_ROUNDS;
use mover_protocol::table::ChunkIndex;
use mover_protocol::{Message, Open, Plan, Start, Tracker};
use tokio::sync::{mpsc, Notify, Semaphore};

use crate::agent::Ctx;
use crate::auto_compress::Auto;
use crate::chunk;
use crate::error::TransferError;
use crate::link::{self, close, Downlink, Streams, Up};
use crate::pool::{Pool, PoolBuf};

/// How long the source waits for every target's needs after a round.
const NEED_TIMEOUT: Duration = Duration::from_secs(900);

/// What the source reports when everything was read and sent.
#[derive(Default)]
struct Totals {
    bytes: u64,
    wire_bytes: Arc<AtomicU64>,
    chunks: u64,
    skipped: Arc<AtomicU64>,
    resent: u64,
    /// `--max-rate`, shared by the data streams and the repair rounds.
    pacer: Option<Arc<crate::rate::Pacer>>,
}

/// Runs a transfer started by the controller. Every outcome goes to `up` as messages; the
/// function returns when every target has reported.
pub(crate) async fn run(ctx: Arc<Ctx>, start: Start, up: Up) {
    let plan = Arc::new(start.plan.clone());
    let targets: Vec<usize> = (1..plan.nodes().len()).collect();
    let result = async {
        let (root, backup) = source_root(&ctx, &start).await?;
        let sent = run_inner(&ctx, start, plan.clone(), up.clone(), root).await;
        if let Some(b) = backup {
            b.remove().await;
        }
        sent
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "transfer failed at the source");
        let reason = format!("source {} failed: {e}", ctx.node);
        link::report_failed(&up, &plan, &targets, &reason, e.retryable()).await;
    }
}

/// The directory to send: the dataset's own, or for a backup method a backup of it that this
/// agent's `backup` hook makes (and the caller removes at the end).
async fn source_root(
    ctx: &Ctx,
    start: &Start,
) -> Result<(PathBuf, Option<crate::backup::Backup>), TransferError> {
    let dataset = &start.plan.source().dataset;
    let path = ctx
        .cfg
        .datasets
        .get(dataset)
        .ok_or_else(|| TransferError::UnknownDataset {
            node: ctx.node.clone(),
            dataset: dataset.clone(),
        })?
        .path
        .clone();
    match crate::backup::tool(start.method) {
        None => Ok((path, None)),
        Some(tool) => {
            let b = crate::backup::Backup::take(ctx, tool, &path, start.transfer_id).await?;
            Ok((b.dir.clone(), Some(b)))
        }
    }
}

async fn run_inner(
    ctx: &Arc<Ctx>,
    start: Start,
    plan: Arc<mover_protocol::Plan>,
    up: Up,
    root: PathBuf,
) -> Result<(), TransferError> {
    let scan_root = root.clone();
    let table = Arc::from(crate::table::table_in(&ctx.cfg.state_dir, "the manifest"));
    let spill_dir = ctx.cfg.state_dir.clone();
    let scan =
        tokio::task::spawn_blocking(move || crate::scan::scan_in(&scan_root, table, &spill_dir))
            .await
            .map_err(|e| TransferError::Internal(e.to_string()))??;
    for p in &scan.skipped {
        tracing::warn!(path = %p.display(), "skipping a socket, FIFO or device file");
    }
    let manifest = Arc::new(scan.manifest);
    let _ = up
        .send(Message::ManifestEnd {
            entries: manifest.len() as u64,
            total_bytes: manifest.total_bytes(),
        })
        .await;

    let open = Open {
        transfer_id: start.transfer_id,
        chunk_size: start.chunk_size,
        connections: start.connections,
        method: start.method,
        plan: start.plan.clone(),
        grant: start.grant.clone(),
    };
    // Children's events pass through a router that keeps the needs and the reports for the
    // repair rounds and hands the rest to the controller.
    let rounds = Arc::new(Rounds::new(&plan, manifest.clone(), start.chunk_size));
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let router = tokio::spawn(route(ev_rx, up.clone(), rounds.clone()));
    // What the targets hold is folded in as each list comes, into a table in a file: see
    // `HaveMerge`. The table is made with the first list (a fresh copy has none).
    let (have_tx, mut have_rx) = mpsc::channel::<Message>(16);
    let (targets, index) = (
        plan.nodes().len() - 1,
        ChunkIndex::new(&manifest, start.chunk_size)?,
    );
    let state_dir = ctx.cfg.state_dir.clone();
    let merging = tokio::task::spawn_blocking(move || {
        let mut merge: Option<HaveMerge> = None;
        while let Some(m) = have_rx.blocking_recv() {
            if let Message::Have { node, chunks } = m {
                merge
                    .get_or_insert_with(|| {
                        let table = crate::table::table_in(&state_dir, "the targets' held chunks");
                        HaveMerge::new(targets, index.clone(), table)
                    })
                    .add(&node, &chunks);
            }
        }
        let merge = merge?;
        if let Some(e) = merge.failure() {
            tracing::warn!(error = %e, "cannot keep what the targets hold; sending every chunk");
        }
        Some(merge.finish())
    });
    let mut links = open_children(ctx, &open, 0, &manifest, &plan, &ev_tx, &have_tx).await;
    drop(have_tx);
    let haves = Arc::new(
        merging
            .await
            .map_err(|e| TransferError::Internal(e.to_string()))?
            .unwrap_or_default(),
    );
    // Reports of nodes that failed before they were ready.
    for l in &mut links {
        for m in std::mem::take(&mut l.early) {
            let _ = ev_tx.send(m).await;
        }
    }
    if !haves.is_empty() {
        tracing::info!(
            chunks = haves.len(),
            "every target already holds some chunks; they are not sent"
        );
    }
    let (relinker, joining) =
        link::Relinker::new(ctx.clone(), open.clone(), manifest.clone(), ev_tx.clone());
    let link::Joining {
        joiners,
        new_links: mut joined,
    } = joining;
    let link::Fanout {
        events: mut events_tasks,
        streams: data_streams,
        links: mut all_links,
    } = link::Fanout::new(links, start.connections, &plan, &ev_tx, &relinker);
    drop(ev_tx);
    let finish = |all_links: &Vec<Downlink>, code, why: &str| {
        for l in all_links {
            l.close(code, why);
        }
    };
    if !all_links.is_empty() {
        let sent = async {
            let (mut totals, tracker) = stream_chunks(
                ctx,
                &root,
                &manifest,
                &start,
                data_streams,
                joiners,
                &relinker,
                &haves,
            )
            .await?;
            let digest = tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .digest()
                .ok_or_else(|| TransferError::Internal("source did not hash every chunk".into()))?;
            totals.resent = repair(
                ctx,
                &root,
                &manifest,
                &start,
                &tracker,
                &rounds,
                &mut all_links,
                &mut joined,
                &totals,
            )
            .await?;
            link::take_new_links(&mut joined, &mut all_links);
            let end = Message::End {
                chunks: totals.chunks,
                digest,
            };
            for l in &mut all_links {
                let _ = crate::frame::write_message(&mut l.control, &end).await;
                let _ = l.control.finish();
            }
            Ok::<_, TransferError>((totals, end))
        }
        .await;
        match sent {
            Ok((totals, end)) => {
                let _ = up
                    .send(Message::Sent {
                        bytes: totals.bytes,
                        wire_bytes: totals.wire_bytes.load(Ordering::Relaxed),
                        chunks: totals.chunks,
                        files: manifest.file_count(),
                        skipped: totals.skipped.load(Ordering::Relaxed),
                        resent: totals.resent,
                    })
                    .await;
                let events = std::mem::take(&mut events_tasks);
                link::await_subtrees(events, Some(&end), &mut joined, &mut all_links).await;
            }
            Err(TransferError::NoTargetsLeft) => {
                for t in events_tasks {
                    let _ = t.await;
                }
                drop(relinker);
                let _ = router.await;
                return Ok(());
            }
            Err(e) => {
                // Report the real cause first: the controller keeps each target's first
                // report, and closing the links makes the events tasks report link failures.
                tracing::warn!(error = %e, "transfer failed at the source");
                let targets: Vec<usize> = (1..plan.nodes().len()).collect();
                let reason = format!("source {} failed: {e}", ctx.node);
                link::report_failed(&up, &plan, &targets, &reason, e.retryable()).await;
                relinker.cancel();
                link::take_new_links(&mut joined, &mut all_links);
                finish(&all_links, close::FAILED, "source failed");
                for t in events_tasks {
                    let _ = t.await;
                }
                drop(relinker);
                let _ = router.await;
                return Ok(());
            }
        }
    }
    for t in events_tasks {
        let _ = t.await;
    }
    drop(relinker);
    let _ = router.await;
    link::take_new_links(&mut joined, &mut all_links);
    finish(&all_links, close::DONE, "done");
    Ok(())
}

/// The repair rounds' view of the targets: who has answered since the last resend, and what
/// they need. A target answers once after its main pass and once after each `Repaired`; a
/// node that joined late (re-linked past a dead relay) answers whenever its own main pass ends,
/// and is counted in the next round.
struct Rounds {
    state: Mutex<RoundState>,
    changed: Notify,
    /// The manifest (each file's size, by manifest index) and the chunk size: what a need
    /// may name.
    manifest: Arc<Manifest>,
    chunk_size: u64,
}

struct RoundState {
    targets: Vec<String>,
    finished: HashSet<String>,
    needs: BTreeSet<(u32, u64)>,
    answered: HashSet<String>,
}

impl Rounds {
    fn new(plan: &Plan, manifest: Arc<Manifest>, chunk_size: u32) -> Self {
        Self {
            manifest,
            chunk_size: u64::from(chunk_size),
            state: Mutex::new(RoundState {
                targets: plan.targets().iter().map(|t| t.name.clone()).collect(),
                finished: HashSet::new(),
                needs: BTreeSet::new(),
                answered: HashSet::new(),
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RoundState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn need(&self, node: String, done: bool, chunks: Vec<(u32, u64)>) {
        {
            let mut s = self.lock();
            // Only chunks of the manifest: what is kept stays bounded by it.
            s.needs.extend(chunks.into_iter().filter(|&(file, offset)| {
                self.manifest
                    .file_size(file as usize)
                    .ok()
                    .flatten()
                    .is_some_and(|size| offset % self.chunk_size == 0 && offset < size)
            }));
            if done {
                s.answered.insert(node);
            }
        }
        self.changed.notify_waiters();
    }

    fn finished(&self, node: String) {
        self.lock().finished.insert(node);
        self.changed.notify_waiters();
    }

    /// Waits until every target that has not finished has answered, and returns the union of
    /// what they need. Targets still silent at the deadline are left to fail at `End`.
    async fn wait(&self, round: u32) -> BTreeSet<(u32, u64)> {
        let deadline = tokio::time::Instant::now() + NEED_TIMEOUT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                let waiting = s
                    .targets
                    .iter()
                    .filter(|t| !s.finished.contains(*t) && !s.answered.contains(*t))
                    .count();
                if waiting == 0 {
                    s.answered.clear();
                    return std::mem::take(&mut s.needs);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(round, "some targets never said what they need");
                let mut s = self.lock();
                s.answered.clear();
                return std::mem::take(&mut s.needs);
            }
        }
    }
}

/// Passes children's events to the controller, keeping needs and reports for the rounds.
async fn route(mut rx: mpsc::Receiver<Message>, up: Up, rounds: Arc<Rounds>) {
    while let Some(m) = rx.recv().await {
        match m {
            Message::Need {
                node, done, chunks, ..
            } => rounds.need(node, done, chunks),
            // From a node that joined after the main pass began: its needs cover it.
            Message::Have { .. } => {}
            Message::Report { node, outcome } => {
                rounds.finished(node.clone());
                let _ = up.send(Message::Report { node, outcome }).await;
            }
            Message::Progress { .. } => {
                let _ = up.try_send(m);
            }
            other => {
                let _ = up.send(other).await;
            }
        }
    }
}

/// Runs the repair rounds: resends what targets need on the control streams until nobody
/// needs anything. Returns how many chunks were resent.
#[allow(clippy::too_many_arguments)]
async fn repair(
    ctx: &Arc<Ctx>,
    root: &std::path::Path,
    manifest: &Arc<Manifest>,
    start: &Start,
    tracker: &Arc<Mutex<Tracker>>,
    rounds: &Rounds,
    links: &mut Vec<Downlink>,
    joined: &mut mpsc::UnboundedReceiver<Downlink>,
    totals: &Totals,
) -> Result<u64, TransferError> {
    let mut resent = 0;
    for round in 0..MAX_ROUNDS {
        let needs = rounds.wait(round).await;
        link::take_new_links(joined, links);
        if needs.is_empty() {
            break;
        }
        tracing::info!(round, chunks = needs.len(), "resending what targets need");
        let (tx, mut rx) = mpsc::channel::<mover_protocol::Chunk>(ctx.cfg.workers());
        let workers = Arc::new(Semaphore::new(ctx.cfg.workers()));
        let pool = Pool::new(
            crate::chunk::buffer_capacity(start.chunk_size),
            4 * ctx.cfg.workers(),
        );
        let producer = {
            let (tracker, manifest, root) = (tracker.clone(), manifest.clone(), root.to_owned());
            let level = i32::from(start.compress);
            let (disk, cache) = (ctx.disk.clone(), ctx.cfg.source_cache);
            async move {
                for (file, offset) in needs {
                    let (len, want, folded) = {
                        let t = tracker.lock().unwrap_or_else(|p| p.into_inner());
                        let folded = t.is_folded(file, offset);
                        (t.chunk_len(file, offset), t.hash_of(file, offset), folded)
                    };
                    // A chunk whose page was folded has no hash of its own left to compare
                    // the second read with; the read still checks the file's size and
                    // mtime, and the targets compare tree digests at the end.
                    let Some(len) = len.filter(|_| want.is_some() || folded) else {
                        continue;
                    };
                    let entry = manifest.get(file as usize)?;
                    let job = ReadJob {
                        path: crate::scan::source_path(&root, &entry),
                        file,
                        offset,
                        size: entry.size(),
                        mtime: (entry.mtime_sec, entry.mtime_nsec),
                        len: len as usize,
                        level,
                        pool: pool.clone(),
                        disk: disk.clone(),
                        cache,
                    };
                    let permit = workers
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|e| TransferError::Internal(e.to_string()))?;
                    let c = tokio::task::spawn_blocking(move || job.run())
                        .await
                        .map_err(|e| TransferError::Internal(e.to_string()))??;
                    drop(permit);
                    if want.is_some_and(|w| c.hash != w) {
                        return Err(TransferError::SourceChanged {
                            path: display_path(&entry.path),
                            detail: format!(
                                "the chunk at {offset} read differently the second time"
                            ),
                        });
                    }
                    if tx.send(c).await.is_err() {
                        break;
                    }
                }
                Ok(())
            }
        };
        let consumer = async {
            let mut n = 0u64;
            while let Some(c) = rx.recv().await {
                let parts = [c.frame_prefix(), c.payload.clone()];
                let len = parts.iter().map(|p| p.len() as u64).sum();
                if let Some(p) = &totals.pacer {
                    p.take(len).await;
                }
                for l in links.iter_mut() {
                    if crate::frame::write_parts(&mut l.control, &parts)
                        .await
                        .is_ok()
                    {
                        totals.wire_bytes.fetch_add(len, Ordering::Relaxed);
                    }
                }
                n += 1;
            }
            n
        };
        let (produced, n) = tokio::join!(producer, consumer);
        produced?;
        resent += n;
        link::take_new_links(joined, links);
        for l in links.iter_mut() {
            let _ = crate::frame::write_message(&mut l.control, &Message::Repaired { round }).await;
        }
    }
    Ok(resent)
}

/// Opens links to the children of `me`. A child that cannot be reached (or refuses) is
/// reported failed and linked past: its own children are opened in its place, with the same
/// signed plan (a node accepts an `Open` from any node above it), as the [`link::Relinker`]
/// does for a child that fails later. The transfer goes on for the others.
pub(crate) async fn open_children(
    ctx: &Arc<Ctx>,
    open: &Open,
    me: usize,
    manifest: &Manifest,
    plan: &Arc<mover_protocol::Plan>,
    up: &Up,
    haves: &Up,
) -> Vec<Downlink> {
    let mut links = Vec::new();
    let mut todo: std::collections::VecDeque<usize> = plan.children(me).into();
    while let Some(child) = todo.pop_front() {
        match Downlink::open(ctx, open, child, manifest, haves).await {
            Ok(l) => links.push(l),
            Err(e) => {
                let name = &plan.nodes()[child].name;
                tracing::warn!(child = %name, error = %e, "cannot open link to child; linking past it");
                // A child that refused says why in its own words, naming itself.
                let reason = match &e {
                    TransferError::Refused(why) => why.clone(),
                    other => format!("link to {name} failed: {other}"),
                };
                link::report_failed(up, plan, &[child], &reason, e.retryable()).await;
                todo.extend(plan.children(child));
            }
        }
    }
    links
}

/// Reads every chunk, encodes it on a worker thread and sends it round-robin over the data
/// streams. Memory is bounded by the worker count and the channel depth, not the dataset.
#[allow(clippy::too_many_arguments)]
async fn stream_chunks(
    ctx: &Arc<Ctx>,
    root: &std::path::Path,
    manifest: &Arc<Manifest>,
    start: &Start,
    data_streams: Vec<Streams>,
    joiners: Vec<mpsc::UnboundedReceiver<(String, quinn::SendStream)>>,
    relinker: &Arc<link::Relinker>,
    haves: &Arc<Skips>,
) -> Result<(Totals, Arc<Mutex<Tracker>>), TransferError> {
    let n = data_streams.len();
    let mut writers = Vec::with_capacity(n);
    let pacer = crate::rate::Pacer::new(start.max_rate).map(Arc::new);
    let totals = Totals {
        pacer: pacer.clone(),
        ..Totals::default()
    };
    if start.max_rate > 0 {
        tracing::info!(
            bytes_per_sec = start.max_rate,
            "sending at most the set rate"
        );
    }
    let wire = totals.wire_bytes.clone();
    let skipped = totals.skipped.clone();
    // One queue of encoded frames for every data stream: whichever stream's writer is free
    // takes the next frame, so a stream slowed by its connection's congestion control does
    // not hold the others back.
    // Two frames per stream, no more than 8 in all (memory: see `crate::chunk::budget`).
    // An entry is one chunk's frame (prefix and payload) or a batch of small ones.
    let (tx, rx) = mpsc::channel::<Vec<Bytes>>((2 * n).clamp(1, 8));
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    // Writers waiting for a frame: the link is then ahead of the CPU (see the automatic
    // compression below). A writer counts only once it has sent its first frame: until
    // then there is nothing to tell, and compressing is the safer guess.
    let waiting = Arc::new(AtomicUsize::new(0));
    let auto = start
        .compress_auto
        .then(|| Arc::new(Auto::new(ctx.cfg.workers(), Instant::now())));
    for (mut streams, mut join) in data_streams.into_iter().zip(joiners) {
        let (rx, waiting, auto) = (rx.clone(), waiting.clone(), auto.clone());
        let wire = wire.clone();
        let relinker = relinker.clone();
        let pacer = pacer.clone();
        writers.push(tokio::spawn(async move {
            let mut first = true;
            loop {
                if !first {
                    waiting.fetch_add(1, Ordering::Relaxed);
                }
                let next = {
                    let mut rx = rx.lock().await;
                    match rx.try_recv() {
                        Ok(parts) => Some(parts),
                        Err(_) => {
                            if let Some(auto) = auto.as_ref().filter(|_| !first) {
                                auto.writer_starved();
                            }
                            rx.recv().await
                        }
                    }
                };
                if !first {
                    waiting.fetch_sub(1, Ordering::Relaxed);
                }
                first = false;
                let Some(parts) = next else {
                    break;
                };
                while let Ok(s) = join.try_recv() {
                    streams.push(Some(s));
                }
                if relinker.relinking() {
                    link::pause_for_relink(&relinker, &mut join, &mut streams).await;
                }
                // Every child on this stream dropped out (each is reported by its events
                // task) and none joins: this writer stops, and once every writer has, the
                // closed queue tells the producer.
                if streams.iter().all(Option::is_none)
                    && !link::wait_for_joiner(&relinker, &mut join, &mut streams).await
                {
                    return;
                }
                let len = parts.iter().map(|p| p.len() as u64).sum();
                if let Some(p) = &pacer {
                    p.take(len).await;
                }
                wire.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                link::forward(&parts, &mut streams).await;
            }
            join.close();
            while let Ok(s) = join.try_recv() {
                streams.push(Some(s));
            }
            link::finish_all(&mut streams);
        }));
    }
    // Chunks under way at once (read, waiting to encode, or encoding): more than the encoding
    // threads, so that the disk always has reads queued while the CPU encodes.
    let depth = read_ahead(ctx.cfg.workers()).min(crate::chunk::budget(start.chunk_size));
    let in_flight = Arc::new(Semaphore::new(depth));
    let workers = Arc::new(Semaphore::new(ctx.cfg.workers()));
    // Buffers in use at once: a read and a compressed copy per chunk under way, and a frame
    // queued or in flight per stream.
    let pool = Pool::new(
        crate::chunk::buffer_capacity(start.chunk_size),
        2 * depth + 4 * n,
    );
    let tracker = Arc::new(Mutex::new(Tracker::new(
        manifest.clone(),
        start.chunk_size,
    )?));
    let (err_tx, mut err_rx) = mpsc::channel::<TransferError>(1);
    let mut chunks = 0u64;
    let mut bytes = 0u64;
    // All on one host with no rate set: the "link" is a memory copy.
    let one_host = start.compress_auto && start.max_rate == 0 && all_on_loopback(&start.plan);
    if one_host {
        tracing::info!(
            "automatic compression: every node of this transfer listens on a loopback address \
             and no rate is set, so chunks go as they are (compressing would only spend this \
             host's CPU twice)"
        );
    }
    let encoder = Encoder {
        in_flight: in_flight.clone(),
        workers,
        tx: tx.clone(),
        waiting,
        tracker: tracker.clone(),
        err_tx,
        haves: haves.clone(),
        skipped,
        auto: auto.clone(),
        one_host,
    };
    // Consecutive small chunks (small files, and the tails of large ones) go to a worker
    // thread together, which reads and encodes them all and queues their frames at once:
    // one hand-off for many files instead of several per file.
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    let batch_limit = BATCH_BYTES.min(start.chunk_size as usize);
    for (id, e) in manifest.iter().enumerate() {
        let e = e?;
        let EntryKind::File { size } = e.kind else {
            continue;
        };
        let path = crate::scan::source_path(root, &e);
        let mut offset = 0;
        while offset < size {
            if let Ok(err) = err_rx.try_recv() {
                return Err(err);
            }
            if tx.is_closed() {
                return Err(TransferError::NoTargetsLeft);
            }
            let len = (size - offset).min(u64::from(start.chunk_size)) as usize;
            let job = ReadJob {
                path: path.clone(),
                file: id as u32,
                offset,
                size,
                mtime: (e.mtime_sec, e.mtime_nsec),
                len,
                level: i32::from(start.compress),
                pool: pool.clone(),
                disk: ctx.disk.clone(),
                cache: ctx.cfg.source_cache,
            };
            chunks += 1;
            bytes += len as u64;
            offset += len as u64;
            if len > SMALL_READ {
                encoder.spawn(vec![job]).await?;
                continue;
            }
            // A batch is read into one buffer of the pool, so it stays within one.
            if batch_bytes + len > batch_limit {
                encoder.spawn(std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
            batch.push(job);
            batch_bytes += len;
            if batch.len() >= BATCH_CHUNKS {
                encoder.spawn(std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
        }
    }
    if !batch.is_empty() {
        encoder.spawn(batch).await?;
    }
    drop(encoder);
    // Wait for every job: they hold permits until their frame is queued.
    let _all = in_flight
        .acquire_many(depth as u32)
        .await
        .map_err(|e| TransferError::Internal(e.to_string()))?;
    if let Ok(err) = err_rx.try_recv() {
        return Err(err);
    }
    drop(tx);
    for w in writers {
        let _ = w.await;
    }
    if let Some(auto) = &auto {
        tracing::info!(
            raw_bytes = auto.raw_bytes(),
            fast_bytes = auto.fast_bytes(),
            level = start.compress,
            bytes,
            "automatic compression: of all the bytes, these went as they were, and these at \
             zstd's fast level (the rest at the level given)"
        );
    }
    Ok((
        Totals {
            bytes,
            chunks,
            ..totals
        },
        tracker,
    ))
}

/// Chunks of at most this many bytes (small files) are read on the thread that encodes them,
/// in batches of up to [`BATCH_CHUNKS`] chunks or [`BATCH_BYTES`] bytes.
const SMALL_READ: usize = 64 << 10;
const BATCH_CHUNKS: usize = 64;
const BATCH_BYTES: usize = 1 << 20;

/// Hands chunks to the encoding threads and queues their frames for the data streams.
struct Encoder {
    /// A permit per job under way (read, waiting to encode, or encoding).
    in_flight: Arc<Semaphore>,
    /// A permit per encoding thread.
    workers: Arc<Semaphore>,
    tx: mpsc::Sender<Vec<Bytes>>,
    /// Data-stream writers waiting for a frame.
    waiting: Arc<AtomicUsize>,
    tracker: Arc<Mutex<Tracker>>,
    err_tx: mpsc::Sender<TransferError>,
    haves: Arc<Skips>,
    skipped: Arc<AtomicU64>,
    /// With automatic compression: what picks each chunk's level.
    auto: Option<Arc<Auto>>,
    one_host: bool,
}

impl Encoder {
    /// Starts reading and encoding `jobs` (one large chunk, or a batch of small ones) once a
    /// job may start; their frames are queued together. A failure goes to the error channel.
    async fn spawn(&self, mut jobs: Vec<ReadJob>) -> Result<(), TransferError> {
        let internal = |e: &dyn std::fmt::Display| TransferError::Internal(e.to_string());
        let permit = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| internal(&e))?;
        let (tx, waiting, workers) = (self.tx.clone(), self.waiting.clone(), self.workers.clone());
        let (tracker, err_tx, haves, skipped) = (
            self.tracker.clone(),
            self.err_tx.clone(),
            self.haves.clone(),
            self.skipped.clone(),
        );
        let (auto, one_host) = (self.auto.clone(), self.one_host);
        tokio::spawn(async move {
            let result = async {
                // A large chunk is read through the disk back end before it waits for an
                // encoding thread; small ones are read on that thread itself: for a few KiB
                // the hand-offs to the disk thread and back cost more than the read.
                let read = match jobs.as_slice() {
                    [job] if job.len > SMALL_READ => Some(job.read().await?),
                    _ => None,
                };
                let _cpu = workers.acquire_owned().await.map_err(|e| internal(&e))?;
                // Automatic compression (see `crate::auto_compress`): raw when a writer
                // waits with nothing queued (or all on one host), zstd's fast level when the
                // encoding threads have had no rest, else the transfer's level.
                if let Some(auto) = &auto {
                    let starved = one_host
                        || (waiting.load(Ordering::Relaxed) > 0
                            && tx.capacity() == tx.max_capacity());
                    let len = jobs.iter().map(|j| j.len as u64).sum();
                    let given = jobs.first().map_or(0, |j| j.level);
                    let level = auto.level(given, starved, len, Instant::now());
                    for job in &mut jobs {
                        job.level = level;
                    }
                }
                tokio::task::spawn_blocking(move || {
                    let began = Instant::now();
                    let chunks = match (read, jobs.pop()) {
                        (Some((f, buf)), Some(job)) => vec![job.encode(&f, buf.freeze())?],
                        (_, last) => encode_batch(jobs.into_iter().chain(last).collect())?,
                    };
                    if let Some(auto) = &auto {
                        auto.encoded(began.elapsed());
                    }
                    Ok(chunks)
                })
                .await
                .map_err(|e| internal(&e))?
            }
            .await;
            match result {
                Ok(chunks) => {
                    {
                        let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
                        for c in &chunks {
                            if t.admit(c).is_ok() {
                                t.verified(c.file, c.offset, c.hash);
                            }
                        }
                    }
                    let mut frames = Vec::with_capacity(2 * chunks.len());
                    for c in chunks {
                        if haves.skip(c.file, c.offset, &c.hash) {
                            skipped.fetch_add(u64::from(c.raw_len), Ordering::Relaxed);
                        } else {
                            frames.push(c.frame_prefix());
                            frames.push(c.payload);
                        }
                    }
                    if !frames.is_empty() {
                        let _ = tx.send(frames).await;
                    }
                }
                Err(e) => {
                    let _ = err_tx.try_send(e);
                }
            }
            drop(permit);
        });
        Ok(())
    }
}

/// One chunk to read and encode on a worker thread.
struct ReadJob {
    path: PathBuf,
    file: u32,
    offset: u64,
    size: u64,
    /// The modification time the scan saw, as (seconds, nanoseconds).
    mtime: (i64, u32),
    len: usize,
    /// zstd's level, 0 for none.
    level: i32,
    pool: Arc<Pool>,
    disk: Arc<dyn crate::disk::Disk>,
    cache: crate::disk::SourceCache,
}

impl ReadJob {
    fn io_error(&self, source: std::io::Error) -> TransferError {
        TransferError::Read {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Reads and encodes the chunk on this (blocking) thread.
    fn run(self) -> Result<mover_protocol::Chunk, TransferError> {
        let f = Arc::new(std::fs::File::open(&self.path).map_err(|e| self.io_error(e))?);
        let buf = self.pool.take_for_overwrite(self.len);
        let read = self
            .disk
            .read(f.clone(), self.offset, buf, self.cache)
            .wait();
        let buf = self.check_read(read)?;
        self.encode(&f, buf.freeze())
    }

    /// Reads the chunk from an async task, so that reads queue on the disk back end while
    /// the encoding threads are busy. Returns the open file for [`ReadJob::encode`].
    async fn read(&self) -> Result<(Arc<std::fs::File>, PoolBuf), TransferError> {
        let f = Arc::new(std::fs::File::open(&self.path).map_err(|e| self.io_error(e))?);
        let buf = self.pool.take_for_overwrite(self.len);
        let read = self
            .disk
            .read(f.clone(), self.offset, buf, self.cache)
            .done()
            .await;
        Ok((f, self.check_read(read)?))
    }

    fn check_read(
        &self,
        read: std::io::Result<(PoolBuf, usize)>,
    ) -> Result<PoolBuf, TransferError> {
        let (buf, got) = read.map_err(|e| self.io_error(e))?;
        self.check_len(got)?;
        Ok(buf)
    }

    /// Fails if a read got `got` bytes, fewer than the chunk has.
    fn check_len(&self, got: usize) -> Result<(), TransferError> {
        if got < self.len {
            return Err(TransferError::SourceChanged {
                path: display_path(self.path.as_os_str().as_encoded_bytes()),
                detail: format!(
                    "it ended at {} bytes, the scan saw {}",
                    self.offset + got as u64,
                    self.size
                ),
            });
        }
        Ok(())
    }

    /// Checks that the file did not change under the read, then hashes and compresses.
    fn encode(
        self,
        f: &std::fs::File,
        data: Bytes,
    ) -> Result<mover_protocol::Chunk, TransferError> {
        self.check_unchanged(f)?;
        Ok(self.encode_read(data))
    }

    /// Hashes and compresses the chunk, read and checked.
    fn encode_read(self, data: Bytes) -> mover_protocol::Chunk {
        chunk::encode(
            self.file,
            self.offset,
            self.size,
            data,
            self.level,
            &self.pool,
        )
    }

    /// Fails if the file changed since the scan. A write during or before a read moves the
    /// file's mtime (or size): what was read may be a mix of two versions, so the transfer
    /// must not go on with it.
    fn check_unchanged(&self, f: &std::fs::File) -> Result<(), TransferError> {
        let meta = f.metadata().map_err(|e| self.io_error(e))?;
        let now = (meta.mtime(), u32::try_from(meta.mtime_nsec()).unwrap_or(0));
        if meta.len() != self.size || now != self.mtime {
            return Err(TransferError::SourceChanged {
                path: display_path(self.path.as_os_str().as_encoded_bytes()),
                detail: if meta.len() != self.size {
                    format!("its size is now {}, the scan saw {}", meta.len(), self.size)
                } else {
                    "it was modified after the scan".to_owned()
                },
            });
        }
        Ok(())
    }
}

/// Reads a batch of small chunks on this (blocking) thread into one buffer, one after the
/// other, and encodes each from its part of it: their frames then share one allocation until
/// the last is acknowledged, instead of a buffer each (thousands of small files may be in
/// flight at once).
fn encode_batch(jobs: Vec<ReadJob>) -> Result<Vec<mover_protocol::Chunk>, TransferError> {
    let Some(first) = jobs.first() else {
        return Ok(Vec::new());
    };
    let total = jobs.iter().map(|j| j.len).sum();
    let mut buf = first.pool.take_for_overwrite(total);
    let mut at = 0;
    for job in &jobs {
        let f = std::fs::File::open(&job.path).map_err(|e| job.io_error(e))?;
        let part = &mut buf[at..at + job.len];
        let got = crate::disk::threads::read_full(&f, job.offset, part, job.cache);
        job.check_len(got.map_err(|e| job.io_error(e))?)?;
        job.check_unchanged(&f)?;
        at += job.len;
    }
    let all = buf.freeze();
    let mut at = 0;
    Ok(jobs
        .into_iter()
        .map(|job| {
            let data = all.slice(at..at + job.len);
            at += job.len;
            job.encode_read(data)
        })
        .collect())
}

/// Whether every node of `plan` listens on a loopback address, so that all of them share
/// this host's CPUs and the "link" between them is a memory copy: compressing a chunk then
/// costs CPU at both ends and saves nothing the link would have spent.
fn all_on_loopback(plan: &Plan) -> bool {
    plan.nodes().iter().all(|n| is_loopback_address(&n.address))
}

/// Whether `host:port` (or `[v6]:port`) names a loopback address.
fn is_loopback_address(address: &str) -> bool {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Chunks a source keeps under way for `workers` encoding threads.
fn read_ahead(workers: usize) -> usize {
    (2 * workers).clamp(4, 16)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mover_protocol::manifest::Entry;
    use mover_protocol::{PlanNode, Topology};

    fn plan(targets: &[&str]) -> Plan {
        let n = |name: &str| PlanNode {
            name: name.into(),
            address: "a".into(),
            dataset: "d".into(),
            parent: None,
        };
        Plan::build(
            n("s"),
            targets.iter().map(|t| n(t)).collect(),
            Topology::Chain,
        )
        .unwrap()
    }

    #[test]
    fn loopback_addresses_are_told_from_others() {
        for a in [
            "127.0.0.1:4710",
            "127.8.9.10:1",
            "[::1]:4710",
            "localhost:4710",
        ] {
            assert!(is_loopback_address(a), "{a}");
        }
        for a in [
            "198.18.0.2:4710",
            "[2001:db8::1]:4710",
            "east1:4710",
            "10.0.0.1:1",
        ] {
            assert!(!is_loopback_address(a), "{a}");
        }
        let mut p = plan(&["t1", "t2"]);
        assert!(
            !all_on_loopback(&p),
            "addresses named \"a\" are not loopback"
        );
        let mut on = |addrs: &[&str]| {
            let nodes = addrs
                .iter()
                .enumerate()
                .map(|(i, a)| PlanNode {
                    name: format!("n{i}"),
                    address: (*a).into(),
                    dataset: "d".into(),
                    parent: None,
                })
                .collect::<Vec<_>>();
            p = Plan::build(nodes[0].clone(), nodes[1..].to_vec(), Topology::Chain).unwrap();
            all_on_loopback(&p)
        };
        assert!(on(&["127.0.0.1:1", "127.0.0.1:2", "[::1]:3"]));
        assert!(!on(&["127.0.0.1:1", "198.18.0.2:2", "127.0.0.1:3"]));
    }

    fn manifest() -> Manifest {
        let e = |path: &str, kind| Entry {
            path: path.as_bytes().to_vec().into(),
            kind,
            mode: 0o755,
            mtime_sec: 0,
            mtime_nsec: 0,
        };
        Manifest::from_entries(vec![
            e("", EntryKind::Dir),
            e("f", EntryKind::File { size: 10_000 }),
        ])
        .unwrap()
    }

    #[tokio::test]
    async fn a_round_waits_for_every_live_target_and_keeps_only_real_chunks() {
        let r = Arc::new(Rounds::new(
            &plan(&["a", "b", "c"]),
            Arc::new(manifest()),
            4096,
        ));
        // Chunks the manifest does not have are dropped: a file id past the end, the root
        // directory, an offset off a chunk boundary or past the end.
        r.need(
            "a".into(),
            true,
            vec![(1, 4096), (9, 0), (0, 0), (1, 100), (1, 12_288)],
        );
        r.finished("c".into());
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait(0).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "b has not answered");
        r.need("b".into(), false, vec![(1, 0)]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "b's answer is not done yet");
        r.need("b".into(), true, vec![]);
        let got = waiter.await.unwrap();
        assert_eq!(got.into_iter().collect::<Vec<_>>(), vec![(1, 0), (1, 4096)]);
        // The next round starts empty: everyone must answer again.
        r.need("a".into(), true, vec![]);
        let next = tokio::time::timeout(Duration::from_millis(100), r.wait(1)).await;
        assert!(next.is_err(), "b has not answered round 1");
    }

    fn job(path: PathBuf, file: u32, len: usize, pool: &Arc<Pool>) -> ReadJob {
        let meta = std::fs::metadata(&path).unwrap();
        ReadJob {
            path,
            file,
            offset: 0,
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec() as u32),
            len,
            level: 0,
            pool: pool.clone(),
            disk: Arc::new(crate::disk::threads::Threads::start(1).unwrap()),
            cache: crate::disk::SourceCache::Keep,
        }
    }

    #[test]
    fn a_batch_of_small_files_is_read_into_one_buffer_and_each_chunk_stands_alone() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::new(chunk::buffer_capacity(1 << 20), 4);
        let datas: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + 3000 * i as usize]).collect();
        let jobs: Vec<_> = datas
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let path = dir.path().join(format!("f{i}"));
                std::fs::write(&path, d).unwrap();
                job(path, i as u32 + 1, d.len(), &pool)
            })
            .collect();
        let chunks = encode_batch(jobs).unwrap();
        assert_eq!(chunks.len(), 5);
        for (i, (c, d)) in chunks.iter().zip(&datas).enumerate() {
            assert_eq!(c.file, i as u32 + 1);
            assert_eq!(
                &c.payload[..],
                &d[..],
                "chunk {i} carries its own file's bytes"
            );
            assert_eq!(c.raw_len as usize, d.len());
            let decoded = chunk::decode(c, d.len() as u64, &pool).unwrap();
            assert_eq!(&decoded[..], &d[..]);
        }
        // All five share one buffer: it goes back to the pool once the last frame is gone.
        let idle = pool.idle();
        let last = chunks.into_iter().last().unwrap();
        assert_eq!(pool.idle(), idle);
        drop(last);
        assert_eq!(pool.idle(), idle + 1);
    }

    #[test]
    fn a_batch_fails_when_a_file_changed_since_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::new(chunk::buffer_capacity(1 << 20), 4);
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"first").unwrap();
        std::fs::write(&b, b"second").unwrap();
        let jobs = vec![job(a, 1, 5, &pool), job(b.clone(), 2, 6, &pool)];
        std::fs::write(&b, b"sec").unwrap();
        let err = encode_batch(jobs).unwrap_err();
        assert!(
            matches!(&err, TransferError::SourceChanged { path, .. } if path.ends_with("/b")),
            "{err}"
        );
    }
}
