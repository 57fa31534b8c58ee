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

/// The same 16 KiB pages of rows that `mover sample` and the demo write (about 2x with
/// zstd -1), so micro and end-to-end figures are measured on alike data.
fn semi_compressible() -> Vec<u8> {
    mover::sample::pages(CHUNK, 42)
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
