//! The receiving side of a transfer: a target, and a relay when the plan gives it children.
//!
//! A relay forwards every chunk frame to its children exactly as it arrived, before and
//! independently of its own decoding, so the hops below never wait for its disk. Its own copy
//! is verified and written into a staging area, which replaces the dataset only after every
//! chunk and the whole tree's digest check out. On a node that forwards nothing, a raw chunk
//! is hashed piece by piece as it arrives (while each piece is still in the CPU's cache);
//! every other chunk is checked on a worker thread (a compressed one after it is
//! decompressed), and a worker thread writes each chunk that matched.
//!
//! Before it says `Ready`, a receiver seeds its staging area from what it already has (an
//! interrupted run's verified chunks, an older copy of the dataset; see [`crate::basis`]) and
//! tells the source with `Have`. After the data streams end it reads those held chunks back
//! from staging and checks them, then asks for whatever is missing or damaged with `Need`;
//! the source resends those on the control stream in repair rounds until nothing is missing,
//! then sends `End`.
//!
//! A receive that fails for a reason a rerun can fix (a lost link, a stopped source) keeps its
//! staging area and its record, so the next transfer into the dataset resumes from them.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mover_protocol::hash::chunk_hash;
use mover_protocol::manifest::{display_path, ManifestBuilder};
use mover_protocol::message::{MAX_LIST_ENTRIES, MAX_ROUNDS};
use mover_protocol::{max_frame_len, Admit, Chunk, Manifest, Message, Open, Outcome, Tracker};
use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;

use crate::agent::Ctx;
use crate::backup::Prepared;
use crate::basis::{self, Record, Recorded};

use crate::error::{LinkError, TransferError};
use crate::frame::{read_frame_hashing, read_message};
use crate::link::{self, Downlink, Up};
use crate::pool::Pool;
use crate::staging::{Staging, StagingError, StagingVerify, WholeFile};

/// How long to wait for the parent's data streams after saying `Ready`.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// How often progress goes upstream.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How long the manifest may take to arrive.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a newer transfer into a dataset waits for the one it replaces to let go.
const SUPERSEDE_WAIT: Duration = Duration::from_secs(60);
/// Most chunks one node asks for in a round; more means something is badly wrong.
const MAX_NEED: usize = 4 << 20;
/// Held chunks read back at a time in the final check.
const CHECK_BATCH: usize = 4096;

/// Handles an `Open` from our parent on its control stream.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    open: Open,
    parent: String,
    parent_conn: quinn::Connection,
    mut control: SendStream,
    from_parent: RecvStream,
) {
    if let Err(reason) = ctx.check_grant(&open) {
        link::refuse(&mut control, &ctx.node, reason).await;
        return;
    }
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
    // Our parent, or a node above it taking over for a parent that died; never a node beside
    // or below us.
    let above = std::iter::successors(plan.nodes()[me].parent, |&p| {
        plan.nodes()[usize::from(p)].parent
    })
    .any(|p| plan.nodes()[usize::from(p)].name == parent);
    if !above {
        link::refuse(
            &mut control,
            &ctx.node,
            format!("{parent} is not above this node in the plan"),
        )
        .await;
        return;
    }
    if let Some(outcome) = ctx.committed(open.transfer_id) {
        // A node linking in again past a dead relay (or replaying a kept grant): this one
        // finished already, and says so rather than run the transfer twice.
        tracing::info!(%parent, "transfer committed here already; reporting it again");
        link::answer(&mut control, &ctx.node, outcome).await;
        return;
    }
    // Everything upstream (Have, Ready, then this subtree's events) goes through one pump; a
    // receive that fails before Ready sends its Report instead, which the parent reads.
    let (up_tx, up_rx) = mpsc::channel::<Message>(1024);
    let pump = tokio::spawn(link::pump_up(up_rx, control));
    let generation = ctx.next_generation();
    let (ctl_tx, ctl_rx) = mpsc::channel(4);
    let reader = tokio::spawn(read_control(
        from_parent,
        max_frame_len(open.chunk_size),
        ctl_tx,
    ));
    let r = Receive {
        ctx: ctx.clone(),
        sender: parent,
        open: &open,
        plan,
        me,
        generation,
        parent_conn,
        up: up_tx.clone(),
        started,
        reported: std::sync::atomic::AtomicBool::new(false),
    };
    if let Err(e) = r.run(ctl_rx).await {
        r.fail_own(&e).await;
    }
    reader.abort();
    // Every sender of the upstream channel must go for the pump to finish its stream: the
    // receive holds one too.
    drop(r);
    drop(up_tx);
    let _ = pump.await;
    let mut reg = ctx.registry.lock().unwrap_or_else(|p| p.into_inner());
    if reg
        .get(&open.transfer_id)
        .is_some_and(|r| r.generation == generation)
    {
        reg.remove(&open.transfer_id);
    }
}

/// Reads the parent's control stream into a channel, so that waiting for it can be combined
/// with other waits without losing a half-read frame.
async fn read_control(
    mut recv: RecvStream,
    max_len: u32,
    tx: mpsc::Sender<Result<Message, LinkError>>,
) {
    loop {
        let m = read_message(&mut recv, max_len).await;
        let stop = m.is_err();
        if tx.send(m).await.is_err() || stop {
            return;
        }
    }
}

type Control = mpsc::Receiver<Result<Message, LinkError>>;

async fn next_control(ctl: &mut Control) -> Result<Message, LinkError> {
    ctl.recv().await.unwrap_or(Err(LinkError::Closed))
}

/// This node's claim on a dataset: while it lives, no other receive writes into the dataset's
/// staging area.
struct Claim {
    ctx: Arc<Ctx>,
    dataset: String,
    generation: u64,
    _released: oneshot::Sender<()>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut active = self.ctx.active.lock().unwrap_or_else(|p| p.into_inner());
        if active
            .get(&self.dataset)
            .is_some_and(|a| a.generation == self.generation)
        {
            active.remove(&self.dataset);
        }
    }
}

/// Claims `dataset` for this receive. A receive already running into it (whose parent is
/// gone, or which a rerun replaces) is stopped, and waited for until it lets go.
async fn claim(
    ctx: &Arc<Ctx>,
    dataset: &str,
    generation: u64,
    transfer_id: u64,
    conn: &quinn::Connection,
) -> Result<Claim, TransferError> {
    if ctx
        .replaced
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&transfer_id)
    {
        return Err(TransferError::Refused(format!(
            "{}: transfer {transfer_id:016x} was replaced by a newer transfer into {dataset}",
            ctx.node
        )));
    }
    let (tx, rx) = oneshot::channel();
    let previous = {
        let mut active = ctx.active.lock().unwrap_or_else(|p| p.into_inner());
        active.insert(
            dataset.to_owned(),
            crate::agent::Active {
                generation,
                transfer_id,
                conn: conn.clone(),
                released: Some(rx),
            },
        )
    };
    if let Some(mut p) = previous {
        // The same transfer again (its sender linked past a dead relay) takes over quietly;
        // another one replaces it for good.
        if p.transfer_id != transfer_id {
            let mut replaced = ctx.replaced.lock().unwrap_or_else(|p| p.into_inner());
            replaced.push_back(p.transfer_id);
            if replaced.len() > 64 {
                replaced.pop_front();
            }
        }
        tracing::info!(%dataset, "a newer transfer replaces the one running into this dataset");
        p.conn.close(
            link::close::SUPERSEDED.into(),
            b"replaced by a newer transfer into the same dataset",
        );
        if let Some(rx) = p.released.take() {
            if tokio::time::timeout(SUPERSEDE_WAIT, rx).await.is_err() {
                return Err(TransferError::Busy {
                    dataset: dataset.to_owned(),
                    secs: SUPERSEDE_WAIT.as_secs(),
                });
            }
        }
    }
    Ok(Claim {
        ctx: ctx.clone(),
        dataset: dataset.to_owned(),
        generation,
        _released: tx,
    })
}

/// Counters of one receive.
#[derive(Default)]
struct Counts {
    /// Chunks fetched again after failing verification.
    repaired: AtomicU64,
}

/// One receive: what every step needs.
struct Receive<'a> {
    ctx: Arc<Ctx>,
    /// The node that sent the `Open` (its certificate's name): only it may attach data.
    sender: String,
    open: &'a Open,
    plan: Arc<mover_protocol::Plan>,
    me: usize,
    generation: u64,
    parent_conn: quinn::Connection,
    up: Up,
    started: Instant,
    /// Whether this node's own failure was reported.
    reported: std::sync::atomic::AtomicBool,
}

/// The staging area with what goes with it.
struct Stage {
    /// Taken out at commit.
    staging: Option<Arc<Staging>>,
    record: Arc<Record>,
    record_path: std::path::PathBuf,
    /// Chunks of an interrupted run found damaged while seeding.
    damaged: u64,
    /// What runs on the verified copy before it is committed (a backup method's `prepare`).
    prepare: Option<Prepared>,
}

impl Receive<'_> {
    /// Reports this node's own failure upstream, once.
    async fn fail_own(&self, e: &TransferError) {
        if self.reported.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::warn!(error = %e, "this node's copy failed");
        let _ = self
            .up
            .send(Message::Report {
                node: self.ctx.node.clone(),
                outcome: Outcome::Failed {
                    reason: format!("{}: {e}", self.ctx.node),
                    retryable: e.retryable(),
                },
            })
            .await;
    }

    async fn run(&self, mut ctl: Control) -> Result<(), TransferError> {
        let ctx = &self.ctx;
        let dataset = &self.plan.nodes()[self.me].dataset;
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
        let _claim = claim(
            ctx,
            dataset,
            self.generation,
            self.open.transfer_id,
            &self.parent_conn,
        )
        .await?;
        if let Some(outcome) = ctx.committed(self.open.transfer_id) {
            // The receive this one took over from committed while it let go.
            tracing::info!("transfer committed here already; reporting it again");
            self.reported.store(true, Ordering::Relaxed);
            let _ = self
                .up
                .send(Message::Report {
                    node: ctx.node.clone(),
                    outcome,
                })
                .await;
            return Ok(());
        }

        // The manifest, checked entry by entry as it arrives.
        let table = Arc::from(crate::table::table_in(&ctx.cfg.state_dir, "the manifest"));
        let manifest = tokio::time::timeout(MANIFEST_TIMEOUT, read_manifest(&mut ctl, table))
            .await
            .map_err(|_| LinkError::Timeout {
                what: "the manifest",
                secs: MANIFEST_TIMEOUT.as_secs(),
            })??;
        let manifest = Arc::new(manifest);

        // A backup method's copy is prepared before its commit, by this agent's own hook:
        // one that cannot be run fails this node before any data arrives.
        let before_commit = crate::backup::tool(self.open.method)
            .map(|tool| crate::backup::prepare_command(ctx, tool, dataset, &dest))
            .transpose();
        let (state_dir, m2, label) = (ctx.cfg.state_dir.clone(), manifest.clone(), dataset.clone());
        // Seeding reads a chunk per thread: as many threads as the chunk budget holds.
        let (chunk_size, threads) = (self.open.chunk_size, self.writing());
        let writes = ctx.cfg.staging_writes;
        let prepared = match before_commit {
            Err(e) => Err(e),
            Ok(before_commit) => tokio::task::spawn_blocking(move || {
                prepare(&state_dir, &dest, &label, m2, chunk_size, threads).map(
                    |(mut stage, seeded)| {
                        if let Some(s) = &stage.staging {
                            s.set_writes(writes);
                        }
                        stage.prepare = before_commit;
                        (stage, seeded)
                    },
                )
            })
            .await
            .map_err(|e| TransferError::Internal(e.to_string()))?,
        };
        let mut tracker = Tracker::new(manifest.clone(), self.open.chunk_size)?;
        let (mut stage, own_failure) = match prepared {
            Ok((mut stage, seeded)) => {
                // The tracker finds held chunks' hashes where seeding put them.
                tracker = tracker.with_table(seeded.hashes.table());
                // One message's worth at a time: the list can name every chunk.
                let mut chunks = Vec::new();
                let mut held = seeded.held().peekable();
                while held.peek().is_some() {
                    chunks.clear();
                    for h in held.by_ref().take(MAX_LIST_ENTRIES as usize) {
                        if tracker.held_in_table(h.file, h.offset) {
                            chunks.push(h);
                        }
                    }
                    let _ = self
                        .up
                        .send(Message::Have {
                            node: ctx.node.clone(),
                            chunks: std::mem::take(&mut chunks),
                        })
                        .await;
                }
                if seeded.count() > 0 || seeded.damaged > 0 {
                    tracing::info!(
                        resumed = seeded.resumed,
                        reused = seeded.reused,
                        damaged = seeded.damaged,
                        held_bytes = tracker.bytes_done(),
                        "staging seeded from what was already here"
                    );
                }
                stage.damaged = seeded.damaged;
                (Some(stage), None)
            }
            // A relay that cannot hold its own copy (a full disk) still passes the data on.
            // (Its failure is reported after Ready: before, it would read as a refusal.)
            Err(e) if !self.plan.children(self.me).is_empty() => (None, Some(e)),
            Err(e) => return Err(e),
        };
        let tracker = Arc::new(Mutex::new(tracker));
        let counts = Arc::new(Counts::default());
        if let Some(s) = &stage {
            counts.repaired.store(s.damaged, Ordering::Relaxed);
        }
        let result = self
            .receive_into(
                &mut ctl,
                &manifest,
                &mut stage,
                &tracker,
                &counts,
                own_failure.as_ref(),
            )
            .await;
        let result = match own_failure {
            Some(e) => Err(e),
            None => result,
        };
        let Some(Stage {
            staging,
            record,
            record_path,
            ..
        }) = stage
        else {
            return result;
        };
        drop(record);
        let Some(staging) = staging else {
            // Committed (or consumed by a commit that failed).
            let _ = std::fs::remove_file(&record_path);
            return result;
        };
        match &result {
            Ok(()) => {}
            Err(e) if e.retryable() => {
                // Kept for the next run; wait for the last writer so that nothing writes into
                // it once the claim is released.
                if let Some(s) = sole(staging).await {
                    tracing::info!(path = %s.path().display(), "staging kept to resume from");
                }
            }
            Err(_) => {
                if let Some(s) = sole(staging).await {
                    let path = s.path().to_owned();
                    match tokio::task::spawn_blocking(move || s.abort()).await {
                        Ok(Ok(())) => {
                            tracing::info!(path = %path.display(), "removed staging area")
                        }
                        Ok(Err(e)) => tracing::warn!(error = %e, "could not remove staging area"),
                        Err(e) => tracing::warn!(error = %e, "could not remove staging area"),
                    }
                }
                let _ = std::fs::remove_file(&record_path);
            }
        }
        result
    }

    async fn receive_into(
        &self,
        ctl: &mut Control,
        manifest: &Arc<Manifest>,
        stage: &mut Option<Stage>,
        tracker: &Arc<Mutex<Tracker>>,
        counts: &Arc<Counts>,
        own_failure: Option<&TransferError>,
    ) -> Result<(), TransferError> {
        let (ctx, open, plan, me, up) = (&self.ctx, self.open, &self.plan, self.me, &self.up);
        // Children first, so that they are ready when data starts to flow; what they hold
        // goes up as it comes, before our Ready.
        let mut links = crate::source::open_children(ctx, open, me, manifest, plan, up, up).await;
        for l in &mut links {
            for h in std::mem::take(&mut l.early) {
                let _ = up.send(h).await;
            }
        }
        let (relinker, joining) =
            link::Relinker::new(ctx.clone(), open.clone(), manifest.clone(), up.clone());
        let link::Joining {
            joiners,
            new_links: mut joined,
        } = joining;
        let link::Fanout {
            events: events_tasks,
            streams: per_stream,
            links: mut controls,
        } = link::Fanout::new(links, open.connections, plan, up, &relinker);

        let (attach_tx, mut attach_rx) = mpsc::channel::<RecvStream>(usize::from(open.connections));
        ctx.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                open.transfer_id,
                crate::agent::Registration {
                    parent: self.sender.clone(),
                    streams: attach_tx,
                    connections: open.connections,
                    generation: self.generation,
                },
            );
        let _ = up.send(Message::Ready).await;
        tracing::debug!(children = controls.len(), "ready");
        if let Some(e) = own_failure {
            self.fail_own(e).await;
        }

        // Chunks decoded and written at once: one per worker thread, as many as the chunk
        // budget holds (a frame and its decompressed copy each).
        let writing = self.writing();
        let workers = Arc::new(Semaphore::new(writing));
        // Buffers in use at once: a frame being read, forwarded or decoded per stream, and a
        // frame and its decompressed copy per chunk being written.
        let pool = Pool::new(
            crate::chunk::buffer_capacity(open.chunk_size),
            2 * writing + 3 * usize::from(open.connections),
        );
        let failure: Arc<Mutex<Option<TransferError>>> = Arc::new(Mutex::new(None));
        let progress = spawn_progress(ctx.node.clone(), tracker.clone(), up.clone());
        let writer = stage.as_ref().and_then(|st| {
            Some(Writer {
                tracker: tracker.clone(),
                staging: st.staging.clone()?,
                record: st.record.clone(),
                counts: counts.clone(),
                ctx: ctx.clone(),
                pool: pool.clone(),
            })
        });

        let mut data_tasks = JoinSet::new();
        for (streams, join) in per_stream.into_iter().zip(joiners) {
            let attach = tokio::time::timeout(ATTACH_TIMEOUT, attach_rx.recv());
            let recv = tokio::select! {
                r = attach => r.map_err(|_| LinkError::Timeout {
                    what: "the parent's data streams",
                    secs: ATTACH_TIMEOUT.as_secs(),
                })?
                .ok_or(LinkError::Closed)?,
                e = self.parent_conn.closed() => return Err(LinkError::Connection(e).into()),
            };
            let job = DataJob {
                writer: writer.clone(),
                relinker: relinker.clone(),
                pool: pool.clone(),
                workers: workers.clone(),
                failure: failure.clone(),
                max_len: max_frame_len(open.chunk_size),
            };
            data_tasks.spawn(job.run(recv, streams, join));
        }
        tracing::debug!("data streams attached");
        let (outcome, ended) = self
            .rounds(
                ctl,
                &mut data_tasks,
                (&mut controls, &mut joined),
                writer.as_ref(),
                &workers,
                &failure,
            )
            .await;
        progress.abort();
        drop(writer);
        let result = match outcome {
            Ok(digest) => self.commit(stage, tracker, counts, digest).await,
            Err(e) => Err(e),
        };
        link::take_new_links(&mut joined, &mut controls);
        if result.is_err() && ended.is_none() {
            // Failing (or replaced by a newer transfer): take over nothing below.
            relinker.cancel();
        }
        if ended.is_none() {
            for l in &controls {
                l.close(link::close::FAILED, "upstream failed");
            }
        }
        link::await_subtrees(events_tasks, ended.as_ref(), &mut joined, &mut controls).await;
        drop(relinker);
        link::take_new_links(&mut joined, &mut controls);
        for l in &controls {
            l.close(link::close::DONE, "done");
        }
        result
    }

    /// Chunks decoded and written at once: twice the worker threads, since each write holds
    /// its thread while the device writes it and then reads it back, and the CPU should have
    /// other chunks to decode and check meanwhile (as the source reads ahead of its encoders);
    /// no more than the chunk memory budget holds.
    fn writing(&self) -> usize {
        (2 * self.ctx.cfg.workers()).min(crate::chunk::budget(self.open.chunk_size))
    }

    /// Makes the staging area the dataset and reports it.
    async fn commit(
        &self,
        stage: &mut Option<Stage>,
        tracker: &Arc<Mutex<Tracker>>,
        counts: &Counts,
        digest: [u8; 32],
    ) -> Result<(), TransferError> {
        let (bytes, files, held_bytes) = {
            let t = tracker.lock().unwrap_or_else(|p| p.into_inner());
            (t.bytes_done(), t.files_done(), t.held_bytes())
        };
        let prepare = stage.as_mut().and_then(|s| s.prepare.take());
        let staging = stage
            .as_mut()
            .and_then(|s| s.staging.take())
            .ok_or_else(|| TransferError::Internal("no staging area".into()))?;
        commit(staging, prepare).await?;
        let outcome = Outcome::Committed {
            bytes,
            files,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            digest,
            held: held_bytes,
            repaired: counts.repaired.load(Ordering::Relaxed),
        };
        self.ctx.note_committed(self.open.transfer_id, &outcome);
        tracing::info!(bytes, files, "committed");
        let _ = self
            .up
            .send(Message::Report {
                node: self.ctx.node.clone(),
                outcome,
            })
            .await;
        Ok(())
    }

    /// The main pass on the data streams, then repair rounds on the control stream until the
    /// parent's `End`. Returns the source's digest once ours equals it, and the `End` if it was
    /// passed on to the children (after which they finish on their own).
    ///
    /// Once this node's own copy has failed it asks for nothing more, but it keeps passing
    /// everything on to its children until the end.
    async fn rounds(
        &self,
        ctl: &mut Control,
        data_tasks: &mut JoinSet<Result<(), LinkError>>,
        (controls, joined): (&mut Vec<Downlink>, &mut mpsc::UnboundedReceiver<Downlink>),
        writer: Option<&Writer>,
        workers: &Arc<Semaphore>,
        failure: &Arc<Mutex<Option<TransferError>>>,
    ) -> (Result<[u8; 32], TransferError>, Option<Message>) {
        // The main pass ends when every data stream has. The parent says nothing on the
        // control stream until its own main pass is over, so anything there now means that
        // it is gone, or that this node was linked in late (past a dead relay) and hears
        // the repair rounds or `End` while its data streams, already over upstream, end.
        let mut early: Option<Message> = None;
        let late_deadline = tokio::time::sleep(Duration::MAX);
        tokio::pin!(late_deadline);
        loop {
            tokio::select! {
                () = &mut late_deadline, if early.is_some() => {
                    return (Err(LinkError::Timeout {
                        what: "the data streams to end after the parent's repair rounds began",
                        secs: ATTACH_TIMEOUT.as_secs(),
                    }.into()), None);
                }
                r = data_tasks.join_next() => match r {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => return (Err(e.into()), None),
                    Some(Err(e)) => return (Err(TransferError::Internal(e.to_string())), None),
                },
                m = next_control(ctl), if early.is_none() => {
                    if let Ok(m @ (Message::Chunk(_) | Message::Repaired { .. } | Message::End { .. })) = m {
                        tracing::debug!(message = m.name(), "heard from the parent before the data streams ended");
                        early = Some(m);
                        late_deadline.as_mut().reset(tokio::time::Instant::now() + ATTACH_TIMEOUT);
                        continue;
                    }
                    // The parent spoke out of turn or is gone. Give the data streams a moment
                    // to drain: a chunk that broke the rules says more than what followed it.
                    let drain = async {
                        while let Some(r) = data_tasks.join_next().await {
                            if let Ok(Err(e)) = r {
                                return Some(e);
                            }
                        }
                        None
                    };
                    let data_error = tokio::time::timeout(Duration::from_secs(1), drain).await;
                    data_tasks.abort_all();
                    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        return (Err(e), None);
                    }
                    if let Ok(Some(e)) = data_error {
                        return (Err(e.into()), None);
                    }
                    return (Err(match m {
                        Err(e) => e.into(),
                        Ok(other) => LinkError::Unexpected { got: other.name(), expected: "data" }.into(),
                    }), None);
                }
            }
        }
        tracing::debug!("main pass done");
        if let Err(e) = settle(workers, self.writing()).await {
            return (Err(e), None);
        }
        let mut own: Option<TransferError> =
            failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut writer = writer.filter(|_| own.is_none());
        if let Some(w) = writer {
            // Read everything back before asking for what is missing: damage on disk is
            // repaired like damage in transit.
            let w2 = w.clone();
            // A chunk buffer per thread: as many as the chunk budget holds.
            let threads = self.writing();
            match tokio::task::spawn_blocking(move || w2.check_staging(threads)).await {
                Ok(0) => {}
                Ok(lost) => {
                    tracing::warn!(
                        chunks = lost,
                        "chunks in staging did not match their hash; asking again"
                    );
                    w.counts.repaired.fetch_add(lost, Ordering::Relaxed);
                }
                Err(e) => own = Some(TransferError::Internal(e.to_string())),
            }
        }
        if let Some(e) = &own {
            // With End already here the failure is reported with the result, once the
            // staging area has been dealt with; otherwise now, for the rounds still to come.
            if !matches!(early, Some(Message::End { .. })) {
                self.fail_own(e).await;
            }
            writer = None;
        } else if let Some(w) = writer {
            if let Err(e) = self.send_needs(&w.tracker, 0).await {
                return (Err(e), None);
            }
        }
        loop {
            let m = match early.take() {
                Some(m) => m,
                None => match next_control(ctl).await {
                    Ok(m) => m,
                    Err(e) => return (Err(own.unwrap_or_else(|| e.into())), None),
                },
            };
            link::take_new_links(joined, controls);
            match &m {
                Message::Chunk(c) => {
                    forward_control(controls, &m).await;
                    if let Some(w) = writer {
                        if let Err(e) = w.repair(c.clone()).await {
                            self.fail_own(&e).await;
                            own = Some(e);
                            writer = None;
                        }
                    }
                }
                Message::Repaired { round } => {
                    forward_control(controls, &m).await;
                    if let Some(w) = writer {
                        if let Err(e) = self.send_needs(&w.tracker, round + 1).await {
                            return (Err(e), None);
                        }
                    }
                }
                Message::End { digest, .. } => {
                    if let Some(hold) = self.ctx.faults.hold_end() {
                        tracing::warn!(?hold, "TEST FAULT: holding End back");
                        // Until the agent stops, as a relay busy elsewhere would be.
                        tokio::select! {
                            () = tokio::time::sleep(hold) => {}
                            _ = self.parent_conn.closed() => {}
                        }
                    }
                    link::take_new_links(joined, controls);
                    forward_control(controls, &m).await;
                    for l in controls.iter_mut() {
                        let _ = l.control.finish();
                    }
                    if let Some(e) = own {
                        return (Err(e), Some(m.clone()));
                    }
                    let Some(w) = writer else {
                        return (
                            Err(TransferError::Internal("no staging area".into())),
                            Some(m.clone()),
                        );
                    };
                    let t = w.tracker.lock().unwrap_or_else(|p| p.into_inner());
                    if !t.is_complete() {
                        return (
                            Err(TransferError::Incomplete {
                                missing: t.missing_chunks(),
                            }),
                            Some(m.clone()),
                        );
                    }
                    if t.digest() != Some(*digest) {
                        return (Err(TransferError::DigestMismatch), Some(m.clone()));
                    }
                    return (Ok(*digest), Some(m.clone()));
                }
                other => {
                    return (
                        Err(LinkError::Unexpected {
                            got: other.name(),
                            expected: "repairs or end",
                        }
                        .into()),
                        None,
                    )
                }
            }
        }
    }

    /// Tells the source which chunks this node still lacks after `round`.
    async fn send_needs(&self, tracker: &Mutex<Tracker>, round: u32) -> Result<(), TransferError> {
        if round > MAX_ROUNDS {
            let missing = tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .missing_chunks();
            return Err(TransferError::Unrepaired {
                missing,
                rounds: MAX_ROUNDS,
            });
        }
        let missing = tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .missing(MAX_NEED + 1);
        if missing.len() > MAX_NEED {
            return Err(TransferError::Incomplete {
                missing: missing.len() as u64,
            });
        }
        if !missing.is_empty() {
            tracing::info!(round, chunks = missing.len(), "asking for missing chunks");
        }
        let parts: Vec<&[(u32, u64)]> = if missing.is_empty() {
            vec![&[]]
        } else {
            missing.chunks(MAX_LIST_ENTRIES as usize).collect()
        };
        let last = parts.len() - 1;
        for (i, part) in parts.into_iter().enumerate() {
            let _ = self
                .up
                .send(Message::Need {
                    node: self.ctx.node.clone(),
                    round,
                    done: i == last,
                    chunks: part.to_vec(),
                })
                .await;
        }
        Ok(())
    }
}

/// Reads the manifest from the parent into `table`.
async fn read_manifest(
    ctl: &mut Control,
    table: Arc<dyn mover_protocol::table::Table>,
) -> Result<Manifest, TransferError> {
    let mut builder = ManifestBuilder::in_table(table);
    loop {
        match next_control(ctl).await? {
            Message::ManifestPart(entries) => builder.push(entries)?,
            Message::ManifestEnd {
                entries,
                total_bytes,
            } => return Ok(builder.finish(entries, total_bytes)?),
            other => {
                return Err(LinkError::Unexpected {
                    got: other.name(),
                    expected: "manifest",
                }
                .into())
            }
        }
    }
}

/// Makes the staging area (from an interrupted run's, when there is one) and seeds it.
fn prepare(
    state_dir: &std::path::Path,
    dest: &std::path::Path,
    label: &str,
    manifest: Arc<Manifest>,
    chunk_size: u32,
    threads: usize,
) -> Result<(Stage, basis::Seeded), TransferError> {
    let dir = Staging::locate(state_dir, dest, label)?;
    let leftover = basis::set_aside(&dir)?;
    // With nothing to seed from, the files are made while the data already flows: creating
    // thousands of them takes seconds on a busy filesystem.
    let created = if leftover.is_none() && !dest.is_dir() {
        // Files that fit one chunk are made whole by the writer that gets that chunk.
        Staging::create_deferred(state_dir, dest, label, manifest, u64::from(chunk_size))
    } else {
        Staging::create(state_dir, dest, label, manifest)
    };
    let staging = match created {
        Ok(s) => s,
        Err(e) => {
            if let Some(l) = leftover {
                basis::discard(l);
            }
            return Err(e.into());
        }
    };
    let record_path = basis::record_path(&dir);
    let seeded = Record::create(&record_path)
        .map_err(|e| TransferError::Internal(format!("create {}: {e}", record_path.display())))
        .and_then(|record| {
            let old = dest.is_dir().then_some(dest);
            // Held chunks' hashes go to a file when there is anything to hold.
            let table: Arc<dyn mover_protocol::table::Table> =
                if leftover.is_some() || old.is_some() {
                    Arc::from(crate::table::table_in(state_dir, "the chunks held here"))
                } else {
                    Arc::new(mover_protocol::table::MemTable::default())
                };
            // An interrupted run's record is read into a table of its own.
            let resume = leftover.as_ref().map(|l| {
                (
                    l,
                    crate::table::table_in(state_dir, "the interrupted run's record"),
                )
            });
            let seeded = basis::seed(
                &staging,
                chunk_size,
                resume.as_ref().map(|(l, t)| (*l, &**t)),
                old,
                &record,
                table,
                threads,
            )?;
            Ok((record, seeded))
        });
    if let Some(l) = leftover {
        basis::discard(l);
    }
    match seeded {
        Ok((record, seeded)) => Ok((
            Stage {
                staging: Some(Arc::new(staging)),
                record: Arc::new(record),
                record_path,
                damaged: 0,
                prepare: None,
            },
            seeded,
        )),
        Err(e) => {
            let _ = staging.abort();
            let _ = std::fs::remove_file(&record_path);
            Err(e)
        }
    }
}

/// Waits until every worker has let go of the staging area, and returns it.
async fn sole(mut staging: Arc<Staging>) -> Option<Staging> {
    for _ in 0..600 {
        match Arc::try_unwrap(staging) {
            Ok(s) => return Some(s),
            Err(s) => staging = s,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!(path = %staging.path().display(), "staging area still in use; left in place");
    None
}

/// What a failed `prepare` means for this node.
const NOT_PREPARED: &str = "nothing was committed here and the old data is untouched";

/// Makes the verified staging area durable and swaps it into place; with `prepare`, runs it on
/// the finished tree first, and commits nothing (removing the copy) if it fails.
async fn commit(staging: Arc<Staging>, prepare: Option<Prepared>) -> Result<(), TransferError> {
    let staging = sole(staging)
        .await
        .ok_or_else(|| TransferError::Internal("staging area still in use at commit".into()))?;
    let (staging, finalized) = blocking(move || {
        let r = staging.finalize();
        (staging, r)
    })
    .await?;
    finalized?;
    let prepared = prepare.is_some();
    if let Some(prepare) = prepare {
        // The tool works on the tree as it will be, modes and links in place.
        if let Err(e) = prepare.run(NOT_PREPARED).await {
            let path = staging.path().to_owned();
            match blocking(move || staging.abort()).await {
                Ok(Ok(())) => {
                    tracing::info!(path = %path.display(), "removed the copy that failed to prepare")
                }
                Ok(Err(rm)) => {
                    tracing::warn!(path = %path.display(), error = %rm, "could not remove a copy that failed to prepare")
                }
                Err(rm) => {
                    tracing::warn!(path = %path.display(), error = %rm, "could not remove a copy that failed to prepare")
                }
            }
            return Err(e);
        }
    }
    blocking(move || -> Result<(), TransferError> {
        if prepared {
            // What the tool changed must be on disk before the swap.
            staging.sync()?;
        }
        staging.commit()?;
        Ok(())
    })
    .await?
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransferError::Internal(e.to_string()))
}

/// Waits for every write in flight (each holds a worker permit).
async fn settle(workers: &Semaphore, n: usize) -> Result<(), TransferError> {
    let _all = workers
        .acquire_many(n as u32)
        .await
        .map_err(|e| TransferError::Internal(e.to_string()))?;
    Ok(())
}

/// Passes a control message on to every child; a child whose stream fails is left to its
/// events task to report.
async fn forward_control(controls: &mut [Downlink], m: &Message) {
    let frame = m.to_frame();
    for l in controls.iter_mut() {
        if let Err(e) = l.control.write_all(&frame).await {
            tracing::debug!(child = %l.node, error = %e, "control stream to child failed");
        }
    }
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

/// Decodes, verifies and writes this node's copy of chunks.
#[derive(Clone)]
struct Writer {
    tracker: Arc<Mutex<Tracker>>,
    staging: Arc<Staging>,
    record: Arc<Record>,
    counts: Arc<Counts>,
    ctx: Arc<Ctx>,
    pool: Arc<Pool>,
}

impl Writer {
    /// Decompresses, checks and writes admitted chunks (on a blocking thread), as the
    /// agent's `staging_verify` says: checked in memory and then written, or written and
    /// then read back and checked. Staging is only ever committed whole once every chunk
    /// passed. A chunk that fails is missing again, to be asked for; only a write that fails
    /// is an error (the chunks after it are then missing again too). The chunks that passed
    /// go into the record with one write.
    fn write(&self, chunks: Vec<Arrived>) -> Result<(), TransferError> {
        let mut landed = Vec::with_capacity(chunks.len());
        let mut failure = None;
        for Arrived { chunk, hashed } in chunks {
            if failure.is_some() {
                self.tracker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .failed(chunk.file, chunk.offset);
                continue;
            }
            match self.land(chunk, hashed) {
                Ok(Some(l)) => landed.push(l),
                Ok(None) => {}
                Err(e) => failure = Some(e),
            }
        }
        let mut paths = Vec::with_capacity(landed.len());
        for (file, _) in &landed {
            paths.push(self.staging.manifest().get(*file as usize)?.path);
        }
        let records: Vec<(&[u8], Recorded)> = paths
            .iter()
            .zip(&landed)
            .map(|(path, (_, r))| (&path[..], *r))
            .collect();
        let recorded = if records.is_empty() {
            Ok(())
        } else {
            self.record
                .append_all(&records)
                .map_err(|e| TransferError::Internal(format!("append to record: {e}")))
        };
        let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        for (file, r) in &landed {
            if recorded.is_ok() {
                t.verified(*file, r.offset, r.hash);
            } else {
                t.failed(*file, r.offset);
            }
        }
        match failure {
            Some(e) => Err(e),
            None => recorded,
        }
    }

    /// Writes one chunk and checks it as [`Writer::write`] says: `hashed` is the hash of its
    /// raw bytes when that was taken as they arrived. Returns the chunk's file and record
    /// when it passed, `None` when it is to be fetched again.
    fn land(
        &self,
        mut chunk: Chunk,
        mut hashed: Option<[u8; 32]>,
    ) -> Result<Option<(u32, Recorded)>, TransferError> {
        if self.ctx.faults.flip_chunk() {
            let mut damaged = chunk.payload.to_vec();
            crate::fault::flip(&mut damaged);
            chunk.payload = Bytes::from(damaged);
            // Damaged "in transit": before anything was hashed.
            hashed = None;
        }
        // The path only for a warning: no copy of it per chunk.
        let manifest = self.staging.manifest();
        let size = manifest.file_size(chunk.file as usize)?.unwrap_or(0);
        let shown = || {
            manifest
                .with(chunk.file as usize, |e| display_path(&e.path))
                .unwrap_or_else(|e| format!("file {} ({e})", chunk.file))
        };
        let decoded = crate::chunk::decompress(&chunk, &self.pool);
        let raw = match decoded {
            Ok(raw) => raw,
            Err(e) => {
                tracing::warn!(path = %shown(), error = %e, "chunk failed verification; it will be fetched again");
                self.refetch(&chunk);
                return Ok(None);
            }
        };
        // The frame is not needed any more: its buffer goes back to the pool before the
        // write (or the read-back) takes one.
        chunk.payload = Bytes::new();
        let len = chunk.raw_len as usize;
        let matched = match self.ctx.cfg.staging_verify {
            // Checked in memory, then written only if it matched.
            StagingVerify::Memory => {
                let held = match hashed {
                    Some(h) => raw.len() == len && h == chunk.hash,
                    None => holds(&raw, len, chunk.offset, size, &chunk.hash),
                };
                if !held {
                    tracing::warn!(path = %shown(), offset = chunk.offset,
                        "chunk failed verification: as received it did not match its hash (damaged in transit); it will be fetched again");
                    self.refetch(&chunk);
                    return Ok(None);
                }
                self.put(&chunk, raw).map(|_| true)
            }
            // Written, then read back from staging (from the device, where writes go
            // around the page cache) and checked.
            StagingVerify::ReadBack => self.put(&chunk, raw).and_then(|written| {
                self.damage_if_asked(&chunk);
                let back = match written {
                    Some(whole) => whole.read_back(&self.pool, len),
                    None => self.staging.read_back(
                        &*self.ctx.disk,
                        &self.pool,
                        chunk.file,
                        chunk.offset,
                        len,
                    ),
                };
                back.map(|buf| holds(&buf, len, chunk.offset, size, &chunk.hash))
            }),
        };
        match matched {
            Ok(true) => Ok(Some((
                chunk.file,
                Recorded {
                    file_size: size,
                    offset: chunk.offset,
                    len: chunk.raw_len,
                    hash: chunk.hash,
                },
            ))),
            Ok(false) => {
                tracing::warn!(path = %shown(), offset = chunk.offset,
                    "chunk failed verification: read back from staging, it did not match its hash (damaged in transit, or the disk returned other bytes than were written); it will be fetched again");
                self.refetch(&chunk);
                Ok(None)
            }
            Err(e) => {
                self.tracker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .failed(chunk.file, chunk.offset);
                Err(e.into())
            }
        }
    }

    /// Writes a decoded chunk into staging: a file that fits one chunk whole (returned, for a
    /// read-back), any other chunk at its offset.
    fn put(&self, chunk: &Chunk, raw: Bytes) -> Result<Option<WholeFile>, StagingError> {
        if self.staging.writes_whole(chunk.file) {
            let whole = self.staging.write_whole(chunk.file, &raw)?;
            Ok(Some(whole))
        } else {
            let (disk, pool) = (&*self.ctx.disk, &self.pool);
            self.staging
                .write_with(disk, pool, chunk.file, chunk.offset, raw)
                .map(|()| None)
        }
    }

    /// Makes a chunk that failed a check missing again, to be asked for, and counts it.
    fn refetch(&self, chunk: &Chunk) {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed(chunk.file, chunk.offset);
        self.counts.repaired.fetch_add(1, Ordering::Relaxed);
    }

    /// A chunk resent on the control stream.
    async fn repair(&self, chunk: Chunk) -> Result<(), TransferError> {
        let admitted = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(&chunk)?;
        if admitted == Admit::Skip {
            return Ok(());
        }
        let w = self.clone();
        let arrived = Arrived {
            chunk,
            hashed: None,
        };
        tokio::task::spawn_blocking(move || w.write(vec![arrived]))
            .await
            .map_err(|e| TransferError::Internal(e.to_string()))?
    }

    /// Test fault: damages the chunk just written, before it is read back.
    fn damage_if_asked(&self, chunk: &Chunk) {
        if self.ctx.faults.flip_staging() {
            self.damage(chunk.file, chunk.offset);
        }
    }

    /// Reads every chunk held from before the transfer back from staging and checks its
    /// hash (each chunk written in the transfer was checked as it was written); a chunk
    /// that does not match is missing again. Returns how many did not.
    ///
    /// A batch at a time, in file order: a chunk that matches is done like one received, so
    /// the tracker folds its page and forgets its hash as the check goes.
    fn check_staging(&self, threads: usize) -> u64 {
        let cs = self.staging.manifest().len();
        let mut from = (0u32, 0u64);
        let mut lost_count = 0;
        loop {
            let held = self
                .tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .held_from(from, CHECK_BATCH);
            let Some(&(file, offset, _)) = held.last() else {
                return lost_count;
            };
            from = (file, offset + 1);
            let next = AtomicU64::new(0);
            let lost = Mutex::new(Vec::new());
            std::thread::scope(|s| {
                for _ in 0..threads.max(1) {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(&(file, offset, hash)) = held.get(i) else {
                            return;
                        };
                        if (file as usize) >= cs || !self.matches(file, offset, hash) {
                            lost.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((file, offset));
                        }
                    });
                }
            });
            let mut lost = lost.into_inner().unwrap_or_else(|p| p.into_inner());
            lost.sort_unstable();
            let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
            for &(file, offset, hash) in &held {
                if lost.binary_search(&(file, offset)).is_ok() {
                    lost_count += u64::from(t.lost(file, offset));
                } else {
                    t.confirm(file, offset, hash);
                }
            }
        }
    }

    fn matches(&self, file: u32, offset: u64, hash: [u8; 32]) -> bool {
        let len = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .chunk_len(file, offset);
        let Some(len) = len else {
            return false;
        };
        let size = (self.staging.manifest().file_size(file as usize))
            .ok()
            .flatten()
            .unwrap_or(0);
        let read = self
            .staging
            .read_back(&*self.ctx.disk, &self.pool, file, offset, len as usize);
        read.is_ok_and(|buf| holds(&buf, len as usize, offset, size, &hash))
    }

    /// Test fault: flips a bit of one chunk in staging.
    fn damage(&self, file: u32, offset: u64) {
        use std::os::unix::fs::FileExt;
        let Some(path) = self.staging.entry_path_of(file) else {
            return;
        };
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        else {
            return;
        };
        let mut b = [0u8; 1];
        if f.read_exact_at(&mut b, offset).is_ok() {
            crate::fault::flip(&mut b);
            let _ = f.write_all_at(&b, offset);
            tracing::warn!(path = %path.display(), offset, "TEST FAULT: flipped a bit in staging");
        }
    }
}

/// Whether `buf`, read back from staging, is the whole chunk of `len` bytes at `offset` of a
/// file of `size` bytes whose hash is `hash`.
fn holds(buf: &[u8], len: usize, offset: u64, size: u64, hash: &[u8; 32]) -> bool {
    buf.len() == len && chunk_hash(buf, offset, size) == *hash
}

/// A chunk as received, with the hash of its raw bytes when that was taken as they arrived.
struct Arrived {
    chunk: Chunk,
    hashed: Option<[u8; 32]>,
}

/// Chunks taken in from a data stream and not yet handed to a worker thread.
#[derive(Default)]
struct Batch {
    chunks: Vec<Arrived>,
    /// Their raw bytes.
    bytes: usize,
}

/// A batch goes to a worker thread once it holds this many chunks or bytes.
const BATCH_CHUNKS: usize = 64;
const BATCH_BYTES: usize = 1 << 20;

/// Reads one data stream: forwards each frame to the children, then decodes and writes our
/// own copy on a worker thread.
struct DataJob {
    /// `None` on a relay that holds no copy of its own.
    writer: Option<Writer>,
    relinker: Arc<link::Relinker>,
    pool: Arc<Pool>,
    workers: Arc<Semaphore>,
    failure: Arc<Mutex<Option<TransferError>>>,
    max_len: u32,
}

impl DataJob {
    async fn run(
        self,
        mut recv: RecvStream,
        mut children: Vec<Option<(String, SendStream)>>,
        mut join: mpsc::UnboundedReceiver<(String, SendStream)>,
    ) -> Result<(), LinkError> {
        let result = self.pump(&mut recv, &mut children, &mut join).await;
        // Links that join from now on get no more data on this stream.
        join.close();
        while let Ok(s) = join.try_recv() {
            children.push(Some(s));
        }
        link::finish_all(&mut children);
        result
    }

    async fn pump(
        &self,
        recv: &mut RecvStream,
        children: &mut Vec<Option<(String, SendStream)>>,
        join: &mut mpsc::UnboundedReceiver<(String, SendStream)>,
    ) -> Result<(), LinkError> {
        let mut batch = Batch::default();
        let result = self.pump_into(&mut batch, recv, children, join).await;
        // Chunks taken in are written whatever ended the stream.
        let written = self.write_batch(&mut batch).await;
        result.and(written)
    }

    /// Forwards and takes in frames until the stream ends. Chunks that arrive together (small
    /// files: many frames in one burst of packets) go to a worker thread together, so that
    /// each small file does not cost a hand-off of its own: a frame already received joins
    /// the batch, and the batch is handed off whenever the next frame is not here yet or
    /// the batch is full.
    async fn pump_into(
        &self,
        batch: &mut Batch,
        recv: &mut RecvStream,
        children: &mut Vec<Option<(String, SendStream)>>,
        join: &mut mpsc::UnboundedReceiver<(String, SendStream)>,
    ) -> Result<(), LinkError> {
        // Our copy is checked in memory: its raw chunks are hashed as they arrive, on a node
        // that forwards nothing. A relay forwards each frame first and leaves its own check
        // to a worker thread, so the hops below never wait for it.
        let manifest = self
            .writer
            .as_ref()
            .filter(|w| w.ctx.cfg.staging_verify == StagingVerify::Memory)
            .map(|w| w.staging.manifest());
        let file_size = |file: u32| manifest?.file_size(file as usize).ok().flatten();
        loop {
            let relaying = children.iter().any(Option::is_some);
            let size_here = |file: u32| file_size(file).filter(|_| !relaying);
            let next = read_frame_hashing(recv, self.max_len, &self.pool, size_here);
            tokio::pin!(next);
            let ready = if batch.chunks.is_empty() {
                None
            } else {
                // One poll: the future stays pinned here and is awaited to its end below, so
                // a frame half read is never dropped.
                match std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await {
                    Poll::Ready(frame) => Some(frame),
                    Poll::Pending => None,
                }
            };
            let frame = match ready {
                Some(frame) => frame?,
                None => {
                    self.write_batch(batch).await?;
                    next.await?
                }
            };
            let Some((frame, hashed)) = frame else {
                return Ok(());
            };
            while let Ok(s) = join.try_recv() {
                children.push(Some(s));
            }
            if self.relinker.relinking() {
                link::pause_for_relink(&self.relinker, join, children).await;
            }
            link::forward(std::slice::from_ref(&frame.bytes), children).await;
            let Some(writer) = &self.writer else {
                continue;
            };
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
            let admitted = writer
                .tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .admit(&chunk);
            match admitted {
                Ok(Admit::Write) => {}
                Ok(Admit::Skip) => continue,
                Err(e) => {
                    self.fail(e.into());
                    continue;
                }
            }
            batch.bytes += chunk.raw_len as usize;
            batch.chunks.push(Arrived { chunk, hashed });
            if batch.chunks.len() >= BATCH_CHUNKS || batch.bytes >= BATCH_BYTES {
                self.write_batch(batch).await?;
            }
        }
    }

    /// Hands the batch's chunks to a worker thread once one is free.
    async fn write_batch(&self, batch: &mut Batch) -> Result<(), LinkError> {
        let chunks = std::mem::take(&mut batch.chunks);
        batch.bytes = 0;
        let Some(writer) = self.writer.clone().filter(|_| !chunks.is_empty()) else {
            return Ok(());
        };
        let Ok(permit) = self.workers.clone().acquire_owned().await else {
            // Never closed while data flows; the chunks are missing again if it ever is.
            let mut t = writer.tracker.lock().unwrap_or_else(|p| p.into_inner());
            for Arrived { chunk: c, .. } in &chunks {
                t.failed(c.file, c.offset);
            }
            return Err(LinkError::Closed);
        };
        let failure = self.failure.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = writer.write(chunks) {
                failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
            }
            // Let go of the staging area before the permit: whoever takes every permit
            // may then own it.
            drop(writer);
            drop(permit);
        });
        Ok(())
    }

    fn fail(&self, e: TransferError) {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }
}
