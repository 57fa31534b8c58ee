//! Frame header and the small decoding helpers every message uses.
//!
//! A frame on a stream is `kind: u8, len: u32 (big endian), body: len bytes`. Lengths are checked
//! against a caller-supplied bound *before* anything is allocated, and every read checks that
//! the bytes are there, so decoding never panics and never over-allocates.

use bytes::{Buf, BufMut, Bytes};

/// Bytes in a frame header: kind (1) + body length (4).
pub const FRAME_HEADER_LEN: usize = 5;

/// The largest body any frame may have: the largest chunk plus room for its header fields.
pub const MAX_FRAME_LEN: u32 = crate::MAX_CHUNK_SIZE + 1024;

/// Why a frame or message could not be decoded. Never retryable: the peer sent bad bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("decode frame: truncated, {what} needs {need} more bytes")]
    Truncated { what: &'static str, need: usize },
    #[error("decode frame: {what} is {len} but at most {max} is allowed")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("decode frame: unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("decode frame: {what} is invalid: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("decode frame: peer speaks protocol version {peer}, this build speaks {ours}")]
    Version { peer: u16, ours: u16 },
    #[error("decode frame: {extra} unexpected bytes after the {what} message")]
    Trailing { what: &'static str, extra: usize },
}

/// The header in front of every frame body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub len: u32,
}

impl FrameHeader {
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(self.kind);
        buf.put_u32(self.len);
    }

    /// Decodes a header and refuses a body longer than `max_len` before anyone allocates it.
    pub fn decode(buf: &mut impl Buf, max_len: u32) -> Result<Self, DecodeError> {
        need(buf, FRAME_HEADER_LEN, "frame header")?;
        let kind = buf.get_u8();
        let len = buf.get_u32();
        if len > max_len {
            return Err(DecodeError::TooLarge {
                what: "frame body",
                len: len.into(),
                max: max_len.into(),
            });
        }
        Ok(Self { kind, len })
    }
}

pub(crate) fn need(buf: &impl Buf, n: usize, what: &'static str) -> Result<(), DecodeError> {
    if buf.remaining() < n {
        return Err(DecodeError::Truncated {
            what,
            need: n - buf.remaining(),
        });
    }
    Ok(())
}

pub(crate) fn get_u8(buf: &mut impl Buf, what: &'static str) -> Result<u8, DecodeError> {
    need(buf, 1, what)?;
    Ok(buf.get_u8())
}

pub(crate) fn get_u16(buf: &mut impl Buf, what: &'static str) -> Result<u16, DecodeError> {
    need(buf, 2, what)?;
    Ok(buf.get_u16())
}

pub(crate) fn get_u32(buf: &mut impl Buf, what: &'static str) -> Result<u32, DecodeError> {
    need(buf, 4, what)?;
    Ok(buf.get_u32())
}

pub(crate) fn get_u64(buf: &mut impl Buf, what: &'static str) -> Result<u64, DecodeError> {
    need(buf, 8, what)?;
    Ok(buf.get_u64())
}

pub(crate) fn get_i64(buf: &mut impl Buf, what: &'static str) -> Result<i64, DecodeError> {
    need(buf, 8, what)?;
    Ok(buf.get_i64())
}

pub(crate) fn get_hash(buf: &mut impl Buf, what: &'static str) -> Result<[u8; 32], DecodeError> {
    need(buf, 32, what)?;
    let mut h = [0u8; 32];
    buf.copy_to_slice(&mut h);
    Ok(h)
}

/// A u16-length-prefixed byte string of at most `max` bytes.
pub(crate) fn get_bytes16(
    buf: &mut impl Buf,
    max: usize,
    what: &'static str,
) -> Result<Vec<u8>, DecodeError> {
    let len = usize::from(get_u16(buf, what)?);
    if len > max {
        return Err(DecodeError::TooLarge {
            what,
            len: len as u64,
            max: max as u64,
        });
    }
    need(buf, len, what)?;
    let mut v = vec![0u8; len];
    buf.copy_to_slice(&mut v);
    Ok(v)
}

pub(crate) fn put_bytes16(buf: &mut impl BufMut, b: &[u8]) {
    // Callers bound their strings far below u16::MAX; truncate rather than corrupt the frame.
    let len = b.len().min(usize::from(u16::MAX));
    buf.put_u16(len as u16);
    buf.put_slice(&b[..len]);
}

pub(crate) fn get_string(
    buf: &mut impl Buf,
    max: usize,
    what: &'static str,
) -> Result<String, DecodeError> {
    let raw = get_bytes16(buf, max, what)?;
    String::from_utf8(raw).map_err(|_| DecodeError::Invalid {
        what,
        why: "not UTF-8".into(),
    })
}

/// A u32-length-prefixed UTF-8 string of at most `max` bytes.
pub(crate) fn get_string32(
    buf: &mut impl Buf,
    max: usize,
    what: &'static str,
) -> Result<String, DecodeError> {
    let len = get_u32(buf, what)? as usize;
    if len > max {
        return Err(DecodeError::TooLarge {
            what,
            len: len as u64,
            max: max as u64,
        });
    }
    need(buf, len, what)?;
    let mut v = vec![0u8; len];
    buf.copy_to_slice(&mut v);
    String::from_utf8(v).map_err(|_| DecodeError::Invalid {
        what,
        why: "not UTF-8".into(),
    })
}

pub(crate) fn put_bytes32(buf: &mut impl BufMut, b: &[u8]) {
    let len = b.len().min(u32::MAX as usize);
    buf.put_u32(len as u32);
    buf.put_slice(&b[..len]);
}

/// Takes `len` bytes as a zero-copy slice when the buffer is `Bytes`.
pub(crate) fn get_payload(
    buf: &mut impl Buf,
    len: usize,
    what: &'static str,
) -> Result<Bytes, DecodeError> {
    need(buf, len, what)?;
    Ok(buf.copy_to_bytes(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_refuses_oversized_body_before_allocating() {
        let mut b = Vec::new();
        FrameHeader {
            kind: 7,
            len: u32::MAX,
        }
        .encode(&mut b);
        let err = FrameHeader::decode(&mut &b[..], MAX_FRAME_LEN).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn truncated_header_is_an_error() {
        let err = FrameHeader::decode(&mut &[1u8, 0, 0][..], 10).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Truncated {
                what: "frame header",
                need: 2
            }
        );
    }

    #[test]
    fn oversized_string_is_refused() {
        let mut b = Vec::new();
        put_bytes16(&mut b, &[b'a'; 100]);
        let err = get_string(&mut &b[..], 10, "name").unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { len: 100, .. }));
    }
}
