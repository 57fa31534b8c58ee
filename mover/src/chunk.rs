//! Turning file bytes into chunk frames and back: hash, compress, decompress, verify.
//!
//! Pure CPU work, called from blocking worker threads. Compression contexts are reused per
//! thread, so no chunk allocates one.

use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;
use mover_protocol::hash::chunk_hash;
use mover_protocol::{Chunk, Encoding};

use crate::error::ChunkCodecError;
use crate::pool::{Pool, PoolBuf};

/// Capacity of a transfer's pooled buffers: a whole chunk frame fits in one.
pub fn buffer_capacity(chunk_size: u32) -> usize {
    chunk_size as usize + 4096
}

/// What the chunks a node works on at once (read or received, and encoded or decoded: two
/// buffers each) may add up to, whatever its core count.
pub const CHUNK_BUDGET: usize = 64 << 20;

/// How many chunks of `chunk_size` a node works on at once within [`CHUNK_BUDGET`]: 8 of the
/// default 4 MiB; never fewer than 2.
pub fn budget(chunk_size: u32) -> usize {
    (CHUNK_BUDGET / (2 * (chunk_size as usize).max(1))).max(2)
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Hashes and (when `level` is not 0 and it helps) compresses one chunk read into `data`; a
/// raw chunk's payload is `data` itself. `level` is zstd's: 1 to 19, or below 0 for its
/// fast levels.
pub fn encode(
    file: u32,
    offset: u64,
    file_size: u64,
    data: Bytes,
    level: i32,
    pool: &Arc<Pool>,
) -> Chunk {
    let hash = chunk_hash(&data, offset, file_size);
    let raw_len = data.len() as u32;
    // Keep raw unless zstd saves at least 1/32: decompression is not free either.
    let limit = data.len() - data.len() / 32;
    let compressed = (level != 0)
        .then(|| compress(&data, level, pool, limit))
        .flatten();
    let (encoding, payload) = match compressed {
        Some(c) => (Encoding::Zstd, c.freeze()),
        None => (Encoding::Raw, data),
    };
    Chunk {
        file,
        offset,
        raw_len,
        encoding,
        hash,
        payload,
    }
}

/// Compresses into a pooled buffer; `None` when the result would not be under `limit` bytes.
fn compress(data: &[u8], level: i32, pool: &Arc<Pool>, limit: usize) -> Option<PoolBuf> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        match slot.as_mut() {
            // Automatic compression switches levels chunk by chunk: the context and its
            // tables are kept, only the level changes.
            Some((l, c)) if *l != level => {
                c.set_compression_level(level).ok()?;
                *l = level;
            }
            Some(_) => {}
            None => *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?)),
        }
        let (_, c) = slot.as_mut()?;
        // A destination of `limit` bytes makes zstd give up on data that will not shrink
        // enough, instead of compressing it all for nothing.
        // Its bytes are all overwritten or cut off: no need to clear them first.
        let mut out = pool.take_for_overwrite(limit.min(pool.capacity()));
        let n = c.compress_to_buffer(data, &mut out[..]).ok()?;
        out.truncate(n);
        // The frame waits in QUIC's send buffer until acknowledged: in a buffer of its own
        // size, not one of the chunk's (a copy of what was written, cheaper than the clearing
        // of the larger buffer that this used to cost).
        (n < limit).then(|| pool.fit(out))
    })
}

/// Decompresses a chunk and checks it against its hash. Returns the raw bytes.
pub fn decode(c: &Chunk, file_size: u64, pool: &Arc<Pool>) -> Result<Bytes, ChunkCodecError> {
    let raw = decompress(c, pool)?;
    if chunk_hash(&raw, c.offset, file_size) != c.hash {
        return Err(ChunkCodecError::HashMismatch { offset: c.offset });
    }
    Ok(raw)
}

/// Decompresses a chunk to its declared raw length, without checking its hash: for a caller
/// that checks the bytes where they land (a receiver hashes each chunk as it reads it back
/// from staging, which also catches whatever this would have).
pub fn decompress(c: &Chunk, pool: &Arc<Pool>) -> Result<Bytes, ChunkCodecError> {
    let raw = match c.encoding {
        Encoding::Raw => c.payload.clone(),
        Encoding::Zstd => DECOMPRESSOR.with(|cell| {
            let err = |reason: String| ChunkCodecError::Decompress {
                offset: c.offset,
                reason,
            };
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| err(e.to_string()))?);
            }
            let d = slot.as_mut().ok_or_else(|| err("no decompressor".into()))?;
            // The output is at most the declared raw length, already bounded by the chunk
            // size: a payload that inflates further is refused, not buffered.
            let mut out = pool.take_for_overwrite(c.raw_len as usize);
            let n = d
                .decompress_to_buffer(&c.payload, &mut out[..])
                .map_err(|e| err(e.to_string()))?;
            out.truncate(n);
            Ok::<_, ChunkCodecError>(out.freeze())
        })?,
    };
    if raw.len() != c.raw_len as usize {
        return Err(ChunkCodecError::Length {
            offset: c.offset,
            len: raw.len(),
            expected: c.raw_len,
        });
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chunk_budget_bounds_chunks_at_work() {
        assert_eq!(budget(mover_protocol::DEFAULT_CHUNK_SIZE), 8);
        assert_eq!(budget(1 << 20), 32);
        for size in [64 << 10, 1 << 20, 4 << 20, 16 << 20] {
            assert!(budget(size) * 2 * size as usize <= CHUNK_BUDGET, "{size}");
        }
        // However large a chunk, two may be at work (one read while one is sent).
        assert_eq!(budget(64 << 20), 2);
    }

    fn pooled(pool: &Arc<Pool>, data: &[u8]) -> Bytes {
        let mut b = pool.take(data.len());
        b.copy_from_slice(data);
        b.freeze()
    }

    #[test]
    fn levels_change_chunk_by_chunk_on_one_thread() {
        // Automatic compression moves between the transfer's level and zstd's fast one for
        // consecutive chunks; the thread's one context must follow each change.
        let pool = Pool::new(buffer_capacity(1 << 20), 8);
        let mut data = Vec::new();
        let mut x = 1u32;
        while data.len() < 1 << 20 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let word = ["alpha", "beta", "gamma", "delta", "epsilon"][(x >> 16) as usize % 5];
            data.extend_from_slice(format!("{word}{} ", (x >> 8) % 1000).as_bytes());
        }
        let size = data.len() as u64;
        let mut lens = Vec::new();
        for level in [1, FAST, 1, FAST, 0] {
            let c = encode(0, 0, size, pooled(&pool, &data), level, &pool);
            assert_eq!(decode(&c, size, &pool).unwrap(), data, "level {level}");
            lens.push(c.payload.len());
        }
        assert_eq!(lens[0], lens[2], "level 1 again gives level 1's output");
        assert_eq!(lens[1], lens[3]);
        assert_ne!(lens[0], lens[1], "the fast level is a different level");
        assert!(
            lens[1] < data.len() / 2,
            "the fast level still compresses: {lens:?}"
        );
        assert_eq!(lens[4], data.len());
    }

    const FAST: i32 = -1;

    #[test]
    fn round_trips_compressible_and_random_data() {
        let pool = Pool::new(buffer_capacity(1 << 17), 8);
        let text = "select * from t where id = 1;\n".repeat(3000).into_bytes();
        let c = encode(0, 0, text.len() as u64, pooled(&pool, &text), 1, &pool);
        assert_eq!(c.encoding, Encoding::Zstd);
        assert!(c.payload.len() < text.len() / 4);
        assert_eq!(decode(&c, text.len() as u64, &pool).unwrap(), text);

        let noise: Vec<u8> = (0..70_000).map(|_| fastrand::u8(..)).collect();
        let c = encode(0, 0, noise.len() as u64, pooled(&pool, &noise), 3, &pool);
        assert_eq!(c.encoding, Encoding::Raw, "incompressible data goes raw");
        assert_eq!(decode(&c, noise.len() as u64, &pool).unwrap(), noise);
        drop(c);
        assert!(pool.idle() > 0, "buffers went back to the pool");
    }

    #[test]
    fn detects_a_flipped_bit() {
        let pool = Pool::new(buffer_capacity(1 << 16), 8);
        let mut c = encode(0, 0, 65536, pooled(&pool, &[7u8; 65536]), 0, &pool);
        let mut p = c.payload.to_vec();
        p[100] ^= 1;
        c.payload = p.into();
        assert!(matches!(
            decode(&c, 65536, &pool),
            Err(ChunkCodecError::HashMismatch { .. })
        ));
        // Without the check the damaged bytes come out as they are, for the caller to hash.
        let raw = decompress(&c, &pool).unwrap();
        assert_eq!(raw.len(), 65536);
        assert_ne!(chunk_hash(&raw, 0, 65536), c.hash);
    }

    #[test]
    fn refuses_a_zstd_bomb_beyond_the_declared_length() {
        let pool = Pool::new(buffer_capacity(1 << 20), 8);
        let mut c = encode(0, 0, 1 << 20, pool.take(1 << 20).freeze(), 1, &pool);
        assert_eq!(c.encoding, Encoding::Zstd);
        c.raw_len = 1000;
        assert!(decode(&c, 1 << 20, &pool).is_err());
        assert!(decompress(&c, &pool).is_err());
    }
}
