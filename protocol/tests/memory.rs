//! How much memory what grows with the dataset takes: a receiver's tracker as a large copy
//! goes through, and the source's merge of what the targets already hold. Its own test
//! binary, because it counts every allocation of the process; the tests take turns.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::Mutex;

use mover_protocol::have::HaveMerge;
use mover_protocol::message::{Encoding, MAX_LIST_ENTRIES};
use mover_protocol::table::{ChunkIndex, Table};
use mover_protocol::{Admit, Chunk, Entry, EntryKind, Held, Manifest, Tracker};

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

    /// Counted as glibc does it for the large lists measured here: a block above the mmap
    /// threshold grows or shrinks by remapping its pages, so the old and the new never both
    /// take memory (the default, a new block and a copy, would count both).
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                - layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `realloc` is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One test at a time: each measures the whole process.
static ONE: Mutex<()> = Mutex::new(());

const CHUNK: u32 = 4 << 20;

fn entry(path: &str, kind: EntryKind) -> Entry {
    Entry {
        path: path.as_bytes().to_vec().into(),
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
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let big = 4u64 << 40;
    let mut entries = vec![entry("", EntryKind::Dir)];
    entries.push(entry("ibdata1", EntryKind::File { size: big }));
    for i in 0..100 {
        let size = 1 + i * 3_000_000;
        entries.push(entry(&format!("t{i:03}.ibd"), EntryKind::File { size }));
    }
    let manifest = Manifest::from_entries(entries).expect("a valid manifest");
    let files: Vec<(u32, u64)> = manifest
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e.unwrap().kind {
            EntryKind::File { size } => Some((i as u32, size)),
            _ => None,
        })
        .collect();
    let mut tracker = Tracker::new(manifest.clone(), CHUNK).unwrap();
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

/// A reseed of 4 TiB (four files of 1 TiB, a million chunks of 4 MiB) onto four targets
/// that all hold an older copy: every target lists every chunk, in `Have` messages of 65,536
/// chunks that arrive one after another. Keeping the lists until every target was ready, then
/// merging them in a hash map, peaked at 363 MiB here (363 bytes per chunk, measured with this
/// allocator); a sorted list of the first target's chunks kept 28 bytes per chunk and peaked
/// at 45. The merge now keeps its records in a table in a file (18 bytes per chunk, 18 MiB
/// here, in the page cache rather than the process), and the process only each message's
/// chunks while it folds them in.
#[test]
fn a_four_tib_reseed_onto_four_targets_keeps_the_source_s_merge_in_a_file() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    const TARGETS: usize = 4;
    const CHUNKS: u64 = 1 << 20;
    let manifest = four_files(CHUNKS);
    let index = ChunkIndex::new(&manifest, CHUNK).unwrap();
    let table = FileTable::new("reseed").unwrap();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut merge = HaveMerge::new(TARGETS, index, Box::new(table));
    for t in 0..TARGETS {
        let node = format!("east{t}");
        let mut next = 0;
        while next < CHUNKS {
            let end = CHUNKS.min(next + u64::from(MAX_LIST_ENTRIES));
            // As a `Have` message arrives: decoded, merged, dropped.
            let chunks: Vec<Held> = (next..end)
                .map(|i| {
                    let mut hash = [0u8; 32];
                    hash[..8].copy_from_slice(&i.to_le_bytes());
                    Held {
                        file: 1 + (i >> 18) as u32,
                        offset: (i & ((1 << 18) - 1)) * u64::from(CHUNK),
                        hash,
                    }
                })
                .collect();
            merge.add(&node, &chunks);
            next = end;
        }
    }
    assert!(merge.failure().is_none(), "{:?}", merge.failure());
    let skips = merge.finish();
    assert_eq!(skips.len(), CHUNKS, "every chunk is held by all four");
    let mut hash = [0u8; 32];
    hash[..8].copy_from_slice(&77u64.to_le_bytes());
    assert!(skips.skip(1, 77 * u64::from(CHUNK), &hash));
    hash[0] ^= 1;
    assert!(!skips.skip(1, 77 * u64::from(CHUNK), &hash));
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let kept = LIVE.load(Ordering::Relaxed) - base;
    println!(
        "{TARGETS} targets x {CHUNKS} chunks held: the merge peaked at {peak} bytes \
         ({:.1} per chunk of the dataset; one message's chunks while they are folded in); \
         {kept} bytes kept for the transfer",
        peak as f64 / CHUNKS as f64
    );
    // What is left is the merge's few fields and one message's worth of buffers: nothing
    // per chunk of the dataset.
    assert!(kept < 4 << 20, "{kept} bytes kept for {CHUNKS} chunks");
    assert!(peak < 8 << 20, "the merge peaked at {peak} bytes");
}

/// The target's side of the same reseed: 4 TiB, every chunk held from an older copy. The
/// tracker keeps each held chunk's hash in a table in a file and one bit for it in memory;
/// the final read-back goes through them a batch at a time and confirms each, which folds
/// its page. Before, a held chunk took 33 bytes in the tracker and 48 more in the read-back's
/// list (81 MiB at the peak here).
#[test]
fn a_four_tib_reseed_keeps_a_bit_per_held_chunk_on_the_target() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    const CHUNKS: u64 = 1 << 20;
    let manifest = four_files(CHUNKS);
    let table = std::sync::Arc::new(FileTable::new("held").unwrap());
    let hash_of = |i: u64| {
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&i.to_le_bytes());
        hash[8] = 1;
        hash
    };
    let place = |i: u64| {
        (
            1 + (i >> 18) as u32,
            (i & ((1 << 18) - 1)) * u64::from(CHUNK),
        )
    };
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut tracker = Tracker::new(manifest, CHUNK).unwrap().with_table(table);
    for i in 0..CHUNKS {
        let (file, offset) = place(i);
        assert!(tracker.held(file, offset, hash_of(i)));
    }
    assert!(tracker.is_complete());
    let held = LIVE.load(Ordering::Relaxed) - base;
    let seen = read_back(&mut tracker, |file, offset, hash| {
        let i = (u64::from(file - 1) << 18) | (offset / u64::from(CHUNK));
        assert_eq!(hash, hash_of(i), "the table gives back the hash put there");
    });
    assert_eq!(seen, CHUNKS);
    assert_eq!(tracker.missing_chunks(), CHUNKS.div_ceil(1000));
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let kept = LIVE.load(Ordering::Relaxed) - base;
    println!(
        "{CHUNKS} chunks held: the tracker took {held} bytes once all were held \
         ({:.2} per chunk), peaked at {peak} through the read-back, and keeps {kept}",
        held as f64 / CHUNKS as f64
    );
    assert!(
        held < 2 * CHUNKS as usize,
        "{held} bytes for {CHUNKS} held chunks"
    );
    assert!(peak < 8 << 20, "the tracker peaked at {peak} bytes");
}

/// The final read-back of every held chunk, a batch at a time, as a receiver does it: each
/// chunk listed goes through `check`, and one in 1,000 was damaged on disk (lost), the rest
/// confirmed. Returns how many were listed.
fn read_back(tracker: &mut Tracker, check: impl Fn(u32, u64, [u8; 32])) -> u64 {
    let mut from = (0, 0);
    let mut seen = 0u64;
    loop {
        let batch = tracker.held_from(from, 4096);
        let Some(&(file, offset, _)) = batch.last() else {
            return seen;
        };
        from = (file, offset + 1);
        for (file, offset, hash) in batch {
            check(file, offset, hash);
            if seen % 1000 == 7 {
                assert!(tracker.lost(file, offset));
            } else {
                assert!(tracker.confirm(file, offset, hash));
            }
            seen += 1;
        }
    }
}

/// What grows with the number of files rather than bytes: a million small files (a schema of
/// 1,000 databases of 1,000 tables) received as a manifest in parts, then copied fresh. The
/// manifest's entries live in a table file (8 bytes per 64 entries stay in the process); the
/// tracker keeps a bit per entry and a track only for files under way. Before, each file cost
/// 99 bytes here (the entries in memory, a 16-byte state per entry), and 408 two changes
/// before that.
#[test]
fn a_million_files_cost_under_a_byte_each() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let manifest = std::sync::Arc::new(small_files("million"));
    let building = PEAK.load(Ordering::Relaxed) - base;
    let kept = LIVE.load(Ordering::Relaxed) - base;
    let files = DBS * TABLES;
    let mut tracker = Tracker::new(manifest.clone(), CHUNK).unwrap();
    let with_tracker = LIVE.load(Ordering::Relaxed) - base;
    for (i, e) in manifest.iter().enumerate() {
        if let EntryKind::File { size } = e.unwrap().kind {
            let c = Chunk {
                file: i as u32,
                offset: 0,
                raw_len: size as u32,
                encoding: Encoding::Raw,
                hash: [7; 32],
                payload: bytes::Bytes::new(),
            };
            assert_eq!(tracker.admit(&c), Ok(Admit::Write));
            tracker.verified(c.file, 0, c.hash);
        }
    }
    assert!(tracker.is_complete());
    let done = LIVE.load(Ordering::Relaxed) - base;
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let per = |b: usize| b as f64 / files as f64;
    println!(
        "{files} files: the manifest keeps {kept} bytes ({:.2} per file) and peaked at \
         {building} while it was built ({:.2}); with the tracker {with_tracker} ({:.2}); \
         once every file is done {done} ({:.2}); peak {peak} ({:.2})",
        per(kept),
        per(building),
        per(with_tracker),
        per(done),
        per(peak)
    );
    assert!(
        per(peak) < 2.0,
        "{peak} bytes at the peak for {files} files"
    );
    assert!(
        per(done - kept) < 1.0,
        "the tracker keeps {} bytes for {files} files done",
        done - kept
    );
}

const DBS: u64 = 1000;
const TABLES: u64 = 1000;

/// 1,000 databases of 1,000 small tables, received as a manifest in parts, in a table file
/// named after `name`.
fn small_files(name: &str) -> Manifest {
    let table = std::sync::Arc::new(FileTable::new(name).expect("a table file"));
    let mut b = mover_protocol::ManifestBuilder::in_table(table);
    b.push(vec![entry("", EntryKind::Dir)]).expect("the root");
    let (mut entries, mut bytes) = (1u64, 0u64);
    for db in 0..DBS {
        let mut part = vec![entry(&format!("db{db:04}"), EntryKind::Dir)];
        for t in 0..TABLES {
            let size = 16384 + t * 16;
            bytes += size;
            part.push(entry(
                &format!("db{db:04}/t{t:04}.ibd"),
                EntryKind::File { size },
            ));
        }
        entries += part.len() as u64;
        b.push(part).expect("a valid part");
    }
    b.finish(entries, bytes).expect("a valid manifest")
}

/// A reseed of those million small files onto an older copy that holds every one: each
/// file's one chunk is held, its hash in a table in a file. A file wholly held keeps a bit,
/// not a track (a track each took about 130 bytes a file, as long as the read-back had not
/// reached it); the read-back confirms them in batches, one in 1,000 found damaged.
#[test]
fn a_reseed_of_a_million_small_files_keeps_a_bit_per_held_file() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let manifest = std::sync::Arc::new(small_files("reseed-manifest"));
    let table = std::sync::Arc::new(FileTable::new("reseed-held").unwrap());
    let hash_of = |file: u32| {
        let mut hash = [0u8; 32];
        hash[..4].copy_from_slice(&file.to_le_bytes());
        hash[8] = 2;
        hash
    };
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut tracker = Tracker::new(manifest.clone(), CHUNK)
        .unwrap()
        .with_table(table);
    let files = (0..manifest.len() as u32)
        .filter(|&f| manifest.file_size(f as usize).unwrap().is_some())
        .collect::<Vec<_>>();
    let listed = LIVE.load(Ordering::Relaxed) - base;
    for &f in &files {
        assert!(tracker.held(f, 0, hash_of(f)));
    }
    assert!(tracker.is_complete());
    let held = LIVE.load(Ordering::Relaxed) - base - listed;
    let seen = read_back(&mut tracker, |file, offset, hash| {
        assert_eq!((offset, hash), (0, hash_of(file)));
    });
    assert_eq!(seen, files.len() as u64);
    assert_eq!(tracker.missing_chunks(), seen.div_ceil(1000));
    let peak = PEAK.load(Ordering::Relaxed) - base - listed;
    // The damaged ones come again; every root that waited for the first of them (most of
    // them in the table) goes into the digest.
    for (n, &f) in files.iter().enumerate() {
        if n % 1000 == 7 {
            let c = Chunk {
                file: f,
                offset: 0,
                raw_len: manifest.file_size(f as usize).unwrap().unwrap() as u32,
                encoding: Encoding::Raw,
                hash: hash_of(f),
                payload: bytes::Bytes::new(),
            };
            assert_eq!(tracker.admit(&c), Ok(Admit::Write));
            tracker.verified(f, 0, c.hash);
        }
    }
    let roots: Vec<(u32, [u8; 32])> = files
        .iter()
        .map(|&f| (f, mover_protocol::hash::file_root(&[hash_of(f)])))
        .collect();
    let want = mover_protocol::hash::tree_digest(roots.iter().map(|(f, r)| (*f, r)));
    assert_eq!(tracker.digest(), Some(want));
    let n = files.len() as f64;
    println!(
        "{} small files held: the tracker took {held} bytes once all were held ({:.2} per \
         file) and peaked at {peak} through the read-back ({:.2})",
        files.len(),
        held as f64 / n,
        peak as f64 / n
    );
    assert!(held < files.len(), "{held} bytes for {n} held files");
    assert!(peak < 4 << 20, "the tracker peaked at {peak} bytes");
}

/// A source's scan hands each entry to the manifest's builder as it finds it, and the
/// builder checks it and stores it in its table: what stays in the process is the chain of
/// directories above the last entry, the block being filled, and an offset per block.
#[test]
fn a_scanned_manifest_is_checked_and_stored_as_it_comes() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let table = std::sync::Arc::new(FileTable::new("scan").unwrap());
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut b = mover_protocol::ManifestBuilder::in_table(table);
    b.add(entry("", EntryKind::Dir)).unwrap();
    for db in 0..1000 {
        b.add(entry(&format!("db{db:04}"), EntryKind::Dir)).unwrap();
        for t in 0..1000 {
            b.add(entry(
                &format!("db{db:04}/t{t:04}.ibd"),
                EntryKind::File { size: 16384 },
            ))
            .unwrap();
        }
    }
    let n = b.len();
    let manifest = b.finish(n as u64, n as u64 / 1001 * 1000 * 16384).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    println!(
        "{n} entries checked and stored: {peak} bytes in the process at the peak ({:.2} per entry)",
        peak as f64 / n as f64
    );
    assert_eq!(manifest.len(), n);
    assert_eq!(
        manifest.get(n - 1).unwrap().path[..],
        b"db0999/t0999.ibd"[..]
    );
    // An offset per block of 64 entries (and the list's doubling), nothing per entry.
    assert!(peak < n / 2, "{peak} bytes to check {n} entries");
}

/// Four files of `chunks / 4` chunks each: 4 TiB for a million chunks.
fn four_files(chunks: u64) -> Manifest {
    let mut entries = vec![entry("", EntryKind::Dir)];
    for f in 1..=4 {
        let size = (chunks / 4) * u64::from(CHUNK);
        entries.push(entry(&format!("ibdata{f}"), EntryKind::File { size }));
    }
    Manifest::from_entries(entries).expect("a valid manifest")
}

/// A table in a file that is removed when the test ends.
#[derive(Debug)]
struct FileTable {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl FileTable {
    fn new(name: &str) -> std::io::Result<Self> {
        let path =
            std::env::temp_dir().join(format!("mover-memory-{name}-{}.table", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        Ok(Self { file, path })
    }
}

impl Drop for FileTable {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Table for FileTable {
    fn read_at(&self, pos: u64, out: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        out.fill(0);
        let mut done = 0;
        while done < out.len() {
            match self.file.read_at(&mut out[done..], pos + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(())
    }

    fn write_at(&self, pos: u64, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, pos)
    }
}
