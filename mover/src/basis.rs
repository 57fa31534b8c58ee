//! What a receiver already holds before data arrives: chunks it verified in an interrupted run
//! (left in its staging area and listed in the staging area's record) and an older copy of the
//! dataset. Both are hashed again here and reported as held; the source skips a chunk only
//! when every target holds it with the hash the source reads, so nothing stale is ever kept.
//!
//! Files of an interrupted run are moved into the new staging area (no copy); chunks of an old
//! copy are copied in as they are hashed (the old copy stays untouched until the commit).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use mover_protocol::hash::{chunk_count, chunk_hash};
use mover_protocol::table::{ChunkIndex, Hashes, Table};
use mover_protocol::Held;

use crate::staging::{Staging, StagingError};

/// Bytes in a record after its path.
const RECORD_TAIL: usize = 8 + 8 + 4 + 32 + 4;

/// The durable list of chunks verified into a staging area, next to it. Appended after each
/// chunk is written; a crash mid-append leaves a torn last record, which loading ignores.
///
/// One record per chunk: `path_len u16, path, file_size u64, offset u64, len u32, hash [32],
/// check [4]` (big endian), `check` being the first bytes of BLAKE3 over the rest.
#[derive(Debug)]
pub(crate) struct Record {
    file: Mutex<File>,
}

/// A chunk named in a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Recorded {
    pub file_size: u64,
    pub offset: u64,
    pub len: u32,
    pub hash: [u8; 32],
}

impl Record {
    /// Starts an empty record at `path`.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            // Appends (std refuses append together with truncate, so the flag goes here).
            .custom_flags(libc::O_APPEND | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    pub fn append(&self, path: &[u8], c: &Recorded) -> io::Result<()> {
        self.append_all(&[(path, *c)])
    }

    /// Appends several chunks with one write.
    pub fn append_all(&self, chunks: &[(&[u8], Recorded)]) -> io::Result<()> {
        let size: usize = chunks.iter().map(|(p, _)| 2 + p.len() + RECORD_TAIL).sum();
        let mut rec = Vec::with_capacity(size);
        for (path, c) in chunks {
            let start = rec.len();
            rec.extend_from_slice(&(path.len() as u16).to_be_bytes());
            rec.extend_from_slice(path);
            rec.extend_from_slice(&c.file_size.to_be_bytes());
            rec.extend_from_slice(&c.offset.to_be_bytes());
            rec.extend_from_slice(&c.len.to_be_bytes());
            rec.extend_from_slice(&c.hash);
            let check = blake3::hash(&rec[start..]);
            rec.extend_from_slice(&check.as_bytes()[..4]);
        }
        // Appended with one write: a process killed between writes loses nothing written
        // before, and a torn write loses only the records from the tear on (each carries its
        // own check, and reading stops at the first that fails it).
        self.file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&rec)
    }
}

/// Reads a record back one chunk at a time, in the order written, through one buffer
/// whatever the record's size: `each` gets each chunk's path and what was recorded. A missing
/// file is an empty record; reading stops at the first record that is torn or fails its check.
pub(crate) fn read_record(path: &Path, mut each: impl FnMut(&[u8], Recorded)) -> io::Result<()> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut r = io::BufReader::with_capacity(256 << 10, f);
    let mut rec = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let plen = usize::from(u16::from_be_bytes(len));
        rec.clear();
        rec.extend_from_slice(&len);
        rec.resize(2 + plen + RECORD_TAIL, 0);
        match r.read_exact(&mut rec[2..]) {
            Ok(()) => {}
            // Torn by a crash mid-append.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let total = rec.len();
        if blake3::hash(&rec[..total - 4]).as_bytes()[..4] != rec[total - 4..] {
            tracing::warn!(path = %path.display(), "record damaged; using what came before");
            return Ok(());
        }
        let t = &rec[2 + plen..];
        let u64_at = |i: usize| u64::from_be_bytes(t[i..i + 8].try_into().unwrap_or([0; 8]));
        let mut hash = [0; 32];
        hash.copy_from_slice(&t[20..52]);
        each(
            &rec[2..2 + plen],
            Recorded {
                file_size: u64_at(0),
                offset: u64_at(8),
                len: u32::from_be_bytes(t[16..20].try_into().unwrap_or([0; 4])),
                hash,
            },
        );
    }
}

/// The record that goes with a staging directory.
pub(crate) fn record_path(staging_dir: &Path) -> PathBuf {
    sibling(staging_dir, ".record")
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// What an interrupted run left: its staging tree and its record, both moved aside.
#[derive(Debug)]
pub(crate) struct Leftover {
    pub tree: PathBuf,
    record: PathBuf,
}

/// Moves an interrupted run's staging tree at `staging_dir` and its record aside, so that a
/// fresh one can be made. Returns `None` when there is nothing to resume from.
pub(crate) fn set_aside(staging_dir: &Path) -> Result<Option<Leftover>, StagingError> {
    let prev = sibling(staging_dir, ".prev");
    let prev_record = sibling(staging_dir, ".prev.record");
    let record = record_path(staging_dir);
    // A leftover of a leftover (a crash while resuming) is dropped; the newer one is kept.
    crate::staging::remove_tree_if_present(&prev)?;
    let _ = std::fs::remove_file(&prev_record);
    match std::fs::symlink_metadata(staging_dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) | Err(_) => {
            let _ = std::fs::remove_file(&record);
            return Ok(None);
        }
    }
    std::fs::rename(staging_dir, &prev).map_err(|e| io_err("move aside", staging_dir, e))?;
    if let Err(e) = std::fs::rename(&record, &prev_record) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %record.display(), error = %e, "cannot move the record aside; starting over");
        }
        let _ = std::fs::remove_file(&record);
    }
    Ok(Some(Leftover {
        tree: prev,
        record: prev_record,
    }))
}

/// Removes a leftover tree and its record once seeding is done with them.
pub(crate) fn discard(leftover: Leftover) {
    if let Err(e) = crate::staging::remove_tree_if_present(&leftover.tree) {
        tracing::warn!(path = %leftover.tree.display(), error = %e, "cannot remove old staging");
    }
    let _ = std::fs::remove_file(&leftover.record);
}

/// Bytes per chunk in the table of an interrupted run's record: a flag, the file's size
/// then, and the chunk's hash.
const RESUME_SLOT: usize = 1 + 8 + 32;

/// An interrupted run's record, placed by the new manifest's chunk numbering: a
/// [`RESUME_SLOT`] per chunk in a table, and a bit per manifest entry with any. Files whose
/// chunk no longer fits (the file shrank, or the record names a path the manifest lacks) are
/// left out.
struct Resumable<'a> {
    table: &'a dyn Table,
    files: Bits,
}

/// A file's index in the manifest, and its size.
type FilePlace = (u32, u64);

impl<'a> Resumable<'a> {
    /// Reads `leftover`'s record into `table` through one buffer.
    fn read(
        leftover: &Leftover,
        staging: &Staging,
        index: &ChunkIndex,
        table: &'a dyn Table,
    ) -> Result<Self, StagingError> {
        let manifest = staging.manifest();
        let mut files = Bits::with_len(manifest.len() as u64);
        // Each file's place and size, found by path in the manifest (in the scan's order, so
        // by a binary search); the record lists a file's chunks one after another, so the
        // last one found is kept.
        let mut last: Option<(Box<[u8]>, Option<FilePlace>)> = None;
        let mut failed = None;
        let mut slot = [0u8; RESUME_SLOT];
        let read = read_record(&leftover.record, |path, r| {
            if failed.is_some() {
                return;
            }
            let found = match &last {
                Some((p, found)) if &p[..] == path => *found,
                _ => {
                    let found = manifest.position(path).and_then(|at| {
                        let Some(i) = at else { return Ok(None) };
                        let size = manifest.file_size(i)?;
                        Ok(size.filter(|s| *s > 0).map(|s| (i as u32, s)))
                    });
                    match found {
                        Ok(found) => {
                            last = Some((path.into(), found));
                            found
                        }
                        Err(e) => {
                            failed = Some(StagingError::from(e));
                            return;
                        }
                    }
                }
            };
            let Some((file, size)) = found else {
                return;
            };
            let cs = index.chunk_size();
            let fits = r.offset < size && u64::from(r.len) == (size - r.offset).min(cs);
            let Some(i) = index.index(file, r.offset).filter(|_| fits) else {
                return;
            };
            slot[0] = 1;
            slot[1..9].copy_from_slice(&r.file_size.to_be_bytes());
            slot[9..].copy_from_slice(&r.hash);
            if let Err(e) = table.write_at(i * RESUME_SLOT as u64, &slot) {
                failed = Some(io_err("keep the record of", &leftover.record, e));
                return;
            }
            files.set(u64::from(file));
        });
        if let Err(e) = read {
            tracing::warn!(path = %leftover.record.display(), error = %e, "cannot read record; starting over");
            return Ok(Self {
                table,
                files: Bits::default(),
            });
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(Self { table, files })
    }
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> StagingError {
    if source.raw_os_error() == Some(libc::ENOSPC) {
        return StagingError::NoSpace {
            path: path.to_path_buf(),
        };
    }
    StagingError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Which chunks of one file are held: a bit per chunk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Bits {
    words: Vec<u64>,
    count: u64,
}

impl Bits {
    fn with_len(chunks: u64) -> Self {
        Self {
            words: vec![0; chunks.div_ceil(64) as usize],
            count: 0,
        }
    }

    fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w >> (i % 64) & 1 == 1)
    }

    fn set(&mut self, i: u64) {
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            if *w >> (i % 64) & 1 == 0 {
                *w |= 1 << (i % 64);
                self.count += 1;
            }
        }
    }

    /// How many are set.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The set bits, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            (0..64)
                .filter(move |b| word >> b & 1 == 1)
                .map(move |b| w as u64 * 64 + b)
        })
    }
}

/// What seeding found.
#[derive(Debug)]
pub(crate) struct Seeded {
    /// Which chunks are held: a bit per chunk of the manifest, at its [`ChunkIndex`] place.
    /// Their hashes are in `hashes`, so that on a reseed onto an older copy (where nearly
    /// every chunk is held) the process keeps one bit per chunk, and nothing per file.
    held: Bits,
    /// Entries in the manifest.
    entries: usize,
    pub hashes: Hashes,
    /// Chunks kept from an interrupted run.
    pub resumed: u64,
    /// Chunks copied from an older copy of the dataset.
    pub reused: u64,
    /// Chunks of an interrupted run whose bytes no longer matched their record.
    pub damaged: u64,
}

impl Seeded {
    /// Every chunk held, by file and offset, with its hash from `hashes`. A chunk whose hash
    /// cannot be read back is left out: it is then not held, and the source sends it.
    pub fn held(&self) -> impl Iterator<Item = Held> + '_ {
        let index = self.hashes.index();
        let cs = index.chunk_size();
        (0..self.entries as u32)
            .filter(move |_| self.held.count() > 0)
            .flat_map(move |file| {
                let chunks = index.chunks_of(file);
                let first = chunks.start;
                chunks.filter(|&c| self.held.get(c)).filter_map(move |c| {
                    let offset = (c - first) * cs;
                    let hash = self.hashes.get(file, offset)?;
                    Some(Held { file, offset, hash })
                })
            })
    }

    /// Chunks held.
    pub fn count(&self) -> u64 {
        self.held.count()
    }
}

/// Fills a fresh staging area from what is already here, on `threads` threads, appending
/// every chunk it keeps to `record` and its hash to `table` (see [`Hashes`]). Only staging
/// errors (a full disk, a table that cannot be written) fail it; a
/// leftover or old file that cannot be read is simply not used.
pub(crate) fn seed(
    staging: &Staging,
    chunk_size: u32,
    leftover: Option<(&Leftover, &dyn Table)>,
    old: Option<&Path>,
    record: &Record,
    table: std::sync::Arc<dyn Table>,
    threads: usize,
) -> Result<Seeded, StagingError> {
    let hashes = Hashes::new(ChunkIndex::new(staging.manifest(), chunk_size)?, table);
    let index = hashes.index();
    // The interrupted run's record, read once into its own table (it lists chunks in the
    // order they arrived, across files).
    let resumable = leftover
        .map(|(l, t)| Resumable::read(l, staging, index, t).map(|r| (l, r)))
        .transpose()?;
    let leftover = resumable.as_ref();
    // Threads take the manifest's entries in turn, by index.
    let manifest = staging.manifest();
    let next = AtomicUsize::new(0);
    let held = Mutex::new(Bits::with_len(index.total()));
    let (resumed, reused, damaged) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let failure: Mutex<Option<StagingError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; chunk_size as usize];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= manifest.len() {
                        return;
                    }
                    let (file, size) = match manifest.file_size(i) {
                        Ok(Some(size)) if size > 0 => (i as u32, size),
                        Ok(_) => continue,
                        Err(e) => {
                            failure
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e.into());
                            return;
                        }
                    };
                    if failure.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                        return;
                    }
                    let mut job = FileSeed {
                        staging,
                        chunk_size,
                        record,
                        hashes: &hashes,
                        first: index.chunks_of(file).start,
                        file,
                        size,
                        buf: &mut buf,
                        held: Bits::with_len(chunk_count(size, chunk_size)),
                        damaged: 0,
                        reused: 0,
                    };
                    let result = job.run(leftover, old);
                    resumed.fetch_add(job.held.count() - job.reused, Ordering::Relaxed);
                    reused.fetch_add(job.reused, Ordering::Relaxed);
                    damaged.fetch_add(job.damaged, Ordering::Relaxed);
                    if job.held.count() > 0 {
                        let mut all = held.lock().unwrap_or_else(|p| p.into_inner());
                        for i in job.held.iter() {
                            all.set(job.first + i);
                        }
                    }
                    if let Err(e) = result {
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(Seeded {
        held: held.into_inner().unwrap_or_else(|p| p.into_inner()),
        entries: manifest.len(),
        hashes,
        resumed: resumed.into_inner(),
        reused: reused.into_inner(),
        damaged: damaged.into_inner(),
    })
}

/// Seeds one file.
struct FileSeed<'a> {
    staging: &'a Staging,
    chunk_size: u32,
    record: &'a Record,
    hashes: &'a Hashes,
    /// The index of the file's first chunk in the manifest: where its part of an interrupted
    /// run's record is.
    first: u64,
    file: u32,
    size: u64,
    buf: &'a mut Vec<u8>,
    /// The chunks kept: first those resumed, then those copied from an old file.
    held: Bits,
    damaged: u64,
    reused: u64,
}

impl FileSeed<'_> {
    fn run(
        &mut self,
        leftover: Option<&(&Leftover, Resumable<'_>)>,
        old: Option<&Path>,
    ) -> Result<(), StagingError> {
        let path = self.staging.manifest().get(self.file as usize)?.path;
        let to = self
            .staging
            .entry_path_of(self.file)
            .ok_or_else(|| io_err("seed", Path::new(""), io::ErrorKind::NotFound.into()))?;
        if let Some((l, resumable)) = leftover {
            if resumable.files.get(u64::from(self.file)) {
                if let Ok((dir, name, _)) = open_beneath(&l.tree, &path) {
                    self.staging.adopt(self.file, &dir, &name)?;
                    self.check_resumed(&to, &path, resumable.table)?;
                }
            }
        }
        if self.held.count() == chunk_count(self.size, self.chunk_size) {
            return Ok(());
        }
        if let Some(old) = old {
            if let Ok((_, _, f)) = open_beneath(old, &path) {
                self.copy_old(&f, &to, &path)?;
            }
        }
        Ok(())
    }

    fn chunk_len(&self, offset: u64) -> Option<usize> {
        let cs = u64::from(self.chunk_size);
        (offset % cs == 0 && offset < self.size).then(|| (self.size - offset).min(cs) as usize)
    }

    /// Hashes each recorded chunk of an adopted file again: it is held only if its bytes are
    /// still what was verified. Reads the file's part of the record's table a block at a time.
    fn check_resumed(
        &mut self,
        to: &Path,
        path: &[u8],
        recorded: &dyn Table,
    ) -> Result<(), StagingError> {
        const BLOCK: u64 = 1024;
        let f = File::open(to).map_err(|e| io_err("open", to, e))?;
        let chunks = chunk_count(self.size, self.chunk_size);
        let mut slots = vec![0u8; BLOCK as usize * RESUME_SLOT];
        for block in (0..chunks).step_by(BLOCK as usize) {
            let n = (chunks - block).min(BLOCK) as usize;
            let slots = &mut slots[..n * RESUME_SLOT];
            recorded
                .read_at((self.first + block) * RESUME_SLOT as u64, slots)
                .map_err(|e| io_err("read the record of", to, e))?;
            for (k, slot) in slots.chunks_exact(RESUME_SLOT).enumerate() {
                if slot[0] != 1 {
                    continue;
                }
                let offset = (block + k as u64) * u64::from(self.chunk_size);
                let Some(len) = self.chunk_len(offset) else {
                    continue;
                };
                let file_size = u64::from_be_bytes(slot[1..9].try_into().unwrap_or([0; 8]));
                let buf = &mut self.buf[..len];
                if f.read_exact_at(buf, offset).is_err() {
                    continue;
                }
                let hash = chunk_hash(buf, offset, self.size);
                if file_size == self.size && hash[..] != slot[9..] {
                    self.damaged += 1;
                    continue;
                }
                self.keep(path, offset, len, hash, to)?;
            }
        }
        Ok(())
    }

    /// Copies the chunks an old copy of the file can give into staging, hashing each.
    fn copy_old(&mut self, old: &File, to: &Path, path: &[u8]) -> Result<(), StagingError> {
        let old_size = old.metadata().map(|m| m.len()).unwrap_or(0);
        let out = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(to)
            .map_err(|e| io_err("open", to, e))?;
        let mut offset = 0;
        while let Some(len) = self.chunk_len(offset) {
            if offset + len as u64 > old_size {
                break;
            }
            // Every chunk held so far was resumed.
            if !self.held.get(offset / u64::from(self.chunk_size)) {
                let buf = &mut self.buf[..len];
                if old.read_exact_at(buf, offset).is_err() {
                    break;
                }
                let hash = chunk_hash(buf, offset, self.size);
                out.write_all_at(buf, offset)
                    .map_err(|e| io_err("write", to, e))?;
                self.keep(path, offset, len, hash, to)?;
                self.reused += 1;
            }
            offset += len as u64;
        }
        Ok(())
    }

    fn keep(
        &mut self,
        path: &[u8],
        offset: u64,
        len: usize,
        hash: [u8; 32],
        to: &Path,
    ) -> Result<(), StagingError> {
        self.record
            .append(
                path,
                &Recorded {
                    file_size: self.size,
                    offset,
                    len: len as u32,
                    hash,
                },
            )
            .map_err(|e| io_err("record", to, e))?;
        self.hashes
            .put(self.file, offset, &hash)
            .map_err(|e| io_err("keep the hash of", to, e))?;
        self.held.set(offset / u64::from(self.chunk_size));
        Ok(())
    }
}

/// Opens the regular file at manifest path `rel` under `root` without following any symlink
/// on the way (a symlink anywhere in the path is an error, so nothing outside `root` is ever
/// read). Returns its directory, its name there, and the file.
pub(crate) fn open_beneath(root: &Path, rel: &[u8]) -> io::Result<(File, CString, File)> {
    let not_found = || io::Error::from(io::ErrorKind::NotFound);
    let mut comps: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
    let name = comps
        .pop()
        .filter(|n| !n.is_empty())
        .ok_or_else(not_found)?;
    let mut dir = File::open(root)?;
    for c in comps {
        dir = openat(&dir, c, libc::O_DIRECTORY)?;
    }
    let file = openat(&dir, name, libc::O_NONBLOCK)?;
    if !file.metadata()?.is_file() {
        return Err(not_found());
    }
    let name = CString::new(name).map_err(|_| not_found())?;
    Ok((dir, name, file))
}

fn openat(dir: &File, name: &[u8], flags: libc::c_int) -> io::Result<File> {
    if name.is_empty() || name == b"." || name == b".." {
        return Err(io::ErrorKind::NotFound.into());
    }
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::NotFound))?;
    // SAFETY: `dir` is open and `c` lives for the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | flags,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mover_protocol::manifest::{Entry, EntryKind, Manifest};
    use std::collections::HashMap;
    use std::sync::Arc;

    /// A whole record, by path.
    fn load(path: &Path) -> io::Result<HashMap<Vec<u8>, Vec<Recorded>>> {
        let mut out: HashMap<Vec<u8>, Vec<Recorded>> = HashMap::new();
        read_record(path, |p, r| out.entry(p.to_vec()).or_default().push(r))?;
        Ok(out)
    }

    fn rec(offset: u64, hash: u8) -> Recorded {
        Recorded {
            file_size: 1 << 20,
            offset,
            len: 4096,
            hash: [hash; 32],
        }
    }

    #[test]
    fn a_record_reads_back_and_stops_at_a_torn_or_damaged_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.record");
        let r = Record::create(&path).unwrap();
        r.append(b"a/b", &rec(0, 1)).unwrap();
        r.append(b"a/b", &rec(4096, 2)).unwrap();
        r.append(b"c", &rec(0, 3)).unwrap();
        drop(r);
        let all = load(&path).unwrap();
        assert_eq!(all[&b"a/b".to_vec()], vec![rec(0, 1), rec(4096, 2)]);
        assert_eq!(all[&b"c".to_vec()], vec![rec(0, 3)]);

        // A crash mid-append: the last record is cut short.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let torn = load(&path).unwrap();
        assert_eq!(torn.len(), 1);
        assert_eq!(torn[&b"a/b".to_vec()].len(), 2);

        // A flipped bit in the second record: only the first is trusted.
        let mut bad = bytes.clone();
        let second = 2 + 3 + RECORD_TAIL + 20;
        bad[second] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert_eq!(load(&path).unwrap()[&b"a/b".to_vec()], vec![rec(0, 1)]);

        assert!(load(&dir.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn records_appended_together_read_back_alike_and_tear_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.record");
        let r = Record::create(&path).unwrap();
        r.append(b"a", &rec(0, 1)).unwrap();
        r.append_all(&[(b"b", rec(0, 2)), (b"a", rec(4096, 3)), (b"c", rec(0, 4))])
            .unwrap();
        drop(r);
        let all = load(&path).unwrap();
        assert_eq!(all[&b"a".to_vec()], vec![rec(0, 1), rec(4096, 3)]);
        assert_eq!(all[&b"b".to_vec()], vec![rec(0, 2)]);
        assert_eq!(all[&b"c".to_vec()], vec![rec(0, 4)]);
        // A write torn inside the batch keeps the records before the tear.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - (2 + 1 + RECORD_TAIL) - 5]).unwrap();
        let torn = load(&path).unwrap();
        assert_eq!(torn[&b"a".to_vec()], vec![rec(0, 1)]);
        assert_eq!(torn[&b"b".to_vec()], vec![rec(0, 2)]);
        assert!(!torn.contains_key(b"c".as_slice()));
    }

    #[test]
    fn open_beneath_never_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"x").unwrap();
        std::fs::write(root.join("d/f"), b"ok").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), root.join("flink")).unwrap();
        assert!(open_beneath(&root, b"d/f").is_ok());
        for bad in [
            &b"link/secret"[..],
            b"flink",
            b"d/../d/f",
            b"d",
            b"",
            b"nope",
        ] {
            assert!(
                open_beneath(&root, bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn file_entry(path: &str, size: u64) -> Entry {
        Entry {
            path: path.as_bytes().to_vec().into(),
            kind: EntryKind::File { size },
            mode: 0o644,
            mtime_sec: 0,
            mtime_nsec: 0,
        }
    }

    #[test]
    fn seeding_keeps_verified_leftovers_and_copies_matching_old_chunks() {
        const CS: u32 = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let dest = dir.path().join("dest");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::create_dir_all(&dest).unwrap();
        let size = 3 * u64::from(CS);
        let new: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let root = Entry {
            path: Vec::new().into(),
            kind: EntryKind::Dir,
            mode: 0o755,
            mtime_sec: 0,
            mtime_nsec: 0,
        };
        let m = Arc::new(
            Manifest::from_entries(vec![root, file_entry("a", size), file_entry("b", size)])
                .unwrap(),
        );
        let cs = CS as usize;
        // An old copy of "b" whose middle chunk differs.
        let mut old_b = new.clone();
        old_b[cs + 3] ^= 0xff;
        std::fs::write(dest.join("b"), &old_b).unwrap();

        // An interrupted run verified chunks 0 and 2 of "a"; chunk 2 was damaged since.
        let staging_dir = Staging::locate(&state, &dest, "ds").unwrap();
        let first = Staging::create(&state, &dest, "ds", m.clone()).unwrap();
        let record = Record::create(&record_path(&staging_dir)).unwrap();
        for idx in [0u64, 2] {
            let off = idx * u64::from(CS);
            let data = &new[off as usize..off as usize + cs];
            first.write_at(1, off, data).unwrap();
            record
                .append(
                    b"a",
                    &Recorded {
                        file_size: size,
                        offset: off,
                        len: CS,
                        hash: chunk_hash(data, off, size),
                    },
                )
                .unwrap();
        }
        first.write_at(1, 2 * u64::from(CS) + 9, b"rot").unwrap();
        drop((first, record));

        let leftover = set_aside(&staging_dir).unwrap().unwrap();
        let staging = Staging::create(&state, &dest, "ds", m).unwrap();
        let record = Record::create(&record_path(&staging_dir)).unwrap();
        let table: Arc<dyn Table> = Arc::new(mover_protocol::table::MemTable::default());
        let resume = mover_protocol::table::MemTable::default();
        let seeded = seed(
            &staging,
            CS,
            Some((&leftover, &resume)),
            Some(&dest),
            &record,
            table,
            2,
        )
        .unwrap();
        let prev_record = sibling(&staging_dir, ".prev.record");
        assert!(
            prev_record.exists(),
            "the record was moved aside with its tree"
        );
        discard(leftover);
        assert!(!prev_record.exists());
        assert_eq!((seeded.resumed, seeded.damaged), (1, 1));
        assert_eq!(
            seeded.reused, 3,
            "every chunk of the old b is copied in and hashed"
        );
        let held: Vec<(u32, u64, [u8; 32])> =
            seeded.held().map(|h| (h.file, h.offset, h.hash)).collect();
        let hash = |data: &[u8], idx: usize| {
            let off = idx * cs;
            chunk_hash(&data[off..off + cs], off as u64, size)
        };
        assert_eq!(
            held,
            vec![
                (1, 0, hash(&new, 0)),
                (2, 0, hash(&new, 0)),
                (2, u64::from(CS), hash(&old_b, 1)),
                (2, 2 * u64::from(CS), hash(&new, 2)),
            ]
        );
        assert_ne!(hash(&old_b, 1), hash(&new, 1));
        // What was held is in the new staging area and in its record.
        let b = std::fs::read(staging.entry_path_of(2).unwrap()).unwrap();
        assert_eq!(b, old_b);
        let again = load(&record_path(&staging_dir)).unwrap();
        assert_eq!(again[&b"a".to_vec()].len(), 1);
        assert_eq!(again[&b"b".to_vec()].len(), 3);
        assert!(!staging_dir.with_extension("prev").exists());
    }
}
