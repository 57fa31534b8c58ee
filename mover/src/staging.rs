//! The staging area: a private copy of a dataset's tree that becomes the destination only at
//! commit, in one atomic rename.
//!
//! Life cycle: [`Staging::create`] makes every directory and (preallocated) file of the
//! manifest ([`Staging::create_deferred`] makes the files on a thread of its own while writes
//! begin, and leaves files that fit one chunk to [`Staging::write_whole`]);
//! [`Staging::write_at`] fills files, from many threads at once;
//! [`Staging::finalize`] adds symlinks, sets modes and times, and makes it all durable;
//! [`Staging::commit`] swaps the tree into place, or [`Staging::abort`] throws it away. The
//! destination is not touched before the commit, so a failed transfer never leaves a
//! half-written data directory behind. Dropping a `Staging` leaves its tree on disk (a later
//! run may resume from it); call `abort` to remove it.

use std::ffi::{CString, OsStr};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use filetime::FileTime;
use mover_protocol::manifest::{display_path, Entry, EntryKind, Manifest, ManifestError};

use crate::disk::{Disk, SourceCache};
use crate::pool::{Pool, PoolBuf, ALIGN};

/// Longest accepted staging label.
const MAX_LABEL_LEN: usize = 100;

/// Why a staging step failed.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error(
        "use staging label {label:?}: {reason}; a label is 1 to 100 ASCII letters, digits, \
         '-', '_' or '.', starting with a letter or digit"
    )]
    InvalidLabel { label: String, reason: &'static str },
    #[error("stage {}: the destination needs a final path component", dest.display())]
    NoDestName { dest: PathBuf },
    #[error(
        "stage {}: its parent directory {} does not exist (create it first)",
        dest.display(),
        parent.display()
    )]
    DestParentMissing { dest: PathBuf, parent: PathBuf },
    #[error("stage {}: it is {found}, not a directory", dest.display())]
    DestNotADirectory { dest: PathBuf, found: &'static str },
    #[error(
        "create staging directory {}: it already exists (left by an earlier run? remove it or \
         use another label)",
        path.display()
    )]
    StagingExists { path: PathBuf },
    #[error("write {}: no space left on device", path.display())]
    NoSpace { path: PathBuf },
    #[error("write file {file}: the manifest has {count} entries")]
    UnknownFile { file: u32, count: usize },
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    #[error("write file {file} ({path}): that entry is not a regular file")]
    NotAFile { file: u32, path: String },
    #[error(
        "write file {file} ({path}): {len} bytes at offset {offset} go past its size of {size}"
    )]
    OutOfRange {
        file: u32,
        path: String,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error(
        "finalize {}: its data never arrived (the transfer ended without it)",
        path.display()
    )]
    NeverWritten { path: PathBuf },
    #[error(
        "write file {file} ({path}) whole: {len} bytes given for a file of {size} (or one \
         written chunk by chunk)"
    )]
    NotWhole {
        file: u32,
        path: String,
        len: usize,
        size: u64,
    },
    #[error("commit {}: the staging area was not finalized", path.display())]
    NotFinalized { path: PathBuf },
    #[error(
        "swap {} into place at {}: the filesystem does not support atomic exchange \
         (renameat2 RENAME_EXCHANGE)",
        staging.display(),
        dest.display()
    )]
    ExchangeUnsupported { staging: PathBuf, dest: PathBuf },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl StagingError {
    /// Whether the disk is full: freeing space and retrying can help.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::NoSpace { .. })
    }

    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return Self::NoSpace {
                path: path.to_path_buf(),
            };
        }
        Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    /// Whether an existing directory was replaced (and then removed).
    pub replaced_existing: bool,
    /// Where the replaced tree still lies if removing it failed (the commit itself succeeded;
    /// the reason was logged). `None` when nothing was left behind.
    pub old_tree_left_at: Option<PathBuf>,
}

/// A staging tree for one dataset destination. `Send + Sync`: `write_at` may run on many
/// threads at once.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    dest: PathBuf,
    manifest: Arc<Manifest>,
    finalized: AtomicBool,
    /// Set when the files are being created in the background ([`Staging::create_deferred`]).
    creator: Option<Creator>,
    /// Files of at most this many bytes (and not empty) are left to [`Staging::write_whole`],
    /// which makes each in one go; 0 when none are.
    whole_max: u64,
    /// Which of those `write_whole` has made, by manifest index.
    whole_done: Vec<AtomicU64>,
    /// Whether chunk writes and read-backs bypass the page cache: one of `DIRECT_*`.
    direct: AtomicU8,
}

/// A file [`Staging::write_whole`] just made, still open.
#[derive(Debug)]
pub struct WholeFile {
    file: File,
    path: PathBuf,
}

impl WholeFile {
    /// Reads the file's first `len` bytes back into a buffer of `pool`, through the same
    /// descriptor on the calling thread; shorter where the file is.
    pub fn read_back(&self, pool: &Arc<Pool>, len: usize) -> Result<PoolBuf, StagingError> {
        let mut buf = pool.take_for_overwrite(len);
        let got = crate::disk::threads::read_full(&self.file, 0, &mut buf, SourceCache::Keep)
            .map_err(|e| StagingError::io("read", &self.path, e))?;
        buf.truncate(got);
        Ok(buf)
    }
}

/// How chunk data goes into staging (`staging_writes` in the agent config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StagingWrites {
    /// `O_DIRECT` where the filesystem takes it, through the page cache where it does not:
    /// the copy into memory, the page cache filling with data nobody reads soon, and the
    /// writeback later are all skipped, and a read-back ([`StagingVerify::ReadBack`]) reads
    /// what the device holds.
    #[default]
    Direct,
    /// Through the page cache, always.
    Cached,
}

impl std::str::FromStr for StagingWrites {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "direct" => Ok(Self::Direct),
            "cached" => Ok(Self::Cached),
            _ => Err(format!(
                "{s:?} is not a way to write staging (use direct or cached)"
            )),
        }
    }
}

/// How a receiver checks each chunk it writes into staging (`staging_verify` in the agent
/// config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StagingVerify {
    /// The decoded chunk is hashed in memory and written only if it matches: it catches
    /// damage in transit (and in a relay's memory), and costs the device nothing.
    #[default]
    Memory,
    /// Each chunk is written, then read back from staging (from the device, where writes are
    /// direct) and hashed: it also catches a disk or controller that stores other bytes than
    /// it was given, at the cost of a device read per chunk.
    ReadBack,
}

impl std::str::FromStr for StagingVerify {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "memory" => Ok(Self::Memory),
            "read-back" => Ok(Self::ReadBack),
            _ => Err(format!(
                "{s:?} is not a way to check staging writes (use memory or read-back)"
            )),
        }
    }
}

/// `Staging::direct`: not tried yet on this filesystem.
const DIRECT_UNTRIED: u8 = 0;
/// `Staging::direct`: worked here.
const DIRECT_WORKS: u8 = 1;
/// `Staging::direct`: turned off, or refused by the filesystem.
const DIRECT_OFF: u8 = 2;

/// The thread that creates a deferred staging tree's files, in manifest order, while data
/// already flows: writers wait only for the file they write. Dropping it stops the thread.
#[derive(Debug)]
struct Creator {
    shared: Arc<Creating>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Creating {
    state: std::sync::Mutex<CreateState>,
    changed: std::sync::Condvar,
    cancel: AtomicBool,
    /// Held by whoever creates a file: the creator thread and [`Staging::write_whole`]. The
    /// kernel makes creations in one directory wait for each other anyway (on a lock its
    /// waiters spin on while it is held), and a create can take long on a filesystem that
    /// just deleted many files; here the waiters sleep and leave the CPU to the transfer.
    make: std::sync::Mutex<()>,
}

impl Creating {
    /// Creates the file at `path` (mode 0600; `fresh`: it must not exist yet, else it is
    /// emptied if it does) with the other creators waiting.
    fn make(&self, path: &Path, fresh: bool) -> io::Result<File> {
        let _one_at_a_time = self.make.lock().unwrap_or_else(|p| p.into_inner());
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(fresh)
            .create(!fresh)
            .truncate(!fresh)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
    }
}

#[derive(Debug, Default)]
struct CreateState {
    /// Entries with an index below this exist.
    next: usize,
    done: bool,
    /// The first failure: the path, and the error as the OS gave it.
    failed: Option<(PathBuf, io::Error)>,
}

impl Creating {
    fn lock(&self) -> std::sync::MutexGuard<'_, CreateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until entry `upto` exists (`None`: every entry), or creating failed.
    fn wait(&self, upto: Option<usize>) -> Result<(), StagingError> {
        let mut st = self.lock();
        loop {
            if let Some((path, e)) = &st.failed {
                let again = match e.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(e.kind(), e.to_string()),
                };
                return Err(StagingError::io("create file", path, again));
            }
            if st.done || upto.is_some_and(|u| st.next > u) {
                return Ok(());
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Creator {
    /// Files of 1 to `whole_max` bytes are skipped: [`Staging::write_whole`] makes them.
    fn start(dir: PathBuf, manifest: Arc<Manifest>, whole_max: u64) -> Result<Self, StagingError> {
        let shared = Arc::new(Creating::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mover-create".into())
            .spawn(move || {
                for (i, e) in manifest.iter().enumerate().skip(1) {
                    if s.cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    let e = match e {
                        Ok(e) => e,
                        Err(err) => {
                            s.lock().failed = Some((dir.clone(), io::Error::other(err)));
                            break;
                        }
                    };
                    if let EntryKind::File { size } = e.kind {
                        if size > 0 && size <= whole_max {
                            continue;
                        }
                        let path = dir.join(OsStr::from_bytes(&e.path));
                        if let Err(err) = s.make(&path, true).and_then(|f| reserve(&f, size)) {
                            s.lock().failed = Some((path, err));
                            break;
                        }
                    }
                    s.lock().next = i + 1;
                    s.changed.notify_all();
                }
                s.lock().done = true;
                s.changed.notify_all();
            })
            .map_err(|e| StagingError::io("start creating files in", Path::new("staging"), e))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        self.shared.cancel.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Creator {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Staging {
    /// Creates the staging tree for `manifest`, to be committed at `dest`.
    ///
    /// The final rename is atomic only within one filesystem, so the staging directory goes
    /// where that holds: `state_dir/staging/<label>` when `state_dir` and `dest`'s parent are
    /// on the same filesystem (same `st_dev` and, where `statx` reports it, the same mount, so
    /// that bind mounts do not fool it), otherwise `<dest's parent>/.mover-staging-<label>`.
    ///
    /// `dest`'s parent must exist; `dest` itself may be missing or an existing directory (never
    /// a file or a symlink). Directories are created with mode 0700 and files with 0600 and
    /// preallocated to their final size (`fallocate`, or `set_len` where unsupported), so a
    /// full disk shows up here ([`StagingError::NoSpace`]) rather than mid-transfer. On error
    /// the partial staging tree is removed.
    pub fn create(
        state_dir: &Path,
        dest: &Path,
        label: &str,
        manifest: Arc<Manifest>,
    ) -> Result<Staging, StagingError> {
        Self::create_with(state_dir, dest, label, manifest, None)
    }

    /// Like [`Staging::create`], but only the directories are made before it returns: a
    /// thread creates (and preallocates) the files in manifest order meanwhile, so that a
    /// tree of thousands of files does not hold the transfer back until the last one exists.
    /// Writes wait for their file; [`Staging::finalize`] for all of them. A full disk then
    /// shows up as the failure of a write (or of `finalize`), still before anything is
    /// committed. For a tree with nothing to adopt into it: [`Staging::adopt`] needs every
    /// file in place first.
    ///
    /// Files of 1 to `whole_max` bytes (those that fit one chunk) are not made here at all:
    /// [`Staging::write_whole`] makes each with its data, mode and mtime in one go, and
    /// [`Staging::finalize`] fails if one never came.
    pub fn create_deferred(
        state_dir: &Path,
        dest: &Path,
        label: &str,
        manifest: Arc<Manifest>,
        whole_max: u64,
    ) -> Result<Staging, StagingError> {
        Self::create_with(state_dir, dest, label, manifest, Some(whole_max))
    }

    fn create_with(
        state_dir: &Path,
        dest: &Path,
        label: &str,
        manifest: Arc<Manifest>,
        deferred: Option<u64>,
    ) -> Result<Staging, StagingError> {
        let dir = Self::locate(state_dir, dest, label)?;
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StagingError::StagingExists { path: dir })
            }
            Err(e) => return Err(StagingError::io("create directory", &dir, e)),
        }
        let whole_max = deferred.unwrap_or(0);
        let whole_done = if whole_max > 0 {
            (0..manifest.len().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        } else {
            Vec::new()
        };
        let mut staging = Staging {
            dir,
            dest: dest.to_path_buf(),
            manifest,
            finalized: AtomicBool::new(false),
            creator: None,
            whole_max,
            whole_done,
            direct: AtomicU8::new(DIRECT_OFF),
        };
        let made = staging.populate(deferred.is_none()).and_then(|()| {
            if deferred.is_some() {
                staging.creator = Some(Creator::start(
                    staging.dir.clone(),
                    staging.manifest.clone(),
                    whole_max,
                )?);
            }
            Ok(())
        });
        if let Err(e) = made {
            if let Err(rm) = remove_tree(&staging.dir) {
                tracing::warn!(path = %staging.dir.display(), error = %rm,
                    "failed to remove a partly created staging tree");
            }
            return Err(e);
        }
        Ok(staging)
    }

    /// Where [`Staging::create`] puts the staging directory for `dest` and `label` (see
    /// there), after checking the label and the destination. Creates nothing but the
    /// `staging` directory under `state_dir`.
    pub fn locate(state_dir: &Path, dest: &Path, label: &str) -> Result<PathBuf, StagingError> {
        check_label(label)?;
        let parent = dest_parent(dest)?;
        let parent_meta = match fs::metadata(&parent) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StagingError::DestParentMissing {
                    dest: dest.to_path_buf(),
                    parent,
                })
            }
            Err(e) => return Err(StagingError::io("inspect", &parent, e)),
        };
        if !parent_meta.is_dir() {
            let err = io::Error::from(io::ErrorKind::NotADirectory);
            return Err(StagingError::io("inspect", &parent, err));
        }
        match fs::symlink_metadata(dest) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                return Err(StagingError::DestNotADirectory {
                    dest: dest.to_path_buf(),
                    found: if m.file_type().is_symlink() {
                        "a symlink (give the directory it points to instead)"
                    } else {
                        "not a directory"
                    },
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StagingError::io("inspect", dest, e)),
        }

        let state_meta =
            fs::metadata(state_dir).map_err(|e| StagingError::io("inspect", state_dir, e))?;
        let dir =
            if state_meta.dev() == parent_meta.dev() && same_mount_if_known(state_dir, &parent) {
                let base = state_dir.join("staging");
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&base)
                    .map_err(|e| StagingError::io("create directory", &base, e))?;
                base.join(label)
            } else {
                parent.join(format!(".mover-staging-{label}"))
            };
        Ok(dir)
    }

    /// The path of entry `file` inside the staging tree.
    pub fn entry_path_of(&self, file: u32) -> Option<PathBuf> {
        Some(self.entry_path(&self.manifest.get(file as usize).ok()?))
    }

    /// Moves an already open regular file, `name` in directory `from_dir`, into place as file
    /// `file` of the tree (replacing the empty one `create` made), at the manifest's size.
    /// What it holds is kept: a resumed transfer checks it chunk by chunk.
    pub fn adopt(&self, file: u32, from_dir: &File, name: &CString) -> Result<(), StagingError> {
        self.created(None)?;
        let entry = self.entry(file)?;
        let EntryKind::File { size } = entry.kind else {
            return Err(StagingError::NotAFile {
                file,
                path: display_path(&entry.path),
            });
        };
        let to = self.entry_path(&entry);
        let to_c = cstring(&to).map_err(|e| StagingError::io("adopt", &to, e))?;
        // SAFETY: both descriptors and both strings live for the call.
        let r = unsafe {
            libc::renameat(
                from_dir.as_raw_fd(),
                name.as_ptr(),
                libc::AT_FDCWD,
                to_c.as_ptr(),
            )
        };
        if r != 0 {
            return Err(StagingError::io("adopt", &to, io::Error::last_os_error()));
        }
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&to)
            .map_err(|e| StagingError::io("open", &to, e))?;
        f.set_len(size)
            .map_err(|e| StagingError::io("size file", &to, e))?;
        preallocate(&f, &to, size)
    }

    /// The staging directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where the tree goes at commit.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Writes `data` at `offset` into file `file` (its index in the manifest).
    pub fn write_at(&self, file: u32, offset: u64, data: &[u8]) -> Result<(), StagingError> {
        let (f, path) = self.open_for_write(file, offset, data.len())?;
        // `write_all_at` loops over short writes and retries on EINTR.
        f.write_all_at(data, offset)
            .map_err(|e| StagingError::io("write", &path, e))
    }

    /// Sets how [`Staging::write_with`] and [`Staging::read_back`] reach the disk; cached
    /// until this is called.
    pub fn set_writes(&self, writes: StagingWrites) {
        let state = match writes {
            StagingWrites::Direct => DIRECT_UNTRIED,
            StagingWrites::Cached => DIRECT_OFF,
        };
        self.direct.store(state, Ordering::Relaxed);
    }

    /// Whether chunk writes go around the page cache (`O_DIRECT`) now.
    pub fn writes_direct(&self) -> bool {
        self.direct.load(Ordering::Relaxed) != DIRECT_OFF
    }

    /// Records that `O_DIRECT` worked, or that the filesystem refused it (`error`), and logs
    /// the first time either happens. A refusal is final: a later success on another thread
    /// does not turn direct writes back on.
    fn note_direct(&self, error: Option<&io::Error>, path: &Path) {
        match error {
            None => {
                let first = self
                    .direct
                    .compare_exchange(
                        DIRECT_UNTRIED,
                        DIRECT_WORKS,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok();
                if first {
                    tracing::info!(staging = %self.dir.display(), "chunks go to staging with O_DIRECT");
                }
            }
            Some(e) => {
                if self.direct.swap(DIRECT_OFF, Ordering::Relaxed) != DIRECT_OFF {
                    tracing::info!(
                        path = %path.display(),
                        error = %e,
                        "this filesystem refuses O_DIRECT; chunks go to staging through the page cache"
                    );
                }
            }
        }
    }

    /// Writes one chunk's `data` at `offset` into file `file` through the disk back end
    /// `disk`. Where writes are direct, the whole 4 KiB blocks of the chunk go with
    /// `O_DIRECT` (from `data` itself if it starts on a block boundary, else from a copy in a
    /// buffer of `pool`) and the rest of a file's last block through the page cache; a
    /// filesystem that refuses `O_DIRECT` gets the whole chunk through the page cache, now
    /// and for the rest of the transfer.
    pub fn write_with(
        &self,
        disk: &dyn Disk,
        pool: &Arc<Pool>,
        file: u32,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StagingError> {
        let entry = self.file_entry(file, offset, data.len())?;
        self.created(Some(file as usize))?;
        let path = self.entry_path(&entry);
        let head = self.direct_head(offset, data.len());
        if head > 0 {
            match self.write_direct(disk, pool, &path, offset, &data, head) {
                Ok(()) => {
                    self.note_direct(None, &path);
                    if head == data.len() {
                        return Ok(());
                    }
                    let f = open_in_tree(&path, libc::O_WRONLY)
                        .map_err(|e| StagingError::io("open", &path, e))?;
                    return f
                        .write_all_at(&data[head..], offset + head as u64)
                        .map_err(|e| StagingError::io("write", &path, e));
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.note_direct(Some(&e), &path);
                }
                Err(e) => return Err(StagingError::io("write", &path, e)),
            }
        }
        let f =
            open_in_tree(&path, libc::O_WRONLY).map_err(|e| StagingError::io("open", &path, e))?;
        disk.write(Arc::new(f), offset, data)
            .wait()
            .map_err(|e| StagingError::io("write", &path, e))
    }

    /// How many leading bytes of `len` at `offset` go with `O_DIRECT`: 0 unless writes are
    /// direct, else the whole blocks.
    fn direct_head(&self, offset: u64, len: usize) -> usize {
        if !self.writes_direct() || offset % ALIGN as u64 != 0 {
            return 0;
        }
        len - len % ALIGN
    }

    fn write_direct(
        &self,
        disk: &dyn Disk,
        pool: &Arc<Pool>,
        path: &Path,
        offset: u64,
        data: &Bytes,
        head: usize,
    ) -> io::Result<()> {
        let f = open_in_tree(path, libc::O_WRONLY | libc::O_DIRECT)?;
        let blocks = if crate::pool::is_aligned(data) {
            data.slice(..head)
        } else {
            let mut copy = pool.take_for_overwrite(head);
            copy.copy_from_slice(&data[..head]);
            copy.freeze()
        };
        disk.write(Arc::new(f), offset, blocks).wait()
    }

    /// Reads `len` bytes at `offset` of file `file` back from staging into a buffer of
    /// `pool`, to check them against their hash. Where writes are direct this reads what the
    /// device holds (`O_DIRECT`), not the page cache. The buffer is shorter than `len` only
    /// where the file is.
    pub fn read_back(
        &self,
        disk: &dyn Disk,
        pool: &Arc<Pool>,
        file: u32,
        offset: u64,
        len: usize,
    ) -> Result<PoolBuf, StagingError> {
        let entry = self.file_entry(file, offset, len)?;
        let path = self.entry_path(&entry);
        let head = if self.writes_whole(file) {
            0
        } else {
            self.direct_head(offset, len)
        };
        let mut done = 0;
        // Taken for all `len` bytes (the pool picks the buffer's size from the request), then
        // cut to the direct part.
        let mut buf = pool.take_for_overwrite(len);
        buf.truncate(head);
        if head > 0 {
            match open_in_tree(&path, libc::O_RDONLY | libc::O_DIRECT) {
                Ok(f) => {
                    let (b, got) = disk
                        .read(Arc::new(f), offset, buf, SourceCache::Keep)
                        .wait()
                        .map_err(|e| StagingError::io("read", &path, e))?;
                    buf = b;
                    if got < head {
                        buf.truncate(got);
                        return Ok(buf);
                    }
                    done = head;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.note_direct(Some(&e), &path);
                }
                Err(e) => return Err(StagingError::io("open", &path, e)),
            }
        }
        buf.resize(len);
        let f =
            open_in_tree(&path, libc::O_RDONLY).map_err(|e| StagingError::io("open", &path, e))?;
        let (mut buf, got) = if done == 0 {
            disk.read(Arc::new(f), offset, buf, SourceCache::Keep)
                .wait()
                .map_err(|e| StagingError::io("read", &path, e))?
        } else {
            let got = crate::disk::threads::read_full(
                &f,
                offset + done as u64,
                &mut buf[done..],
                SourceCache::Keep,
            )
            .map_err(|e| StagingError::io("read", &path, e))?;
            (buf, done + got)
        };
        buf.truncate(got);
        Ok(buf)
    }

    /// Whether file `file` is left to [`Staging::write_whole`] (see
    /// [`Staging::create_deferred`]).
    pub fn writes_whole(&self, file: u32) -> bool {
        self.whole_max > 0
            && self
                .manifest
                .file_size(file as usize)
                .is_ok_and(|s| s.is_some_and(|size| size > 0 && size <= self.whole_max))
    }

    /// Makes file `file`, one that [`Staging::writes_whole`], with all of its data, then its
    /// mode and mtime, through one descriptor. A plain `pwrite` on the calling thread: for a
    /// file this small, handing the write to the disk back end costs more than the copy into
    /// the page cache. A second call for the same file rewrites it, as long as the mode the
    /// first gave it lets this user write. Returns the file, still open, to read it back.
    pub fn write_whole(&self, file: u32, data: &[u8]) -> Result<WholeFile, StagingError> {
        let entry = self.file_entry(file, 0, data.len())?;
        if !self.writes_whole(file) || data.len() as u64 != entry.size() {
            return Err(StagingError::NotWhole {
                file,
                path: display_path(&entry.path),
                len: data.len(),
                size: entry.size(),
            });
        }
        let path = self.entry_path(&entry);
        let made = match &self.creator {
            Some(c) => c.shared.make(&path, false),
            None => Err(io::Error::from(io::ErrorKind::Unsupported)),
        };
        let f = made.map_err(|e| StagingError::io("create file", &path, e))?;
        f.write_all_at(data, 0)
            .map_err(|e| StagingError::io("write", &path, e))?;
        set_mode_and_mtime_of(&f, &entry, &path)?;
        if let Some(w) = self.whole_done.get(file as usize / 64) {
            w.fetch_or(1 << (file % 64), Ordering::Release);
        }
        Ok(WholeFile { file: f, path })
    }

    /// Checks that file `file` is a regular file and that `len` bytes at `offset` fit it.
    fn file_entry(&self, file: u32, offset: u64, len: usize) -> Result<Entry, StagingError> {
        let entry = self.entry(file)?;
        let EntryKind::File { size } = entry.kind else {
            return Err(StagingError::NotAFile {
                file,
                path: display_path(&entry.path),
            });
        };
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > size) {
            return Err(StagingError::OutOfRange {
                file,
                path: display_path(&entry.path),
                offset,
                len,
                size,
            });
        }
        Ok(entry)
    }

    /// Checks that `len` bytes at `offset` fit file `file` and opens it for writing.
    fn open_for_write(
        &self,
        file: u32,
        offset: u64,
        len: usize,
    ) -> Result<(File, PathBuf), StagingError> {
        let entry = self.file_entry(file, offset, len)?;
        self.created(Some(file as usize))?;
        let path = self.entry_path(&entry);
        // Opened per call: chunks are MiBs, so the open is cheap next to the write, and
        // thousands of files never hold thousands of descriptors.
        let f =
            open_in_tree(&path, libc::O_WRONLY).map_err(|e| StagingError::io("open", &path, e))?;
        Ok((f, path))
    }

    /// Creates the symlinks, sets every mode and mtime from the manifest, and makes the whole
    /// tree durable. May be called again after a failure.
    pub fn finalize(&self) -> Result<(), StagingError> {
        self.created(None)?;
        // Ownership is not carried in the manifest yet, so even as root every entry stays
        // owned by this process's user: a known gap.
        for e in self.manifest.iter() {
            let e = e?;
            let EntryKind::Symlink { target } = &e.kind else {
                continue;
            };
            let path = self.entry_path(&e);
            if let Err(err) = std::os::unix::fs::symlink(OsStr::from_bytes(target), &path) {
                // A finalize that is run again finds its own links already in place.
                let same = err.kind() == io::ErrorKind::AlreadyExists
                    && fs::read_link(&path).is_ok_and(|t| t.as_os_str().as_bytes() == &target[..]);
                if !same {
                    return Err(StagingError::io("create symlink", &path, err));
                }
            }
            let t = mtime(&e);
            // Linux has no symlink permissions, so only the time is set. The manifest has no
            // atime; the mtime stands in for it.
            filetime::set_symlink_file_times(&path, t, t)
                .map_err(|err| StagingError::io("set the times of", &path, err))?;
        }
        for (i, e) in self.manifest.iter().enumerate() {
            let e = e?;
            if !matches!(e.kind, EntryKind::File { .. }) {
                continue;
            }
            if self.writes_whole(i as u32) {
                // Made whole, mode and mtime included, by `write_whole`.
                let done = self
                    .whole_done
                    .get(i / 64)
                    .is_some_and(|w| w.load(Ordering::Acquire) >> (i % 64) & 1 == 1);
                if !done {
                    return Err(StagingError::NeverWritten {
                        path: self.entry_path(&e),
                    });
                }
                continue;
            }
            self.set_mode_and_mtime(&e, 0)?;
        }
        // Directories last, children before parents (the reverse of the manifest's order):
        // creating entries moves a directory's mtime, and a 0555 parent must not be set
        // before its children are done. Read back to front a block at a time.
        for i in (0..self.manifest.len()).rev() {
            let e = self.manifest.get(i)?;
            if e.is_dir() {
                self.set_mode_and_mtime(&e, libc::O_DIRECTORY)?;
            }
        }

        self.sync()?;
        self.finalized.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes the whole tree durable, as it is now (after a finalized tree was changed in
    /// place, by a backup tool's prepare step say).
    pub fn sync(&self) -> Result<(), StagingError> {
        // One syncfs flushes every file and directory of the tree in a single pass; an fsync
        // per entry would cost thousands of journal commits. It also flushes unrelated dirty
        // data on the same filesystem, which is harmless. Since Linux 5.8 it reports
        // writeback errors, so a failed flush is not missed.
        let root = open_dir(&self.dir)?;
        // SAFETY: `root` is an open descriptor for the whole call.
        if unsafe { libc::syncfs(root.as_raw_fd()) } != 0 {
            return Err(StagingError::io(
                "sync the filesystem of",
                &self.dir,
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Swaps the finalized tree into place at the destination and removes what was there.
    ///
    /// An existing destination is exchanged with `renameat2(RENAME_EXCHANGE)`, so a complete
    /// directory is at `dest` at every moment; a missing one is created by a rename that
    /// refuses to replace anything that appeared meanwhile.
    pub fn commit(self) -> Result<CommitInfo, StagingError> {
        if !self.finalized.load(Ordering::Acquire) {
            return Err(StagingError::NotFinalized { path: self.dir });
        }
        let dest_parent = dest_parent(&self.dest)?;
        let staging_parent = self.dir.parent().unwrap_or(Path::new("/")).to_path_buf();
        // Moving a directory to another parent rewrites its `..`, which needs write
        // permission on it; a 0555 root gets u+w for the move only.
        let moves_across = !same_inode(&dest_parent, &staging_parent);
        let new_root_mode = self.manifest.with(0, |e| e.mode).unwrap_or(0o755);

        let replaced_existing = match fs::symlink_metadata(&self.dest) {
            Ok(m) if m.is_dir() => true,
            Ok(_) => {
                return Err(StagingError::DestNotADirectory {
                    dest: self.dest,
                    found: "no longer a directory",
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(StagingError::io("inspect", &self.dest, e)),
        };

        let mut new_guard = WritableGuard::new(&self.dir, new_root_mode, moves_across)?;
        let old_guard = if replaced_existing {
            let old_mode = fs::symlink_metadata(&self.dest)
                .map_err(|e| StagingError::io("inspect", &self.dest, e))?
                .mode()
                & 0o7777;
            Some(WritableGuard::new(&self.dest, old_mode, moves_across)?)
        } else {
            None
        };

        let flags = if replaced_existing {
            libc::RENAME_EXCHANGE
        } else {
            libc::RENAME_NOREPLACE
        };
        match renameat2(&self.dir, &self.dest, flags) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !replaced_existing => {
                // The filesystem lacks RENAME_NOREPLACE; a plain rename still cannot leave a
                // half tree at dest.
                fs::rename(&self.dir, &self.dest)
                    .map_err(|e| StagingError::io("rename staging into", &self.dest, e))?;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(StagingError::ExchangeUnsupported {
                    staging: self.dir,
                    dest: self.dest,
                })
            }
            Err(e) => return Err(StagingError::io("rename staging into", &self.dest, e)),
        }
        // Both paths now name the other tree: the new root is at dest, the old one (if any) at
        // the staging path. Restore the new root's mode there; the old one is going away.
        new_guard.retarget(&self.dest);
        drop(new_guard);
        if let Some(g) = old_guard {
            g.forget();
        }

        fsync_dir(&dest_parent)?;
        if moves_across {
            fsync_dir(&staging_parent)?;
        }

        let mut old_tree_left_at = None;
        if replaced_existing {
            if let Err(e) = remove_tree(&self.dir) {
                tracing::warn!(path = %self.dir.display(), error = %e,
                    "committed, but failed to remove the replaced tree");
                old_tree_left_at = Some(self.dir.clone());
            }
        }
        Ok(CommitInfo {
            replaced_existing,
            old_tree_left_at,
        })
    }

    /// Removes the staging tree; the destination is not touched.
    pub fn abort(mut self) -> Result<(), StagingError> {
        if let Some(c) = &mut self.creator {
            c.stop();
        }
        match remove_tree(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StagingError::io("remove staging tree", &self.dir, e))
            }
            _ => Ok(()),
        }
    }

    /// Entry `file` of the manifest.
    fn entry(&self, file: u32) -> Result<Entry, StagingError> {
        match self.manifest.get(file as usize) {
            Err(ManifestError::NoEntry { .. }) => Err(StagingError::UnknownFile {
                file,
                count: self.manifest.len(),
            }),
            got => Ok(got?),
        }
    }

    fn entry_path(&self, e: &Entry) -> PathBuf {
        if e.path.is_empty() {
            self.dir.clone()
        } else {
            self.dir.join(OsStr::from_bytes(&e.path))
        }
    }

    /// Waits until file `upto` exists (`None`: every file), when they are made in the
    /// background.
    fn created(&self, upto: Option<usize>) -> Result<(), StagingError> {
        match &self.creator {
            Some(c) => c.shared.wait(upto),
            None => Ok(()),
        }
    }

    /// Makes every directory of the manifest, and with `files` every file (not the
    /// symlinks: they come last).
    fn populate(&self, files: bool) -> Result<(), StagingError> {
        for e in self.manifest.iter().skip(1) {
            let e = e?;
            let path = self.entry_path(&e);
            match e.kind {
                EntryKind::Dir => DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(|err| StagingError::io("create directory", &path, err))?,
                EntryKind::File { size } if files => create_file(&path, size)?,
                EntryKind::File { .. } | EntryKind::Symlink { .. } => {}
            }
        }
        Ok(())
    }

    fn set_mode_and_mtime(&self, e: &Entry, extra_flags: libc::c_int) -> Result<(), StagingError> {
        let path = self.entry_path(e);
        // Through a descriptor opened without following links, so nothing outside the tree
        // can be touched even if an entry were swapped for a symlink.
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | extra_flags)
            .open(&path)
            .map_err(|err| StagingError::io("open", &path, err))?;
        set_mode_and_mtime_of(&f, e, &path)
    }
}

/// Gives the open file `f` (at `path`) entry `e`'s mode and mtime.
fn set_mode_and_mtime_of(f: &File, e: &Entry, path: &Path) -> Result<(), StagingError> {
    f.set_permissions(fs::Permissions::from_mode(e.mode))
        .map_err(|err| StagingError::io("set the mode of", path, err))?;
    filetime::set_file_handle_times(f, None, Some(mtime(e)))
        .map_err(|err| StagingError::io("set the mtime of", path, err))
}

fn mtime(e: &Entry) -> FileTime {
    FileTime::from_unix_time(e.mtime_sec, e.mtime_nsec)
}

fn check_label(label: &str) -> Result<(), StagingError> {
    let bad = |reason| {
        Err(StagingError::InvalidLabel {
            label: label.to_string(),
            reason,
        })
    };
    if label.is_empty() {
        return bad("it is empty");
    }
    if label.len() > MAX_LABEL_LEN {
        return bad("it is too long");
    }
    if !label.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("it does not start with a letter or digit");
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return bad("it holds a character that is not allowed");
    }
    Ok(())
}

/// `dest`'s parent directory (`.` for a bare relative name).
fn dest_parent(dest: &Path) -> Result<PathBuf, StagingError> {
    let no_name = || StagingError::NoDestName {
        dest: dest.to_path_buf(),
    };
    let name = dest.file_name().ok_or_else(no_name)?;
    if name == OsStr::new("..") {
        return Err(no_name());
    }
    Ok(match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    })
}

/// Creates `path` (never through a symlink, never over an existing entry) at its final size.
/// Opens a file of the staging tree with `flags` (an access mode and extras), never
/// following a symlink.
fn open_in_tree(path: &Path, flags: libc::c_int) -> io::Result<File> {
    let access = flags & libc::O_ACCMODE;
    OpenOptions::new()
        .read(access != libc::O_WRONLY)
        .write(access != libc::O_RDONLY)
        .custom_flags((flags & !libc::O_ACCMODE) | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

fn create_file(path: &Path, size: u64) -> Result<(), StagingError> {
    create_file_raw(path, size).map_err(|e| StagingError::io("create file", path, e))
}

/// Creates a file that must not exist yet and reserves `size` bytes for it.
fn create_file_raw(path: &Path, size: u64) -> io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    reserve(&f, size)
}

/// Reserves `size` bytes for `f` (`fallocate`, or `set_len` where unsupported).
fn preallocate(f: &File, path: &Path, size: u64) -> Result<(), StagingError> {
    reserve(f, size).map_err(|e| StagingError::io("preallocate", path, e))
}

/// Reserves `size` bytes for `f` (`fallocate`, or `set_len` where unsupported).
fn reserve(f: &File, size: u64) -> io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    let len = libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: `f` is an open descriptor for the whole call.
    if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS) => f.set_len(size),
        _ => Err(err),
    }
}

/// Removes a tree if it exists (see [`remove_tree`]).
pub(crate) fn remove_tree_if_present(path: &Path) -> Result<(), StagingError> {
    match remove_tree(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(StagingError::io("remove old staging tree", path, e))
        }
        _ => Ok(()),
    }
}

/// Removes a tree, first making writable any directory that blocks it (a 0555 directory
/// cannot be emptied by its owner unless it is root).
fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_dirs_writable(path)?;
            fs::remove_dir_all(path)
        }
        r => r,
    }
}

fn make_dirs_writable(dir: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Ok(());
    }
    if meta.mode() & 0o700 != 0o700 {
        fs::set_permissions(
            dir,
            fs::Permissions::from_mode(meta.mode() & 0o7777 | 0o700),
        )?;
    }
    for item in fs::read_dir(dir)? {
        let item = item?;
        if item.file_type()?.is_dir() {
            make_dirs_writable(&item.path())?;
        }
    }
    Ok(())
}

/// Gives a directory u+w for the span of a rename, then puts its mode back.
struct WritableGuard {
    path: PathBuf,
    mode: Option<u32>,
}

impl WritableGuard {
    fn new(path: &Path, mode: u32, needed: bool) -> Result<Self, StagingError> {
        if !needed || mode & 0o200 != 0 {
            return Ok(Self {
                path: path.to_path_buf(),
                mode: None,
            });
        }
        fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o200))
            .map_err(|e| StagingError::io("set the mode of", path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            mode: Some(mode),
        })
    }

    /// The directory was renamed to `path`.
    fn retarget(&mut self, path: &Path) {
        self.path = path.to_path_buf();
    }

    /// Leaves the mode as it is now.
    fn forget(mut self) {
        self.mode = None;
    }
}

impl Drop for WritableGuard {
    fn drop(&mut self) {
        if let Some(mode) = self.mode {
            // chmod does not touch the mtime, so the manifest's mtime stays exact.
            if let Err(e) = fs::set_permissions(&self.path, fs::Permissions::from_mode(mode)) {
                tracing::warn!(path = %self.path.display(), error = %e,
                    "failed to restore a directory's mode after a rename");
            }
        }
    }
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (from, to) = (cstring(from)?, cstring(to)?);
    // The raw syscall rather than the libc wrapper, which older glibc versions lack.
    // SAFETY: both pointers are valid NUL-terminated strings for the whole call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn open_dir(path: &Path) -> Result<File, StagingError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| StagingError::io("open directory", path, e))
}

fn fsync_dir(path: &Path) -> Result<(), StagingError> {
    open_dir(path)?
        .sync_all()
        .map_err(|e| StagingError::io("sync directory", path, e))
}

fn same_inode(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// False only when `statx` says the two paths are on different mounts (a bind mount of the
/// same filesystem has the same `st_dev`, yet rename across it fails with EXDEV).
fn same_mount_if_known(a: &Path, b: &Path) -> bool {
    match (mount_id(a), mount_id(b)) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

fn mount_id(path: &Path) -> Option<u64> {
    let c = cstring(path).ok()?;
    // SAFETY: an all-zero `statx` is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `stx` a writable statx buffer.
    let rc = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, libc::STATX_MNT_ID, &mut stx) };
    (rc == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::compare::{b3sum, compare_trees};
    use crate::scan::tests::make_tree;
    use crate::scan::{scan, source_path};
    use std::process::Command;

    const _: fn() = || {
        fn check<T: Send + Sync>() {}
        check::<Staging>();
    };

    /// Copies every file of `m` from `src` into `s` in 1 MiB + 7 chunks, last chunk first,
    /// from two threads.
    fn copy_files(src: &Path, s: &Staging, m: &Manifest) {
        const CHUNK: usize = 1024 * 1024 + 7;
        let mut jobs = Vec::new();
        for (id, e) in m.to_vec().unwrap().iter().enumerate() {
            if let EntryKind::File { .. } = e.kind {
                let data = fs::read(source_path(src, e)).unwrap();
                let mut off = 0;
                while off < data.len() {
                    let end = (off + CHUNK).min(data.len());
                    jobs.push((id as u32, off as u64, data[off..end].to_vec()));
                    off = end;
                }
            }
        }
        jobs.reverse();
        std::thread::scope(|scope| {
            for half in [0, 1] {
                let jobs = &jobs;
                scope.spawn(move || {
                    for (file, off, data) in jobs.iter().skip(half).step_by(2) {
                        s.write_at(*file, *off, data).unwrap();
                    }
                });
            }
        });
    }

    fn source(tmp: &Path) -> (PathBuf, Arc<Manifest>) {
        let src = tmp.join("src");
        fs::create_dir(&src).unwrap();
        make_tree(&src);
        let m = Arc::new(scan(&src).unwrap().manifest);
        (src, m)
    }

    /// Everything about a tree that a test may want unchanged: entries and file hashes.
    fn fingerprint(root: &Path) -> Vec<(Entry, Option<blake3::Hash>)> {
        scan(root)
            .unwrap()
            .manifest
            .to_vec()
            .unwrap()
            .into_iter()
            .map(|e| {
                let h = matches!(e.kind, EntryKind::File { .. })
                    .then(|| b3sum(&source_path(root, &e)).unwrap());
                (e, h)
            })
            .collect()
    }

    fn old_dest(tmp: &Path) -> PathBuf {
        let dest = tmp.join("data").join("dest");
        fs::create_dir_all(dest.join("old-dir")).unwrap();
        fs::write(dest.join("old.txt"), b"old data").unwrap();
        fs::write(dest.join("big"), b"older, shorter contents").unwrap();
        fs::write(dest.join("old-dir/x"), b"x").unwrap();
        fs::set_permissions(dest.join("old-dir"), fs::Permissions::from_mode(0o555)).unwrap();
        dest
    }

    #[test]
    fn copies_a_tree_and_replaces_an_existing_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, m) = source(tmp.path());
        let state = tmp.path().join("state");
        fs::create_dir(&state).unwrap();
        let dest = old_dest(tmp.path());

        let s = Staging::create(&state, &dest, "mysql-1a2b3c", m.clone()).unwrap();
        assert_eq!(s.path(), state.join("staging/mysql-1a2b3c"));
        // Files exist at their final size before any write.
        assert_eq!(
            fs::metadata(s.path().join("big")).unwrap().len(),
            m.to_vec()
                .unwrap()
                .iter()
                .find(|e| &e.path[..] == b"big")
                .unwrap()
                .size()
        );
        copy_files(&src, &s, &m);
        s.finalize().unwrap();
        // Finalizing twice is harmless.
        s.finalize().unwrap();
        let staging_path = s.path().to_path_buf();
        let info = s.commit().unwrap();
        assert_eq!(
            info,
            CommitInfo {
                replaced_existing: true,
                old_tree_left_at: None
            }
        );

        let diffs = compare_trees(&src, &dest).unwrap();
        assert!(diffs.is_empty(), "{diffs:#?}");
        assert!(!dest.join("old.txt").exists());
        assert!(!staging_path.exists(), "the old tree was not removed");

        let mode = |p: &str| fs::symlink_metadata(dest.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("ro"), 0o555);
        assert_eq!(mode("ro/readonly"), 0o400);
        assert_eq!(mode(""), 0o750);
        let mtime = |p: &str| {
            let m = fs::symlink_metadata(dest.join(p)).unwrap();
            (m.mtime(), m.mtime_nsec())
        };
        assert_eq!(mtime(""), (1_600_000_000, 999_999_999));
        assert_eq!(mtime("a"), mtime_of(&src, "a"));
        assert_eq!(mtime("to-etc"), mtime_of(&src, "to-etc"));
        assert_eq!(mtime("big"), mtime_of(&src, "big"));
        assert_eq!(
            fs::read_link(dest.join("to-etc")).unwrap(),
            Path::new("/etc")
        );
        assert!(!dest.join("a/fifo").exists());
    }

    fn mtime_of(root: &Path, p: &str) -> (i64, i64) {
        let m = fs::symlink_metadata(root.join(p)).unwrap();
        (m.mtime(), m.mtime_nsec())
    }

    #[test]
    fn commits_where_nothing_was() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, m) = source(tmp.path());
        let state = tmp.path().join("state");
        fs::create_dir(&state).unwrap();
        let dest = tmp.path().join("fresh");
        let s = Staging::create(&state, &dest, "fresh.1", m.clone()).unwrap();
        copy_files(&src, &s, &m);
        s.finalize().unwrap();
        let info = s.commit().unwrap();
        assert!(!info.replaced_existing);
        let diffs = compare_trees(&src, &dest).unwrap();
        assert!(diffs.is_empty(), "{diffs:#?}");
        assert_eq!(fs::read_dir(state.join("staging")).unwrap().count(), 0);
    }

    /// Every disk back end that works here (io_uring only where it can be set up).
    fn disks() -> Vec<Arc<dyn Disk>> {
        let mut v: Vec<Arc<dyn Disk>> =
            vec![Arc::new(crate::disk::threads::Threads::start(2).unwrap())];
        if let Ok(u) = crate::disk::uring::Uring::start(8) {
            v.push(Arc::new(u));
        }
        v
    }

    /// Whether files in `dir` can be opened with `O_DIRECT`.
    fn direct_works_in(dir: &Path) -> bool {
        let probe = dir.join("direct-probe");
        fs::write(&probe, b"x").unwrap();
        let works = open_in_tree(&probe, libc::O_RDONLY | libc::O_DIRECT).is_ok();
        fs::remove_file(&probe).unwrap();
        works
    }

    #[test]
    fn chunks_go_around_the_page_cache_or_through_it_and_read_back_as_written() {
        const CS: usize = 64 << 10;
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        // Two whole chunks and a last one that ends mid-block.
        let data: Vec<u8> = (0..2 * CS + 5000).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(src.join("f"), &data).unwrap();
        let m = Arc::new(scan(&src).unwrap().manifest);
        let f = m
            .to_vec()
            .unwrap()
            .iter()
            .position(|e| &e.path[..] == b"f")
            .unwrap() as u32;
        let state = tmp.path().join("state");
        fs::create_dir(&state).unwrap();
        let direct_here = direct_works_in(tmp.path());
        if !direct_here {
            eprintln!("NOTE: this filesystem refuses O_DIRECT; only the fallback is tested");
        }
        let pool = Pool::new(CS, 4);
        for (d, disk) in disks().iter().enumerate() {
            for writes in [StagingWrites::Direct, StagingWrites::Cached] {
                let dest = tmp.path().join(format!("dest-{d}-{writes:?}"));
                let s = Staging::create(&state, &dest, "t", m.clone()).unwrap();
                s.set_writes(writes);
                // Chunk 0 from a pooled (aligned) buffer, chunk 1 from bytes that start one
                // past a block boundary (copied before an O_DIRECT write), chunk 2 partial.
                let mut first = pool.take(CS);
                first.copy_from_slice(&data[..CS]);
                s.write_with(&**disk, &pool, f, 0, first.freeze()).unwrap();
                let mut shifted = vec![0u8];
                shifted.extend_from_slice(&data[CS..2 * CS]);
                let second = Bytes::from(shifted).slice(1..);
                assert!(!crate::pool::is_aligned(&second));
                s.write_with(&**disk, &pool, f, CS as u64, second).unwrap();
                let last = Bytes::copy_from_slice(&data[2 * CS..]);
                s.write_with(&**disk, &pool, f, 2 * CS as u64, last)
                    .unwrap();
                assert_eq!(
                    s.writes_direct(),
                    direct_here && writes == StagingWrites::Direct,
                    "{writes:?} on {}",
                    disk.name()
                );
                for off in [0, CS, 2 * CS] {
                    let len = (data.len() - off).min(CS);
                    let back = s.read_back(&**disk, &pool, f, off as u64, len).unwrap();
                    assert_eq!(&back[..], &data[off..off + len], "{writes:?} at {off}");
                }
                // A read past the end of the file is refused.
                let err = s
                    .read_back(&**disk, &pool, f, 2 * CS as u64, CS)
                    .unwrap_err();
                assert!(matches!(err, StagingError::OutOfRange { .. }), "{err}");
                s.finalize().unwrap();
                s.commit().unwrap();
                assert_eq!(fs::read(dest.join("f")).unwrap(), data, "{writes:?}");
            }
        }
    }

    /// Writes file `i` (entry `e`) of a deferred tree from `src` in one piece, whole where the
    /// tree leaves it to `write_whole`.
    fn write_file(s: &Staging, src: &Path, i: usize, e: &Entry) {
        let data = fs::read(source_path(src, e)).unwrap();
        if s.writes_whole(i as u32) {
            s.write_whole(i as u32, &data).unwrap();
        } else {
            s.write_at(i as u32, 0, &data).unwrap();
        }
    }

    #[test]
    fn a_deferred_tree_takes_writes_in_any_order_while_its_files_are_made() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, m) = source(tmp.path());
        let state = tmp.path().join("state");
        fs::create_dir(&state).unwrap();
        let dest = tmp.path().join("fresh");
        // Files of up to 200,000 bytes are left to `write_whole`; "big" is not.
        let s = Staging::create_deferred(&state, &dest, "deferred", m.clone(), 200_000).unwrap();
        // Directories are there at once; writes to the last file first wait for it.
        assert!(s.path().join("a").is_dir());
        let whole = |name: &str| {
            let i = m
                .to_vec()
                .unwrap()
                .iter()
                .position(|e| &e.path[..] == name.as_bytes())
                .unwrap();
            s.writes_whole(i as u32)
        };
        assert!(whole("a/with space") && whole("ro/readonly"));
        assert!(!whole("big") && !whole("empty") && !whole("a"));
        let entries = m.to_vec().unwrap();
        let mut files: Vec<_> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.kind, EntryKind::File { .. }))
            .collect();
        files.reverse();
        for (i, e) in files {
            if s.writes_whole(i as u32) {
                // Made by its writer, not in the background: nothing there before.
                assert!(!s.entry_path(e).exists(), "{}", display_path(&e.path));
            }
            write_file(&s, &src, i, e);
        }
        s.finalize().unwrap();
        s.commit().unwrap();
        // Modes (0400 and 0640 among them) and mtimes of whole files are right too.
        let diffs = compare_trees(&src, &dest).unwrap();
        assert!(diffs.is_empty(), "{diffs:#?}");
    }

    #[test]
    fn a_whole_file_must_come_whole_and_must_come() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, m) = source(tmp.path());
        let state = tmp.path().join("state");
        fs::create_dir(&state).unwrap();
        let dest = tmp.path().join("fresh");
        let s = Staging::create_deferred(&state, &dest, "whole", m.clone(), 200_000).unwrap();
        let idx = |name: &str| {
            m.to_vec()
                .unwrap()
                .iter()
                .position(|e| &e.path[..] == name.as_bytes())
                .unwrap()
        };
        let (deep, big) = (idx("a/b/c/deep.txt") as u32, idx("big") as u32);
        // Part of a file, more than it, or a file left to the background: refused.
        for (file, len) in [(deep, 3), (big, 5)] {
            let err = s.write_whole(file, &vec![b'x'; len]).unwrap_err();
            assert!(matches!(err, StagingError::NotWhole { .. }), "{err}");
        }
        let err = s.write_whole(deep, b"deep\n+").unwrap_err();
        assert!(matches!(err, StagingError::OutOfRange { .. }), "{err}");
        assert!(!s.path().join("a/b/c/deep.txt").exists());
        // Everything else arrives; deep.txt never does, so the tree is not finalized.
        for (i, e) in m.to_vec().unwrap().iter().enumerate() {
            if matches!(e.kind, EntryKind::File { .. }) && i as u32 != deep {
                write_file(&s, &src, i, e);
            }
        }
        let err = s.finalize().unwrap_err();
        assert!(matches!(err, StagingError::NeverWritten { .. }), "{err}");
        assert!(err.to_string().contains("deep.txt"), "{err}");
        assert!(matches!(s.commit(), Err(StagingError::NotFinalized { .. })));
        assert!(!dest.exists());
    }

    #[test]
    fn aborting_a_deferred_tree_stops_making_files_and_removes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        fs::create_dir(&state).unwrap();
        let src = tmp.path().join("many");
        fs::create_dir(&src).unwrap();
        for i in 0..2000 {
            fs::write(src.join(format!("f{i}")), b"x").unwrap();
        }
        let m = Arc::new(scan(&src).unwrap().manifest);
        let dest = tmp.path().join("dest");
        let s = Staging::create_deferred(&state, &dest, "stopped", m, 0).unwrap();
        let path = s.path().to_path_buf();
        s.abort().unwrap();
        // Nothing is made after the abort removed the tree.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!path.exists());
        assert!(!dest.exists());
    }

    #[test]
    fn abort_leaves_the_destination_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, m) = source(tmp.path());
        let state = tmp.path().join("state");
        fs::create_dir(&state).unwrap();
        let dest = old_dest(tmp.path());
        let before = fingerprint(&dest);

        let s = Staging::create(&state, &dest, "abort-me", m.clone()).unwrap();
        copy_files(&src, &s, &m);
        s.finalize().unwrap();
        let staging_path = s.path().to_path_buf();
        s.abort().unwrap();
        assert!(!staging_path.exists());
        assert_eq!(fingerprint(&dest), before);
    }

    #[test]
    fn refuses_bad_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let (_src, m) = source(tmp.path());
        let dest = tmp.path().join("dest");
        let s = Staging::create(tmp.path(), &dest, "w", m.clone()).unwrap();
        let big = m
            .to_vec()
            .unwrap()
            .iter()
            .position(|e| &e.path[..] == b"big")
            .unwrap() as u32;
        let size = m.get(big as usize).unwrap().size();

        let err = s.write_at(m.len() as u32, 0, b"x").unwrap_err();
        assert!(matches!(err, StagingError::UnknownFile { .. }), "{err}");
        let err = s.write_at(0, 0, b"x").unwrap_err();
        assert!(matches!(err, StagingError::NotAFile { .. }), "{err}");
        let err = s.write_at(big, size - 1, b"xy").unwrap_err();
        assert!(matches!(err, StagingError::OutOfRange { .. }), "{err}");
        assert!(err.to_string().contains("big"), "{err}");
        let err = s.write_at(big, u64::MAX, b"x").unwrap_err();
        assert!(matches!(err, StagingError::OutOfRange { .. }), "{err}");
        s.write_at(big, size - 2, b"xy").unwrap();
        s.write_at(big, size, b"").unwrap();
        assert!(!err.is_no_space());

        let err = Staging::create(tmp.path(), &dest, "w", m.clone()).unwrap_err();
        assert!(matches!(err, StagingError::StagingExists { .. }), "{err}");
        s.abort().unwrap();
        assert!(!dest.exists());
    }

    #[test]
    fn replaces_a_read_only_root_with_a_read_only_root() {
        // Renaming a directory to another parent rewrites its `..`, which needs u+w on it
        // (unless root): both roots are 0555 and the staging area is in another directory.
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("f"), b"new").unwrap();
        filetime::set_file_mtime(&src, FileTime::from_unix_time(1_000, 1)).unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o555)).unwrap();
        let dest = old_dest(tmp.path());
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o555)).unwrap();
        let state = tmp.path().join("state");
        fs::create_dir(&state).unwrap();

        let m = Arc::new(scan(&src).unwrap().manifest);
        let s = Staging::create(&state, &dest, "ro", m.clone()).unwrap();
        copy_files(&src, &s, &m);
        s.finalize().unwrap();
        assert!(s.commit().unwrap().replaced_existing);
        let diffs = compare_trees(&src, &dest).unwrap();
        assert!(diffs.is_empty(), "{diffs:#?}");
        assert!(!state.join("staging/ro").exists());
        for d in [&src, &dest] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    #[test]
    fn commit_needs_finalize() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Arc::new(scan(tmp.path()).unwrap().manifest);
        let s = Staging::create(tmp.path(), &tmp.path().join("d"), "n", m).unwrap();
        let err = s.commit().unwrap_err();
        assert!(matches!(err, StagingError::NotFinalized { .. }), "{err}");
    }

    #[test]
    fn refuses_bad_labels_and_destinations() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Arc::new(scan(tmp.path()).unwrap().manifest);
        for label in ["", "../x", "a/b", ".hidden", "-x", "a b", &"x".repeat(101)] {
            let err =
                Staging::create(tmp.path(), &tmp.path().join("d"), label, m.clone()).unwrap_err();
            assert!(
                matches!(err, StagingError::InvalidLabel { .. }),
                "{label:?}: {err}"
            );
        }
        let err =
            Staging::create(tmp.path(), &tmp.path().join("no/such/d"), "l", m.clone()).unwrap_err();
        assert!(
            matches!(err, StagingError::DestParentMissing { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("no/such"), "{err}");

        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        let err = Staging::create(tmp.path(), &file, "l", m.clone()).unwrap_err();
        assert!(
            matches!(err, StagingError::DestNotADirectory { .. }),
            "{err}"
        );
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        let err = Staging::create(tmp.path(), &link, "l", m).unwrap_err();
        assert!(
            matches!(err, StagingError::DestNotADirectory { .. }),
            "{err}"
        );
    }

    /// A tmpfs mounted for one test, unmounted on drop.
    struct Tmpfs(PathBuf);

    impl Tmpfs {
        fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("SKIP: not root, cannot mount a tmpfs");
                return None;
            }
            fs::create_dir_all(at).ok()?;
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(at)
                .output();
            match out {
                Ok(o) if o.status.success() => Some(Tmpfs(at.to_path_buf())),
                Ok(o) => {
                    eprintln!(
                        "SKIP: mount tmpfs failed: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    None
                }
                Err(e) => {
                    eprintln!("SKIP: cannot run mount: {e}");
                    None
                }
            }
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    #[test]
    fn full_disk_is_no_space_and_other_filesystems_stage_beside_dest() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, m) = source(tmp.path());
        let state = tmp.path().join("state");
        fs::create_dir(&state).unwrap();
        let Some(small) = Tmpfs::mount(&tmp.path().join("small"), "1m") else {
            return;
        };
        let dest = small.0.join("dest");
        let err = Staging::create(&state, &dest, "full", m).unwrap_err();
        assert!(err.is_no_space(), "{err}");
        assert!(err.to_string().contains("no space left on device"), "{err}");
        assert!(err.to_string().contains(".mover-staging-full/big"), "{err}");
        // The partial tree was removed.
        assert_eq!(fs::read_dir(&small.0).unwrap().count(), 0);

        let Some(large) = Tmpfs::mount(&tmp.path().join("large"), "64m") else {
            return;
        };
        let m = Arc::new(scan(&src).unwrap().manifest);
        let dest = large.0.join("dest");
        let s = Staging::create(&state, &dest, "beside", m.clone()).unwrap();
        assert_eq!(s.path(), large.0.join(".mover-staging-beside"));
        copy_files(&src, &s, &m);
        s.finalize().unwrap();
        s.commit().unwrap();
        let diffs = compare_trees(&src, &dest).unwrap();
        assert!(diffs.is_empty(), "{diffs:#?}");
    }
}
