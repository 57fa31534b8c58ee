//! Reading and writing protocol frames on QUIC streams.

use bytes::{Bytes, BytesMut};
use mover_protocol::hash::ChunkHasher;
use mover_protocol::{Chunk, DecodeError, FrameHeader, Message, FRAME_HEADER_LEN};
use quinn::{RecvStream, SendStream};

use std::sync::Arc;

use crate::error::LinkError;
use crate::pool::{Pool, ALIGN};

/// One frame as it arrived: the raw bytes (to forward untouched) and its header.
pub struct RawFrame {
    pub header: FrameHeader,
    /// Header and body, exactly as received.
    pub bytes: Bytes,
}

impl RawFrame {
    pub fn decode(&self) -> Result<Message, DecodeError> {
        let mut body = self.bytes.slice(FRAME_HEADER_LEN..);
        Message::decode(self.header.kind, &mut body)
    }
}

/// Reads a frame header, or `None` at a clean end of stream (before its first byte).
async fn read_header(
    recv: &mut RecvStream,
    max_len: u32,
) -> Result<Option<([u8; FRAME_HEADER_LEN], FrameHeader)>, LinkError> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    match recv.read(&mut head[..1]).await? {
        None => return Ok(None),
        Some(0) => return Err(LinkError::Closed),
        Some(_) => {}
    }
    recv.read_exact(&mut head[1..]).await?;
    let header = FrameHeader::decode(&mut &head[..], max_len)?;
    Ok(Some((head, header)))
}

/// Reads the next frame, or `None` at a clean end of stream. `max_len` bounds the body before
/// anything is allocated for it.
pub async fn read_frame(
    recv: &mut RecvStream,
    max_len: u32,
) -> Result<Option<RawFrame>, LinkError> {
    let Some((head, header)) = read_header(recv, max_len).await? else {
        return Ok(None);
    };
    let mut buf = BytesMut::zeroed(FRAME_HEADER_LEN + header.len as usize);
    buf[..FRAME_HEADER_LEN].copy_from_slice(&head);
    recv.read_exact(&mut buf[FRAME_HEADER_LEN..]).await?;
    Ok(Some(RawFrame {
        header,
        bytes: buf.freeze(),
    }))
}

/// How much of a raw chunk's payload is read before that piece is hashed: small enough to
/// be hashed from the CPU's cache, large enough for BLAKE3's wide SIMD.
const HASH_PIECE: usize = 256 << 10;

/// Like [`read_frame`], but reads the frame into a buffer from `pool` (data streams). For a
/// raw chunk of a file whose size `file_size` knows, it also hashes the payload as it
/// arrives, one piece at a time while that piece is still in the CPU's cache (instead of
/// reading the whole chunk from memory again later), and returns that
/// [`chunk_hash`](mover_protocol::hash::chunk_hash) of the bytes received with the frame.
pub async fn read_frame_hashing(
    recv: &mut RecvStream,
    max_len: u32,
    pool: &Arc<Pool>,
    file_size: impl Fn(u32) -> Option<u64>,
) -> Result<Option<(RawFrame, Option<[u8; 32]>)>, LinkError> {
    let Some((head, header)) = read_header(recv, max_len).await? else {
        return Ok(None);
    };
    let len = FRAME_HEADER_LEN + header.len as usize;
    let payload_at = Chunk::payload_at(header.kind).filter(|at| *at <= len);
    // A chunk's payload lands on an ALIGN boundary (where the buffer has room for that), so
    // that raw data goes to disk with O_DIRECT from this very buffer, not from a copy.
    let pad = payload_at
        .map(|at| (ALIGN - at % ALIGN) % ALIGN)
        .filter(|pad| pad + len <= pool.capacity())
        .unwrap_or(0);
    let mut buf = pool.take_for_overwrite(pad + len);
    let frame = &mut buf[pad..pad + len];
    frame[..FRAME_HEADER_LEN].copy_from_slice(&head);
    let mut hashed = None;
    match payload_at {
        Some(at) => {
            recv.read_exact(&mut frame[FRAME_HEADER_LEN..at]).await?;
            let (prefix, payload) = frame.split_at_mut(at);
            let hasher = Chunk::raw_span(&prefix[FRAME_HEADER_LEN..])
                .filter(|(_, _, raw_len)| *raw_len as usize == payload.len())
                .and_then(|(file, offset, raw_len)| {
                    ChunkHasher::new(offset, u64::from(raw_len), file_size(file)?)
                });
            match hasher {
                Some(mut h) => {
                    for piece in payload.chunks_mut(HASH_PIECE) {
                        recv.read_exact(piece).await?;
                        h.update(piece);
                    }
                    hashed = h.finish();
                }
                None => recv.read_exact(payload).await?,
            }
        }
        None => recv.read_exact(&mut frame[FRAME_HEADER_LEN..]).await?,
    }
    let frame = RawFrame {
        header,
        bytes: buf.freeze().slice(pad..),
    };
    Ok(Some((frame, hashed)))
}

/// Reads and decodes the next message; the end of the stream is an error here.
pub async fn read_message(recv: &mut RecvStream, max_len: u32) -> Result<Message, LinkError> {
    match read_frame(recv, max_len).await? {
        Some(f) => Ok(f.decode()?),
        None => Err(LinkError::Closed),
    }
}

pub async fn write_message(send: &mut SendStream, msg: &Message) -> Result<(), LinkError> {
    send.write_all(&msg.to_frame()).await?;
    Ok(())
}

/// Writes pre-encoded pieces of one frame without copying them together.
pub async fn write_parts(send: &mut SendStream, parts: &[Bytes]) -> Result<(), LinkError> {
    let mut chunks: Vec<Bytes> = parts.to_vec();
    send.write_all_chunks(&mut chunks).await?;
    Ok(())
}
