//! The manifest: what a dataset's tree holds, and the rules that confine it.
//!
//! A manifest is a list of entries, parents before children. Entry 0 is the dataset's root
//! directory (empty path). Every other path is relative, `/`-separated, with no empty, `.` or
//! `..` component, and its parent must be a directory listed earlier. That one rule keeps every
//! write inside the staging area: no absolute path, no climbing out, and no path that passes
//! through a symlink or a file, because only listed directories can be parents.
//! A file's id in chunk frames is its index in the manifest.

use std::collections::HashSet;

use bytes::{Buf, BufMut};

use crate::codec::{get_bytes16, get_i64, get_u32, get_u64, get_u8, put_bytes16, DecodeError};

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

/// Why a manifest was refused. The peer sent it, so retrying will not help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("accept manifest: path {path:?} is not allowed: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("accept manifest: path {path:?} has no directory {parent:?} listed before it (a parent must be a listed directory, never a symlink or a file)")]
    NoParent { path: String, parent: String },
    #[error("accept manifest: path {path:?} is listed twice")]
    Duplicate { path: String },
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(Entry::size).sum()
    }

    pub fn file_count(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::File { .. }))
            .count() as u64
    }

    /// Validates a complete list of entries (what a sender scanned, or a test built), in
    /// place: they are not copied into a second list.
    pub fn from_entries(entries: Vec<Entry>) -> Result<Self, ManifestError> {
        let mut b = ManifestBuilder::new();
        b.check_count(entries.len())?;
        for e in &entries {
            b.check(e)?;
        }
        if entries.is_empty() {
            return Err(ManifestError::NoRoot);
        }
        b.check_unique(&entries)?;
        Ok(Manifest { entries })
    }
}

/// Accumulates manifest parts as they arrive, checking each entry once, with bounded memory:
/// a part that would take the manifest past [`MAX_ENTRIES`] entries, or an entry that would
/// take it past [`MAX_MANIFEST_BYTES`], is refused before it is stored.
#[derive(Debug)]
pub struct ManifestBuilder {
    entries: Vec<Entry>,
    dirs: HashSet<Vec<u8>>,
    /// Every path but the root's, by 8 bytes of its BLAKE3 hash, in the order they came: only
    /// to refuse a path named twice (see [`ManifestBuilder::check_unique`]), so neither a copy
    /// of each path (most of a manifest's size) nor a hash set (over 50 bytes an entry while
    /// it grows) is needed.
    keys: Vec<u64>,
    /// Entries checked so far (those of `entries`, or of a list checked in place).
    checked: u64,
    total_bytes: u64,
    encoded_bytes: u64,
    max_entries: u64,
    max_encoded_bytes: u64,
}

impl Default for ManifestBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn path_key(path: &[u8]) -> u64 {
    let mut k = [0u8; 8];
    k.copy_from_slice(&blake3::hash(path).as_bytes()[..8]);
    u64::from_le_bytes(k)
}

impl ManifestBuilder {
    pub fn new() -> Self {
        Self::with_limits(MAX_ENTRIES, MAX_MANIFEST_BYTES)
    }

    /// A builder with the given bounds (smaller ones let tests reach them).
    fn with_limits(max_entries: u64, max_encoded_bytes: u64) -> Self {
        Self {
            entries: Vec::new(),
            dirs: HashSet::new(),
            keys: Vec::new(),
            checked: 0,
            total_bytes: 0,
            encoded_bytes: 0,
            max_entries,
            max_encoded_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn push(&mut self, part: Vec<Entry>) -> Result<(), ManifestError> {
        self.check_count(part.len())?;
        for e in part {
            self.check(&e)?;
            self.entries.push(e);
        }
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
            self.dirs.insert(Vec::new());
            self.checked = 1;
            return Ok(());
        }
        check_path(&e.path)?;
        let parent = parent_of(&e.path);
        if !self.dirs.contains(parent) {
            return Err(ManifestError::NoParent {
                path: display_path(&e.path),
                parent: display_path(parent),
            });
        }
        // A path named before as a directory is refused here; any other repeat, once the
        // whole list is in (`check_unique`).
        if self.dirs.contains(&e.path[..]) {
            return Err(ManifestError::Duplicate {
                path: display_path(&e.path),
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
        }
        if e.is_dir() {
            self.dirs.insert(e.path.to_vec());
        }
        self.keys.push(path_key(&e.path));
        self.checked += 1;
        Ok(())
    }

    /// Closes the manifest, checking the sender's declared totals against what arrived.
    pub fn finish(mut self, entries: u64, total_bytes: u64) -> Result<Manifest, ManifestError> {
        if self.entries.is_empty() {
            return Err(ManifestError::NoRoot);
        }
        if entries != self.entries.len() as u64 {
            return Err(ManifestError::CountMismatch {
                what: "entries",
                declared: entries,
                actual: self.entries.len() as u64,
            });
        }
        if total_bytes != self.total_bytes {
            return Err(ManifestError::CountMismatch {
                what: "bytes",
                declared: total_bytes,
                actual: self.total_bytes,
            });
        }
        let entries = std::mem::take(&mut self.entries);
        self.check_unique(&entries)?;
        Ok(Manifest { entries })
    }

    /// Refuses a path that `entries` (the list checked) names twice: sorts the paths' keys
    /// and, where two agree, compares the paths themselves (two different paths agree on 8
    /// bytes of their hashes by chance with probability 2^-64; that costs a scan of the list,
    /// never a wrong refusal).
    fn check_unique(&mut self, entries: &[Entry]) -> Result<(), ManifestError> {
        self.keys.sort_unstable();
        let mut at = 0;
        while at + 1 < self.keys.len() {
            let key = self.keys[at];
            let run = self.keys[at..].iter().take_while(|k| **k == key).count();
            if run > 1 {
                let mut named: Vec<&[u8]> = entries
                    .iter()
                    .skip(1)
                    .filter(|e| path_key(&e.path) == key)
                    .map(|e| &e.path[..])
                    .collect();
                named.sort_unstable();
                if let Some(w) = named.windows(2).find(|w| w[0] == w[1]) {
                    return Err(ManifestError::Duplicate {
                        path: display_path(w[0]),
                    });
                }
            }
            at += run;
        }
        Ok(())
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
            file("é", 0),
            link("l", "/etc/passwd"),
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
        let err = Manifest::from_entries(vec![dir(""), file("x", 1), dir("x")]).unwrap_err();
        assert!(matches!(err, ManifestError::Duplicate { .. }));
        let err = Manifest::from_entries(vec![file("x", 1)]).unwrap_err();
        assert_eq!(err, ManifestError::NoRoot);
        let err = Manifest::from_entries(vec![dir(""), dir("")]).unwrap_err();
        assert!(matches!(err, ManifestError::BadPath { .. }));
    }

    #[test]
    fn a_path_named_twice_in_two_parts_is_refused_when_the_manifest_closes() {
        let mut b = ManifestBuilder::new();
        b.push(vec![dir(""), dir("d"), file("d/x", 1)]).unwrap();
        b.push(vec![file("y", 1), file("d/x", 2)]).unwrap();
        let err = b.finish(5, 4).unwrap_err();
        assert_eq!(err, ManifestError::Duplicate { path: "d/x".into() });
        // Two different paths whose keys agree (forced here; 2^-64 by chance) are compared
        // as paths, and pass.
        let entries = vec![dir(""), file("a", 1), file("b", 1)];
        let mut b = ManifestBuilder::new();
        b.keys = vec![path_key(b"a"); 2];
        b.check_unique(&entries).unwrap();
        let mut b = ManifestBuilder::new();
        b.keys = vec![path_key(b"a"); 2];
        let err = b.check_unique(&[dir(""), file("a", 1), file("a", 1)]);
        assert!(matches!(err, Err(ManifestError::Duplicate { .. })));
    }

    #[test]
    fn entry_bound_refuses_the_part_that_crosses_it_before_storing_it() {
        let mut b = ManifestBuilder::with_limits(10, u64::MAX);
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
        let mut b = ManifestBuilder::with_limits(10, u64::MAX);
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
        let mut b = ManifestBuilder::with_limits(MAX_ENTRIES, bound);
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
