//! Any bytes as the manifest frames of a control stream: whatever `ManifestBuilder` accepts
//! stays inside the staging area.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mover_protocol::{manifest_frame_budget, ManifestBuilder, Message};
use mover_protocol_fuzz::{confinement_violation, decode_frame};

fuzz_target!(|data: &[u8]| {
    let mut buf = Bytes::copy_from_slice(data);
    let mut builder = ManifestBuilder::new();
    loop {
        match decode_frame(&mut buf, manifest_frame_budget()) {
            Ok(Message::ManifestPart(entries)) => {
                if builder.push(entries).is_err() {
                    return;
                }
            }
            Ok(Message::ManifestEnd {
                entries,
                total_bytes,
            }) => {
                if let Ok(m) = builder.finish(entries, total_bytes) {
                    if let Some(why) = confinement_violation(&m.entries) {
                        panic!("accepted a manifest that breaks confinement: {why}");
                    }
                    assert_eq!(m.entries.len() as u64, entries);
                    assert_eq!(m.total_bytes(), total_bytes);
                }
                return;
            }
            _ => return,
        }
    }
});
