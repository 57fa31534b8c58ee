//! The source side of a transfer: scan the dataset, read, hash and compress chunks on worker
//! threads, and stream them to the plan's first hops.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use mover_protocol::manifest::{display_path, EntryKind, Manifest};
use mover_protocol::{Message, Open, Start, Tracker};
use tokio::sync::{mpsc, Semaphore};

use crate::agent::Ctx;
use crate::chunk;
use crate::error::TransferError;
use crate::link::{self, close, Downlink, Streams, Up};
use crate::pool::Pool;

/// What the source reports when everything was read and sent.
struct Totals {
    bytes: u64,
    wire_bytes: u64,
    chunks: u64,
}

/// Runs a transfer started by the controller. Every outcome goes to `up` as messages; the
/// function returns when every target has reported.
pub(crate) async fn run(ctx: Arc<Ctx>, start: Start, up: Up) {
    let plan = Arc::new(start.plan.clone());
    let targets: Vec<usize> = (1..plan.nodes().len()).collect();
    if let Err(e) = run_inner(&ctx, start, plan.clone(), up.clone()).await {
        tracing::warn!(error = %e, "transfer failed at the source");
        let reason = format!("source {} failed: {e}", ctx.node);
        link::report_failed(&up, &plan, &targets, &reason, e.retryable()).await;
    }
}

async fn run_inner(
    ctx: &Arc<Ctx>,
    start: Start,
    plan: Arc<mover_protocol::Plan>,
    up: Up,
) -> Result<(), TransferError> {
    let dataset = &plan.source().dataset;
    let root = ctx
        .cfg
        .datasets
        .get(dataset)
        .ok_or_else(|| TransferError::UnknownDataset {
            node: ctx.node.clone(),
            dataset: dataset.clone(),
        })?
        .path
        .clone();
    let scan_root = root.clone();
    let scan = tokio::task::spawn_blocking(move || crate::scan::scan(&scan_root))
        .await
        .map_err(|e| TransferError::Internal(e.to_string()))??;
    for p in &scan.skipped {
        tracing::warn!(path = %p.display(), "skipping a socket, FIFO or device file");
    }
    let manifest = Arc::new(scan.manifest);
    let _ = up
        .send(Message::ManifestEnd {
            entries: manifest.entries.len() as u64,
            total_bytes: manifest.total_bytes(),
        })
        .await;

    let open = Open {
        transfer_id: start.transfer_id,
        chunk_size: start.chunk_size,
        connections: start.connections,
        plan: start.plan.clone(),
    };
    let links = open_children(ctx, &open, 0, &manifest, &plan, &up).await;
    let link::Fanout {
        events: events_tasks,
        streams: data_streams,
        links: mut all_links,
    } = link::Fanout::new(links, start.connections, &plan, &up);
    if !all_links.is_empty() {
        let totals = stream_chunks(ctx, &root, &manifest, &start, data_streams).await;
        match totals {
            Ok((totals, digest)) => {
                for l in &mut all_links {
                    let _ = crate::frame::write_message(
                        &mut l.control,
                        &Message::End {
                            chunks: totals.chunks,
                            digest,
                        },
                    )
                    .await;
                    let _ = l.control.finish();
                }
                let _ = up
                    .send(Message::Sent {
                        bytes: totals.bytes,
                        wire_bytes: totals.wire_bytes,
                        chunks: totals.chunks,
                        files: manifest.file_count(),
                    })
                    .await;
            }
            Err(TransferError::NoTargetsLeft) => {
                for t in events_tasks {
                    let _ = t.await;
                }
                return Ok(());
            }
            Err(e) => {
                // Report the real cause first: the controller keeps each target's first
                // report, and closing the links makes the events tasks report link failures.
                tracing::warn!(error = %e, "transfer failed at the source");
                let targets: Vec<usize> = (1..plan.nodes().len()).collect();
                let reason = format!("source {} failed: {e}", ctx.node);
                link::report_failed(&up, &plan, &targets, &reason, e.retryable()).await;
                for l in &all_links {
                    l.close(close::FAILED, "source failed");
                }
                for t in events_tasks {
                    let _ = t.await;
                }
                return Ok(());
            }
        }
    }
    for t in events_tasks {
        let _ = t.await;
    }
    for l in &all_links {
        l.close(close::DONE, "done");
    }
    Ok(())
}

/// Opens links to the children of `me`; a child that cannot be reached is reported failed
/// with its subtree, and the transfer goes on for the others.
pub(crate) async fn open_children(
    ctx: &Arc<Ctx>,
    open: &Open,
    me: usize,
    manifest: &Manifest,
    plan: &Arc<mover_protocol::Plan>,
    up: &Up,
) -> Vec<Downlink> {
    let mut links = Vec::new();
    for child in plan.children(me) {
        match Downlink::open(&ctx.endpoint, open, child, manifest).await {
            Ok(l) => links.push(l),
            Err(e) => {
                let name = &plan.nodes()[child].name;
                tracing::warn!(child = %name, error = %e, "cannot open link to child");
                // A child that refused says why in its own words, naming itself.
                let reason = match &e {
                    TransferError::Refused(why) => why.clone(),
                    other => format!("link to {name} failed: {other}"),
                };
                link::report_failed(up, plan, &[child], &reason, e.retryable()).await;
                let below = plan.descendants(child);
                link::report_failed(
                    up,
                    plan,
                    &below,
                    &format!("upstream relay {name} could not be reached: {e}"),
                    e.retryable(),
                )
                .await;
            }
        }
    }
    links
}

/// Reads every chunk, encodes it on a worker thread and sends it round-robin over the data
/// streams. Memory is bounded by the worker count and the channel depth, not the dataset.
async fn stream_chunks(
    ctx: &Arc<Ctx>,
    root: &std::path::Path,
    manifest: &Arc<Manifest>,
    start: &Start,
    data_streams: Vec<Streams>,
) -> Result<(Totals, [u8; 32]), TransferError> {
    let n = data_streams.len();
    let mut senders = Vec::with_capacity(n);
    let mut writers = Vec::with_capacity(n);
    let wire = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for mut streams in data_streams {
        let (tx, mut rx) = mpsc::channel::<[Bytes; 2]>(2);
        senders.push(tx);
        let wire = wire.clone();
        writers.push(tokio::spawn(async move {
            while let Some(parts) = rx.recv().await {
                wire.fetch_add(
                    (parts[0].len() + parts[1].len()) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                link::forward(&parts, &mut streams).await;
                if streams.iter().all(Option::is_none) {
                    // Every child on this stream dropped out (each is reported by its
                    // events task); dropping the receiver tells the producer.
                    return;
                }
            }
            link::finish_all(&mut streams);
        }));
    }
    let workers = Arc::new(Semaphore::new(ctx.cfg.workers()));
    // Buffers in use at once: a read and a compressed copy per worker, and a frame queued or
    // in flight per stream.
    let pool = Pool::new(
        crate::chunk::buffer_capacity(start.chunk_size),
        2 * ctx.cfg.workers() + 4 * n,
    );
    let tracker = Arc::new(Mutex::new(Tracker::new(manifest, start.chunk_size)));
    let (err_tx, mut err_rx) = mpsc::channel::<TransferError>(1);
    let mut chunks = 0u64;
    let mut bytes = 0u64;
    for (id, e) in manifest.entries.iter().enumerate() {
        let EntryKind::File { size } = e.kind else {
            continue;
        };
        let path = crate::scan::source_path(root, e);
        let mut offset = 0;
        while offset < size {
            if let Ok(err) = err_rx.try_recv() {
                return Err(err);
            }
            if senders.iter().all(mpsc::Sender::is_closed) {
                return Err(TransferError::NoTargetsLeft);
            }
            let len = (size - offset).min(u64::from(start.chunk_size)) as usize;
            let permit = workers
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| TransferError::Internal(e.to_string()))?;
            let tx = senders[(chunks % n as u64) as usize].clone();
            let (tracker, err_tx) = (tracker.clone(), err_tx.clone());
            let job = ReadJob {
                path: path.clone(),
                file: id as u32,
                offset,
                size,
                len,
                level: start.compress,
                pool: pool.clone(),
            };
            tokio::spawn(async move {
                let job = tokio::task::spawn_blocking(move || job.run()).await;
                let result = match job {
                    Ok(r) => r,
                    Err(e) => Err(TransferError::Internal(e.to_string())),
                };
                match result {
                    Ok(c) => {
                        {
                            let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
                            if t.admit(&c).is_ok() {
                                t.verified(c.file, c.offset, c.hash);
                            }
                        }
                        let prefix = c.frame_prefix();
                        let _ = tx.send([prefix, c.payload]).await;
                    }
                    Err(e) => {
                        let _ = err_tx.try_send(e);
                    }
                }
                drop(permit);
            });
            chunks += 1;
            bytes += len as u64;
            offset += len as u64;
        }
    }
    // Wait for every job: they hold permits until their frame is queued.
    let _all = workers
        .acquire_many(ctx.cfg.workers() as u32)
        .await
        .map_err(|e| TransferError::Internal(e.to_string()))?;
    if let Ok(err) = err_rx.try_recv() {
        return Err(err);
    }
    drop(senders);
    for w in writers {
        let _ = w.await;
    }
    let digest = tracker
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .digest()
        .ok_or_else(|| TransferError::Internal("source did not hash every chunk".into()))?;
    let totals = Totals {
        bytes,
        wire_bytes: wire.load(std::sync::atomic::Ordering::Relaxed),
        chunks,
    };
    Ok((totals, digest))
}

/// One chunk to read and encode on a worker thread.
struct ReadJob {
    path: PathBuf,
    file: u32,
    offset: u64,
    size: u64,
    len: usize,
    level: u8,
    pool: Arc<Pool>,
}

impl ReadJob {
    fn run(self) -> Result<mover_protocol::Chunk, TransferError> {
        let io = |source| TransferError::Read {
            path: self.path.display().to_string(),
            source,
        };
        let f = std::fs::File::open(&self.path).map_err(io)?;
        let mut buf = self.pool.take(self.len);
        let mut done = 0;
        while done < self.len {
            match f.read_at(&mut buf[done..], self.offset + done as u64) {
                Ok(0) => {
                    return Err(TransferError::SourceChanged {
                        path: display_path(self.path.as_os_str().as_encoded_bytes()),
                        detail: format!(
                            "it ended at {} bytes, the scan saw {}",
                            self.offset + done as u64,
                            self.size
                        ),
                    })
                }
                Ok(k) => done += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(chunk::encode(
            self.file,
            self.offset,
            self.size,
            buf,
            self.level,
            &self.pool,
        ))
    }
}
