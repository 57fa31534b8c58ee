//! Turning file bytes into chunk frames and back: hash, compress, decompress, verify.
//!
//! Pure CPU work, called from blocking worker threads. Compression contexts are reused per
//! thread, so no chunk allocates one.

use std::cell::RefCell;

use bytes::Bytes;
use mover_protocol::hash::chunk_hash;
use mover_protocol::{Chunk, Encoding};

use crate::error::ChunkCodecError;

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Hashes and (when `level > 0` and it helps) compresses one chunk.
pub fn encode(file: u32, offset: u64, file_size: u64, data: Bytes, level: u8) -> Chunk {
    let hash = chunk_hash(&data, offset, file_size);
    let raw_len = data.len() as u32;
    let compressed = (level > 0)
        .then(|| compress(&data, i32::from(level)))
        .flatten()
        // Keep raw unless zstd saves at least 1/32: decompression is not free either.
        .filter(|c| c.len() < data.len() - data.len() / 32);
    let (encoding, payload) = match compressed {
        Some(c) => (Encoding::Zstd, Bytes::from(c)),
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

fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, c) = slot.as_mut()?;
        c.compress(data).ok()
    })
}

/// Decompresses a chunk and checks it against its hash. Returns the raw bytes.
pub fn decode(c: &Chunk, file_size: u64) -> Result<Bytes, ChunkCodecError> {
    let raw = match c.encoding {
        Encoding::Raw => c.payload.clone(),
        Encoding::Zstd => DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| {
                    ChunkCodecError::Decompress {
                        offset: c.offset,
                        reason: e.to_string(),
                    }
                })?);
            }
            let d = slot.as_mut().ok_or(ChunkCodecError::Decompress {
                offset: c.offset,
                reason: "no decompressor".into(),
            })?;
            // The capacity is the declared raw length, already bounded by the chunk size.
            let out = d.decompress(&c.payload, c.raw_len as usize).map_err(|e| {
                ChunkCodecError::Decompress {
                    offset: c.offset,
                    reason: e.to_string(),
                }
            })?;
            Ok::<_, ChunkCodecError>(Bytes::from(out))
        })?,
    };
    if raw.len() != c.raw_len as usize {
        return Err(ChunkCodecError::Length {
            offset: c.offset,
            len: raw.len(),
            expected: c.raw_len,
        });
    }
    if chunk_hash(&raw, c.offset, file_size) != c.hash {
        return Err(ChunkCodecError::HashMismatch { offset: c.offset });
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_compressible_and_random_data() {
        let text = Bytes::from("select * from t where id = 1;\n".repeat(3000));
        let c = encode(0, 0, text.len() as u64, text.clone(), 1);
        assert_eq!(c.encoding, Encoding::Zstd);
        assert!(c.payload.len() < text.len() / 4);
        assert_eq!(decode(&c, text.len() as u64).unwrap(), text);

        let noise: Bytes = (0..70_000)
            .map(|_| fastrand::u8(..))
            .collect::<Vec<_>>()
            .into();
        let c = encode(0, 0, noise.len() as u64, noise.clone(), 3);
        assert_eq!(c.encoding, Encoding::Raw, "incompressible data goes raw");
        assert_eq!(decode(&c, noise.len() as u64).unwrap(), noise);
    }

    #[test]
    fn detects_a_flipped_bit() {
        let data = Bytes::from(vec![7u8; 65536]);
        let mut c = encode(0, 0, 65536, data, 0);
        let mut p = c.payload.to_vec();
        p[100] ^= 1;
        c.payload = p.into();
        assert!(matches!(
            decode(&c, 65536),
            Err(ChunkCodecError::HashMismatch { .. })
        ));
    }

    #[test]
    fn refuses_a_zstd_bomb_beyond_the_declared_length() {
        let big = Bytes::from(vec![0u8; 1 << 20]);
        let mut c = encode(0, 0, 1 << 20, big, 1);
        c.raw_len = 1000;
        assert!(decode(&c, 1 << 20).is_err());
    }
}
