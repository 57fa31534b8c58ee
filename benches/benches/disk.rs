//! The two disk back ends side by side: writing 256 MiB in 4 MiB chunks into a preallocated
//! file (then `fdatasync`) and reading it back with a cold page cache, with 4 and with 64
//! requests in flight (4 is what an agent with the default `workers` on two cores keeps in
//! flight; 64 is the io_uring back end's queue depth).
//!
//! `cargo bench -p mover-benches --bench disk` (add `-- --quick` for a fast pass). The file
//! lives in `MOVER_BENCH_DIR` (default: the system's temporary directory): point it at the
//! device to measure. io_uring is skipped, with a note, where it cannot be set up.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mover::disk::{Disk, IoChoice, Pending, SourceCache};
use mover::pool::Pool;

const CHUNK: usize = 4 << 20;
const TOTAL: usize = 256 << 20;

/// Runs `submit(i)` for every chunk with at most `depth` requests waiting.
fn pipelined<T>(depth: usize, mut submit: impl FnMut(usize) -> Pending<T>) {
    let mut inflight = VecDeque::new();
    for i in 0..TOTAL / CHUNK {
        if inflight.len() == depth {
            let p: Pending<T> = inflight.pop_front().expect("a request in flight");
            p.wait().expect("disk request");
        }
        inflight.push_back(submit(i));
    }
    for p in inflight {
        p.wait().expect("disk request");
    }
}

fn drop_cache(f: &File) {
    f.sync_all().expect("fsync");
    // SAFETY: posix_fadvise only advises the kernel about an open descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn benches(c: &mut Criterion) {
    let dir = std::env::var_os("MOVER_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let tmp = tempfile::tempdir_in(dir).expect("bench directory");
    let path = tmp.path().join("chunks");
    let file = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create the bench file"),
    );
    // SAFETY: fallocate on our own open file; preallocated like a staging file.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, TOTAL as libc::off_t) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    let data = Bytes::from(mover::sample::pages(TOTAL, 7));
    let pool = Pool::new(CHUNK, 64);

    let mut backends: Vec<Arc<dyn Disk>> = Vec::new();
    for choice in [IoChoice::Threads, IoChoice::Uring] {
        match mover::disk::open(choice) {
            Ok(d) => backends.push(d),
            Err(e) => eprintln!("skipping {choice:?}: {e}"),
        }
    }

    let mut g = c.benchmark_group("disk");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    g.sample_size(10);
    for disk in &backends {
        for depth in [4, 64] {
            let id = format!("{}/qd{depth}", disk.name());
            g.bench_function(format!("write+fdatasync/{id}"), |b| {
                b.iter(|| {
                    pipelined(depth, |i| {
                        let at = i * CHUNK;
                        disk.write(file.clone(), at as u64, data.slice(at..at + CHUNK))
                    });
                    file.sync_data().expect("fdatasync");
                })
            });
            g.bench_function(format!("read-cold/{id}"), |b| {
                b.iter_batched(
                    || drop_cache(&file),
                    |()| {
                        pipelined(depth, |i| {
                            let at = (i * CHUNK) as u64;
                            disk.read(file.clone(), at, pool.take(CHUNK), SourceCache::Keep)
                        })
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();
}

criterion_group!(disk, benches);
criterion_main!(disk);
