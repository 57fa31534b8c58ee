//! Checks shared by the fuzz targets.

use std::collections::HashSet;

use bytes::Bytes;
use mover_protocol::manifest::{MAX_FILE_SIZE, MAX_NAME_LEN, MAX_PATH_LEN};
use mover_protocol::{DecodeError, Entry, EntryKind, FrameHeader, Message};

/// Decodes one frame from the front of `buf` as a stream reader would, bounding the body by
/// `max_len`. A body shorter than the header says is decoded as it is, and so fails.
pub fn decode_frame(buf: &mut Bytes, max_len: u32) -> Result<Message, DecodeError> {
    let header = FrameHeader::decode(buf, max_len)?;
    let len = (header.len as usize).min(buf.len());
    let mut body = buf.split_to(len);
    Message::decode(header.kind, &mut body)
}

/// Panics unless `msg` encodes to one frame that decodes back to `msg`.
pub fn assert_stable(msg: &Message) {
    let mut frame = msg.to_frame();
    let again = decode_frame(&mut frame, u32::MAX)
        .unwrap_or_else(|e| panic!("re-encoded {} does not decode: {e}", msg.name()));
    assert_eq!(&again, msg, "re-encoded {} decodes differently", msg.name());
    assert!(frame.is_empty(), "re-encoded {} left bytes", msg.name());
}

/// The confinement rules, restated independently of the crate: the root directory first, then
/// relative paths with no empty, `.` or `..` component, each under a directory listed earlier.
pub fn confinement_violation(entries: &[Entry]) -> Option<String> {
    let Some((root, rest)) = entries.split_first() else {
        return Some("empty manifest".into());
    };
    if !root.path.is_empty() || !root.is_dir() {
        return Some("first entry is not the root directory".into());
    }
    let mut dirs: HashSet<&[u8]> = HashSet::from([&b""[..]]);
    let mut seen: HashSet<&[u8]> = HashSet::from([&b""[..]]);
    for e in rest {
        let p = &e.path[..];
        let show = String::from_utf8_lossy(p);
        if p.is_empty() || p.len() > MAX_PATH_LEN || p[0] == b'/' || p.contains(&0) {
            return Some(format!("bad path {show:?}"));
        }
        if p.split(|&b| b == b'/')
            .any(|c| matches!(c, b"" | b"." | b"..") || c.len() > MAX_NAME_LEN)
        {
            return Some(format!("bad component in {show:?}"));
        }
        let parent = p
            .iter()
            .rposition(|&b| b == b'/')
            .map_or(&b""[..], |i| &p[..i]);
        if !dirs.contains(parent) {
            return Some(format!("{show:?} has no directory parent listed before it"));
        }
        if !seen.insert(p) {
            return Some(format!("{show:?} listed twice"));
        }
        match e.kind {
            EntryKind::Dir => {
                dirs.insert(p);
            }
            EntryKind::File { size } if size > MAX_FILE_SIZE => {
                return Some(format!("{show:?} is {size} bytes"));
            }
            _ => {}
        }
    }
    None
}
