//! The per-chunk CPU work of a transfer, on one 4 MiB chunk of semi-compressible data: hashing,
//! zstd level 1, the sender's encode path, the receiver's decode path, and the frame codec.
//!
//! `cargo bench -p mover-benches --bench chunk` (add `-- --quick` for a fast pass). Every
//! throughput counts the chunk's raw bytes, so the figures compare directly with a link's speed.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use mover_protocol::hash::chunk_hash;
use mover_protocol::{
    Chunk, Encoding, FrameHeader, Message, DEFAULT_CHUNK_SIZE, FRAME_HEADER_LEN, MAX_FRAME_LEN,
};

const CHUNK: usize = DEFAULT_CHUNK_SIZE as usize;
/// The chunk sits at 4 MiB of a 64 MiB file, so its hash is a subtree's chaining value, as it
/// is for every chunk of a multi-chunk file.
const OFFSET: u64 = DEFAULT_CHUNK_SIZE as u64;
const FILE_SIZE: u64 = 16 * DEFAULT_CHUNK_SIZE as u64;
const LEVEL: i32 = 1;

/// A small deterministic generator, so every run measures the same bytes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Table-like text (ids, words from a small vocabulary, numbers) interleaved with runs of
/// random bytes, as in a database file holding some already-compressed values: zstd -1 makes
/// it about 2-3 times smaller.
fn semi_compressible() -> Vec<u8> {
    const WORDS: [&str; 32] = [
        "alpha",
        "bravo",
        "charlie",
        "delta",
        "echo",
        "foxtrot",
        "golf",
        "hotel",
        "india",
        "juliet",
        "kilo",
        "lima",
        "mike",
        "november",
        "oscar",
        "papa",
        "quebec",
        "romeo",
        "sierra",
        "tango",
        "uniform",
        "victor",
        "whiskey",
        "xray",
        "yankee",
        "zulu",
        "pending",
        "shipped",
        "returned",
        "paid",
        "cancelled",
        "NULL",
    ];
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut data = Vec::with_capacity(CHUNK + 4096);
    let mut id = 100_000u64;
    while data.len() < CHUNK {
        if rng.below(100) < 12 {
            let n = 256 + rng.below(2048);
            data.extend((0..n).map(|_| rng.next() as u8));
        } else {
            for _ in 0..8 + rng.below(56) {
                id += 1 + rng.below(3) as u64;
                let line = format!(
                    "{id}\t{} {}\t{}.{:02}\t2024-{:02}-{:02}\n",
                    WORDS[rng.below(WORDS.len())],
                    WORDS[rng.below(WORDS.len())],
                    rng.below(100_000),
                    rng.below(100),
                    1 + rng.below(12),
                    1 + rng.below(28),
                );
                data.extend_from_slice(line.as_bytes());
            }
        }
    }
    data.truncate(CHUNK);
    data
}

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.sample_size(20);
    g
}

fn benches(c: &mut Criterion) {
    let data = semi_compressible();
    let mut compressor = zstd::bulk::Compressor::new(LEVEL).expect("zstd compressor");
    let mut decompressor = zstd::bulk::Decompressor::new().expect("zstd decompressor");
    let compressed = compressor.compress(&data).expect("compress");
    eprintln!(
        "chunk: {} bytes, zstd -{LEVEL}: {} bytes (ratio {:.2})",
        data.len(),
        compressed.len(),
        data.len() as f64 / compressed.len() as f64
    );

    let mut g = group(c, "hash");
    g.bench_function("chunk_hash", |b| {
        b.iter(|| chunk_hash(black_box(&data), OFFSET, FILE_SIZE))
    });
    g.bench_function("blake3_hash", |b| b.iter(|| blake3::hash(black_box(&data))));
    g.finish();

    let mut g = group(c, "zstd1");
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(CHUNK));
    g.bench_function("compress", |b| {
        b.iter(|| {
            out.clear();
            compressor
                .compress_to_buffer(black_box(&data[..]), &mut out)
                .expect("compress")
        })
    });
    let mut raw = Vec::with_capacity(CHUNK);
    g.bench_function("decompress", |b| {
        b.iter(|| {
            raw.clear();
            decompressor
                .decompress_to_buffer(black_box(&compressed[..]), &mut raw)
                .expect("decompress")
        })
    });
    g.finish();

    // What the sender and each receiver do per chunk (as in `mover::chunk`), output allocated
    // per chunk as there.
    let chunk = Chunk {
        file: 3,
        offset: OFFSET,
        raw_len: CHUNK as u32,
        encoding: Encoding::Zstd,
        hash: chunk_hash(&data, OFFSET, FILE_SIZE),
        payload: Bytes::from(compressed),
    };
    let mut g = group(c, "chunk");
    g.bench_function("encode_hash_compress", |b| {
        b.iter(|| {
            let data = black_box(&data[..]);
            let hash = chunk_hash(data, OFFSET, FILE_SIZE);
            let payload = compressor.compress(data).expect("compress");
            (hash, payload)
        })
    });
    g.bench_function("decode_decompress_verify", |b| {
        b.iter(|| {
            let c = black_box(&chunk);
            let raw = decompressor
                .decompress(&c.payload, c.raw_len as usize)
                .expect("decompress");
            assert_eq!(chunk_hash(&raw, c.offset, FILE_SIZE), c.hash);
            raw
        })
    });
    g.finish();

    // The frame codec on a raw 4 MiB chunk: encoding copies the payload into the frame;
    // decoding from `Bytes` slices it without a copy, from a plain slice copies it.
    let msg = Message::Chunk(Chunk {
        encoding: Encoding::Raw,
        payload: Bytes::from(data.clone()),
        ..chunk
    });
    let frame = msg.to_frame();
    let mut g = group(c, "frame");
    let mut buf = Vec::with_capacity(frame.len());
    g.bench_function("encode", |b| {
        b.iter(|| {
            buf.clear();
            black_box(&msg).encode(&mut buf);
        })
    });
    g.bench_function("decode_bytes", |b| {
        b.iter(|| {
            let mut f = black_box(&frame).clone();
            let h = FrameHeader::decode(&mut f, MAX_FRAME_LEN).expect("header");
            Message::decode(h.kind, &mut f).expect("chunk")
        })
    });
    g.bench_function("decode_slice", |b| {
        b.iter(|| {
            let mut f = &black_box(&frame)[..];
            let h = FrameHeader::decode(&mut f, MAX_FRAME_LEN).expect("header");
            Message::decode(h.kind, &mut f).expect("chunk")
        })
    });
    g.finish();
    assert_eq!(frame.len(), FRAME_HEADER_LEN + Chunk::HEADER_LEN + CHUNK);
}

criterion_group!(chunk, benches);
criterion_main!(chunk);
