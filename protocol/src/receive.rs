//! What a receiver tracks: which chunks it expects, which arrived, which were verified.
//!
//! The tracker is fed chunk headers before their payloads are decoded (so that a frame for a
//! file that is not in the manifest, at an offset that is not a chunk boundary, with the wrong
//! length, or sent twice, is refused before any work or write) and the result of each
//! verification. It knows when every file is complete and gives each file's root hash.

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
    #[error("accept chunk: chunk at {offset} of {path} was sent twice")]
    Duplicate { path: String, offset: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Missing,
    Pending,
    Done([u8; 32]),
}

/// A file's chunks. Only chunks that arrived take memory, so a manifest that declares a huge
/// file costs nothing until its data really comes.
#[derive(Debug)]
struct FileTrack {
    size: u64,
    chunks: u64,
    slots: HashMap<u64, Slot>,
    missing: u64,
    root: Option<[u8; 32]>,
}

impl FileTrack {
    fn slot(&self, idx: u64) -> Slot {
        self.slots.get(&idx).copied().unwrap_or(Slot::Missing)
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
                    let root = (n == 0).then(|| file_root(&[]));
                    files_done += u64::from(n == 0);
                    Some(FileTrack {
                        size,
                        chunks: n,
                        slots: HashMap::new(),
                        missing: n,
                        root,
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
        }
    }

    fn path(&self, file: u32) -> String {
        display_path(&self.paths[file as usize])
    }

    /// Checks a chunk's header against the manifest and marks it as being processed.
    pub fn admit(&mut self, c: &Chunk) -> Result<(), ChunkError> {
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
        if track.slot(idx) != Slot::Missing {
            return Err(ChunkError::Duplicate {
                path: self.path(c.file),
                offset: c.offset,
            });
        }
        track.slots.insert(idx, Slot::Pending);
        Ok(())
    }

    /// Records a chunk whose bytes matched `hash` and are written. Returns the file's root
    /// hash when this was its last missing chunk.
    pub fn verified(&mut self, file: u32, offset: u64, hash: [u8; 32]) -> Option<[u8; 32]> {
        let chunk_size = u64::from(self.chunk_size);
        let track = self.files.get_mut(file as usize)?.as_mut()?;
        let idx = offset / chunk_size;
        if track.slot(idx) != Slot::Pending {
            return None;
        }
        track.slots.insert(idx, Slot::Done(hash));
        track.missing -= 1;
        self.missing_chunks -= 1;
        self.bytes_done += (track.size - offset).min(chunk_size);
        if track.missing > 0 {
            return None;
        }
        let hashes: Vec<[u8; 32]> = (0..track.chunks)
            .filter_map(|i| match track.slot(i) {
                Slot::Done(h) => Some(h),
                _ => None,
            })
            .collect();
        // Done with this file: its slots are no longer needed.
        track.slots = HashMap::new();
        let root = file_root(&hashes);
        track.root = Some(root);
        self.files_done += 1;
        Some(root)
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
        let roots = self
            .files
            .iter()
            .enumerate()
            .filter_map(|(i, f)| Some((i as u32, f.as_ref()?.root.as_ref()?)));
        Some(tree_digest(roots))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::chunk_hash;
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
        t.admit(&chunk(1, 4096, 904)).unwrap();
        assert_eq!(
            t.verified(1, 4096, chunk_hash(&data[4096..], 4096, 5000)),
            None
        );
        t.admit(&chunk(1, 0, 4096)).unwrap();
        let root = t
            .verified(1, 0, chunk_hash(&data[..4096], 0, 5000))
            .unwrap();
        assert_eq!(root, *blake3::hash(&data).as_bytes());
        assert!(t.is_complete());
        assert_eq!(t.bytes_done(), 5000);
        assert!(t.digest().is_some());
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
