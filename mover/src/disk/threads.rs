//! The thread-pool disk back end: `preadv2`/`pwrite` on a few dedicated threads. Used where
//! io_uring cannot be set up (old kernel, seccomp, `kernel.io_uring_disabled`) or when asked
//! for with `--io threads`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{mpsc, Arc, Mutex};

use bytes::Bytes;

use super::{Disk, Pending, SourceCache};
use crate::pool::PoolBuf;

type Job = Box<dyn FnOnce() + Send>;

/// Threads for a machine of this size: enough for a device's queue, few enough to stay small.
pub(crate) fn pool_size() -> usize {
    (2 * crate::cores()).clamp(4, 16)
}

/// A pool of threads that each run one request at a time.
#[derive(Debug)]
pub struct Threads {
    jobs: mpsc::Sender<Job>,
    size: usize,
}

impl Threads {
    /// Starts `size` threads; they end when the `Threads` is dropped and the queue is empty.
    pub fn start(size: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..size.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("mover-disk-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(mpsc::RecvError) => return,
                    }
                })?;
        }
        Ok(Self {
            jobs: tx,
            size: size.max(1),
        })
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Pending<T> {
        let (tx, pending) = Pending::channel();
        // A send fails only once every thread is gone; the dropped reply then reports it.
        let _ = self.jobs.send(Box::new(move || {
            let _ = tx.send(f());
        }));
        pending
    }
}

impl Disk for Threads {
    fn name(&self) -> &'static str {
        "threads"
    }

    fn read(
        &self,
        file: Arc<File>,
        offset: u64,
        mut buf: PoolBuf,
        cache: SourceCache,
    ) -> Pending<(PoolBuf, usize)> {
        self.run(move || {
            let got = read_full(&file, offset, &mut buf, cache)?;
            Ok((buf, got))
        })
    }

    fn write(&self, file: Arc<File>, offset: u64, data: Bytes) -> Pending<()> {
        // `write_all_at` loops over short writes and retries on EINTR.
        self.run(move || file.write_all_at(&data, offset))
    }
}

/// Reads until `buf` is full or the file ends, the way [`Disk::read`] says.
pub(crate) fn read_full(
    file: &File,
    offset: u64,
    buf: &mut [u8],
    cache: SourceCache,
) -> io::Result<usize> {
    let mut done = 0;
    let mut flags = super::read_flags(cache);
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: `iov` points into `rest`, which is valid for writes of its length and
        // borrowed for the whole call.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                flags,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN) => continue,
                Some(errno) if flags != 0 && super::dontcache_refused(errno) => {
                    super::note_dontcache(false);
                    flags = 0;
                    continue;
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    if cache == SourceCache::Drop {
        if flags != 0 {
            super::note_dontcache(true);
        } else {
            super::drop_cached(file, offset, done);
        }
    }
    Ok(done)
}
