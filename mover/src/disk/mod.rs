//! Disk I/O for chunk data: reading a chunk of a source file and writing one into staging,
//! behind one trait with two back ends, io_uring ([`uring`]) and a pread/pwrite thread pool
//! ([`threads`]). [`open`] picks one when the agent starts: io_uring when a probe shows it
//! works, the thread pool otherwise or when asked for.
//!
//! Requests carry owned buffers (a [`PoolBuf`] to read into, [`Bytes`] to write from) that the
//! back end keeps, unmoved, until the kernel is done with them, and answer through a
//! [`Pending`] that a blocking thread waits on or a task awaits.

pub(crate) mod threads;
pub(crate) mod uring;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::pool::PoolBuf;

/// Requests in flight on the io_uring back end, and the size of the thread pool's queue: deep
/// enough to keep an NVMe device busy with 4 MiB chunks.
pub const QUEUE_DEPTH: u32 = 64;

/// Which back end to use (`io` in the agent config, `mover agent --io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoChoice {
    /// io_uring where the startup probe shows it works, else threads.
    #[default]
    Auto,
    /// io_uring, or the agent does not start.
    Uring,
    /// The pread/pwrite thread pool.
    Threads,
}

impl FromStr for IoChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "uring" => Ok(Self::Uring),
            "threads" => Ok(Self::Threads),
            _ => Err(format!(
                "{s:?} is not a disk I/O back end (use auto, uring or threads)"
            )),
        }
    }
}

/// What reading the source does to the page cache (`source_cache` in the agent config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceCache {
    /// Plain buffered reads.
    #[default]
    Keep,
    /// Leave the page cache as it was, so a running database keeps its hot pages: reads use
    /// `RWF_DONTCACHE` where the kernel and filesystem have it (Linux 6.14+), and otherwise
    /// `posix_fadvise(POSIX_FADV_DONTNEED)` on the range just read.
    Drop,
}

/// Why a back end could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("use io_uring for disk I/O (--io uring): {reason}; use --io threads or io = \"auto\"")]
    UringUnavailable { reason: String },
    #[error("start the disk I/O threads: {0}")]
    Spawn(io::Error),
}

/// The answer to one request.
#[must_use = "a disk request's result must be waited for"]
#[derive(Debug)]
pub struct Pending<T>(oneshot::Receiver<io::Result<T>>);

impl<T> Pending<T> {
    fn channel() -> (oneshot::Sender<io::Result<T>>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, Self(rx))
    }

    /// Blocks the calling thread until the request is done. Not for async tasks: use
    /// [`Pending::done`] there.
    pub fn wait(self) -> io::Result<T> {
        self.0.blocking_recv().unwrap_or_else(|_| Err(stopped()))
    }

    /// Waits for the request in an async task.
    pub async fn done(self) -> io::Result<T> {
        self.0.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> io::Error {
    io::Error::other("the disk I/O thread stopped")
}

/// Reads and writes chunk data at offsets of open files.
pub trait Disk: Send + Sync + fmt::Debug {
    /// `"uring"` or `"threads"`.
    fn name(&self) -> &'static str;

    /// Fills `buf` (all of its length) from `offset` of `file`. Returns the buffer and how
    /// many bytes were read: fewer than asked only where the file ends.
    fn read(
        &self,
        file: Arc<File>,
        offset: u64,
        buf: PoolBuf,
        cache: SourceCache,
    ) -> Pending<(PoolBuf, usize)>;

    /// Writes all of `data` at `offset` of `file`.
    fn write(&self, file: Arc<File>, offset: u64, data: Bytes) -> Pending<()>;
}

/// Sets up the back end `choice` names and logs which one is used and why.
pub fn open(choice: IoChoice) -> Result<Arc<dyn Disk>, DiskError> {
    match choice {
        IoChoice::Threads => {
            let t = threads::Threads::start(threads::pool_size()).map_err(DiskError::Spawn)?;
            tracing::info!(
                threads = t.size(),
                "disk I/O: threads (pread/pwrite pool), as configured"
            );
            Ok(Arc::new(t))
        }
        IoChoice::Uring => {
            let u = uring::Uring::start(QUEUE_DEPTH)
                .map_err(|reason| DiskError::UringUnavailable { reason })?;
            tracing::info!(depth = QUEUE_DEPTH, "disk I/O: io_uring, as configured");
            Ok(Arc::new(u))
        }
        IoChoice::Auto => match uring::Uring::start(QUEUE_DEPTH) {
            Ok(u) => {
                tracing::info!(depth = QUEUE_DEPTH, "disk I/O: io_uring");
                Ok(Arc::new(u))
            }
            Err(reason) => {
                let t = threads::Threads::start(threads::pool_size()).map_err(DiskError::Spawn)?;
                tracing::info!(
                    threads = t.size(),
                    "disk I/O: threads (pread/pwrite pool); io_uring is unavailable: {reason}"
                );
                Ok(Arc::new(t))
            }
        },
    }
}

/// Whether `RWF_DONTCACHE` works here: unknown until the first read with it.
static DONTCACHE: AtomicU8 = AtomicU8::new(DONTCACHE_UNKNOWN);
const DONTCACHE_UNKNOWN: u8 = 0;
const DONTCACHE_WORKS: u8 = 1;
const DONTCACHE_UNSUPPORTED: u8 = 2;

/// The read flags for a read with `cache`.
fn read_flags(cache: SourceCache) -> i32 {
    match cache {
        SourceCache::Drop if DONTCACHE.load(Ordering::Relaxed) != DONTCACHE_UNSUPPORTED => {
            libc::RWF_DONTCACHE
        }
        _ => 0,
    }
}

/// Records how a `source_cache = "drop"` read went, and logs the method the first time.
fn note_dontcache(works: bool) {
    let new = if works {
        DONTCACHE_WORKS
    } else {
        DONTCACHE_UNSUPPORTED
    };
    if DONTCACHE.swap(new, Ordering::Relaxed) != new {
        if works {
            tracing::info!("source reads leave the page cache alone: RWF_DONTCACHE");
        } else {
            tracing::info!(
                "source reads leave the page cache alone: posix_fadvise(DONTNEED) after each \
                 read (RWF_DONTCACHE is not supported here)"
            );
        }
    }
}

/// Whether an error from a read with `RWF_DONTCACHE` means the flag is not supported.
fn dontcache_refused(errno: i32) -> bool {
    errno == libc::EOPNOTSUPP || errno == libc::EINVAL
}

/// Drops the pages of a range just read from the page cache (the fallback of
/// [`SourceCache::Drop`] where `RWF_DONTCACHE` is missing). Advice only: failures are ignored.
fn drop_cached(file: &File, offset: u64, len: usize) {
    // SAFETY: posix_fadvise on an open descriptor only gives the kernel advice.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pool::Pool;
    use std::os::unix::fs::FileExt;

    /// Every back end that works on this machine; io_uring is skipped (with a note) where the
    /// probe fails, so that the tests run in sandboxes without it.
    fn backends() -> Vec<Arc<dyn Disk>> {
        let mut v: Vec<Arc<dyn Disk>> = vec![Arc::new(threads::Threads::start(4).unwrap())];
        match uring::Uring::start(8) {
            Ok(u) => v.push(Arc::new(u)),
            Err(e) if std::env::var_os("MOVER_TEST_REQUIRE_URING").is_some() => {
                panic!("io_uring is required by MOVER_TEST_REQUIRE_URING: {e}")
            }
            Err(e) => eprintln!("skipping the io_uring back end: {e}"),
        }
        v
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn rw_file(dir: &tempfile::TempDir, name: &str) -> Arc<File> {
        Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join(name))
                .unwrap(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_chunks_in_flight_at_once_land_where_they_belong() {
        for disk in backends() {
            let dir = tempfile::tempdir().unwrap();
            let f = rw_file(&dir, "f");
            let chunk = 64 << 10;
            // More requests than the queue is deep, all submitted before any is awaited.
            let n = 40;
            let data = pattern(chunk * n, 7);
            let writes: Vec<_> = (0..n)
                .rev()
                .map(|i| {
                    let part = Bytes::copy_from_slice(&data[i * chunk..(i + 1) * chunk]);
                    disk.write(f.clone(), (i * chunk) as u64, part)
                })
                .collect();
            for w in writes {
                w.done().await.unwrap();
            }
            let mut on_disk = vec![0; data.len()];
            f.read_exact_at(&mut on_disk, 0).unwrap();
            assert!(on_disk == data, "{}: the file differs", disk.name());

            let pool = Pool::new(chunk, 4);
            let reads: Vec<_> = (0..n)
                .map(|i| {
                    disk.read(
                        f.clone(),
                        (i * chunk) as u64,
                        pool.take(chunk),
                        SourceCache::Keep,
                    )
                })
                .collect();
            for (i, r) in reads.into_iter().enumerate() {
                let (buf, got) = r.done().await.unwrap();
                assert_eq!(got, chunk, "{}", disk.name());
                assert!(
                    buf[..] == data[i * chunk..(i + 1) * chunk],
                    "{}: chunk {i}",
                    disk.name()
                );
            }
        }
    }

    #[test]
    fn a_read_past_the_end_returns_what_there_is() {
        for disk in backends() {
            let dir = tempfile::tempdir().unwrap();
            let f = rw_file(&dir, "f");
            f.write_all_at(&pattern(1000, 1), 0).unwrap();
            let pool = Pool::new(4096, 1);
            let (buf, got) = disk
                .read(f.clone(), 200, pool.take(4096), SourceCache::Keep)
                .wait()
                .unwrap();
            assert_eq!(got, 800, "{}", disk.name());
            assert!(buf[..800] == pattern(1000, 1)[200..], "{}", disk.name());
            let (_, got) = disk
                .read(f, 5000, pool.take(10), SourceCache::Keep)
                .wait()
                .unwrap();
            assert_eq!(got, 0, "{}", disk.name());
        }
    }

    #[test]
    fn reads_that_drop_the_cache_return_the_same_bytes() {
        for disk in backends() {
            let dir = tempfile::tempdir().unwrap();
            let f = rw_file(&dir, "f");
            let data = pattern(3 << 20, 9);
            f.write_all_at(&data, 0).unwrap();
            f.sync_all().unwrap();
            let pool = Pool::new(1 << 20, 1);
            for i in 0..3 {
                let (buf, got) = disk
                    .read(f.clone(), i << 20, pool.take(1 << 20), SourceCache::Drop)
                    .wait()
                    .unwrap();
                assert_eq!(got, 1 << 20);
                let at = (i as usize) << 20;
                assert!(buf[..] == data[at..at + (1 << 20)], "{}", disk.name());
            }
            assert_ne!(DONTCACHE.load(Ordering::Relaxed), DONTCACHE_UNKNOWN);
        }
    }

    #[test]
    fn errors_come_back_to_the_caller() {
        for disk in backends() {
            let dir = tempfile::tempdir().unwrap();
            rw_file(&dir, "ro");
            let ro = Arc::new(File::open(dir.path().join("ro")).unwrap());
            let err = disk
                .write(ro, 0, Bytes::from_static(b"hello"))
                .wait()
                .unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{}", disk.name());
            let wo = Arc::new(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.path().join("ro"))
                    .unwrap(),
            );
            let pool = Pool::new(16, 1);
            let err = disk
                .read(wo, 0, pool.take(16), SourceCache::Keep)
                .wait()
                .unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{}", disk.name());
        }
    }

    #[test]
    fn io_choice_parses_the_three_names() {
        assert_eq!("auto".parse(), Ok(IoChoice::Auto));
        assert_eq!("uring".parse(), Ok(IoChoice::Uring));
        assert_eq!("threads".parse(), Ok(IoChoice::Threads));
        assert!("aio"
            .parse::<IoChoice>()
            .unwrap_err()
            .contains("auto, uring or threads"));
    }
}
