//! What a receiver tracks: which chunks it expects, which it holds, which were verified.
//!
//! The tracker is fed chunk headers before their payloads are decoded (so that a frame for a
//! file that is not in the manifest, at an offset that is not a chunk boundary, or with the
//! wrong length is refused before any work or write) and the result of each verification.
//! Chunks a receiver already had before the transfer (from an interrupted run, or an older
//! copy) are *held*: they count as present, and a chunk that arrives for a held slot with
//! another hash replaces it. The tracker knows what is still missing (to ask for again), when
//! every file is complete, and each file's root hash.

use std::collections::HashMap;

use crate::hash::{chunk_count, file_root, tree_digest};
use crate::manifest::{display_path, EntryKind, Manifest};
use crate::message::Chunk;

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
    /// Present before the transfer, with this hash.
    Held([u8; 32]),
}

/// A file's chunks. Only chunks that arrived (or are held) take memory, so a manifest that
/// declares a huge file costs nothing until its data really comes.
#[derive(Debug)]
struct FileTrack {
    size: u64,
    chunks: u64,
    slots: HashMap<u64, Slot>,
    /// Chunks neither done nor held.
    missing: u64,
}

impl FileTrack {
    fn slot(&self, idx: u64) -> Slot {
        self.slots.get(&idx).copied().unwrap_or(Slot::Missing)
    }

    fn root(&self) -> Option<[u8; 32]> {
        if self.missing > 0 {
            return None;
        }
        let hashes: Option<Vec<[u8; 32]>> = (0..self.chunks)
            .map(|i| match self.slot(i) {
                Slot::Done(h) | Slot::Held(h) => Some(h),
                _ => None,
            })
            .collect();
        Some(file_root(&hashes?))
    }
}

/// Progress of one receiver through one manifest.
#[derive(Debug)]
pub struct Tracker {
    chunk_size: u32,
    /// Indexed by manifest entry; `None` for directories and symlinks.
    files: Vec<Option<FileTrack>>,
    paths: Vec<Vec<u8>>,
    missing_chunks: u64,
    bytes_done: u64,
    files_done: u64,
    held_bytes: u64,
}

impl Tracker {
    pub fn new(manifest: &Manifest, chunk_size: u32) -> Self {
        let mut missing_chunks = 0;
        let mut files_done = 0;
        let files = manifest
            .entries
            .iter()
            .map(|e| match e.kind {
                EntryKind::File { size } => {
                    let n = chunk_count(size, chunk_size);
                    missing_chunks += n;
                    files_done += u64::from(n == 0);
                    Some(FileTrack {
                        size,
                        chunks: n,
                        slots: HashMap::new(),
                        missing: n,
                    })
                }
                _ => None,
            })
            .collect();
        Self {
            chunk_size,
            files,
            paths: manifest.entries.iter().map(|e| e.path.clone()).collect(),
            missing_chunks,
            bytes_done: 0,
            files_done,
            held_bytes: 0,
        }
    }

    fn path(&self, file: u32) -> String {
        display_path(&self.paths[file as usize])
    }

    /// The length of the chunk at `offset` of `file`, if that is a chunk of a file.
    pub fn chunk_len(&self, file: u32, offset: u64) -> Option<u32> {
        let t = self.files.get(file as usize)?.as_ref()?;
        let cs = u64::from(self.chunk_size);
        (offset % cs == 0 && offset < t.size).then(|| (t.size - offset).min(cs) as u32)
    }

    /// Checks a chunk's header against the manifest and, unless these exact bytes are already
    /// here, marks it as being processed.
    pub fn admit(&mut self, c: &Chunk) -> Result<Admit, ChunkError> {
        let chunk_size = u64::from(self.chunk_size);
        let track = match self.files.get_mut(c.file as usize) {
            None => return Err(ChunkError::UnknownFile { file: c.file }),
            Some(None) => {
                return Err(ChunkError::NotAFile {
                    file: c.file,
                    path: display_path(&self.paths[c.file as usize]),
                })
            }
            Some(Some(t)) => t,
        };
        if c.offset % chunk_size != 0 || c.offset >= track.size {
            let path = display_path(&self.paths[c.file as usize]);
            return Err(ChunkError::BadOffset {
                path,
                offset: c.offset,
            });
        }
        let expected = (track.size - c.offset).min(chunk_size);
        if u64::from(c.raw_len) != expected {
            return Err(ChunkError::BadLength {
                path: self.path(c.file),
                offset: c.offset,
                len: c.raw_len,
                expected,
            });
        }
        let idx = c.offset / chunk_size;
        match track.slot(idx) {
            Slot::Missing => {}
            Slot::Pending => {
                return Err(ChunkError::Duplicate {
                    path: self.path(c.file),
                    offset: c.offset,
                })
            }
            Slot::Done(h) | Slot::Held(h) if h == c.hash => return Ok(Admit::Skip),
            Slot::Done(_) => {
                return Err(ChunkError::Conflict {
                    path: self.path(c.file),
                    offset: c.offset,
                })
            }
            Slot::Held(_) => {
                // What was here before differs: the new bytes replace it.
                let complete = track.missing == 0;
                track.missing += 1;
                self.missing_chunks += 1;
                self.bytes_done -= expected;
                self.held_bytes -= expected;
                self.files_done -= u64::from(complete);
            }
        }
        track.slots.insert(idx, Slot::Pending);
        Ok(Admit::Write)
    }

    /// Records a chunk whose bytes matched `hash` and are written.
    pub fn verified(&mut self, file: u32, offset: u64, hash: [u8; 32]) {
        self.settle(file, offset, Slot::Pending, Slot::Done(hash));
    }

    /// Records a chunk that was already in place before the transfer, with the hash of its
    /// bytes. Only a missing chunk can become held.
    pub fn held(&mut self, file: u32, offset: u64, hash: [u8; 32]) -> bool {
        let held = self.settle(file, offset, Slot::Missing, Slot::Held(hash));
        if held {
            self.held_bytes += u64::from(self.chunk_len(file, offset).unwrap_or(0));
        }
        held
    }

    /// Bytes of chunks held from before the transfer and not replaced.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    fn settle(&mut self, file: u32, offset: u64, from: Slot, to: Slot) -> bool {
        let Some(len) = self.chunk_len(file, offset) else {
            return false;
        };
        let chunk_size = u64::from(self.chunk_size);
        let Some(Some(track)) = self.files.get_mut(file as usize) else {
            return false;
        };
        let idx = offset / chunk_size;
        if track.slot(idx) != from {
            return false;
        }
        track.slots.insert(idx, to);
        track.missing -= 1;
        self.missing_chunks -= 1;
        self.bytes_done += u64::from(len);
        self.files_done += u64::from(track.missing == 0);
        true
    }

    /// A chunk failed verification or could not be written: it is missing again.
    pub fn failed(&mut self, file: u32, offset: u64) {
        let chunk_size = u64::from(self.chunk_size);
        if let Some(Some(t)) = self.files.get_mut(file as usize) {
            let idx = offset / chunk_size;
            if t.slot(idx) == Slot::Pending {
                t.slots.remove(&idx);
            }
        }
    }

    /// A chunk that was done or held turned out not to match its hash on disk: it is missing
    /// again, to be fetched once more. Returns whether it was present.
    pub fn lost(&mut self, file: u32, offset: u64) -> bool {
        let Some(len) = self.chunk_len(file, offset) else {
            return false;
        };
        let chunk_size = u64::from(self.chunk_size);
        let Some(Some(t)) = self.files.get_mut(file as usize) else {
            return false;
        };
        let idx = offset / chunk_size;
        let was_held = match t.slot(idx) {
            Slot::Done(_) => false,
            Slot::Held(_) => true,
            _ => return false,
        };
        self.held_bytes -= if was_held { u64::from(len) } else { 0 };
        let complete = t.missing == 0;
        t.slots.remove(&idx);
        t.missing += 1;
        self.missing_chunks += 1;
        self.bytes_done -= u64::from(len);
        self.files_done -= u64::from(complete);
        true
    }

    /// The hash of a chunk that is done or held.
    pub fn hash_of(&self, file: u32, offset: u64) -> Option<[u8; 32]> {
        self.chunk_len(file, offset)?;
        let t = self.files.get(file as usize)?.as_ref()?;
        match t.slot(offset / u64::from(self.chunk_size)) {
            Slot::Done(h) | Slot::Held(h) => Some(h),
            _ => None,
        }
    }

    /// Every chunk held from before the transfer, with its hash: what the final check reads
    /// back (a receiver reads each chunk it writes back as it writes it).
    pub fn held_chunks(&self) -> Vec<(u32, u64, [u8; 32])> {
        let cs = u64::from(self.chunk_size);
        let mut out = Vec::new();
        for (i, t) in self.files.iter().enumerate() {
            let Some(t) = t else { continue };
            for (&idx, slot) in &t.slots {
                if let Slot::Held(h) = slot {
                    out.push((i as u32, idx * cs, *h));
                }
            }
        }
        out.sort_unstable_by_key(|&(f, o, _)| (f, o));
        out
    }

    /// Up to `max` chunks that are neither done nor held nor in flight, in file order.
    pub fn missing(&self, max: usize) -> Vec<(u32, u64)> {
        let cs = u64::from(self.chunk_size);
        let mut out = Vec::new();
        for (i, t) in self.files.iter().enumerate() {
            let Some(t) = t else { continue };
            if t.missing == 0 {
                continue;
            }
            for idx in 0..t.chunks {
                if out.len() >= max {
                    return out;
                }
                if t.slot(idx) == Slot::Missing {
                    out.push((i as u32, idx * cs));
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
        let roots: Option<Vec<(u32, [u8; 32])>> = self
            .files
            .iter()
            .enumerate()
            .filter_map(|(i, f)| Some((i as u32, f.as_ref()?)))
            .map(|(i, f)| Some((i, f.root()?)))
            .collect();
        let roots = roots?;
        Some(tree_digest(roots.iter().map(|(i, r)| (*i, r))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{chunk_hash, file_root};
    use crate::manifest::tests::{dir, file};
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
            Manifest::from_entries(vec![dir(""), file("a", 5000), file("e", 0), dir("d")]).unwrap();
        let mut t = Tracker::new(&m, 4096);
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
        let mut t = Tracker::new(&m, 4096);
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
        assert_eq!(t.held_chunks(), vec![(1, 0, h0)]);
        // A chunk found damaged on disk is missing again.
        assert!(t.lost(1, 0));
        assert_eq!(t.held_bytes(), 0);
        assert!(!t.lost(1, 0));
        assert_eq!(t.missing(10), vec![(1, 0)]);
        assert_eq!(t.held_chunks(), vec![]);
        assert_eq!(t.hash_of(1, 4096), Some(h1));
        assert_eq!(t.digest(), None);
    }

    #[test]
    fn a_chunk_for_a_finished_file_is_not_counted_twice() {
        // Regression: a finished file's slots used to be dropped, so a chunk sent again was
        // admitted as new and the missing count underflowed.
        let m = Manifest::from_entries(vec![dir(""), file("a", 4096)]).unwrap();
        let mut t = Tracker::new(&m, 4096);
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
        let mut t = Tracker::new(&m, 4096);
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
}
