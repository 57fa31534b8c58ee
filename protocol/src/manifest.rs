//! The manifest: what a dataset's tree holds, and the rules that confine it.
//!
//! A manifest is a list of entries in the scan's order: depth-first, a directory before its
//! contents, names in byte order. Entry 0 is the dataset's root directory (empty path). Every
//! other path is relative, `/`-separated, with no empty, `.` or `..` component, and its parent
//! must be a directory listed earlier. That one rule keeps every write inside the staging
//! area: no absolute path, no climbing out, and no path that passes through a symlink or a
//! file, because only listed directories can be parents. The order makes every check need
//! only the chain of directories above the last entry, and lets the entries live outside the
//! process (see [`Manifest`]). A file's id in chunk frames is its index in the manifest.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut};

use crate::codec::{get_bytes16, get_i64, get_u32, get_u64, get_u8, put_bytes16, DecodeError};
use crate::table::{MemTable, Table};

/// Longest path, in bytes, that a manifest may hold (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single path component (Linux's NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;
/// Most entries one manifest may hold.
pub const MAX_ENTRIES: u64 = 20_000_000;
/// Most bytes one manifest's entries may take on the wire (the sum of
/// [`Entry::encoded_len`]). With [`MAX_ENTRIES`] it bounds what a receiver holds for a
/// manifest: entries may be up to ~8 KiB each (a 4 KiB path and a 4 KiB symlink target), so
/// the entry count alone would let a peer make a receiver hold over 100 GiB.
pub const MAX_MANIFEST_BYTES: u64 = 2 << 30;
/// Largest file a manifest may declare (1 PiB).
pub const MAX_FILE_SIZE: u64 = 1 << 50;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File {
        size: u64,
    },
    /// A symbolic link, kept as a link: its target is never followed.
    Symlink {
        target: Box<[u8]>,
    },
}

/// One entry of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative path bytes, `/`-separated; empty for the root directory. Boxed rather than a
    /// `Vec`: every node keeps one entry per file, and a `Vec`'s capacity costs 8 bytes each.
    pub path: Box<[u8]>,
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
}

impl Entry {
    pub fn size(&self) -> u64 {
        match self.kind {
            EntryKind::File { size } => size,
            _ => 0,
        }
    }

    /// The size of a file; `None` for a directory or a symlink.
    pub fn file_size(&self) -> Option<u64> {
        match self.kind {
            EntryKind::File { size } => Some(size),
            _ => None,
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir)
    }

    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        put_bytes16(buf, &self.path);
        match &self.kind {
            EntryKind::Dir => buf.put_u8(0),
            EntryKind::File { size } => {
                buf.put_u8(1);
                buf.put_u64(*size);
            }
            EntryKind::Symlink { target } => {
                buf.put_u8(2);
                put_bytes16(buf, target);
            }
        }
        buf.put_u32(self.mode);
        buf.put_i64(self.mtime_sec);
        buf.put_u32(self.mtime_nsec);
    }

    pub(crate) fn decode(buf: &mut impl Buf) -> Result<Self, DecodeError> {
        let path = get_bytes16(buf, MAX_PATH_LEN, "entry path")?.into_boxed_slice();
        let kind = match get_u8(buf, "entry kind")? {
            0 => EntryKind::Dir,
            1 => EntryKind::File {
                size: get_u64(buf, "file size")?,
            },
            2 => EntryKind::Symlink {
                target: get_bytes16(buf, MAX_PATH_LEN, "symlink target")?.into_boxed_slice(),
            },
            k => {
                return Err(DecodeError::Invalid {
                    what: "entry kind",
                    why: format!("unknown kind {k}"),
                })
            }
        };
        Ok(Self {
            path,
            kind,
            mode: get_u32(buf, "entry mode")?,
            mtime_sec: get_i64(buf, "entry mtime")?,
            mtime_nsec: get_u32(buf, "entry mtime nanoseconds")?,
        })
    }

    /// Bytes this entry takes on the wire.
    pub fn encoded_len(&self) -> usize {
        let kind = match &self.kind {
            EntryKind::Dir => 0,
            EntryKind::File { .. } => 8,
            EntryKind::Symlink { target } => 2 + target.len(),
        };
        2 + self.path.len() + 1 + kind + 4 + 8 + 4
    }
}

/// Why a manifest was refused (the peer sent it, so retrying will not help), or why an entry
/// of an accepted one could not be read back (`NoEntry`, `Store`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("accept manifest: path {path:?} is not allowed: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("accept manifest: path {path:?} has no directory {parent:?} listed before it (a parent must be a listed directory, never a symlink or a file)")]
    NoParent { path: String, parent: String },
    #[error("accept manifest: path {path:?} is listed twice")]
    Duplicate { path: String },
    #[error("accept manifest: path {path:?} comes after {after:?}; entries must be in the scan's order (depth-first, a directory before its contents, names in byte order)")]
    OutOfOrder { path: String, after: String },
    #[error("manifest has no entry {index} (it has {len})")]
    NoEntry { index: u64, len: u64 },
    #[error("manifest store: {why}")]
    Store { why: String },
    #[error("accept manifest: the first entry must be the root directory (empty path)")]
    NoRoot,
    #[error("accept manifest: {what} is {value} but at most {max} is allowed")]
    TooLarge {
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("accept manifest: the sender declared {declared} {what} but sent {actual}")]
    CountMismatch {
        what: &'static str,
        declared: u64,
        actual: u64,
    },
}

/// Shows a path from the wire for an error message, whatever bytes it holds.
pub fn display_path(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Checks the syntax of one non-root path.
pub fn check_path(p: &[u8]) -> Result<(), ManifestError> {
    let bad = |why| ManifestError::BadPath {
        path: display_path(p),
        why,
    };
    if p.is_empty() {
        return Err(bad("empty path"));
    }
    if p.len() > MAX_PATH_LEN {
        return Err(bad("longer than 4096 bytes"));
    }
    if p[0] == b'/' {
        return Err(bad("absolute path"));
    }
    if p.contains(&0) {
        return Err(bad("contains a NUL byte"));
    }
    for comp in p.split(|&b| b == b'/') {
        match comp {
            b"" => return Err(bad("empty component (// or a trailing /)")),
            b"." => return Err(bad("'.' component")),
            b".." => return Err(bad("'..' component")),
            c if c.len() > MAX_NAME_LEN => return Err(bad("component longer than 255 bytes")),
            _ => {}
        }
    }
    Ok(())
}

fn parent_of(p: &[u8]) -> &[u8] {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[..i],
        None => b"",
    }
}

/// A manifest that passed every check: safe to create in a staging area.
///
/// Its entries are kept encoded in a [`Table`] (an unnamed file for an agent, memory for a
/// test) in blocks of [`BLOCK`] entries; the process keeps one offset per block and a few
/// decoded blocks, so a manifest of millions of files costs almost nothing in memory. Cloning
/// is cheap and shares the entries. Reading an entry can fail only if the table cannot be
/// read (a failing disk under the agent's state directory).
#[derive(Clone)]
pub struct Manifest {
    stored: Arc<Stored>,
}

/// Entries per stored block: one offset kept in memory for each.
pub const BLOCK: usize = 64;
/// Decoded blocks kept for lookups by index (each about 5 KiB).
const CACHED_BLOCKS: usize = 16;

struct Stored {
    table: Arc<dyn Table>,
    /// Where each block starts in the table, and where the last one ends.
    starts: Vec<u64>,
    len: u64,
    total_bytes: u64,
    file_count: u64,
    /// Recently read blocks, most recent first.
    cache: Mutex<VecDeque<(usize, Arc<[Entry]>)>>,
}

impl fmt::Debug for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manifest")
            .field("entries", &self.stored.len)
            .field("files", &self.stored.file_count)
            .field("bytes", &self.stored.total_bytes)
            .finish()
    }
}

/// Two manifests are equal when they list the same entries (one that cannot be read equals
/// nothing).
impl PartialEq for Manifest {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self.iter().zip(other.iter()).all(|(a, b)| match (a, b) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            })
    }
}

impl Manifest {
    /// Validates a complete list of entries (what a test built), kept in memory.
    pub fn from_entries(entries: Vec<Entry>) -> Result<Self, ManifestError> {
        Self::from_entries_in(entries, Arc::new(MemTable::default()))
    }

    /// Validates a complete list of entries, kept in `table`.
    pub fn from_entries_in(
        entries: Vec<Entry>,
        table: Arc<dyn Table>,
    ) -> Result<Self, ManifestError> {
        let mut b = ManifestBuilder::in_table(table);
        b.push(entries)?;
        let (len, bytes) = (b.checked, b.total_bytes);
        b.finish(len, bytes)
    }

    /// Number of entries, the root included.
    pub fn len(&self) -> usize {
        self.stored.len as usize
    }

    /// Never true for a manifest that passed the checks (it has a root); for symmetry.
    pub fn is_empty(&self) -> bool {
        self.stored.len == 0
    }

    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.stored.total_bytes
    }

    pub fn file_count(&self) -> u64 {
        self.stored.file_count
    }

    /// Entry `i`.
    pub fn get(&self, i: usize) -> Result<Entry, ManifestError> {
        self.with(i, Entry::clone)
    }

    /// `f` of entry `i`, without copying the entry.
    pub fn with<R>(&self, i: usize, f: impl FnOnce(&Entry) -> R) -> Result<R, ManifestError> {
        let (block, at) = self.block_of(i)?;
        Ok(f(&block[at]))
    }

    /// The size of entry `i` if it is a file; `None` for a directory, a symlink, or an index
    /// past the end.
    pub fn file_size(&self, i: usize) -> Result<Option<u64>, ManifestError> {
        if i >= self.len() {
            return Ok(None);
        }
        self.with(i, Entry::file_size)
    }

    /// The decoded block holding entry `i`, and `i`'s place in it.
    pub fn block_of(&self, i: usize) -> Result<(Arc<[Entry]>, usize), ManifestError> {
        if i >= self.len() {
            return Err(ManifestError::NoEntry {
                index: i as u64,
                len: self.stored.len,
            });
        }
        let b = i / BLOCK;
        let s = &self.stored;
        {
            let mut cache = s.cache.lock().unwrap_or_else(|p| p.into_inner());
            // Most lookups fall in the block looked at last: no reordering then.
            if let Some((n, entries)) = cache.front() {
                if *n == b {
                    return Ok((entries.clone(), i % BLOCK));
                }
            }
            if let Some(pos) = cache.iter().position(|(n, _)| *n == b) {
                let hit = cache.remove(pos).map(|(_, e)| e);
                if let Some(entries) = hit {
                    cache.push_front((b, entries.clone()));
                    return Ok((entries, i % BLOCK));
                }
            }
        }
        let entries: Arc<[Entry]> = s.read_block(b)?.into();
        let mut cache = s.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.push_front((b, entries.clone()));
        cache.truncate(CACHED_BLOCKS);
        Ok((entries, i % BLOCK))
    }

    /// The index of the entry at `path`, if there is one: a binary search, since entries are
    /// in the scan's order.
    pub fn position(&self, path: &[u8]) -> Result<Option<usize>, ManifestError> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.with(mid, |e| scan_order(&e.path, path))? {
                Ordering::Less => lo = mid + 1,
                Ordering::Greater => hi = mid,
                Ordering::Equal => return Ok(Some(mid)),
            }
        }
        Ok(None)
    }

    /// Every entry in order, read block by block (the lookup cache is left alone).
    pub fn iter(&self) -> Entries {
        Entries {
            stored: self.stored.clone(),
            next_block: 0,
            current: Vec::new().into_iter(),
            failed: false,
        }
    }

    /// Every entry, in memory: for tests and small manifests only.
    pub fn to_vec(&self) -> Result<Vec<Entry>, ManifestError> {
        self.iter().collect()
    }
}

impl Stored {
    fn read_block(&self, b: usize) -> Result<Vec<Entry>, ManifestError> {
        let (Some(&start), Some(&end)) = (self.starts.get(b), self.starts.get(b + 1)) else {
            return Err(ManifestError::NoEntry {
                index: (b * BLOCK) as u64,
                len: self.len,
            });
        };
        let count = (self.len as usize - b * BLOCK).min(BLOCK);
        // A block holds at most BLOCK entries of bounded size (checked when stored).
        let mut bytes = vec![0u8; (end - start) as usize];
        self.table
            .read_at(start, &mut bytes)
            .map_err(|e| ManifestError::Store {
                why: format!("read entries {}..: {e}", b * BLOCK),
            })?;
        let mut buf = &bytes[..];
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(Entry::decode(&mut buf).map_err(|e| ManifestError::Store {
                why: format!("entries {}.. read back damaged: {e}", b * BLOCK),
            })?);
        }
        Ok(out)
    }
}

/// The entries of a [`Manifest`] in order; see [`Manifest::iter`]. After an error it ends.
pub struct Entries {
    stored: Arc<Stored>,
    next_block: usize,
    current: std::vec::IntoIter<Entry>,
    failed: bool,
}

impl Iterator for Entries {
    type Item = Result<Entry, ManifestError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.current.next() {
                return Some(Ok(e));
            }
            if self.failed || self.next_block * BLOCK >= self.stored.len as usize {
                return None;
            }
            match self.stored.read_block(self.next_block) {
                Ok(v) => {
                    self.next_block += 1;
                    self.current = v.into_iter();
                }
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Orders paths as the scan lists them: depth-first, a directory before what it holds,
/// names in byte order. Comparing bytes with `/` taken as the lowest byte gives exactly that
/// (no name holds `/` or NUL).
fn scan_order(a: &[u8], b: &[u8]) -> Ordering {
    let key = |c: &u8| if *c == b'/' { 0 } else { *c };
    a.iter().map(key).cmp(b.iter().map(key))
}

/// Whether `dir` is `path` or one of the directories above it.
fn holds(dir: &[u8], path: &[u8]) -> bool {
    dir.is_empty() || path == dir || (path.starts_with(dir) && path.get(dir.len()) == Some(&b'/'))
}

/// Accumulates manifest parts as they arrive, checking each entry once and storing it in its
/// table, with bounded memory: a part that would take the manifest past [`MAX_ENTRIES`]
/// entries, or an entry that would take it past [`MAX_MANIFEST_BYTES`], is refused before it
/// is stored.
///
/// Entries must come in the scan's order (see [`scan_order`]): then a path named twice is
/// two equal neighbours, and an entry's parent, if listed, is one of the directories open
/// above the entry before it, so the checks keep only that chain in memory.
pub struct ManifestBuilder {
    table: Arc<dyn Table>,
    /// Where each stored block starts.
    starts: Vec<u64>,
    /// The block being filled, encoded.
    block: Vec<u8>,
    in_block: usize,
    /// Bytes stored in the table so far.
    stored: u64,
    /// The directories holding the last entry (the root first), each with its path.
    open: Vec<Box<[u8]>>,
    /// The last entry's path.
    last: Box<[u8]>,
    /// Entries checked and stored so far.
    checked: u64,
    total_bytes: u64,
    file_count: u64,
    encoded_bytes: u64,
    max_entries: u64,
    max_encoded_bytes: u64,
}

impl fmt::Debug for ManifestBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManifestBuilder")
            .field("entries", &self.checked)
            .field("bytes", &self.total_bytes)
            .finish()
    }
}

impl Default for ManifestBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ManifestBuilder {
    /// A builder that keeps the manifest in memory.
    pub fn new() -> Self {
        Self::in_table(Arc::new(MemTable::default()))
    }

    /// A builder that keeps the manifest in `table`.
    pub fn in_table(table: Arc<dyn Table>) -> Self {
        Self::with_limits(table, MAX_ENTRIES, MAX_MANIFEST_BYTES)
    }

    /// A builder with the given bounds (smaller ones let tests reach them).
    fn with_limits(table: Arc<dyn Table>, max_entries: u64, max_encoded_bytes: u64) -> Self {
        Self {
            table,
            starts: vec![0],
            block: Vec::new(),
            in_block: 0,
            stored: 0,
            open: Vec::new(),
            last: Box::default(),
            checked: 0,
            total_bytes: 0,
            file_count: 0,
            encoded_bytes: 0,
            max_entries,
            max_encoded_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.checked as usize
    }

    pub fn is_empty(&self) -> bool {
        self.checked == 0
    }

    /// Checks and stores a part of the manifest.
    pub fn push(&mut self, part: Vec<Entry>) -> Result<(), ManifestError> {
        self.check_count(part.len())?;
        for e in part {
            self.add(e)?;
        }
        Ok(())
    }

    /// Checks and stores the next entry.
    pub fn add(&mut self, e: Entry) -> Result<(), ManifestError> {
        self.check_count(1)?;
        self.check(&e)?;
        e.encode(&mut self.block);
        self.in_block += 1;
        if self.in_block == BLOCK {
            self.flush()?;
        }
        self.last = e.path;
        Ok(())
    }

    /// Writes the block being filled to the table.
    fn flush(&mut self) -> Result<(), ManifestError> {
        if self.in_block == 0 {
            return Ok(());
        }
        self.table
            .write_at(self.stored, &self.block)
            .map_err(|e| ManifestError::Store {
                why: format!("store entries: {e}"),
            })?;
        self.stored += self.block.len() as u64;
        self.starts.push(self.stored);
        self.block.clear();
        self.in_block = 0;
        Ok(())
    }

    /// Refuses a part of `len` entries that would take the manifest past its entry bound.
    fn check_count(&self, len: usize) -> Result<(), ManifestError> {
        let total = self.checked + len as u64;
        if total > self.max_entries {
            return Err(ManifestError::TooLarge {
                what: "entry count",
                value: total,
                max: self.max_entries,
            });
        }
        Ok(())
    }

    /// Checks one entry, the next of the manifest, and counts it.
    fn check(&mut self, e: &Entry) -> Result<(), ManifestError> {
        let encoded = self.encoded_bytes + e.encoded_len() as u64;
        if encoded > self.max_encoded_bytes {
            return Err(ManifestError::TooLarge {
                what: "manifest size in bytes",
                value: encoded,
                max: self.max_encoded_bytes,
            });
        }
        self.encoded_bytes = encoded;
        if self.checked == 0 {
            if !e.path.is_empty() || !e.is_dir() {
                return Err(ManifestError::NoRoot);
            }
            self.open.push(Box::default());
            self.checked = 1;
            return Ok(());
        }
        check_path(&e.path)?;
        match scan_order(&self.last, &e.path) {
            Ordering::Less => {}
            Ordering::Equal => {
                return Err(ManifestError::Duplicate {
                    path: display_path(&e.path),
                })
            }
            Ordering::Greater => {
                return Err(ManifestError::OutOfOrder {
                    path: display_path(&e.path),
                    after: display_path(&self.last),
                })
            }
        }
        let parent = parent_of(&e.path);
        while self.open.last().is_some_and(|d| !holds(d, parent)) {
            self.open.pop();
        }
        if self.open.last().map(|d| &d[..]) != Some(parent) {
            return Err(ManifestError::NoParent {
                path: display_path(&e.path),
                parent: display_path(parent),
            });
        }
        if let EntryKind::File { size } = e.kind {
            if size > MAX_FILE_SIZE {
                return Err(ManifestError::TooLarge {
                    what: "file size",
                    value: size,
                    max: MAX_FILE_SIZE,
                });
            }
            self.total_bytes =
                self.total_bytes
                    .checked_add(size)
                    .ok_or(ManifestError::TooLarge {
                        what: "total size",
                        value: u64::MAX,
                        max: u64::MAX,
                    })?;
            self.file_count += 1;
        }
        if e.is_dir() {
            self.open.push(e.path.clone());
        }
        self.checked += 1;
        Ok(())
    }

    /// Closes the manifest, checking the sender's declared totals against what arrived.
    pub fn finish(mut self, entries: u64, total_bytes: u64) -> Result<Manifest, ManifestError> {
        if self.checked == 0 {
            return Err(ManifestError::NoRoot);
        }
        if entries != self.checked {
            return Err(ManifestError::CountMismatch {
                what: "entries",
                declared: entries,
                actual: self.checked,
            });
        }
        if total_bytes != self.total_bytes {
            return Err(ManifestError::CountMismatch {
                what: "bytes",
                declared: total_bytes,
                actual: self.total_bytes,
            });
        }
        self.flush()?;
        Ok(Manifest {
            stored: Arc::new(Stored {
                table: self.table,
                starts: self.starts,
                len: self.checked,
                total_bytes: self.total_bytes,
                file_count: self.file_count,
                cache: Mutex::new(VecDeque::new()),
            }),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn dir(p: &str) -> Entry {
        Entry {
            path: p.as_bytes().to_vec().into(),
            kind: EntryKind::Dir,
            mode: 0o755,
            mtime_sec: 1,
            mtime_nsec: 0,
        }
    }

    pub(crate) fn file(p: &str, size: u64) -> Entry {
        Entry {
            kind: EntryKind::File { size },
            mode: 0o644,
            ..dir(p)
        }
    }

    fn link(p: &str, t: &str) -> Entry {
        Entry {
            kind: EntryKind::Symlink {
                target: t.as_bytes().to_vec().into(),
            },
            ..dir(p)
        }
    }

    #[test]
    fn accepts_a_normal_tree() {
        let m = Manifest::from_entries(vec![
            dir(""),
            dir("a"),
            file("a/x y\nz", 5),
            link("l", "/etc/passwd"),
            file("é", 0),
        ])
        .unwrap();
        assert_eq!(m.total_bytes(), 5);
        assert_eq!(m.file_count(), 2);
    }

    #[test]
    fn refuses_paths_that_escape() {
        for p in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "./x",
            "a//b",
            "a/",
            "a\0b",
        ] {
            let err = Manifest::from_entries(vec![dir(""), dir("a"), file(p, 1)]).unwrap_err();
            assert!(matches!(err, ManifestError::BadPath { .. }), "{p:?}: {err}");
        }
    }

    #[test]
    fn refuses_a_path_through_a_symlink_or_file() {
        let err =
            Manifest::from_entries(vec![dir(""), link("l", "/tmp"), file("l/x", 1)]).unwrap_err();
        assert!(matches!(err, ManifestError::NoParent { .. }), "{err}");
        let err = Manifest::from_entries(vec![dir(""), file("f", 1), file("f/x", 1)]).unwrap_err();
        assert!(matches!(err, ManifestError::NoParent { .. }), "{err}");
    }

    #[test]
    fn refuses_children_before_parents_duplicates_and_missing_root() {
        let err = Manifest::from_entries(vec![dir(""), file("a/x", 1), dir("a")]).unwrap_err();
        assert!(matches!(err, ManifestError::NoParent { .. }));
        let err = Manifest::from_entries(vec![dir(""), dir("x"), dir("x")]).unwrap_err();
        assert!(matches!(err, ManifestError::Duplicate { .. }));
        let err = Manifest::from_entries(vec![file("x", 1)]).unwrap_err();
        assert_eq!(err, ManifestError::NoRoot);
        let err = Manifest::from_entries(vec![dir(""), dir("")]).unwrap_err();
        assert!(matches!(err, ManifestError::BadPath { .. }));
    }

    #[test]
    fn entries_must_come_in_the_scans_order() {
        // A directory's contents come before a sibling whose name extends its name: "a/x"
        // before "a.b", though '.' < '/' as bytes.
        Manifest::from_entries(vec![dir(""), dir("a"), file("a/x", 1), file("a.b", 1)]).unwrap();
        let err = Manifest::from_entries(vec![dir(""), file("a.b", 1), dir("a")]).unwrap_err();
        assert_eq!(
            err,
            ManifestError::OutOfOrder {
                path: "a".into(),
                after: "a.b".into()
            }
        );
        let err = Manifest::from_entries(vec![dir(""), file("b", 1), file("a", 1)]).unwrap_err();
        assert!(matches!(err, ManifestError::OutOfOrder { .. }), "{err}");
        // A repeat that is not the entry just before breaks the order too.
        let err =
            Manifest::from_entries(vec![dir(""), dir("d"), file("d/x", 1), dir("d")]).unwrap_err();
        assert!(matches!(err, ManifestError::OutOfOrder { .. }), "{err}");
        // Down two levels and back up to the root's children.
        let m = Manifest::from_entries(vec![
            dir(""),
            dir("a"),
            dir("a/b"),
            file("a/b/x", 1),
            file("a/c", 1),
            file("b", 1),
        ])
        .unwrap();
        assert_eq!(m.len(), 6);
    }

    #[test]
    fn a_path_named_twice_in_two_parts_is_refused_when_it_arrives() {
        let mut b = ManifestBuilder::new();
        b.push(vec![dir(""), dir("d"), file("d/x", 1)]).unwrap();
        let err = b.push(vec![file("d/x", 2)]).unwrap_err();
        assert_eq!(err, ManifestError::Duplicate { path: "d/x".into() });
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn entries_read_back_by_index_and_in_order_across_blocks() {
        let mut entries = vec![dir(""), dir("d")];
        for i in 0..(3 * BLOCK + 5) {
            entries.push(file(&format!("d/f{i:05}"), i as u64));
        }
        entries.push(link("l", "d/f00001"));
        let m = Manifest::from_entries(entries.clone()).unwrap();
        assert_eq!(m.len(), entries.len());
        assert_eq!(m.to_vec().unwrap(), entries);
        assert_eq!(m.file_count(), 3 * BLOCK as u64 + 5);
        // Lookups out of order, more blocks than the cache keeps.
        for i in (0..entries.len()).rev().step_by(7) {
            assert_eq!(m.get(i).unwrap(), entries[i]);
            assert_eq!(m.file_size(i).unwrap(), entries[i].file_size());
        }
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(m.position(&e.path).unwrap(), Some(i), "{e:?}");
        }
        for absent in ["a", "d/f", "d/f00001/x", "d/f99999", "m", "d.x"] {
            assert_eq!(m.position(absent.as_bytes()).unwrap(), None, "{absent}");
        }
        let past = m.len();
        assert_eq!(
            m.get(past).unwrap_err(),
            ManifestError::NoEntry {
                index: past as u64,
                len: past as u64
            }
        );
        assert_eq!(m.file_size(past).unwrap(), None);
    }

    /// A table that fails every read: what a failing disk under the state directory does.
    #[derive(Debug, Default)]
    struct Unreadable(MemTable);

    impl Table for Unreadable {
        fn read_at(&self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
            Err(std::io::Error::other("injected read failure"))
        }
        fn write_at(&self, pos: u64, data: &[u8]) -> std::io::Result<()> {
            self.0.write_at(pos, data)
        }
    }

    #[test]
    fn a_table_that_cannot_be_read_gives_an_error_not_fewer_entries() {
        let m =
            Manifest::from_entries_in(vec![dir(""), file("a", 1)], Arc::new(Unreadable::default()))
                .unwrap();
        assert_eq!(m.len(), 2);
        let err = m.get(1).unwrap_err();
        assert!(
            matches!(&err, ManifestError::Store { why } if why.contains("injected")),
            "{err}"
        );
        let all: Vec<_> = m.iter().collect();
        assert_eq!(all.len(), 1, "the iteration ends after its error");
        assert!(all[0].is_err());
    }

    #[test]
    fn entry_bound_refuses_the_part_that_crosses_it_before_storing_it() {
        let mut b = ManifestBuilder::with_limits(Arc::new(MemTable::default()), 10, u64::MAX);
        b.push(vec![dir("")]).unwrap();
        for i in 0..3 {
            b.push((0..3).map(|j| file(&format!("f{i}-{j}"), 1)).collect())
                .unwrap();
        }
        assert_eq!(b.len(), 10);
        // A parent that keeps sending: every further part is refused, and none is stored.
        for _ in 0..3 {
            let err = b.push(vec![file("more", 1)]).unwrap_err();
            assert_eq!(
                err,
                ManifestError::TooLarge {
                    what: "entry count",
                    value: 11,
                    max: 10
                }
            );
            assert_eq!(b.len(), 10);
        }
        // A huge part is refused from its length alone, before any entry is checked.
        let mut b = ManifestBuilder::with_limits(Arc::new(MemTable::default()), 10, u64::MAX);
        let err = b
            .push((0..11).map(|j| file(&format!("../{j}"), 1)).collect())
            .unwrap_err();
        assert!(
            matches!(err, ManifestError::TooLarge { value: 11, .. }),
            "{err}"
        );
        assert!(b.is_empty());
    }

    #[test]
    fn byte_bound_refuses_long_entries_before_storing_them() {
        let long = "x".repeat(MAX_NAME_LEN);
        let target = vec![b'/'; MAX_PATH_LEN];
        let big = Entry {
            kind: EntryKind::Symlink {
                target: target.into(),
            },
            ..dir(&long)
        };
        let root = dir("");
        let bound = (root.encoded_len() + 2 * big.encoded_len()) as u64;
        let mut b = ManifestBuilder::with_limits(Arc::new(MemTable::default()), MAX_ENTRIES, bound);
        b.push(vec![root]).unwrap();
        let mut n = 0;
        let err = loop {
            let e = Entry {
                path: format!("{n}{}", &long[1..]).into_bytes().into(),
                ..big.clone()
            };
            match b.push(vec![e]) {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(n, 2, "two long entries fit, the third does not");
        assert!(
            matches!(err, ManifestError::TooLarge { what: "manifest size in bytes", max, .. } if max == bound),
            "{err}"
        );
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn default_bounds_are_the_documented_constants() {
        let b = ManifestBuilder::new();
        assert_eq!(
            (b.max_entries, b.max_encoded_bytes),
            (MAX_ENTRIES, MAX_MANIFEST_BYTES)
        );
    }

    #[test]
    fn refuses_impossible_sizes_and_wrong_totals() {
        let err = Manifest::from_entries(vec![dir(""), file("x", u64::MAX)]).unwrap_err();
        assert!(matches!(err, ManifestError::TooLarge { .. }));
        let mut b = ManifestBuilder::new();
        b.push(vec![dir(""), file("x", 3)]).unwrap();
        let err = b.finish(2, 4).unwrap_err();
        assert!(matches!(
            err,
            ManifestError::CountMismatch { what: "bytes", .. }
        ));
    }
}
