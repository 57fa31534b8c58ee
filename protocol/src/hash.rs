//! Chunk hashes that combine into a file's BLAKE3 root, equal to what `b3sum` prints.
//!
//! Chunks are a power of two long (at least 1 KiB, BLAKE3's own chunk), so each chunk is a
//! whole subtree of the file's BLAKE3 tree. A chunk frame carries that subtree's chaining value
//! (or, for a file of a single chunk, the root hash itself); a receiver checks each chunk
//! against it, and merges the verified values into the root without reading the file again.

use blake3::hazmat::{
    max_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

/// The value a chunk frame carries for `data` at `offset` of a file of `file_size` bytes.
pub fn chunk_hash(data: &[u8], offset: u64, file_size: u64) -> [u8; 32] {
    if offset == 0 && data.len() as u64 == file_size {
        return *blake3::hash(data).as_bytes();
    }
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(data);
    h.finalize_non_root()
}

/// BLAKE3's own chunk: a subtree starts on a multiple of it.
const BLAKE3_CHUNK: u64 = 1024;

/// [`chunk_hash`] over bytes that arrive in pieces: for a receiver that hashes each piece of
/// a chunk as it lands, while it is still in the CPU's cache. Built from what a peer claims
/// before anything checked it, so it never panics: a span that is no chunk of the file
/// simply has no value.
pub struct ChunkHasher {
    hasher: blake3::Hasher,
    /// The chunk is the whole file: its value is the root hash.
    whole: bool,
    /// Bytes still to come.
    left: u64,
}

impl ChunkHasher {
    /// For a chunk of `len` bytes at `offset` of a file of `file_size` bytes; `None` unless
    /// that span can be a chunk (the whole file, or a non-empty BLAKE3 subtree).
    pub fn new(offset: u64, len: u64, file_size: u64) -> Option<Self> {
        let whole = offset == 0 && len == file_size;
        let mut hasher = blake3::Hasher::new();
        if !whole {
            // In this order: BLAKE3 asks the first before it answers the last.
            let chunk = len > 0
                && offset % BLAKE3_CHUNK == 0
                && max_subtree_len(offset).is_none_or(|max| len <= max);
            if !chunk {
                return None;
            }
            hasher.set_input_offset(offset);
        }
        Some(Self {
            hasher,
            whole,
            left: len,
        })
    }

    /// Hashes the next piece; pieces past the declared length leave the chunk without a
    /// value.
    pub fn update(&mut self, piece: &[u8]) {
        match self.left.checked_sub(piece.len() as u64) {
            Some(left) => {
                self.hasher.update(piece);
                self.left = left;
            }
            None => self.left = u64::MAX,
        }
    }

    /// The chunk's value, once exactly its declared length was hashed.
    pub fn finish(&self) -> Option<[u8; 32]> {
        if self.left != 0 {
            None
        } else if self.whole {
            Some(*self.hasher.finalize().as_bytes())
        } else {
            Some(self.hasher.finalize_non_root())
        }
    }
}

/// The root hash of a file from its chunks' values, in order. `chunk_hashes` must hold
/// `chunk_count(file_size, chunk_size)` values made by [`chunk_hash`].
pub fn file_root(chunk_hashes: &[[u8; 32]]) -> [u8; 32] {
    match chunk_hashes {
        [] => *blake3::hash(b"").as_bytes(),
        [only] => *only,
        many => {
            let (l, r) = split(many);
            *merge_subtrees_root(&subtree(l), &subtree(r), Mode::Hash).as_bytes()
        }
    }
}

/// BLAKE3 puts the largest power of two of whole chunks that leaves at least one byte to the
/// right into the left subtree; with equal power-of-two chunks that is the largest power of
/// two below the chunk count.
fn split(cvs: &[[u8; 32]]) -> (&[[u8; 32]], &[[u8; 32]]) {
    let n = cvs.len();
    let left = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
    cvs.split_at(left)
}

/// The chaining value of a run of consecutive chunks that starts on a multiple of its own
/// length rounded up to a power of two chunks, and is not the whole file: what the file's
/// tree holds for that run, so that a receiver can keep one value for the run in place of
/// one per chunk. `cvs` must not be empty.
pub(crate) fn subtree_cv(cvs: &[[u8; 32]]) -> [u8; 32] {
    subtree(cvs)
}

fn subtree(cvs: &[[u8; 32]]) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (l, r) = split(cvs);
    merge_subtrees_non_root(&subtree(l), &subtree(r), Mode::Hash)
}

/// How many chunks a file of `size` bytes is cut into (zero for an empty file).
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size))
}

/// Digest over a whole transfer's file roots, in manifest order, so two hops can compare what
/// they hold with one value.
pub fn tree_digest<'a>(roots: impl IntoIterator<Item = (u32, &'a [u8; 32])>) -> [u8; 32] {
    let mut d = TreeDigest::default();
    for (file, root) in roots {
        d.add(file, root);
    }
    d.finish()
}

/// [`tree_digest`] fed one file at a time, in manifest order, so that a root need not be kept
/// once it is in.
#[derive(Debug, Clone, Default)]
pub struct TreeDigest(blake3::Hasher);

impl TreeDigest {
    pub fn add(&mut self, file: u32, root: &[u8; 32]) {
        self.0.update(&file.to_be_bytes());
        self.0.update(root);
    }

    pub fn finish(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_by_chunks(data: &[u8], chunk: usize) -> [u8; 32] {
        let cvs: Vec<_> = data
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| chunk_hash(c, (i * chunk) as u64, data.len() as u64))
            .collect();
        file_root(&cvs)
    }

    #[test]
    fn a_chunk_hashed_in_pieces_has_the_value_of_one_hashed_whole() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 11 + i / 7) as u8).collect();
        // A chunk inside a file, and a chunk that is the whole file.
        for (offset, len, size) in [(16_384u64, 16_384usize, 70_000u64), (0, 70_000, 70_000)] {
            let chunk = &data[offset as usize..offset as usize + len];
            let whole = chunk_hash(chunk, offset, size);
            for piece in [1usize, 1000, 1024, 4096, 10_000] {
                let mut h = ChunkHasher::new(offset, len as u64, size).expect("a chunk");
                for p in chunk.chunks(piece) {
                    h.update(p);
                }
                assert_eq!(h.finish(), Some(whole), "offset {offset} piece {piece}");
            }
        }
        // Fewer or more bytes than declared: no value.
        let mut h = ChunkHasher::new(16_384, 16_384, 70_000).expect("a chunk");
        h.update(&data[..16_383]);
        assert_eq!(h.finish(), None, "short");
        h.update(&data[..2]);
        assert_eq!(h.finish(), None, "long");
        h.update(&data[..1]);
        assert_eq!(h.finish(), None, "still long");
        // Spans a peer may claim that are no chunk: never a panic, no hasher.
        for (offset, len, size) in [
            (1000u64, 1024u64, 70_000u64), // not on a BLAKE3 chunk boundary
            (16_384, 0, 70_000),           // empty, not the whole file
            (16_384, 32_768, 70_000),      // more than the subtree at that offset holds
        ] {
            assert!(
                ChunkHasher::new(offset, len, size).is_none(),
                "{offset} {len} {size}"
            );
        }
        let mut empty = ChunkHasher::new(0, 0, 0).expect("an empty file is one chunk");
        empty.update(&[]);
        assert_eq!(empty.finish(), Some(*blake3::hash(b"").as_bytes()));
        assert_eq!(
            chunk_hash(&data, 0, 70_000),
            *blake3::hash(&data).as_bytes()
        );
        assert_ne!(
            chunk_hash(&data[..16_384], 0, 70_000),
            *blake3::hash(&data[..16_384]).as_bytes(),
            "a chunk that is not the whole file is not hashed as a root"
        );
    }

    #[test]
    fn roots_equal_plain_blake3_for_every_shape() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for chunk in [1024usize, 2048, 4096, 16384] {
            for len in [
                0, 1, 1023, 1024, 1025, 4096, 5000, 8192, 9000, 33_000, 65_536, 70_000,
            ] {
                let d = &data[..len];
                assert_eq!(
                    root_by_chunks(d, chunk),
                    *blake3::hash(d).as_bytes(),
                    "chunk {chunk} len {len}"
                );
            }
        }
    }

    #[test]
    fn a_changed_byte_changes_the_chunk_hash() {
        let mut d = vec![5u8; 8192];
        let before = chunk_hash(&d[4096..], 4096, 8192);
        d[5000] ^= 1;
        assert_ne!(before, chunk_hash(&d[4096..], 4096, 8192));
    }

    #[test]
    fn chunk_count_rounds_up() {
        assert_eq!(chunk_count(0, 4096), 0);
        assert_eq!(chunk_count(1, 4096), 1);
        assert_eq!(chunk_count(4096, 4096), 1);
        assert_eq!(chunk_count(4097, 4096), 2);
    }
}
