//! Per-chunk records kept outside the process's memory.
//!
//! What a node learns about each chunk before data flows (which chunks the targets already
//! hold, with what hashes) grows with the dataset: kept in memory, a reseed of tens of TiB
//! onto older copies would cost hundreds of MiB per agent. A [`Table`] keeps fixed-size
//! records at a place computed from the chunk's index in the whole manifest
//! ([`ChunkIndex`]), so a record is found with one read and never needs a map or a sort.
//! Agents keep tables in unlinked files (the kernel's page cache holds what is hot, and a
//! crash leaves nothing behind); tests keep them in memory ([`MemTable`]).

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::hash::chunk_count;
use crate::manifest::{EntryKind, Manifest, ManifestError, BLOCK};

/// Bytes at positions, as a file gives them. Bytes never written read as zeros.
pub trait Table: Send + Sync + fmt::Debug {
    /// Fills `out` with the bytes from `pos` on.
    fn read_at(&self, pos: u64, out: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `pos`.
    fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()>;
}

/// A table in memory: for tests, and for callers with nowhere to put a file.
#[derive(Debug, Default)]
pub struct MemTable(Mutex<Vec<u8>>);

impl Table for MemTable {
    fn read_at(&self, pos: u64, out: &mut [u8]) -> io::Result<()> {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        out.fill(0);
        let start = usize::try_from(pos).unwrap_or(usize::MAX).min(bytes.len());
        let end = start.saturating_add(out.len()).min(bytes.len());
        out[..end - start].copy_from_slice(&bytes[start..end]);
        Ok(())
    }

    fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        let mut bytes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let start = usize::try_from(pos).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start + data.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(data);
        Ok(())
    }
}

/// Each chunk's index in the whole manifest: the chunks of entry 0, then of entry 1, and so
/// on (entries that are not files have none). Eight bytes per block of the manifest's
/// entries ([`BLOCK`]); a file's first chunk adds up the sizes before it in its block.
#[derive(Debug, Clone)]
pub struct ChunkIndex {
    chunk_size: u64,
    manifest: Manifest,
    /// The index of each block's first chunk, and the total after the last.
    first: Vec<u64>,
}

impl ChunkIndex {
    /// Reads `manifest` through once.
    pub fn new(manifest: &Manifest, chunk_size: u32) -> Result<Self, ManifestError> {
        let mut first = Vec::with_capacity(manifest.len().div_ceil(BLOCK) + 1);
        let mut next = 0u64;
        for (i, e) in manifest.iter().enumerate() {
            if i % BLOCK == 0 {
                first.push(next);
            }
            if let EntryKind::File { size } = e?.kind {
                next = next.saturating_add(chunk_count(size, chunk_size));
            }
        }
        first.push(next);
        Ok(Self {
            chunk_size: u64::from(chunk_size.max(1)),
            manifest: manifest.clone(),
            first,
        })
    }

    /// The index of the chunk of `file` at `offset`; `None` unless `offset` is the start of a
    /// chunk of that file.
    pub fn index(&self, file: u32, offset: u64) -> Option<u64> {
        let range = self.chunks_of(file);
        if offset % self.chunk_size != 0 {
            return None;
        }
        let i = range.start.checked_add(offset / self.chunk_size)?;
        (i < range.end).then_some(i)
    }

    /// The indices of `file`'s chunks (empty for an entry that is not a file, none at all,
    /// or one the manifest cannot read back).
    pub fn chunks_of(&self, file: u32) -> Range<u64> {
        let f = file as usize;
        let (Ok((block, at)), Some(&start)) =
            (self.manifest.block_of(f), self.first.get(f / BLOCK))
        else {
            return 0..0;
        };
        let chunks =
            |e: &crate::manifest::Entry| e.file_size().map_or(0, |s| s.div_ceil(self.chunk_size));
        let a = block[..at]
            .iter()
            .fold(start, |acc, e| acc.saturating_add(chunks(e)));
        a..a.saturating_add(chunks(&block[at]))
    }

    /// Chunks in the whole manifest.
    pub fn total(&self) -> u64 {
        self.first.last().copied().unwrap_or(0)
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }
}

/// Chunks' full hashes by place: 32 bytes at each chunk's index in the manifest. What a
/// receiver keeps for the chunks it holds from before a transfer.
#[derive(Debug, Clone)]
pub struct Hashes {
    index: ChunkIndex,
    table: Arc<dyn Table>,
}

impl Hashes {
    pub fn new(index: ChunkIndex, table: Arc<dyn Table>) -> Self {
        Self { index, table }
    }

    pub fn index(&self) -> &ChunkIndex {
        &self.index
    }

    pub fn table(&self) -> Arc<dyn Table> {
        self.table.clone()
    }

    /// Keeps the hash of the chunk of `file` at `offset`.
    pub fn put(&self, file: u32, offset: u64, hash: &[u8; 32]) -> io::Result<()> {
        let i = self.index.index(file, offset).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("file {file} has no chunk at offset {offset}"),
            )
        })?;
        self.table.write_at(i * 32, hash)
    }

    /// The hash kept for the chunk of `file` at `offset`; `None` if that is not a chunk or
    /// the table cannot be read.
    pub fn get(&self, file: u32, offset: u64) -> Option<[u8; 32]> {
        let i = self.index.index(file, offset)?;
        let mut h = [0u8; 32];
        self.table.read_at(i * 32, &mut h).ok()?;
        Some(h)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::manifest::tests::{dir, file};

    #[test]
    fn chunks_are_numbered_through_the_manifest_and_only_at_chunk_starts() {
        let m = Manifest::from_entries(vec![
            dir(""),
            file("a", 10_000),
            dir("d"),
            file("d/e", 0),
            file("d/f", 4096),
        ])
        .unwrap();
        let ix = ChunkIndex::new(&m, 4096).unwrap();
        assert_eq!(ix.total(), 4);
        assert_eq!(ix.chunks_of(1), 0..3);
        assert_eq!(ix.chunks_of(2), 3..3);
        assert_eq!(ix.chunks_of(3), 3..3);
        assert_eq!(ix.chunks_of(4), 3..4);
        assert_eq!(ix.chunks_of(9), 0..0);
        assert_eq!(ix.index(1, 0), Some(0));
        assert_eq!(ix.index(1, 8192), Some(2));
        assert_eq!(ix.index(1, 12288), None, "past the end of the file");
        assert_eq!(ix.index(1, 100), None, "not a chunk start");
        assert_eq!(ix.index(3, 0), None, "an empty file has no chunk");
        assert_eq!(ix.index(4, 0), Some(3));
        assert_eq!(ix.index(0, 0), None, "a directory has no chunk");
        assert_eq!(ix.index(u32::MAX, 0), None);
    }

    #[test]
    fn hashes_go_to_their_chunk_s_place_and_only_chunks_have_one() {
        let m = Manifest::from_entries(vec![dir(""), file("a", 10_000), file("b", 4096)]).unwrap();
        let table = Arc::new(MemTable::default());
        let h = Hashes::new(ChunkIndex::new(&m, 4096).unwrap(), table.clone());
        h.put(2, 0, &[7; 32]).unwrap();
        h.put(1, 4096, &[5; 32]).unwrap();
        assert_eq!(h.get(2, 0), Some([7; 32]));
        assert_eq!(h.get(1, 4096), Some([5; 32]));
        assert_eq!(h.get(1, 0), Some([0; 32]), "never written");
        let mut at = [0u8; 32];
        table.read_at(3 * 32, &mut at).unwrap();
        assert_eq!(at, [7; 32], "b's chunk follows a's three");
        assert!(h.put(1, 100, &[1; 32]).is_err(), "not a chunk start");
        assert!(h.put(0, 0, &[1; 32]).is_err(), "a directory");
        assert_eq!(h.get(1, 3 * 4096), None, "past the end of the file");
    }

    #[test]
    fn a_memory_table_reads_zeros_where_nothing_was_written() {
        let t = MemTable::default();
        t.write_at(4, &[1, 2]).unwrap();
        let mut out = [9u8; 8];
        t.read_at(2, &mut out).unwrap();
        assert_eq!(out, [0, 0, 1, 2, 0, 0, 0, 0]);
        t.read_at(1 << 40, &mut out).unwrap();
        assert_eq!(out, [0; 8]);
    }
}
