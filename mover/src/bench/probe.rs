//! The agent's side of `mover bench`: measuring, on this host, the stages of a transfer that
//! happen here when the controller asks ([`serve`]). Link tests are in [`super::link`].
//!
//! A probe names things (a dataset of this agent's config, a node); it never carries a path
//! or a command. Scratch files go where this agent's staging areas go and are removed on every
//! path out, and the scratch dataset an end-to-end run lands in (`mover-bench`, under the
//! state directory) is removed by the target probe and by `Reset`.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mover_protocol::bench::{Bench, BenchReply, Probe, SourceStats, TargetStats};
use mover_protocol::manifest::EntryKind;
use mover_protocol::{Chunk, Message, FRAME_HEADER_LEN};
use quinn::SendStream;

use super::sampling::{self, Piece};
use super::{MAX_SCRATCH, SCRATCH_DATASET};
use crate::agent::Ctx;
use crate::frame::write_message;
use crate::pool::{Pool, PoolBuf};

/// Raw bytes of the sample kept in memory for the encode and decode passes: enough for a
/// steady rate, few enough for a database host.
const CODEC_BYTES: u64 = 128 << 20;

/// What an agent keeps for `mover bench` between probes.
#[derive(Debug, Default)]
pub(crate) struct AgentBench {
    /// One probe at a time, so that two do not measure each other.
    turn: tokio::sync::Mutex<()>,
    /// Link-test streams already taken.
    pub(super) sinks: super::link::Taken,
}

/// Adds the scratch dataset to an agent's config (an end-to-end run sends from the source's
/// and into each target's) and removes what a bench that was cut short left in `state_dir`.
pub(crate) fn install(cfg: &mut crate::config::AgentConfig) {
    cfg.datasets.insert(
        SCRATCH_DATASET.to_owned(),
        crate::config::DatasetConfig {
            path: scratch_dataset(&cfg.state_dir),
        },
    );
    if let Err(e) = remove_leftovers(&cfg.state_dir) {
        tracing::warn!(error = %e, "could not remove what an earlier mover bench left");
    }
}

/// Where the scratch dataset lives: on the state directory's filesystem.
fn scratch_dataset(state_dir: &Path) -> PathBuf {
    state_dir.join("bench")
}

/// Removes the scratch dataset, its staging area and record, and scratch files.
fn remove_leftovers(state_dir: &Path) -> std::io::Result<()> {
    remove_any(&scratch_dataset(state_dir))?;
    let staging = state_dir.join("staging");
    let entries = match std::fs::read_dir(&staging) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry
            .file_name()
            .as_bytes()
            .starts_with(SCRATCH_DATASET.as_bytes())
        {
            remove_any(&entry.path())?;
        }
    }
    Ok(())
}

/// Removes a file or a directory tree, if it is there.
fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => crate::staging::remove_tree_if_present(path)
            .map_err(|e| std::io::Error::other(e.to_string())),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Answers a `Bench` from the controller on its control stream.
pub(crate) async fn serve(
    ctx: Arc<Ctx>,
    conn: quinn::Connection,
    bench: Bench,
    mut send: SendStream,
) {
    let reply = tokio::select! {
        reply = answer(&ctx, bench) => reply,
        () = crate::hookrun::agent_shutdown(&conn) => return,
    };
    if let BenchReply::Failed { reason } = &reply {
        tracing::warn!(%reason, "a bench probe failed");
    }
    let done = Message::BenchDone {
        node: ctx.node.clone(),
        reply,
    };
    if write_message(&mut send, &done).await.is_ok() {
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(10), send.stopped()).await;
    }
}

async fn answer(ctx: &Arc<Ctx>, bench: Bench) -> BenchReply {
    let _turn = ctx.bench.turn.lock().await;
    let id = bench.id;
    let result = match bench.probe {
        Probe::Source {
            dataset,
            sample,
            chunk_size,
            compress,
            stage,
        } => {
            tracing::info!(%dataset, sample, "bench: reading and encoding a sample");
            source(ctx, &dataset, sample, chunk_size, compress, stage)
                .await
                .map(BenchReply::Source)
        }
        Probe::Link {
            to,
            address,
            bytes,
            millis,
            connections,
            grant,
        } => {
            tracing::info!(%to, bytes, millis, "bench: testing the link");
            let test = super::link::LinkTest {
                id,
                to,
                address,
                bytes,
                time: Duration::from_millis(millis.into()),
                connections,
                grant,
            };
            super::link::link(ctx, test).await.map(BenchReply::Link)
        }
        Probe::Target {
            dataset,
            bytes,
            chunk_size,
            compress,
        } => {
            tracing::info!(%dataset, bytes, "bench: writing a scratch file, decoding");
            target(ctx, id, &dataset, bytes, chunk_size, compress)
                .await
                .map(BenchReply::Target)
        }
        Probe::Reset => reset(ctx).await.map(|()| BenchReply::Reset),
    };
    result.unwrap_or_else(|reason| BenchReply::Failed { reason })
}

/// The directory of one of this agent's datasets (never the scratch dataset).
fn dataset_path(ctx: &Ctx, name: &str) -> Result<PathBuf, String> {
    if name.starts_with(SCRATCH_DATASET) {
        return Err(format!(
            "{name} is mover bench's own scratch dataset: name one of {}'s datasets",
            ctx.node
        ));
    }
    ctx.cfg
        .datasets
        .get(name)
        .map(|d| d.path.clone())
        .ok_or_else(|| {
            format!(
                "unknown dataset {name:?}: add [datasets.{name}] to the agent config of {}",
                ctx.node
            )
        })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("a bench thread failed: {e}"))?
}

/// A regular file of a dataset: where it is, its path in the dataset, its size.
struct DataFile {
    path: PathBuf,
    rel: PathBuf,
    size: u64,
}

/// Scans `root` and lists its regular files in the order a transfer sends them.
fn files_of(root: &Path) -> Result<(Vec<DataFile>, u64), String> {
    let scan = crate::scan::scan(root).map_err(|e| e.to_string())?;
    let entries = scan.manifest.to_vec().map_err(|e| e.to_string())?;
    let files = entries
        .iter()
        .filter_map(|e| match e.kind {
            EntryKind::File { size } => Some(DataFile {
                path: crate::scan::source_path(root, e),
                rel: PathBuf::from(OsStr::from_bytes(&e.path)),
                size,
            }),
            _ => None,
        })
        .collect();
    Ok((files, scan.manifest.total_bytes()))
}

/// One chunk-size read of the sample.
struct Read {
    file: usize,
    offset: u64,
    len: usize,
}

/// The chunk-size reads that cover `pieces`.
fn reads(pieces: &[Piece], chunk: u32) -> Vec<Read> {
    let mut v = Vec::new();
    for p in pieces {
        let mut at = 0;
        while at < p.len {
            let len = (p.len - at).min(u64::from(chunk)) as usize;
            v.push(Read {
                file: p.file,
                offset: p.offset + at,
                len,
            });
            at += len as u64;
        }
    }
    v
}

/// A chunk of the sample kept in memory for the codec passes.
struct Kept {
    file_size: u64,
    offset: u64,
    data: PoolBuf,
}

async fn source(
    ctx: &Arc<Ctx>,
    dataset: &str,
    sample: u64,
    chunk: u32,
    level: u8,
    stage: bool,
) -> Result<SourceStats, String> {
    let root = dataset_path(ctx, dataset)?;
    let scan_root = root.clone();
    let (files, total_bytes) = blocking(move || files_of(&scan_root)).await?;
    let sizes: Vec<u64> = files.iter().map(|f| f.size).collect();
    let pieces = sampling::plan(&sizes, sample, chunk);
    let files = Arc::new(files);

    // What the page cache held before the read, to tell a disk's rate from memory's.
    let (f2, p2) = (files.clone(), pieces.clone());
    let cached = blocking(move || {
        let mut cached = 0;
        for p in &p2 {
            let f = File::open(&f2[p.file].path).map_err(|e| e.to_string())?;
            cached += sampling::resident(&f, p.offset, p.len).unwrap_or(0);
        }
        Ok(cached)
    })
    .await?;

    let todo = reads(&pieces, chunk);
    // Every k-th read, whatever its size, so that each byte of the sample has the same chance
    // to be in the codec passes (small files as much as large ones).
    let sampled: u64 = pieces.iter().map(|p| p.len).sum();
    let keep_every = sampled.div_ceil(CODEC_BYTES).max(1) as usize;
    let depth = ctx
        .cfg
        .workers()
        .clamp(1, crate::disk::QUEUE_DEPTH as usize);
    let pool = Pool::new(crate::chunk::buffer_capacity(chunk), depth);
    let mut in_flight = VecDeque::with_capacity(depth);
    let mut kept = Vec::new();
    let mut read_bytes = 0u64;
    let mut open: Option<(usize, Arc<File>)> = None;
    let started = Instant::now();
    for (i, r) in todo.iter().enumerate() {
        let f = &files[r.file];
        let handle = match &open {
            Some((n, h)) if *n == r.file => h.clone(),
            _ => {
                let h = Arc::new(
                    File::open(&f.path).map_err(|e| format!("read {}: {e}", f.path.display()))?,
                );
                open = Some((r.file, h.clone()));
                h
            }
        };
        if in_flight.len() >= depth {
            read_bytes += finish_read(&files, &mut in_flight, &mut kept, keep_every).await?;
        }
        let pending = ctx
            .disk
            .read(handle, r.offset, pool.take(r.len), ctx.cfg.source_cache);
        in_flight.push_back((i, r, pending));
    }
    while !in_flight.is_empty() {
        read_bytes += finish_read(&files, &mut in_flight, &mut kept, keep_every).await?;
    }
    let read_micros = micros(started.elapsed());

    let codec = blocking(move || Ok(encode_passes(&kept, chunk, level))).await?;
    let staged_bytes = if stage {
        let dest = scratch_dataset(&ctx.cfg.state_dir);
        blocking(move || {
            remove_any(&dest).map_err(|e| format!("remove {}: {e}", dest.display()))?;
            let refs: Vec<(&Path, &Path)> = files
                .iter()
                .map(|f| (f.path.as_path(), f.rel.as_path()))
                .collect();
            sampling::copy(&refs, &pieces, &dest).map_err(|e| {
                let _ = remove_any(&dest);
                format!("copy the sample into {}: {e}", dest.display())
            })
        })
        .await?
    } else {
        0
    };
    Ok(SourceStats {
        total_bytes,
        files: sizes.len() as u64,
        read_bytes,
        read_micros,
        cached_bytes: cached,
        encode_bytes: codec.bytes,
        wire_bytes: codec.wire,
        encode_one_micros: codec.one_micros,
        encode_all_micros: codec.all_micros,
        threads: codec.threads,
        staged_bytes,
        io: ctx.disk.name().to_owned(),
    })
}

type InFlight<'a> = VecDeque<(usize, &'a Read, crate::disk::Pending<(PoolBuf, usize)>)>;

/// Waits for the oldest read in flight, keeps its chunk if it is one the codec passes use,
/// and returns its length.
async fn finish_read(
    files: &[DataFile],
    in_flight: &mut InFlight<'_>,
    kept: &mut Vec<Kept>,
    keep_every: usize,
) -> Result<u64, String> {
    let Some((i, r, pending)) = in_flight.pop_front() else {
        return Ok(0);
    };
    let f = &files[r.file];
    let (data, got) = pending
        .done()
        .await
        .map_err(|e| format!("read {}: {e}", f.path.display()))?;
    if got < r.len {
        return Err(format!(
            "{} changed while it was sampled (it ended at {} bytes, the scan saw {})",
            f.path.display(),
            r.offset + got as u64,
            f.size
        ));
    }
    if i % keep_every == 0 {
        kept.push(Kept {
            file_size: f.size,
            offset: r.offset,
            data,
        });
    }
    Ok(r.len as u64)
}

/// What the encode or decode passes measured.
#[derive(Debug, Default)]
struct Codec {
    /// Raw bytes per pass.
    bytes: u64,
    /// Frame bytes the encode made of them.
    wire: u64,
    one_micros: u64,
    all_micros: u64,
    threads: u16,
}

/// Hashes and compresses the kept chunks with the transfer's own code ([`crate::chunk`]), once
/// on one thread and once on one thread per core. Only the encoding is timed, not the copy of
/// each chunk that it consumes.
fn encode_passes(kept: &[Kept], chunk: u32, level: u8) -> Codec {
    let level = i32::from(level);
    let threads = crate::cores();
    let pool = Pool::new(crate::chunk::buffer_capacity(chunk), 3 * threads);
    let encode = |k: &Kept| -> (Duration, u64) {
        let mut buf = pool.take(k.data.len());
        buf.copy_from_slice(&k.data);
        let t = Instant::now();
        let c = crate::chunk::encode(0, k.offset, k.file_size, buf.freeze(), level, &pool);
        (t.elapsed(), frame_len(&c))
    };
    let warm_up = || {
        if let Some(k) = kept.first() {
            encode(k);
        }
    };
    warm_up();
    let mut one = Duration::ZERO;
    let mut wire = 0;
    for k in kept {
        let (t, w) = encode(k);
        one += t;
        wire += w;
    }
    let all = in_parallel(threads, kept.len(), warm_up, |i| encode(&kept[i]).0);
    Codec {
        bytes: kept.iter().map(|k| k.data.len() as u64).sum(),
        wire,
        one_micros: micros(one),
        all_micros: micros(all),
        threads: threads as u16,
    }
}

/// Runs `job(0..n)` on `threads` threads, each first calling `warm_up`, and returns the
/// longest time any thread spent in its jobs: the pass's duration without thread start-up.
fn in_parallel(
    threads: usize,
    n: usize,
    warm_up: impl Fn() + Sync,
    job: impl Fn(usize) -> Duration + Sync,
) -> Duration {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    warm_up();
                    let mut busy = Duration::ZERO;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return busy;
                        }
                        busy += job(i);
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .max()
            .unwrap_or_default()
    })
}

fn frame_len(c: &Chunk) -> u64 {
    (FRAME_HEADER_LEN + Chunk::HEADER_LEN + c.payload.len()) as u64
}

pub(super) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn target(
    ctx: &Arc<Ctx>,
    id: u64,
    dataset: &str,
    bytes: u64,
    chunk: u32,
    level: u8,
) -> Result<TargetStats, String> {
    let dest = dataset_path(ctx, dataset)?;
    let bytes = bytes.min(MAX_SCRATCH);
    let path = crate::staging::Staging::locate(
        &ctx.cfg.state_dir,
        &dest,
        &format!("{SCRATCH_DATASET}-{id:016x}"),
    )
    .map_err(|e| format!("find where dataset {dataset}'s staging area goes: {e}"))?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    check_space(&dir, bytes)?;
    let (write, sync, direct) = write_scratch(ctx, path, bytes, chunk).await?;

    let copy = scratch_dataset(&ctx.cfg.state_dir);
    let decoded = if copy.is_dir() {
        let c = copy.clone();
        blocking(move || decode_passes(&c, chunk, level)).await
    } else {
        Ok(Codec::default())
    };
    let removed = reset(ctx).await;
    let decoded = decoded?;
    removed?;
    Ok(TargetStats {
        write_bytes: bytes,
        write_micros: micros(write),
        sync_micros: micros(sync),
        decode_bytes: decoded.bytes,
        decode_one_micros: decoded.one_micros,
        decode_all_micros: decoded.all_micros,
        threads: crate::cores() as u16,
        io: if direct {
            format!("{}, O_DIRECT", ctx.disk.name())
        } else {
            ctx.disk.name().to_owned()
        },
        scratch_dir: dir.display().to_string(),
    })
}

/// Refuses a scratch file that would leave less free space than its own size.
fn check_space(dir: &Path, bytes: u64) -> Result<(), String> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: statvfs fills the zeroed struct from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("check the free space in {}: {e}", dir.display()));
    }
    let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    if free < bytes.saturating_mul(2) {
        return Err(format!(
            "{} has {free} bytes free, too little for a {bytes}-byte scratch file and as much \
             again to spare: use a smaller --sample",
            dir.display()
        ));
    }
    Ok(())
}

/// Removes the scratch file when dropped, however the write ends.
struct ScratchFile(PathBuf);

impl Drop for ScratchFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "could not remove a scratch file");
        }
    }
}

/// Writes `bytes` of incompressible data to a new file at `path` through the disk back end,
/// the way a transfer writes staging (with `O_DIRECT` where `staging_writes` asks for it and
/// the filesystem takes it), in chunk-size writes with as many in flight as a transfer has,
/// fdatasyncs it and removes it. Returns the time of the whole, of the fdatasync alone, and
/// whether the writes were direct.
async fn write_scratch(
    ctx: &Ctx,
    path: PathBuf,
    bytes: u64,
    chunk: u32,
) -> Result<(Duration, Duration, bool), String> {
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| format!("create scratch file {}: {e}", path.display()))?;
    let guard = ScratchFile(path);
    let direct = (ctx.cfg.staging_writes == crate::staging::StagingWrites::Direct)
        .then(|| {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_DIRECT)
                .open(&guard.0)
                .ok()
        })
        .flatten();
    let is_direct = direct.is_some();
    let file = Arc::new(direct.unwrap_or(created));
    // Direct writes need whole blocks from an aligned buffer.
    let bytes = if is_direct {
        bytes.next_multiple_of(crate::pool::ALIGN as u64)
    } else {
        bytes
    };
    let mut data = Pool::new(chunk as usize, 1).take(chunk as usize);
    fastrand::fill(&mut data);
    let data = data.freeze();
    let depth = ctx
        .cfg
        .workers()
        .clamp(1, crate::disk::QUEUE_DEPTH as usize);
    let failed = |e: std::io::Error| format!("write scratch file {}: {e}", guard.0.display());
    let mut in_flight: VecDeque<crate::disk::Pending<()>> = VecDeque::with_capacity(depth);
    let started = Instant::now();
    let mut offset = 0;
    while offset < bytes {
        let len = (bytes - offset).min(u64::from(chunk)) as usize;
        if in_flight.len() >= depth {
            if let Some(w) = in_flight.pop_front() {
                w.done().await.map_err(failed)?;
            }
        }
        in_flight.push_back(ctx.disk.write(file.clone(), offset, data.slice(..len)));
        offset += len as u64;
    }
    for w in in_flight {
        w.done().await.map_err(failed)?;
    }
    let synced = Instant::now();
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_data())
        .await
        .map_err(|e| e.to_string())?
        .map_err(failed)?;
    let done = Instant::now();
    drop(guard);
    Ok((done - started, done - synced, is_direct))
}

/// Decompresses and verifies chunks of the end-to-end copy at `root` with the transfer's own
/// code, once on one thread and once on one per core. The chunks are encoded first (not
/// timed) at the transfer's level, so that they are what this host would receive.
fn decode_passes(root: &Path, chunk: u32, level: u8) -> Result<Codec, String> {
    let level = i32::from(level);
    let (files, _) = files_of(root)?;
    let sizes: Vec<u64> = files.iter().map(|f| f.size).collect();
    let pool = Pool::new(crate::chunk::buffer_capacity(chunk), 4 * crate::cores());
    let mut chunks = Vec::new();
    let mut open: Option<(usize, File)> = None;
    for r in reads(&sampling::plan(&sizes, CODEC_BYTES, chunk), chunk) {
        let f = &files[r.file];
        if open.as_ref().is_none_or(|(n, _)| *n != r.file) {
            let h = File::open(&f.path).map_err(|e| format!("read {}: {e}", f.path.display()))?;
            open = Some((r.file, h));
        }
        let Some((_, h)) = &open else { continue };
        let mut buf = pool.take(r.len);
        h.read_exact_at(&mut buf[..], r.offset)
            .map_err(|e| format!("read {}: {e}", f.path.display()))?;
        chunks.push((
            crate::chunk::encode(0, r.offset, f.size, buf.freeze(), level, &pool),
            f.size,
        ));
    }
    let decode = |(c, size): &(Chunk, u64)| -> Result<Duration, String> {
        let t = Instant::now();
        crate::chunk::decode(c, *size, &pool).map_err(|e| e.to_string())?;
        Ok(t.elapsed())
    };
    let warm_up = || {
        if let Some(c) = chunks.first() {
            let _ = decode(c);
        }
    };
    warm_up();
    let mut one = Duration::ZERO;
    for c in &chunks {
        one += decode(c)?;
    }
    let threads = crate::cores();
    let all = in_parallel(threads, chunks.len(), warm_up, |i| {
        decode(&chunks[i]).unwrap_or_default()
    });
    Ok(Codec {
        bytes: chunks.iter().map(|(c, _)| u64::from(c.raw_len)).sum(),
        wire: chunks.iter().map(|(c, _)| frame_len(c)).sum(),
        one_micros: micros(one),
        all_micros: micros(all),
        threads: threads as u16,
    })
}

/// Removes the scratch dataset and leftovers, unless a transfer into it is running (after
/// waiting a little for one that has just reported to let go of it).
async fn reset(ctx: &Ctx) -> Result<(), String> {
    let busy = || {
        ctx.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(SCRATCH_DATASET)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while busy() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if busy() {
        return Err(format!(
            "a transfer into {SCRATCH_DATASET} is running on {}: is another mover bench running?",
            ctx.node
        ));
    }
    remove_leftovers(&ctx.cfg.state_dir)
        .map_err(|e| format!("remove what mover bench left on {}: {e}", ctx.node))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_cover_the_pieces_in_chunks() {
        let pieces = [
            Piece {
                file: 0,
                offset: 0,
                len: 10,
            },
            Piece {
                file: 2,
                offset: 64,
                len: 150,
            },
        ];
        let r = reads(&pieces, 64);
        let v: Vec<_> = r.iter().map(|r| (r.file, r.offset, r.len)).collect();
        assert_eq!(v, [(0, 0, 10), (2, 64, 64), (2, 128, 64), (2, 192, 22)]);
    }

    #[test]
    fn leftovers_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        std::fs::create_dir_all(state.join("bench/sub")).unwrap();
        std::fs::write(state.join("bench/sub/f"), b"x").unwrap();
        std::fs::create_dir_all(state.join("staging/mover-bench/d")).unwrap();
        std::fs::write(state.join("staging/mover-bench.record"), b"r").unwrap();
        std::fs::write(state.join("staging/mover-bench-00ff"), b"s").unwrap();
        std::fs::create_dir_all(state.join("staging/data")).unwrap();
        std::fs::write(state.join("staging/data.record"), b"keep").unwrap();
        remove_leftovers(state).unwrap();
        let mut left: Vec<_> = std::fs::read_dir(state.join("staging"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["data", "data.record"]);
        assert!(!state.join("bench").exists());
        // Nothing to remove is not an error.
        remove_leftovers(state).unwrap();
        remove_leftovers(&state.join("missing")).unwrap();
    }

    #[test]
    fn codec_passes_measure_what_they_were_given() {
        let pool = Pool::new(crate::chunk::buffer_capacity(1 << 16), 4);
        let kept: Vec<Kept> = (0..6)
            .map(|i| {
                let mut data = pool.take(1 << 16);
                let text = format!("row {i}: select * from t;\n").repeat(3000);
                data.copy_from_slice(&text.as_bytes()[..1 << 16]);
                Kept {
                    file_size: 6 << 16,
                    offset: i << 16,
                    data,
                }
            })
            .collect();
        let c = encode_passes(&kept, 1 << 16, 1);
        assert_eq!(c.bytes, 6 << 16);
        assert!(c.wire < c.bytes / 4, "text compresses: {c:?}");
        assert!(c.one_micros > 0 && c.all_micros > 0, "{c:?}");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("f"),
            "insert into t values (1);\n".repeat(20_000),
        )
        .unwrap();
        let d = decode_passes(dir.path(), 1 << 16, 1).unwrap();
        assert_eq!(d.bytes, 26 * 20_000);
        assert!(d.wire < d.bytes / 4 && d.one_micros > 0, "{d:?}");
    }
}
