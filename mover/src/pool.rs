//! Reusable chunk buffers, so that a transfer's memory is a fixed set of buffers rather than
//! a stream of multi-MiB allocations that the allocator may keep after they are freed.
//!
//! A [`PoolBuf`] goes back to its pool when dropped, including after it was frozen into
//! [`Bytes`] and handed to QUIC: the bytes are returned when the last reference goes.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Buffers of one capacity, at most `keep` of them kept while idle.
#[derive(Debug)]
pub struct Pool {
    capacity: usize,
    keep: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    /// A pool of buffers that each hold `capacity` bytes.
    pub fn new(capacity: usize, keep: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            keep,
            free: Mutex::new(Vec::new()),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A zeroed buffer of `len` bytes (`len` at most the pool's capacity; larger requests get
    /// a buffer of their own that is not kept).
    pub fn take(self: &Arc<Self>, len: usize) -> PoolBuf {
        let mut buf = self.take_empty();
        buf.buf.resize(len, 0);
        buf
    }

    /// An empty buffer with the pool's capacity, to be filled by a writer.
    pub fn take_empty(self: &Arc<Self>) -> PoolBuf {
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut buf = reused.unwrap_or_else(|| Vec::with_capacity(self.capacity));
        buf.clear();
        PoolBuf {
            buf,
            pool: self.clone(),
        }
    }

    fn put(&self, buf: Vec<u8>) {
        if buf.capacity() != self.capacity {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep {
            free.push(buf);
        }
    }

    /// Idle buffers held now.
    pub fn idle(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A buffer on loan from a [`Pool`].
#[derive(Debug)]
pub struct PoolBuf {
    buf: Vec<u8>,
    pool: Arc<Pool>,
}

impl PoolBuf {
    /// The underlying vector, to append to (within capacity, to stay poolable).
    pub fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Shares the buffer as `Bytes` without copying; it returns to the pool when the last
    /// reference is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

/// Stops glibc from raising its mmap threshold as large blocks are freed: without this, after
/// the first multi-MiB free every chunk-sized allocation comes from per-thread arenas that are
/// rarely returned, and RSS drifts far above what is in use. Buffers are pooled, so the mmap
/// cost is paid once per buffer.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_after_bytes_are_dropped() {
        let pool = Pool::new(1024, 2);
        let a = pool.take(100);
        assert_eq!(a.len(), 100);
        let bytes = a.freeze();
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.idle(), 0, "a slice still holds the buffer");
        drop(slice);
        assert_eq!(pool.idle(), 1);
        let b = pool.take(1024);
        assert_eq!(pool.idle(), 0);
        assert!(b.iter().all(|&x| x == 0), "reused buffers are zeroed");
    }

    #[test]
    fn keeps_at_most_keep_idle_buffers() {
        let pool = Pool::new(64, 2);
        let bufs: Vec<_> = (0..5).map(|_| pool.take(64)).collect();
        drop(bufs);
        assert_eq!(pool.idle(), 2);
    }
}
