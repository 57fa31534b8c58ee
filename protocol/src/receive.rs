//! What a receiver tracks: which chunks it expects, which it holds, which were verified.
//!
//! The tracker is fed chunk headers before their payloads are decoded (so that a frame for a
//! file that is not in the manifest, at an offset that is not a chunk boundary, or with the
//! wrong length is refused before any work or write) and the result of each verification.
//! Chunks a receiver already had before the transfer (from an interrupted run, or an older
//! copy) are *held*: they count as present, and a chunk that arrives for a held slot with
//! another hash replaces it. The tracker knows what is still missing (to ask for again), when
//! every file is complete, and the digest over every file's root hash (each root goes into it
//! as soon as the files before it are done, and is not kept).
//!
//! A held chunk's hash lives in a [`Table`] (an agent's is a file), not in the tracker: on a
//! reseed onto an older copy nearly every chunk is held, and the tracker keeps one bit for
//! each until the final read-back confirms it (then its page folds like any other).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::hash::{chunk_count, file_root, subtree_cv, TreeDigest};
use crate::manifest::{display_path, Manifest, ManifestError};
use crate::message::Chunk;
use crate::table::{ChunkIndex, Hashes, MemTable, Table};

/// A chunk that breaks the transfer's rules. The sender is broken or hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("accept chunk: file id {file} is not in the manifest")]
    UnknownFile { file: u32 },
    #[error("accept chunk: entry {file} ({path}) is not a regular file")]
    NotAFile { file: u32, path: String },
    #[error("accept chunk: offset {offset} of {path} is not a chunk boundary inside the file")]
    BadOffset { path: String, offset: u64 },
    #[error("accept chunk: chunk at {offset} of {path} has {len} bytes, expected {expected}")]
    BadLength {
        path: String,
        offset: u64,
        len: u32,
        expected: u64,
    },
    #[error("accept chunk: chunk at {offset} of {path} was sent twice at once")]
    Duplicate { path: String, offset: u64 },
    #[error(
        "accept chunk: chunk at {offset} of {path} came again with other contents \
         (the source changed it during the transfer)"
    )]
    Conflict { path: String, offset: u64 },
    #[error("accept chunk: {0}")]
    Manifest(#[from] ManifestError),
}

/// What to do with an admitted chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Decode, verify and write it, then call [`Tracker::verified`] or [`Tracker::failed`].
    Write,
    /// This receiver already holds these exact bytes (it was sent for another node).
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Missing,
    Pending,
    /// Received and verified in this transfer.
    Done([u8; 32]),
    /// Present before the transfer; its hash is in the tracker's table.
    Held,
    /// Done, in a page that was folded into one value: its own hash is no longer kept.
    Folded,
}

/// Chunks per page: the unit in which a file's chunks are kept, and folded once all of them
/// are done. A power of two, so that a page is a whole subtree of the file's BLAKE3 tree.
const PAGE: u64 = 64;

/// A page's state.
#[derive(Debug)]
enum Page {
    /// One slot per chunk of the page, and how many of them are not done.
    Open { slots: Box<[Slot]>, open: u32 },
    /// Only chunks held from before and missing ones: a bit per chunk, set where held.
    Held(u64),
    /// Every chunk done: the page's subtree chaining value in place of its chunks' hashes.
    Folded([u8; 32]),
}

/// A file's pages: a file of one page (every small file) keeps its page in place, a larger
/// one in a map. Only pages where chunks arrived (or are held) are kept.
#[derive(Debug)]
enum Pages {
    One(Option<Page>),
    Many(HashMap<u64, Page>),
}

impl Pages {
    fn for_chunks(chunks: u64) -> Self {
        if chunks <= PAGE {
            Self::One(None)
        } else {
            Self::Many(HashMap::new())
        }
    }

    fn get(&self, page: &u64) -> Option<&Page> {
        match self {
            Self::One(p) => p.as_ref().filter(|_| *page == 0),
            Self::Many(m) => m.get(page),
        }
    }

    fn get_mut(&mut self, page: &u64) -> Option<&mut Page> {
        match self {
            Self::One(p) => p.as_mut().filter(|_| *page == 0),
            Self::Many(m) => m.get_mut(page),
        }
    }

    fn insert(&mut self, page: u64, p: Page) {
        match self {
            Self::One(one) if page == 0 => *one = Some(p),
            Self::One(_) => {}
            Self::Many(m) => {
                m.insert(page, p);
            }
        }
    }

    fn remove(&mut self, page: &u64) {
        match self {
            Self::One(p) if *page == 0 => *p = None,
            Self::One(_) => {}
            Self::Many(m) => {
                m.remove(page);
            }
        }
    }

    /// Page `page` (page 0 for a file of one page), made with `make` if it is not kept yet.
    fn get_or_insert_with(&mut self, page: u64, make: impl FnOnce() -> Page) -> &mut Page {
        debug_assert!(page == 0 || matches!(self, Self::Many(_)));
        match self {
            Self::One(p) => p.get_or_insert_with(make),
            Self::Many(m) => m.entry(page).or_insert_with(make),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::One(p) => usize::from(p.is_some()),
            Self::Many(m) => m.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A file's chunks, by page. Only pages where chunks arrived (or are held) take memory, so a
/// manifest that declares a huge file costs nothing until its data really comes; and a page
/// folds into one value once all its chunks are done (a file of one page, into the file's
/// root), so that a fresh copy of any size keeps about 33 bytes per chunk under way, 32 bytes
/// per 64 chunks done. Only a file with chunks under way or held has one (see [`FileState`]).
#[derive(Debug)]
struct FileTrack {
    chunks: u64,
    pages: Pages,
    /// Chunks neither done nor held.
    missing: u64,
    /// Pages folded (a folded page never opens again).
    folded: u64,
}

/// What a tracker knows of one manifest entry. Nothing is kept per entry but two bits (done,
/// wholly held): a file's size comes from the manifest, and a [`FileTrack`] exists only while a
/// file has chunks under way or held (but for a small file wholly held). A million
/// small files cost 250 KiB here.
#[derive(Debug)]
enum FileState<'a> {
    /// A directory or a symlink.
    NotFile,
    /// A file none of whose chunks has arrived, is under way or is held.
    Untouched,
    Busy(&'a FileTrack),
    /// A file of one page whose every chunk is held from before, and nothing else: on a
    /// reseed of many small files onto an older copy that is nearly every file, so it costs
    /// a bit rather than a track until the read-back confirms it.
    Held,
    /// A file whose every chunk is done and every page folded (or an empty file), so nothing
    /// of it can change any more: its root is in the tracker's [`Roots`].
    Done,
}

/// One bit per manifest entry.
#[derive(Debug)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(len: usize) -> Self {
        Self(vec![0; len.div_ceil(64)])
    }

    fn get(&self, i: u32) -> bool {
        self.0
            .get(i as usize / 64)
            .is_some_and(|w| w >> (i % 64) & 1 == 1)
    }

    fn set(&mut self, i: u32) {
        if let Some(w) = self.0.get_mut(i as usize / 64) {
            *w |= 1 << (i % 64);
        }
    }

    fn clear(&mut self, i: u32) {
        if let Some(w) = self.0.get_mut(i as usize / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    /// The first set bit at or after `from`.
    fn next_set(&self, from: u32) -> Option<u32> {
        let mut w = from as usize / 64;
        let mut word = self.0.get(w)? & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                return Some((w * 64) as u32 + word.trailing_zeros());
            }
            w += 1;
            word = *self.0.get(w)?;
        }
    }
}

/// Done files' roots, on their way into the transfer's tree digest: fed in manifest order as
/// soon as every file before them is done, and kept only until then.
#[derive(Debug, Default)]
struct Roots {
    /// Every entry before this one is a file whose root is in `digest`, or not a file.
    next: u32,
    digest: TreeDigest,
    /// Roots of files done past `next`, the first [`WAITING_IN_MEMORY`] of them; the others
    /// are in the tracker's table (see [`Tracker::keep_root`]).
    waiting: BTreeMap<u32, [u8; 32]>,
}

/// Roots kept in memory while they wait for an earlier file: one file that stays incomplete
/// (damaged on disk, say, and fetched again at the end) makes every later root wait, so
/// past these they go to the tracker's table.
const WAITING_IN_MEMORY: usize = 4096;

impl FileTrack {
    /// The track of a file of one page whose every chunk is held.
    fn all_held(chunks: u64) -> Self {
        let mut t = Self::new(chunks);
        t.pages.insert(0, Page::Held(full_mask(chunks)));
        t.missing = 0;
        t
    }

    /// Whether this is a file of one page whose every chunk is held, and nothing else.
    fn is_all_held(&self) -> bool {
        self.chunks <= PAGE
            && self.missing == 0
            && matches!(self.pages.get(&0), Some(Page::Held(m)) if *m == full_mask(self.chunks))
    }

    fn new(chunks: u64) -> Self {
        Self {
            chunks,
            pages: Pages::for_chunks(chunks),
            missing: chunks,
            folded: 0,
        }
    }

    /// The file's root once every page is folded (so every chunk done, none held).
    fn folded_root(&self) -> Option<[u8; 32]> {
        (self.folded == self.chunks.div_ceil(PAGE))
            .then(|| self.root(&|_| None))
            .flatten()
    }

    fn slot(&self, idx: u64) -> Slot {
        match self.pages.get(&(idx / PAGE)) {
            None => Slot::Missing,
            Some(Page::Folded(_)) => Slot::Folded,
            Some(Page::Held(mask)) if mask >> (idx % PAGE) & 1 == 1 => Slot::Held,
            Some(Page::Held(_)) => Slot::Missing,
            Some(Page::Open { slots, .. }) => slots[(idx % PAGE) as usize],
        }
    }

    /// Chunks in page `page`.
    fn page_len(&self, page: u64) -> usize {
        (self.chunks - page * PAGE).min(PAGE) as usize
    }

    /// Sets the slot of chunk `idx`, which must not be in a folded page, and folds its page
    /// if that made every chunk of the page done.
    fn set(&mut self, idx: u64, to: Slot) {
        let (page, at) = (idx / PAGE, (idx % PAGE) as usize);
        let len = self.page_len(page);
        // Held and missing chunks alone keep a page as bits; anything else opens it.
        match (self.pages.get_mut(&page), to) {
            (None, Slot::Missing) => return,
            (None, Slot::Held) => {
                self.pages.insert(page, Page::Held(1 << at));
                return;
            }
            (Some(Page::Held(mask)), Slot::Held) => {
                *mask |= 1 << at;
                return;
            }
            (Some(Page::Held(mask)), Slot::Missing) => {
                *mask &= !(1 << at);
                if *mask == 0 {
                    self.pages.remove(&page);
                }
                return;
            }
            (Some(Page::Held(mask)), _) => {
                let mask = *mask;
                let slots = (0..len)
                    .map(|i| {
                        if mask >> i & 1 == 1 {
                            Slot::Held
                        } else {
                            Slot::Missing
                        }
                    })
                    .collect();
                self.pages.insert(
                    page,
                    Page::Open {
                        slots,
                        open: len as u32,
                    },
                );
            }
            _ => {}
        }
        let p = self.pages.get_or_insert_with(page, || Page::Open {
            slots: vec![Slot::Missing; len].into_boxed_slice(),
            open: len as u32,
        });
        let Page::Open { slots, open } = p else {
            return;
        };
        let was_done = matches!(slots[at], Slot::Done(_));
        let is_done = matches!(to, Slot::Done(_));
        slots[at] = to;
        match (was_done, is_done) {
            (false, true) => *open -= 1,
            (true, false) => *open += 1,
            _ => {}
        }
        // A page of a larger file folds into its subtree's value; the one page of a file of
        // one page is the whole file, and folds into the file's root.
        if *open == 0 {
            let hashes: Vec<[u8; 32]> = slots
                .iter()
                .filter_map(|s| match s {
                    Slot::Done(h) => Some(*h),
                    _ => None,
                })
                .collect();
            *p = Page::Folded(if self.chunks > PAGE {
                subtree_cv(&hashes)
            } else {
                file_root(&hashes)
            });
            self.folded += 1;
        } else if to == Slot::Missing && slots.iter().all(|s| *s == Slot::Missing) {
            self.pages.remove(&page);
        }
    }

    /// The hashes of page `page`'s chunks, if all are done or held (`held` gives a held
    /// chunk's hash by its index in the file).
    fn page_hashes(&self, held: &HeldOf<'_>, page: u64) -> Option<Vec<[u8; 32]>> {
        let len = self.page_len(page);
        match self.pages.get(&page)? {
            Page::Open { slots, .. } => slots
                .iter()
                .enumerate()
                .map(|(at, s)| match s {
                    Slot::Done(h) => Some(*h),
                    Slot::Held => held(page * PAGE + at as u64),
                    _ => None,
                })
                .collect(),
            Page::Held(mask) => (0..len)
                .map(|at| {
                    (mask >> at & 1 == 1)
                        .then(|| held(page * PAGE + at as u64))
                        .flatten()
                })
                .collect(),
            Page::Folded(_) => None,
        }
    }

    fn root(&self, held: &HeldOf<'_>) -> Option<[u8; 32]> {
        if self.missing > 0 {
            return None;
        }
        if self.chunks <= PAGE {
            if self.chunks == 0 {
                return Some(file_root(&[]));
            }
            if let Some(Page::Folded(root)) = self.pages.get(&0) {
                return Some(*root);
            }
            return Some(file_root(&self.page_hashes(held, 0)?));
        }
        // The file's tree over whole pages is the tree over its chunks: each page is a
        // subtree, and the left-balanced split over pages falls where it does over chunks.
        let pages: Option<Vec<[u8; 32]>> = (0..self.chunks.div_ceil(PAGE))
            .map(|p| match self.pages.get(&p)? {
                Page::Folded(cv) => Some(*cv),
                _ => Some(subtree_cv(&self.page_hashes(held, p)?)),
            })
            .collect();
        Some(file_root(&pages?))
    }
}

/// The bits of a page's first `chunks` chunks (at most [`PAGE`]).
fn full_mask(chunks: u64) -> u64 {
    if chunks >= 64 {
        !0
    } else {
        (1 << chunks) - 1
    }
}

/// Progress of one receiver through one manifest.
#[derive(Debug)]
pub struct Tracker {
    chunk_size: u32,
    /// Files with chunks under way or held, by manifest index.
    busy: BTreeMap<u32, Box<FileTrack>>,
    /// Files done (see [`FileState::Done`]), by manifest index; an empty file is done from
    /// the start, without its bit.
    done: Bits,
    /// Files of one page whose every chunk is held, and nothing else (see
    /// [`FileState::Held`]).
    held: Bits,
    /// Sizes, and paths for error messages.
    manifest: Arc<Manifest>,
    missing_chunks: u64,
    bytes_done: u64,
    files_done: u64,
    held_bytes: u64,
    /// Held chunks' hashes.
    hashes: Hashes,
    /// Whether `hashes` is a table given by the caller, where roots may wait too.
    roots_in_table: bool,
    roots: Roots,
}

/// A held chunk's hash by its index in its file.
type HeldOf<'a> = dyn Fn(u64) -> Option<[u8; 32]> + 'a;

impl Tracker {
    /// A tracker for `manifest`, with every file missing. Reads the manifest through once.
    pub fn new(manifest: impl Into<Arc<Manifest>>, chunk_size: u32) -> Result<Self, ManifestError> {
        let manifest = manifest.into();
        let index = ChunkIndex::new(&manifest, chunk_size)?;
        let mut files_done = 0;
        for e in manifest.iter() {
            files_done += u64::from(e?.file_size() == Some(0));
        }
        let mut t = Self {
            chunk_size,
            busy: BTreeMap::new(),
            done: Bits::new(manifest.len()),
            held: Bits::new(manifest.len()),
            missing_chunks: index.total(),
            hashes: Hashes::new(index, Arc::new(MemTable::default())),
            roots_in_table: false,
            manifest,
            bytes_done: 0,
            files_done,
            held_bytes: 0,
            roots: Roots::default(),
        };
        t.feed_roots();
        Ok(t)
    }

    /// What the tracker knows of entry `file`; `None` past the manifest's end.
    fn state(&self, file: u32) -> Option<FileState<'_>> {
        if let Some(t) = self.busy.get(&file) {
            return Some(FileState::Busy(t));
        }
        if file as usize >= self.manifest.len() {
            return None;
        }
        if self.held.get(file) {
            return Some(FileState::Held);
        }
        Some(match self.size_of(file) {
            None => FileState::NotFile,
            Some(0) => FileState::Done,
            Some(_) if self.done.get(file) => FileState::Done,
            Some(_) => FileState::Untouched,
        })
    }

    /// The root of a file that is done: an empty file's, or the one waiting in `roots`.
    fn done_root(&self, file: u32) -> Option<[u8; 32]> {
        if self.size_of(file)? == 0 {
            return Some(file_root(&[]));
        }
        if let Some(root) = self.roots.waiting.get(&file) {
            return Some(*root);
        }
        if !self.roots_in_table {
            return None;
        }
        let mut root = [0u8; 32];
        self.hashes
            .table()
            .read_at(self.root_at(file), &mut root)
            .ok()?;
        Some(root)
    }

    /// Where the root of a file done out of order is kept in the table: after the held
    /// chunks' hashes, at the file's index.
    fn root_at(&self, file: u32) -> u64 {
        (self.hashes.index().total() + u64::from(file)) * 32
    }

    /// Keeps the root of `file`, done past `roots.next`, until the files before it are done:
    /// in memory, or past [`WAITING_IN_MEMORY`] in the table given to
    /// [`Tracker::with_table`] (in memory after all if there is none or it cannot take it;
    /// the tracker's own table is memory, where a root far along would cost a slot for
    /// every chunk and entry before it).
    fn keep_root(&mut self, file: u32, root: [u8; 32]) {
        let spilled = self.roots_in_table
            && self.roots.waiting.len() >= WAITING_IN_MEMORY
            && file != self.roots.next
            && self
                .hashes
                .table()
                .write_at(self.root_at(file), &root)
                .is_ok();
        if !spilled {
            self.roots.waiting.insert(file, root);
        }
    }

    /// Feeds the roots of the done files from `roots.next` on into the digest, up to the
    /// first file that is not done.
    fn feed_roots(&mut self) {
        loop {
            let next = self.roots.next;
            match self.state(next) {
                Some(FileState::NotFile) => {}
                Some(FileState::Done) => {
                    let Some(root) = self.done_root(next) else {
                        return;
                    };
                    self.roots.waiting.remove(&next);
                    self.roots.digest.add(next, &root);
                }
                _ => return,
            }
            self.roots.next += 1;
        }
    }

    /// Keeps held chunks' hashes in `table` (which must read as zeros, or hold the hashes of
    /// chunks then given to [`Tracker::held_in_table`]) rather than in memory.
    /// Roots of files done out of order wait there too, past the first
    /// [`WAITING_IN_MEMORY`], after the chunks' places.
    pub fn with_table(mut self, table: Arc<dyn Table>) -> Self {
        self.hashes = Hashes::new(self.hashes.index().clone(), table);
        self.roots_in_table = true;
        self
    }

    /// A held chunk of `file`'s hash, by the chunk's index in the file.
    fn held_of(&self, file: u32) -> impl Fn(u64) -> Option<[u8; 32]> + '_ {
        let cs = u64::from(self.chunk_size);
        move |idx| self.hashes.get(file, idx * cs)
    }

    fn path(&self, file: u32) -> String {
        self.manifest
            .with(file as usize, |e| display_path(&e.path))
            .unwrap_or_else(|e| format!("entry {file} ({e})"))
    }

    /// The size of `file`, if it is a file (and the manifest can be read: [`Tracker::admit`]
    /// refuses every chunk with the error if it cannot).
    fn size_of(&self, file: u32) -> Option<u64> {
        self.manifest.file_size(file as usize).ok().flatten()
    }

    /// The slot of chunk `idx` of `file`, if it is a file.
    fn slot(&self, file: u32, idx: u64) -> Option<Slot> {
        match self.state(file)? {
            FileState::NotFile => None,
            FileState::Untouched => Some(Slot::Missing),
            FileState::Busy(t) => Some(t.slot(idx)),
            FileState::Held => Some(Slot::Held),
            FileState::Done => Some(Slot::Folded),
        }
    }

    /// `file`'s track, made for a file that had none. `None` for what is not a file, and for
    /// a file done (nothing of it changes any more).
    fn track_mut(&mut self, file: u32) -> Option<&mut FileTrack> {
        if !self.busy.contains_key(&file) {
            let chunks = chunk_count(self.size_of(file)?, self.chunk_size);
            let track = if self.held.get(file) {
                self.held.clear(file);
                FileTrack::all_held(chunks)
            } else if chunks == 0 || self.done.get(file) {
                return None;
            } else {
                FileTrack::new(chunks)
            };
            self.busy.insert(file, Box::new(track));
        }
        self.busy.get_mut(&file).map(|t| &mut **t)
    }

    /// After a change to `file`'s track: a file whose every page folded keeps only its root,
    /// a small one whose every chunk is held only a bit, and one that keeps nothing is
    /// untouched again.
    fn tidy(&mut self, file: u32) {
        let Some(t) = self.busy.get(&file) else {
            return;
        };
        if let Some(root) = t.folded_root() {
            self.busy.remove(&file);
            self.done.set(file);
            self.keep_root(file, root);
            self.feed_roots();
        } else if t.is_all_held() {
            self.busy.remove(&file);
            self.held.set(file);
        } else if t.pages.is_empty() && t.missing == t.chunks {
            self.busy.remove(&file);
        }
    }

    /// The length of the chunk at `offset` of `file`, if that is a chunk of a file.
    pub fn chunk_len(&self, file: u32, offset: u64) -> Option<u32> {
        let size = self.size_of(file)?;
        let cs = u64::from(self.chunk_size);
        (offset % cs == 0 && offset < size).then(|| (size - offset).min(cs) as u32)
    }

    /// Checks a chunk's header against the manifest and, unless these exact bytes are already
    /// here, marks it as being processed.
    pub fn admit(&mut self, c: &Chunk) -> Result<Admit, ChunkError> {
        let chunk_size = u64::from(self.chunk_size);
        if c.file as usize >= self.manifest.len() {
            return Err(ChunkError::UnknownFile { file: c.file });
        }
        let Some(size) = self.manifest.file_size(c.file as usize)? else {
            return Err(ChunkError::NotAFile {
                file: c.file,
                path: self.path(c.file),
            });
        };
        if c.offset % chunk_size != 0 || c.offset >= size {
            return Err(ChunkError::BadOffset {
                path: self.path(c.file),
                offset: c.offset,
            });
        }
        let expected = (size - c.offset).min(chunk_size);
        if u64::from(c.raw_len) != expected {
            return Err(ChunkError::BadLength {
                path: self.path(c.file),
                offset: c.offset,
                len: c.raw_len,
                expected,
            });
        }
        let idx = c.offset / chunk_size;
        match self.slot(c.file, idx).unwrap_or(Slot::Folded) {
            Slot::Missing => {}
            Slot::Pending => {
                return Err(ChunkError::Duplicate {
                    path: self.path(c.file),
                    offset: c.offset,
                })
            }
            Slot::Done(h) if h == c.hash => return Ok(Admit::Skip),
            Slot::Held if self.hashes.get(c.file, c.offset) == Some(c.hash) => {
                return Ok(Admit::Skip)
            }
            // Done, and its hash no longer kept: taken to be the same bytes sent again for
            // another node. Other bytes would show at the end, in the tree digest.
            Slot::Folded => return Ok(Admit::Skip),
            Slot::Done(_) => {
                return Err(ChunkError::Conflict {
                    path: self.path(c.file),
                    offset: c.offset,
                })
            }
            Slot::Held => {
                // What was here before differs: the new bytes replace it.
                if let Some(track) = self.track_mut(c.file) {
                    let complete = track.missing == 0;
                    track.missing += 1;
                    self.missing_chunks += 1;
                    self.bytes_done -= expected;
                    self.held_bytes -= expected;
                    self.files_done -= u64::from(complete);
                }
            }
        }
        if let Some(track) = self.track_mut(c.file) {
            track.set(idx, Slot::Pending);
        }
        Ok(Admit::Write)
    }

    /// Records a chunk whose bytes matched `hash` and are written.
    pub fn verified(&mut self, file: u32, offset: u64, hash: [u8; 32]) {
        self.settle(file, offset, Slot::Pending, Slot::Done(hash));
    }

    /// Records a chunk that was already in place before the transfer, with the hash of its
    /// bytes. Only a missing chunk can become held, and only if its hash can be kept.
    pub fn held(&mut self, file: u32, offset: u64, hash: [u8; 32]) -> bool {
        if !self.is_missing(file, offset) || self.hashes.put(file, offset, &hash).is_err() {
            return false;
        }
        self.held_in_table(file, offset)
    }

    /// Records a chunk that was already in place before the transfer, whose hash the caller
    /// put in the table given to [`Tracker::with_table`].
    pub fn held_in_table(&mut self, file: u32, offset: u64) -> bool {
        let held = self.settle(file, offset, Slot::Missing, Slot::Held);
        if held {
            self.held_bytes += u64::from(self.chunk_len(file, offset).unwrap_or(0));
        }
        held
    }

    fn is_missing(&self, file: u32, offset: u64) -> bool {
        self.slot(file, offset / u64::from(self.chunk_size)) == Some(Slot::Missing)
    }

    /// A held chunk read back and found to match `hash`: it is done like one received (so
    /// its page can fold). Returns whether it was held.
    pub fn confirm(&mut self, file: u32, offset: u64, hash: [u8; 32]) -> bool {
        if self.chunk_len(file, offset).is_none() {
            return false;
        }
        let idx = offset / u64::from(self.chunk_size);
        if self.slot(file, idx) != Some(Slot::Held) {
            return false;
        }
        if let Some(t) = self.track_mut(file) {
            t.set(idx, Slot::Done(hash));
        }
        self.tidy(file);
        true
    }

    /// Bytes of chunks held from before the transfer and not replaced.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    fn settle(&mut self, file: u32, offset: u64, from: Slot, to: Slot) -> bool {
        let Some(len) = self.chunk_len(file, offset) else {
            return false;
        };
        let idx = offset / u64::from(self.chunk_size);
        if self.slot(file, idx) != Some(from) {
            return false;
        }
        let Some(track) = self.track_mut(file) else {
            return false;
        };
        track.set(idx, to);
        track.missing -= 1;
        let complete = track.missing == 0;
        self.missing_chunks -= 1;
        self.bytes_done += u64::from(len);
        self.files_done += u64::from(complete);
        self.tidy(file);
        true
    }

    /// A chunk failed verification or could not be written: it is missing again.
    pub fn failed(&mut self, file: u32, offset: u64) {
        let idx = offset / u64::from(self.chunk_size);
        if self.slot(file, idx) == Some(Slot::Pending) {
            if let Some(t) = self.track_mut(file) {
                t.set(idx, Slot::Missing);
            }
            self.tidy(file);
        }
    }

    /// A chunk that was done or held turned out not to match its hash on disk: it is missing
    /// again, to be fetched once more. Returns whether it was present.
    pub fn lost(&mut self, file: u32, offset: u64) -> bool {
        let Some(len) = self.chunk_len(file, offset) else {
            return false;
        };
        let idx = offset / u64::from(self.chunk_size);
        let was_held = match self.slot(file, idx) {
            Some(Slot::Done(_)) => false,
            Some(Slot::Held) => true,
            _ => return false,
        };
        let Some(t) = self.track_mut(file) else {
            return false;
        };
        let complete = t.missing == 0;
        t.set(idx, Slot::Missing);
        t.missing += 1;
        self.held_bytes -= if was_held { u64::from(len) } else { 0 };
        self.missing_chunks += 1;
        self.bytes_done -= u64::from(len);
        self.files_done -= u64::from(complete);
        self.tidy(file);
        true
    }

    /// The hash of a chunk that is done or held, unless its page was folded.
    pub fn hash_of(&self, file: u32, offset: u64) -> Option<[u8; 32]> {
        self.chunk_len(file, offset)?;
        let idx = offset / u64::from(self.chunk_size);
        match self.slot(file, idx)? {
            Slot::Done(h) => Some(h),
            Slot::Held => self.hashes.get(file, offset),
            _ => None,
        }
    }

    /// Whether a chunk is done in a page folded into one value (so [`Tracker::hash_of`] no
    /// longer knows its hash).
    pub fn is_folded(&self, file: u32, offset: u64) -> bool {
        self.chunk_len(file, offset).is_some()
            && self.slot(file, offset / u64::from(self.chunk_size)) == Some(Slot::Folded)
    }

    /// Up to `max` chunks held from before the transfer, with their hashes, from `from` (a
    /// file, and an offset in it) on, in file order: what the final check reads back, a batch at a
    /// time (a receiver reads each chunk it writes back as it writes it). A hash that cannot
    /// be read from the table comes as zeros, which no chunk matches: that chunk is fetched
    /// again.
    pub fn held_from(&self, from: (u32, u64), max: usize) -> Vec<(u32, u64, [u8; 32])> {
        let cs = u64::from(self.chunk_size);
        let mut out = Vec::new();
        // Only a file with a track, or one wholly held, can hold chunks: the two, merged in
        // file order.
        let mut busy = self.busy.range(from.0..).peekable();
        let mut next_held = self.held.next_set(from.0);
        loop {
            let wholly = match (busy.peek(), next_held) {
                (Some((&b, _)), Some(h)) => h < b,
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (None, None) => break,
            };
            let made;
            let (i, t) = if wholly {
                let Some(h) = next_held else { break };
                next_held = self.held.next_set(h + 1);
                made =
                    FileTrack::all_held(chunk_count(self.size_of(h).unwrap_or(0), self.chunk_size));
                (h, &made)
            } else {
                let Some((&b, t)) = busy.next() else { break };
                (b, &**t)
            };
            let i = i as usize;
            if t.pages.is_empty() {
                continue;
            }
            // The first chunk at or after `from`'s offset.
            let start = if i == from.0 as usize {
                from.1.div_ceil(cs)
            } else {
                0
            };
            for page in start / PAGE..t.chunks.div_ceil(PAGE) {
                let held = |at: u64| match t.pages.get(&page) {
                    Some(Page::Open { slots, .. }) => slots[at as usize] == Slot::Held,
                    Some(Page::Held(mask)) => mask >> at & 1 == 1,
                    _ => false,
                };
                for at in 0..t.page_len(page) as u64 {
                    let idx = page * PAGE + at;
                    if idx < start || !held(at) {
                        continue;
                    }
                    if out.len() >= max {
                        return out;
                    }
                    let hash = self.hashes.get(i as u32, idx * cs).unwrap_or([0; 32]);
                    out.push((i as u32, idx * cs, hash));
                }
            }
        }
        out
    }

    /// Up to `max` chunks that are neither done nor held nor in flight, in file order.
    pub fn missing(&self, max: usize) -> Vec<(u32, u64)> {
        let cs = u64::from(self.chunk_size);
        let mut out = Vec::new();
        for i in 0..self.manifest.len() as u32 {
            if self.done.get(i) {
                continue;
            }
            let t = match self.state(i) {
                Some(FileState::Busy(t)) => t,
                Some(FileState::Untouched) => {
                    let chunks = chunk_count(self.size_of(i).unwrap_or(0), self.chunk_size);
                    for idx in 0..chunks {
                        if out.len() >= max {
                            return out;
                        }
                        out.push((i, idx * cs));
                    }
                    continue;
                }
                _ => continue,
            };
            if t.missing == 0 {
                continue;
            }
            for page in 0..t.chunks.div_ceil(PAGE) {
                let (slots, held) = match t.pages.get(&page) {
                    Some(Page::Folded(_)) => continue,
                    Some(Page::Open { slots, .. }) => (Some(slots), 0),
                    Some(Page::Held(mask)) => (None, *mask),
                    None => (None, 0),
                };
                for at in 0..t.page_len(page) {
                    if out.len() >= max {
                        return out;
                    }
                    let missing = match slots {
                        Some(s) => s[at] == Slot::Missing,
                        None => held >> at & 1 == 0,
                    };
                    if missing {
                        out.push((i, (page * PAGE + at as u64) * cs));
                    }
                }
            }
        }
        out
    }

    pub fn is_complete(&self) -> bool {
        self.missing_chunks == 0
    }

    pub fn missing_chunks(&self) -> u64 {
        self.missing_chunks
    }

    pub fn bytes_done(&self) -> u64 {
        self.bytes_done
    }

    pub fn files_done(&self) -> u64 {
        self.files_done
    }

    /// The digest of every file's root, once complete.
    pub fn digest(&self) -> Option<[u8; 32]> {
        if !self.is_complete() {
            return None;
        }
        // The roots fed so far, then those of the files past them: done ones waiting, and
        // complete ones that still hold chunks from before (not read back).
        let mut digest = self.roots.digest.clone();
        for i in self.roots.next..self.manifest.len() as u32 {
            let root = match self.state(i)? {
                FileState::NotFile => continue,
                FileState::Done => self.done_root(i)?,
                FileState::Busy(t) => t.root(&self.held_of(i))?,
                FileState::Held => {
                    let chunks = chunk_count(self.size_of(i)?, self.chunk_size);
                    FileTrack::all_held(chunks).root(&self.held_of(i))?
                }
                FileState::Untouched => return None,
            };
            digest.add(i, &root);
        }
        Some(digest.finish())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::hash::{chunk_hash, file_root};
    use crate::manifest::tests::{dir, file};
    use crate::manifest::EntryKind;
    use crate::message::Encoding;

    fn chunk(file: u32, offset: u64, raw_len: u32) -> Chunk {
        Chunk {
            file,
            offset,
            raw_len,
            encoding: Encoding::Raw,
            hash: [0; 32],
            payload: bytes::Bytes::new(),
        }
    }

    #[test]
    fn tracks_chunks_to_completion_and_roots() {
        let m =
            Manifest::from_entries(vec![dir(""), file("a", 5000), file("c", 0), dir("d")]).unwrap();
        let mut t = Tracker::new(m.clone(), 4096).unwrap();
        assert_eq!(t.missing_chunks(), 2);
        assert_eq!(t.files_done(), 1, "the empty file is done from the start");
        let data = vec![9u8; 5000];
        assert_eq!(t.admit(&chunk(1, 4096, 904)), Ok(Admit::Write));
        t.verified(1, 4096, chunk_hash(&data[4096..], 4096, 5000));
        assert_eq!(t.missing(10), vec![(1, 0)]);
        t.admit(&chunk(1, 0, 4096)).unwrap();
        assert_eq!(t.missing(10), vec![], "in flight is not missing");
        t.verified(1, 0, chunk_hash(&data[..4096], 0, 5000));
        assert!(t.is_complete());
        assert_eq!(t.bytes_done(), 5000);
        assert_eq!(t.files_done(), 2);
        let want =
            crate::hash::tree_digest([(1, blake3::hash(&data).as_bytes()), (2, &file_root(&[]))]);
        assert_eq!(t.digest(), Some(want));
    }

    fn with_hash(mut c: Chunk, hash: [u8; 32]) -> Chunk {
        c.hash = hash;
        c
    }

    #[test]
    fn held_chunks_count_and_are_replaced_only_by_other_contents() {
        let m = Manifest::from_entries(vec![dir(""), file("a", 5000)]).unwrap();
        let data = vec![7u8; 5000];
        let (h0, h1) = (
            chunk_hash(&data[..4096], 0, 5000),
            chunk_hash(&data[4096..], 4096, 5000),
        );
        let mut t = Tracker::new(m.clone(), 4096).unwrap();
        assert!(t.held(1, 0, h0));
        assert!(!t.held(1, 0, h0), "held twice");
        assert!(!t.held(1, 100, h0), "not a chunk boundary");
        assert!(t.held(1, 4096, [1; 32]));
        assert!(t.is_complete());
        assert_eq!(t.bytes_done(), 5000);
        assert_eq!(t.held_bytes(), 5000);
        // The same bytes again: nothing to do. Other bytes: they replace what was held.
        assert_eq!(t.admit(&with_hash(chunk(1, 0, 4096), h0)), Ok(Admit::Skip));
        assert_eq!(
            t.admit(&with_hash(chunk(1, 4096, 904), h1)),
            Ok(Admit::Write)
        );
        assert!(!t.is_complete());
        assert_eq!(t.bytes_done(), 4096);
        assert_eq!(t.held_bytes(), 4096);
        assert_eq!(t.files_done(), 0);
        t.verified(1, 4096, h1);
        assert_eq!(
            t.digest(),
            Some(crate::hash::tree_digest([(
                1,
                blake3::hash(&data).as_bytes()
            )]))
        );
        // A verified chunk that comes back with other contents is a conflict.
        assert!(matches!(
            t.admit(&with_hash(chunk(1, 4096, 904), [2; 32])),
            Err(ChunkError::Conflict { .. })
        ));
        // Only the chunk held from before is left to the final read-back.
        assert_eq!(t.held_from((0, 0), usize::MAX), vec![(1, 0, h0)]);
        // A chunk found damaged on disk is missing again.
        assert!(t.lost(1, 0));
        assert_eq!(t.held_bytes(), 0);
        assert!(!t.lost(1, 0));
        assert_eq!(t.missing(10), vec![(1, 0)]);
        assert_eq!(t.held_from((0, 0), usize::MAX), vec![]);
        assert_eq!(t.hash_of(1, 4096), Some(h1));
        assert_eq!(t.digest(), None);
    }

    #[test]
    fn held_chunks_are_read_back_in_batches_and_confirmed_ones_fold() {
        const CS: u64 = 1024;
        let chunks = 3 * PAGE + 5;
        let size = chunks * CS;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
        let hash_at = |idx: u64| {
            let at = (idx * CS) as usize;
            chunk_hash(&data[at..at + CS as usize], idx * CS, size)
        };
        let m = Manifest::from_entries(vec![dir(""), file("a", 10), file("f", size)]).unwrap();
        let table = Arc::new(MemTable::default());
        let mut t = Tracker::new(m.clone(), CS as u32)
            .unwrap()
            .with_table(table.clone());
        // A hash the caller put in the table itself, and hashes given to `held`.
        Hashes::new(ChunkIndex::new(&m, CS as u32).unwrap(), table)
            .put(2, 0, &hash_at(0))
            .unwrap();
        assert!(t.held_in_table(2, 0));
        for idx in 1..chunks {
            assert!(t.held(2, idx * CS, hash_at(idx)));
        }
        assert!(!t.held(2, 1, hash_at(1)), "not a chunk start");
        assert_eq!(t.missing_chunks(), 1, "only file a's chunk");
        // One chunk arrives with other bytes and replaces what was held (its page opens).
        let mut changed = data.clone();
        let at = ((PAGE + 3) * CS) as usize;
        changed[at] ^= 1;
        let other = chunk_hash(&changed[at..at + CS as usize], (PAGE + 3) * CS, size);
        let c = with_hash(chunk(2, (PAGE + 3) * CS, CS as u32), other);
        assert_eq!(t.admit(&c), Ok(Admit::Write));
        t.verified(2, c.offset, other);
        // The same bytes as held: nothing to do.
        let c = with_hash(chunk(2, (PAGE + 4) * CS, CS as u32), hash_at(PAGE + 4));
        assert_eq!(t.admit(&c), Ok(Admit::Skip));

        // In batches of 10, from a cursor just past the last chunk seen.
        let mut from = (0, 0);
        let mut seen = Vec::new();
        loop {
            let batch = t.held_from(from, 10);
            let Some(&(f, o, _)) = batch.last() else {
                break;
            };
            assert!(batch.len() <= 10);
            from = (f, o + 1);
            seen.extend(batch);
        }
        let want: Vec<_> = (0..chunks)
            .filter(|&i| i != PAGE + 3)
            .map(|i| (2, i * CS, hash_at(i)))
            .collect();
        assert_eq!(seen, want);
        assert_eq!(
            t.held_from((2, 5 * CS + 1), 1),
            vec![(2, 6 * CS, hash_at(6))]
        );

        // Confirmed, each page folds: the digest comes from folded pages.
        for &(f, o, h) in &seen {
            assert!(t.confirm(f, o, h));
            assert!(!t.confirm(f, o, h), "confirmed twice");
        }
        assert!(t.held_from((0, 0), 1).is_empty());
        assert!(t.is_folded(2, 0));
        assert!(
            !t.is_folded(2, 3 * PAGE),
            "the last page is short of a full page"
        );
        assert_eq!(t.held_bytes(), size - CS);
        let a = b"0123456789";
        let c = with_hash(chunk(1, 0, 10), chunk_hash(a, 0, 10));
        t.admit(&c).unwrap();
        t.verified(1, 0, c.hash);
        // File "f" is what was held, with the one chunk that replaced its own.
        let want = crate::hash::tree_digest([
            (1, blake3::hash(a).as_bytes()),
            (2, blake3::hash(&changed).as_bytes()),
        ]);
        assert_eq!(t.digest(), Some(want));
    }

    #[test]
    fn a_chunk_for_a_finished_file_is_not_counted_twice() {
        // Regression: a finished file's slots used to be dropped, so a chunk sent again was
        // admitted as new and the missing count underflowed.
        let m = Manifest::from_entries(vec![dir(""), file("a", 4096)]).unwrap();
        let mut t = Tracker::new(m.clone(), 4096).unwrap();
        let c = with_hash(chunk(1, 0, 4096), [3; 32]);
        t.admit(&c).unwrap();
        t.verified(1, 0, c.hash);
        assert_eq!(t.admit(&c), Ok(Admit::Skip));
        t.verified(1, 0, c.hash);
        assert!(t.is_complete());
        assert_eq!(t.missing_chunks(), 0);
        assert_eq!(t.bytes_done(), 4096);
    }

    #[test]
    fn refuses_chunks_that_break_the_manifest() {
        let m = Manifest::from_entries(vec![dir(""), file("a", 5000), dir("d")]).unwrap();
        let mut t = Tracker::new(m.clone(), 4096).unwrap();
        assert!(matches!(
            t.admit(&chunk(9, 0, 4096)),
            Err(ChunkError::UnknownFile { .. })
        ));
        assert!(matches!(
            t.admit(&chunk(2, 0, 4096)),
            Err(ChunkError::NotAFile { .. })
        ));
        assert!(matches!(
            t.admit(&chunk(0, 0, 4096)),
            Err(ChunkError::NotAFile { .. })
        ));
        assert!(matches!(
            t.admit(&chunk(1, 100, 4096)),
            Err(ChunkError::BadOffset { .. })
        ));
        assert!(matches!(
            t.admit(&chunk(1, 8192, 4096)),
            Err(ChunkError::BadOffset { .. })
        ));
        assert!(matches!(
            t.admit(&chunk(1, 0, 10)),
            Err(ChunkError::BadLength { .. })
        ));
        t.admit(&chunk(1, 0, 4096)).unwrap();
        assert!(matches!(
            t.admit(&chunk(1, 0, 4096)),
            Err(ChunkError::Duplicate { .. })
        ));
        t.failed(1, 0);
        t.admit(&chunk(1, 0, 4096)).unwrap();
    }

    #[test]
    fn a_small_file_wholly_held_keeps_a_bit_until_it_is_confirmed_or_lost() {
        let m = Manifest::from_entries(vec![
            dir(""),
            file("a", 5000),
            file("b", 100),
            file("c", 4096),
            file("d", 10),
        ])
        .unwrap();
        let mut t = Tracker::new(m, 4096).unwrap();
        // One chunk of two held: a track. Both: a bit.
        assert!(t.held(1, 0, [1; 32]));
        assert!(matches!(t.state(1).unwrap(), FileState::Busy(_)));
        assert!(t.held(1, 4096, [2; 32]));
        assert!(matches!(t.state(1).unwrap(), FileState::Held));
        for (f, h) in [(2, 3), (3, 4), (4, 5)] {
            assert!(t.held(f, 0, [h; 32]));
            assert!(matches!(t.state(f).unwrap(), FileState::Held));
        }
        assert!(t.busy.is_empty());
        assert!(!t.held(2, 0, [3; 32]), "held already");
        assert_eq!(
            (t.is_complete(), t.held_bytes()),
            (true, 5000 + 100 + 4096 + 10)
        );
        assert_eq!(t.hash_of(1, 4096), Some([2; 32]));
        // The read-back lists them in file order, from where it stopped.
        assert_eq!(
            t.held_from((1, 1), 3),
            vec![(1, 4096, [2; 32]), (2, 0, [3; 32]), (3, 0, [4; 32])]
        );
        // The same bytes sent for another node are skipped; others replace the held ones.
        assert_eq!(
            t.admit(&with_hash(chunk(2, 0, 100), [3; 32])),
            Ok(Admit::Skip)
        );
        assert_eq!(
            t.admit(&with_hash(chunk(3, 0, 4096), [9; 32])),
            Ok(Admit::Write)
        );
        assert!(matches!(t.state(3).unwrap(), FileState::Busy(_)));
        assert_eq!(t.missing_chunks(), 1);
        t.verified(3, 0, [9; 32]);
        assert!(matches!(t.state(3).unwrap(), FileState::Done));
        // Confirmed: done. Damaged on disk: missing again.
        assert!(t.confirm(2, 0, [3; 32]));
        assert!(matches!(t.state(2).unwrap(), FileState::Done));
        assert!(t.lost(4, 0));
        assert!(matches!(t.state(4).unwrap(), FileState::Untouched));
        assert_eq!(t.missing(10), vec![(4, 0)]);
        assert_eq!(t.digest(), None);
        assert!(t.confirm(1, 0, [1; 32]) && t.confirm(1, 4096, [2; 32]));
        let d = with_hash(chunk(4, 0, 10), [6; 32]);
        assert_eq!(t.admit(&d), Ok(Admit::Write));
        t.verified(4, 0, d.hash);
        let want = crate::hash::tree_digest([
            (1, &file_root(&[[1; 32], [2; 32]])),
            (2, &file_root(&[[3; 32]])),
            (3, &file_root(&[[9; 32]])),
            (4, &file_root(&[[6; 32]])),
        ]);
        assert_eq!(t.digest(), Some(want));
        assert!(t.busy.is_empty() && t.held.next_set(0).is_none());
    }

    #[test]
    fn a_file_keeps_a_track_only_while_chunks_of_it_are_under_way_or_held() {
        let m = Manifest::from_entries(vec![dir(""), file("a", 100), file("b", 5000)]).unwrap();
        let mut t = Tracker::new(m, 4096).unwrap();
        assert!(matches!(t.state(0).unwrap(), FileState::NotFile));
        assert!(matches!(t.state(1).unwrap(), FileState::Untouched));
        let a = with_hash(chunk(1, 0, 100), [1; 32]);
        assert_eq!(t.admit(&a), Ok(Admit::Write));
        assert!(matches!(t.state(1).unwrap(), FileState::Busy(_)));
        t.failed(1, 0);
        assert!(
            matches!(t.state(1).unwrap(), FileState::Untouched),
            "nothing is kept once the chunk failed"
        );
        assert_eq!(t.missing(10), vec![(1, 0), (2, 0), (2, 4096)]);
        assert_eq!(t.missing(2), vec![(1, 0), (2, 0)]);
        t.admit(&a).unwrap();
        t.verified(1, 0, a.hash);
        assert!(matches!(t.state(1).unwrap(), FileState::Done));
        assert_eq!(t.roots.next, 2, "its root went into the digest at once");
        assert!(t.roots.waiting.is_empty());
        assert_eq!(t.admit(&a), Ok(Admit::Skip), "sent again for another node");
        assert!(!t.lost(1, 0), "a folded chunk cannot be lost");
        assert_eq!((t.files_done(), t.hash_of(1, 0)), (1, None));
        // A held chunk keeps its file's track until the read-back confirms it: until then
        // it may turn out to be damaged.
        assert!(t.held(2, 0, [2; 32]));
        let tail = with_hash(chunk(2, 4096, 904), [3; 32]);
        assert_eq!(t.admit(&tail), Ok(Admit::Write));
        t.verified(2, 4096, tail.hash);
        assert!(t.is_complete());
        assert!(matches!(t.state(2).unwrap(), FileState::Busy(_)));
        assert_eq!(t.held_from((0, 0), 10), vec![(2, 0, [2; 32])]);
        assert!(t.confirm(2, 0, [2; 32]));
        assert!(matches!(t.state(2).unwrap(), FileState::Done));
        assert!(t.held_from((0, 0), 10).is_empty());
        let want = crate::hash::tree_digest([
            (1, &file_root(&[[1; 32]])),
            (2, &file_root(&[[2; 32], [3; 32]])),
        ]);
        assert_eq!(t.digest(), Some(want));
    }

    #[test]
    fn roots_wait_only_for_the_files_before_them() {
        let m = Manifest::from_entries(vec![
            dir(""),
            file("a", 10),
            file("c-empty", 0),
            dir("d"),
            file("d/b", 20),
            file("d/c", 30),
        ])
        .unwrap();
        let mut t = Tracker::new(m, 4096).unwrap();
        assert_eq!(t.roots.next, 1, "the root directory is passed at once");
        let done = |t: &mut Tracker, file: u32, len: u32, h: u8| {
            let c = with_hash(chunk(file, 0, len), [h; 32]);
            assert_eq!(t.admit(&c), Ok(Admit::Write));
            t.verified(file, 0, c.hash);
        };
        done(&mut t, 5, 30, 3);
        done(&mut t, 4, 20, 2);
        assert_eq!((t.roots.next, t.roots.waiting.len()), (1, 2));
        assert_eq!(t.digest(), None);
        done(&mut t, 1, 10, 1);
        assert_eq!(t.roots.next, 6, "every root went in, the empty file's too");
        assert!(t.roots.waiting.is_empty());
        let want = crate::hash::tree_digest([
            (1, &file_root(&[[1; 32]])),
            (2, &file_root(&[])),
            (4, &file_root(&[[2; 32]])),
            (5, &file_root(&[[3; 32]])),
        ]);
        assert_eq!(t.digest(), Some(want));
    }

    /// A small deterministic shuffle, so that chunks arrive out of order.
    fn shuffled(n: u64, seed: u64) -> Vec<u64> {
        let mut v: Vec<u64> = (0..n).collect();
        let mut x = seed | 1;
        for i in (1..v.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.swap(i, (x % (i as u64 + 1)) as usize);
        }
        v
    }

    fn tracked(t: &Tracker, file: u32) -> &FileTrack {
        match t.state(file).unwrap() {
            FileState::Busy(f) => f,
            other => panic!("file {file} has no track: {other:?}"),
        }
    }

    #[test]
    fn folded_pages_give_the_root_of_plain_blake3_for_every_shape() {
        const CS: usize = 1024;
        // Chunk counts around one page, two pages and a power of two of pages, with and
        // without a short last chunk.
        for chunks in [1u64, 2, 63, 64, 65, 127, 128, 129, 200, 256, 257] {
            for (tail, held_below) in [(0usize, u64::MAX), (100, u64::MAX), (0, 10), (100, 10)] {
                let size = if tail == 0 {
                    chunks as usize * CS
                } else {
                    (chunks as usize - 1) * CS + tail
                };
                let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
                let m = Manifest::from_entries(vec![dir(""), file("f", size as u64)]).unwrap();
                let mut t = Tracker::new(m.clone(), CS as u32).unwrap();
                let hash_at = |idx: u64| {
                    let at = idx as usize * CS;
                    let end = (at + CS).min(size);
                    chunk_hash(&data[at..end], at as u64, size as u64)
                };
                let len_at = |idx: u64| ((size - idx as usize * CS).min(CS)) as u32;
                // Every fifth chunk (below `held_below`) was here before; one of those held
                // other bytes, and one chunk fails its check the first time.
                for idx in (0..chunks.min(held_below)).step_by(5) {
                    let h = if idx == 5 { [9; 32] } else { hash_at(idx) };
                    assert!(t.held(1, idx * CS as u64, h));
                }
                for idx in shuffled(chunks, chunks * 7 + tail as u64 + held_below % 7) {
                    let c = with_hash(chunk(1, idx * CS as u64, len_at(idx)), hash_at(idx));
                    match t.admit(&c).unwrap() {
                        Admit::Skip => continue,
                        Admit::Write => {}
                    }
                    if idx == chunks / 2 {
                        t.failed(1, c.offset);
                        assert_eq!(t.admit(&c), Ok(Admit::Write));
                    }
                    t.verified(1, c.offset, c.hash);
                }
                assert!(t.is_complete(), "{chunks} chunks, tail {tail}");
                let want = crate::hash::tree_digest([(1, blake3::hash(&data).as_bytes())]);
                assert_eq!(t.digest(), Some(want), "{chunks} chunks, tail {tail}");
                // Pages are folded unless they keep a chunk held from before (which the final
                // read-back checks by its own hash).
                // A file all of whose pages folded keeps its root alone.
                let f = match t.state(1).unwrap() {
                    FileState::Busy(f) => Some(f),
                    FileState::Done => None,
                    // A file of one chunk, held from before with the right bytes: a bit.
                    FileState::Held => {
                        assert_eq!(chunks, 1);
                        continue;
                    }
                    other => panic!("{other:?}"),
                };
                for page in 0..chunks.div_ceil(PAGE) {
                    let keeps_held = (page * PAGE..((page + 1) * PAGE).min(chunks))
                        .any(|idx| idx % 5 == 0 && idx != 5 && idx < held_below);
                    let folded =
                        f.is_none_or(|f| matches!(f.pages.get(&page), Some(Page::Folded(_))));
                    assert_eq!(folded, !keeps_held, "page {page} of {chunks} chunks");
                }
            }
        }
    }

    #[test]
    fn a_fresh_copy_keeps_one_value_per_page_done() {
        const CS: u64 = 1024;
        let chunks = 5 * PAGE + 3;
        let size = chunks * CS;
        let m = Manifest::from_entries(vec![dir(""), file("f", size)]).unwrap();
        let mut t = Tracker::new(m.clone(), CS as u32).unwrap();
        let hash = |idx: u64| {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&idx.to_le_bytes());
            h
        };
        // Chunks of the first two pages and one of the third arrive.
        for idx in (0..2 * PAGE).chain([2 * PAGE + 1]) {
            let c = with_hash(chunk(1, idx * CS, CS as u32), hash(idx));
            assert_eq!(t.admit(&c), Ok(Admit::Write));
            t.verified(1, c.offset, c.hash);
        }
        let f = tracked(&t, 1);
        assert!(matches!(f.pages.get(&0), Some(Page::Folded(_))));
        assert!(matches!(f.pages.get(&1), Some(Page::Folded(_))));
        assert!(matches!(f.pages.get(&2), Some(Page::Open { open, .. }) if *open == 63));
        assert_eq!(f.pages.len(), 3, "pages with no data take no memory");
        // A folded chunk sent again (for another node) is skipped; its hash is not kept, and
        // it is not held, so no check at the end can lose it.
        let again = with_hash(chunk(1, 3 * CS, CS as u32), hash(3));
        assert_eq!(t.admit(&again), Ok(Admit::Skip));
        assert_eq!(t.hash_of(1, 3 * CS), None);
        assert!(t.is_folded(1, 3 * CS));
        assert!(!t.is_folded(1, (2 * PAGE + 1) * CS));
        assert!(!t.is_folded(1, 3 * CS + 1), "not a chunk boundary");
        assert!(!t.lost(1, 3 * CS));
        assert_eq!(t.hash_of(1, (2 * PAGE + 1) * CS), Some(hash(2 * PAGE + 1)));
        assert_eq!(t.bytes_done(), (2 * PAGE + 1) * CS);
        // What is missing skips folded pages and lists the rest in order.
        let missing = t.missing(3);
        assert_eq!(
            missing,
            vec![
                (1, 2 * PAGE * CS),
                (1, (2 * PAGE + 2) * CS),
                (1, (2 * PAGE + 3) * CS)
            ]
        );
        assert_eq!(t.missing_chunks(), chunks - 2 * PAGE - 1);
        // A chunk that fails leaves no page behind if nothing else of the page arrived.
        let c = chunk(1, 4 * PAGE * CS, CS as u32);
        t.admit(&c).unwrap();
        assert_eq!(tracked(&t, 1).pages.len(), 4);
        t.failed(1, c.offset);
        assert_eq!(tracked(&t, 1).pages.len(), 3);
    }

    /// What [`Tracker`] must do, kept the plain way: every chunk's state and hash, always.
    mod model {
        use proptest::prelude::*;

        use super::*;

        #[derive(Debug, Clone, Copy, PartialEq)]
        enum M {
            Missing,
            Pending,
            Done([u8; 32]),
            Held([u8; 32]),
            /// Done, in a page the tracker may have folded: its hash kept here for the digest.
            Folded([u8; 32]),
        }

        const CS: u64 = 1024;

        struct Model {
            /// Per manifest entry: a file's size and chunks, or `None` for a directory.
            files: Vec<Option<(u64, Vec<M>)>>,
        }

        impl Model {
            fn len(&self, file: usize, idx: usize) -> u64 {
                let (size, _) = self.files[file].as_ref().expect("a file");
                (size - idx as u64 * CS).min(CS)
            }

            /// Folds what the tracker may fold: every page whose chunks are all done (the
            /// one page of a small file too).
            fn fold(&mut self) {
                for (_, chunks) in self.files.iter_mut().flatten() {
                    for page in chunks.chunks_mut(PAGE as usize) {
                        if page.iter().all(|m| matches!(m, M::Done(_))) {
                            for m in page.iter_mut() {
                                if let M::Done(h) = *m {
                                    *m = M::Folded(h);
                                }
                            }
                        }
                    }
                }
            }

            fn present(m: &M) -> bool {
                matches!(m, M::Done(_) | M::Held(_) | M::Folded(_))
            }

            fn check(&self, t: &Tracker) -> Result<(), TestCaseError> {
                let mut missing_chunks = 0;
                let (mut bytes, mut held_bytes, mut files_done) = (0, 0, 0);
                let mut missing = Vec::new();
                let mut held = Vec::new();
                for (f, entry) in self.files.iter().enumerate() {
                    let Some((_, chunks)) = entry else { continue };
                    files_done += u64::from(chunks.iter().all(Self::present));
                    for (i, m) in chunks.iter().enumerate() {
                        let (file, offset) = (f as u32, i as u64 * CS);
                        let len = self.len(f, i);
                        match m {
                            M::Missing | M::Pending => missing_chunks += 1,
                            _ => bytes += len,
                        }
                        if *m == M::Missing {
                            missing.push((file, offset));
                        }
                        if let M::Held(h) = m {
                            held_bytes += len;
                            held.push((file, offset, *h));
                        }
                        let hash = match m {
                            M::Done(h) | M::Held(h) => Some(*h),
                            _ => None,
                        };
                        prop_assert_eq!(t.hash_of(file, offset), hash, "hash of {}@{}", f, i);
                        prop_assert_eq!(
                            t.is_folded(file, offset),
                            matches!(m, M::Folded(_)),
                            "folded {}@{}",
                            f,
                            i
                        );
                    }
                }
                prop_assert_eq!(t.missing_chunks(), missing_chunks);
                prop_assert_eq!(t.is_complete(), missing_chunks == 0);
                prop_assert_eq!(t.bytes_done(), bytes);
                prop_assert_eq!(t.held_bytes(), held_bytes);
                prop_assert_eq!(t.files_done(), files_done);
                prop_assert_eq!(t.held_from((0, 0), usize::MAX), held);
                prop_assert_eq!(
                    t.missing(7),
                    missing.iter().take(7).copied().collect::<Vec<_>>()
                );
                let digest = (missing_chunks == 0).then(|| {
                    let roots: Vec<(u32, [u8; 32])> = self
                        .files
                        .iter()
                        .enumerate()
                        .filter_map(|(f, e)| Some((f as u32, e.as_ref()?)))
                        .map(|(f, (_, chunks))| {
                            let hashes: Vec<[u8; 32]> = chunks
                                .iter()
                                .map(|m| match m {
                                    M::Done(h) | M::Held(h) | M::Folded(h) => *h,
                                    _ => unreachable!("complete"),
                                })
                                .collect();
                            (f, file_root(&hashes))
                        })
                        .collect();
                    crate::hash::tree_digest(roots.iter().map(|(f, r)| (*f, r)))
                });
                prop_assert_eq!(t.digest(), digest);
                Ok(())
            }
        }

        #[derive(Debug, Clone)]
        enum Op {
            /// Admit a chunk (with one of three contents, and maybe a wrong length or
            /// offset), and verify it if it was taken.
            Send {
                file: usize,
                chunk: usize,
                content: u8,
                bad: u8,
                verify: bool,
            },
            /// Admit and verify a run of chunks with their first contents.
            Run {
                file: usize,
                chunk: usize,
                count: usize,
            },
            Verify {
                file: usize,
                chunk: usize,
            },
            Fail {
                file: usize,
                chunk: usize,
            },
            Held {
                file: usize,
                chunk: usize,
                content: u8,
            },
            Lost {
                file: usize,
                chunk: usize,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            let at = (0..4usize, 0..300usize);
            prop_oneof![
                (at.clone(), 0..3u8, 0..8u8, any::<bool>()).prop_map(
                    |((file, chunk), content, bad, verify)| Op::Send {
                        file,
                        chunk,
                        content,
                        bad,
                        verify
                    }
                ),
                (at.clone(), 1..130usize).prop_map(|((file, chunk), count)| Op::Run {
                    file,
                    chunk,
                    count
                }),
                at.clone()
                    .prop_map(|(file, chunk)| Op::Verify { file, chunk }),
                at.clone()
                    .prop_map(|(file, chunk)| Op::Fail { file, chunk }),
                (at.clone(), 0..3u8).prop_map(|((file, chunk), content)| Op::Held {
                    file,
                    chunk,
                    content
                }),
                at.prop_map(|(file, chunk)| Op::Lost { file, chunk }),
            ]
        }

        fn content(file: usize, chunk: usize, which: u8) -> [u8; 32] {
            let mut h = [which; 32];
            h[..8].copy_from_slice(&(file as u64).to_le_bytes());
            h[8..16].copy_from_slice(&(chunk as u64).to_le_bytes());
            h
        }

        fn run(sizes: Vec<u64>, ops: Vec<Op>) -> Result<(), TestCaseError> {
            let mut entries = vec![dir(""), dir("d")];
            for (i, size) in sizes.iter().enumerate() {
                entries.push(file(&format!("f{i}"), *size));
            }
            let m = Manifest::from_entries(entries).expect("a valid manifest");
            let mut t = Tracker::new(m.clone(), CS as u32).unwrap();
            let mut model = Model {
                files: m
                    .iter()
                    .map(|e| match e.unwrap().kind {
                        EntryKind::File { size } => {
                            Some((size, vec![M::Missing; size.div_ceil(CS) as usize]))
                        }
                        _ => None,
                    })
                    .collect(),
            };
            model.check(&t)?;
            // Entry 1 is a directory; 2.. are the files (entry ids past the end are unknown).
            for op in ops {
                let file_of = |f: usize| (f + 1).min(m.len());
                match op {
                    Op::Send {
                        file: f,
                        chunk,
                        content: which,
                        bad,
                        verify,
                    } => {
                        let f = file_of(f);
                        let Some((size, chunks)) = model.files.get(f).cloned().flatten() else {
                            let c = chunk_at(f as u32, 0, 1024);
                            prop_assert!(t.admit(&c).is_err());
                            continue;
                        };
                        if chunks.is_empty() {
                            prop_assert!(t.admit(&chunk_at(f as u32, 0, 1)).is_err());
                            continue;
                        }
                        let i = chunk % chunks.len();
                        let len = model.len(f, i) as u32;
                        let (offset, len) = match bad {
                            0 => (i as u64 * CS + 512, len),
                            1 => (size.div_ceil(CS) * CS, len),
                            2 => (i as u64 * CS, len + 1),
                            _ => (i as u64 * CS, len),
                        };
                        let mut c = chunk_at(f as u32, offset, len);
                        c.hash = content(f, i, which);
                        let got = t.admit(&c);
                        if bad < 3 {
                            prop_assert!(got.is_err(), "bad chunk taken: {:?}", c);
                            continue;
                        }
                        let slot = &mut model.files[f].as_mut().expect("a file").1[i];
                        let want = match *slot {
                            M::Missing => Ok(Admit::Write),
                            M::Pending => Err("duplicate"),
                            M::Done(h) | M::Held(h) if h == c.hash => Ok(Admit::Skip),
                            M::Done(_) => Err("conflict"),
                            M::Held(_) => Ok(Admit::Write),
                            M::Folded(_) => Ok(Admit::Skip),
                        };
                        match (&got, want) {
                            (Ok(a), Ok(b)) => prop_assert_eq!(*a, b),
                            (Err(ChunkError::Duplicate { .. }), Err("duplicate")) => {}
                            (Err(ChunkError::Conflict { .. }), Err("conflict")) => {}
                            (got, want) => {
                                prop_assert!(false, "{:?}: got {:?}, want {:?}", c, got, want)
                            }
                        }
                        if got == Ok(Admit::Write) {
                            *slot = M::Pending;
                            if verify {
                                t.verified(c.file, c.offset, c.hash);
                                *slot = M::Done(c.hash);
                            }
                        }
                    }
                    Op::Run {
                        file: f,
                        chunk,
                        count,
                    } => {
                        let f = file_of(f);
                        let Some((_, chunks)) = model.files.get(f).cloned().flatten() else {
                            continue;
                        };
                        for i in (chunk..chunk + count).filter(|&i| i < chunks.len()) {
                            let mut c = chunk_at(f as u32, i as u64 * CS, model.len(f, i) as u32);
                            c.hash = content(f, i, 0);
                            let slot = &mut model.files[f].as_mut().expect("a file").1[i];
                            if matches!(*slot, M::Missing | M::Held(_)) && *slot != M::Held(c.hash)
                            {
                                prop_assert_eq!(t.admit(&c), Ok(Admit::Write));
                                t.verified(c.file, c.offset, c.hash);
                                *slot = M::Done(c.hash);
                            }
                        }
                    }
                    Op::Verify { file: f, chunk }
                    | Op::Fail { file: f, chunk }
                    | Op::Held { file: f, chunk, .. }
                    | Op::Lost { file: f, chunk } => {
                        let f = file_of(f);
                        let Some((_, chunks)) = model.files.get(f).cloned().flatten() else {
                            continue;
                        };
                        if chunks.is_empty() {
                            continue;
                        }
                        let i = chunk % chunks.len();
                        let offset = i as u64 * CS;
                        let slot = &mut model.files[f].as_mut().expect("a file").1[i];
                        match op {
                            Op::Verify { .. } => {
                                let h = content(f, i, 0);
                                t.verified(f as u32, offset, h);
                                if *slot == M::Pending {
                                    *slot = M::Done(h);
                                }
                            }
                            Op::Fail { .. } => {
                                t.failed(f as u32, offset);
                                if *slot == M::Pending {
                                    *slot = M::Missing;
                                }
                            }
                            Op::Held { content: which, .. } => {
                                let h = content(f, i, which);
                                let took = t.held(f as u32, offset, h);
                                prop_assert_eq!(took, *slot == M::Missing);
                                if took {
                                    *slot = M::Held(h);
                                }
                            }
                            _ => {
                                let was = matches!(*slot, M::Done(_) | M::Held(_));
                                prop_assert_eq!(t.lost(f as u32, offset), was);
                                if was {
                                    *slot = M::Missing;
                                }
                            }
                        }
                    }
                }
                model.fold();
                model.check(&t)?;
            }
            Ok(())
        }

        fn chunk_at(file: u32, offset: u64, raw_len: u32) -> Chunk {
            chunk(file, offset, raw_len)
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 256,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            /// Any sequence of chunks, checks, holds and losses leaves the tracker where the
            /// plain model is, with the same tree digest once complete, however pages fold.
            #[test]
            fn the_tracker_agrees_with_a_plain_model(
                sizes in proptest::collection::vec(
                    prop_oneof![0..3000u64, 60_000..200_000u64, Just(64 * CS), Just(128 * CS + 7)],
                    1..4,
                ),
                ops in proptest::collection::vec(op(), 1..60),
            ) {
                run(sizes, ops)?;
            }
        }
    }
}
