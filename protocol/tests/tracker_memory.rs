//! How much memory a receiver's tracker takes as a large copy goes through. Its own test
//! binary, because it counts every allocation of the process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use mover_protocol::message::Encoding;
use mover_protocol::{Admit, Chunk, Entry, EntryKind, Manifest, Tracker};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const CHUNK: u32 = 4 << 20;

fn entry(path: &str, kind: EntryKind) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind,
        mode: 0o644,
        mtime_sec: 1,
        mtime_nsec: 0,
    }
}

/// 4 TiB in one file and a few smaller ones, at 4 MiB chunks: a million chunks. They arrive
/// out of order within a window (several streams, several workers), as in a real transfer.
/// The tracker used to keep a hash map entry per chunk done (56-112 bytes each, so 56-112
/// MiB here); it now folds each page of 64 done chunks into one value.
#[test]
fn a_fresh_four_tib_copy_grows_the_tracker_by_a_few_mib() {
    let big = 4u64 << 40;
    let mut entries = vec![entry("", EntryKind::Dir)];
    entries.push(entry("ibdata1", EntryKind::File { size: big }));
    for i in 0..100 {
        let size = 1 + i * 3_000_000;
        entries.push(entry(&format!("t{i:03}.ibd"), EntryKind::File { size }));
    }
    let manifest = Manifest::from_entries(entries).expect("a valid manifest");
    let files: Vec<(u32, u64)> = manifest
        .entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e.kind {
            EntryKind::File { size } => Some((i as u32, size)),
            _ => None,
        })
        .collect();
    let mut tracker = Tracker::new(manifest.clone(), CHUNK);
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);

    const WINDOW: usize = 48;
    let mut in_flight: Vec<Chunk> = Vec::with_capacity(WINDOW);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunks = 0u64;
    for &(file, size) in &files {
        let mut offset = 0;
        while offset < size {
            let raw_len = (size - offset).min(u64::from(CHUNK)) as u32;
            let mut hash = [0u8; 32];
            hash[..8].copy_from_slice(&chunks.to_le_bytes());
            let c = Chunk {
                file,
                offset,
                raw_len,
                encoding: Encoding::Raw,
                hash,
                payload: bytes::Bytes::new(),
            };
            assert_eq!(tracker.admit(&c), Ok(Admit::Write));
            in_flight.push(c);
            if in_flight.len() == WINDOW {
                // One chunk of the window, picked at random, is verified.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let done = in_flight.swap_remove((x % WINDOW as u64) as usize);
                tracker.verified(done.file, done.offset, done.hash);
            }
            offset += u64::from(raw_len);
            chunks += 1;
        }
    }
    for c in in_flight.drain(..) {
        tracker.verified(c.file, c.offset, c.hash);
    }
    assert!(tracker.is_complete());
    assert!(tracker.digest().is_some());
    assert!(chunks > 1 << 20, "{chunks} chunks");
    let grew = PEAK.load(Ordering::Relaxed) - base;
    let per_tib = grew as f64 / 4.0 / f64::from(1 << 20);
    println!(
        "{chunks} chunks: the tracker grew by at most {grew} bytes ({per_tib:.2} MiB per TiB)"
    );
    assert!(
        grew < 8 << 20,
        "the tracker grew by {grew} bytes for {chunks} chunks"
    );
}
