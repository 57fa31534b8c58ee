//! Any bytes as a frame: decoding never panics, and whatever decodes re-encodes to itself.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mover_protocol::{Message, FRAME_HEADER_LEN, MAX_FRAME_LEN};
use mover_protocol_fuzz::{assert_stable, decode_frame};

fuzz_target!(|data: &[u8]| {
    // The body decoder alone, whatever the header's length says, so that mutations of the
    // body reach it without the fuzzer first having to fix the length.
    if let Some((&kind, rest)) = data.split_first() {
        let mut body = rest.get(FRAME_HEADER_LEN - 1..).unwrap_or_default();
        if let Ok(msg) = Message::decode(kind, &mut body) {
            assert!(body.is_empty(), "{} left bytes unread", msg.name());
            assert_stable(&msg);
        }
    }
    // Then as a stream reader sees it: frames one after another, each bounded by its header.
    let mut buf = Bytes::copy_from_slice(data);
    while let Ok(msg) = decode_frame(&mut buf, MAX_FRAME_LEN) {
        assert_stable(&msg);
    }
});
