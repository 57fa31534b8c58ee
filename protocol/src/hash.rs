//! Chunk hashes that combine into a file's BLAKE3 root, equal to what `b3sum` prints.
//!
//! Chunks are a power of two long (at least 1 KiB, BLAKE3's own chunk), so each chunk is a
//! whole subtree of the file's BLAKE3 tree. A chunk frame carries that subtree's chaining value
//! (or, for a file of a single chunk, the root hash itself); a receiver checks each chunk
//! against it, and merges the verified values into the root without reading the file again.

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
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
    let mut h = blake3::Hasher::new();
    for (file, root) in roots {
        h.update(&file.to_be_bytes());
        h.update(root);
    }
    *h.finalize().as_bytes()
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
