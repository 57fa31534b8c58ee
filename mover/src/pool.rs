//! Reusable chunk buffers, so that a transfer's memory is a fixed set of buffers rather than
//! a stream of multi-MiB allocations that the allocator may keep after they are freed.
//!
//! A [`PoolBuf`] goes back to its pool when dropped, including after it was frozen into
//! [`Bytes`] and handed to QUIC: the bytes are returned when the last reference goes.
//!
//! Every buffer starts on a [`ALIGN`] boundary, so that a chunk read or decompressed into one
//! can go to and from the disk with `O_DIRECT` as it is.
//!
//! Requests of at most [`SMALL`] bytes (small files) get buffers of their own size class
//! (4 KiB, 8 KiB, ... [`SMALL`]), kept apart from the chunk-sized ones: thousands of them may
//! be alive at once (QUIC holds each frame until it is acknowledged), and a chunk-sized
//! allocation for each would cost a `mmap` and a `munmap` per small file once the pool ran
//! dry, or the memory of a chunk per file if they came from the heap.
//!
//! Larger requests get a buffer of their size rounded up to a sixteenth of the capacity,
//! not always a whole chunk's: a compressed frame (often half a chunk) or a batch of small
//! files waits in QUIC's send buffer until acknowledged, and a chunk-sized buffer under each
//! kept the source at twice the memory its windows hold. [`Pool::fit`] moves data written
//! into a larger buffer (a compression's output) into one of its size.
//!
//! Idle buffers are kept for reuse, at most `keep` of a kind, and those larger than
//! [`SMALL`] are freed once idle for [`IDLE_FOR`]: a transfer's phases need different
//! buffers, and what one phase left idle would otherwise count to the end.

use std::alloc::Layout;
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Where every pooled buffer starts, and the unit of `O_DIRECT` I/O: a page, which is also a
/// multiple of every common device's logical block size.
pub const ALIGN: usize = 4096;

/// The largest small buffer: a small file's chunk (at most 64 KiB) with its frame header and
/// the padding that puts its payload on a block boundary.
pub const SMALL: usize = 128 << 10;

/// Small size classes: [`ALIGN`] << 0 ..= [`SMALL`].
const CLASSES: usize = (SMALL / ALIGN).trailing_zeros() as usize + 1;

/// Idle small buffers a pool keeps per size class (at most 16 MiB in all).
const SMALL_KEEP: usize = 64;

/// Buffers larger than [`SMALL`] come in sizes of this many steps up to the capacity.
const STEPS: usize = 16;

/// Buffers of `capacity` bytes and of sizes between [`SMALL`] and that, at most `keep` of
/// each kept while idle, and small ones (when `capacity` is larger than [`SMALL`]) for
/// requests that fit one.
#[derive(Debug)]
pub struct Pool {
    capacity: usize,
    keep: usize,
    /// Idle buffers of the full capacity.
    free: Mutex<Idle>,
    /// Idle buffers larger than [`SMALL`] and smaller than the capacity, of many sizes.
    medium: Mutex<Idle>,
    small: [Mutex<Idle>; CLASSES],
}

/// How long a buffer may stay idle before it is freed. What a transfer has in use changes
/// with its phase (raw chunks fill QUIC's windows with whole-chunk buffers until automatic
/// compression starts, small files come last): buffers that served one phase and not the
/// next would otherwise be kept to the end, idle, and count in the agent's memory.
const IDLE_FOR: Duration = Duration::from_secs(2);

/// One kind of idle buffer, the one returned last at the back: taken first (its memory is
/// the warmest), while those at the front are freed once idle for [`IDLE_FOR`].
#[derive(Debug)]
struct Idle {
    blocks: VecDeque<(Block, Instant)>,
    /// Whether buffers idle for [`IDLE_FOR`] are freed.
    trims: bool,
}

impl Idle {
    fn pop(&mut self, now: Instant) -> Option<Block> {
        self.trim(now);
        self.blocks.pop_back().map(|(b, _)| b)
    }

    /// The most recently returned buffer whose capacity `fits`.
    fn take_where(&mut self, now: Instant, fits: impl Fn(usize) -> bool) -> Option<Block> {
        self.trim(now);
        let i = self.blocks.iter().rposition(|(b, _)| fits(b.capacity()))?;
        self.blocks.remove(i).map(|(b, _)| b)
    }

    fn push(&mut self, block: Block, keep: usize, now: Instant) {
        self.trim(now);
        if self.blocks.len() < keep {
            self.blocks.push_back((block, now));
        }
    }

    fn new(trims: bool) -> Self {
        Self {
            blocks: VecDeque::new(),
            trims,
        }
    }

    fn trim(&mut self, now: Instant) {
        while self.trims
            && self
                .blocks
                .front()
                .is_some_and(|(_, since)| now.saturating_duration_since(*since) > IDLE_FOR)
        {
            self.blocks.pop_front();
        }
    }

    fn len(&self) -> usize {
        self.blocks.len()
    }
}

fn lock(idle: &Mutex<Idle>) -> std::sync::MutexGuard<'_, Idle> {
    idle.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    /// A pool of buffers that each hold `capacity` bytes.
    pub fn new(capacity: usize, keep: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            keep,
            free: Mutex::new(Idle::new(true)),
            medium: Mutex::new(Idle::new(true)),
            small: std::array::from_fn(|_| Mutex::new(Idle::new(false))),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The small size class of requests of `len` bytes, if they get a small buffer.
    fn class(&self, len: usize) -> Option<usize> {
        (len <= SMALL && SMALL < self.capacity)
            .then(|| len.max(ALIGN).next_power_of_two().trailing_zeros() as usize)
            .map(|bits| bits - ALIGN.trailing_zeros() as usize)
    }

    /// A zeroed buffer of `len` bytes (`len` at most the pool's capacity; larger requests get
    /// a buffer of their own that is not kept).
    pub fn take(self: &Arc<Self>, len: usize) -> PoolBuf {
        let mut block = self.block(len);
        block.zero(0, len);
        self.lend(block, len)
    }

    /// A buffer of `len` bytes for a caller that fills all of it, or cuts it to what it
    /// filled, before anyone reads it (a read from disk or the network, a decompression):
    /// a reused buffer keeps what its last user left there, which saves clearing megabytes
    /// that are about to be overwritten. Bytes never written before are zeroed, so the
    /// buffer is always initialised memory.
    pub fn take_for_overwrite(self: &Arc<Self>, len: usize) -> PoolBuf {
        let mut block = self.block(len);
        block.zero(block.init, len);
        self.lend(block, len)
    }

    /// Moves `buf`'s bytes into a buffer of the size a request of their length gets, when
    /// that is smaller than `buf`'s: for data that will wait a while (a frame until QUIC has
    /// it acknowledged) in a buffer that was taken larger than what was written into it.
    pub fn fit(self: &Arc<Self>, buf: PoolBuf) -> PoolBuf {
        let len = buf.len();
        if len > self.capacity || buf.capacity() <= self.size_for(len) {
            return buf;
        }
        let mut fitted = self.take_for_overwrite(len);
        fitted.copy_from_slice(&buf);
        fitted
    }

    /// The size of the buffer a request of `len` bytes (at most the capacity) gets: its small
    /// class, or `len` rounded up to a step.
    fn size_for(&self, len: usize) -> usize {
        self.class(len)
            .map_or_else(|| self.step_size(len), |c| ALIGN << c)
    }

    /// A sixteenth of the capacity, in whole [`ALIGN`] units.
    fn step(&self) -> usize {
        (self.capacity / STEPS).next_multiple_of(ALIGN).max(ALIGN)
    }

    /// The size of a new buffer for `len` bytes, above [`SMALL`]: `len` rounded up to a
    /// [`Pool::step`], at most the capacity. A pool whose capacity is [`SMALL`] or less has
    /// buffers of its capacity only.
    fn step_size(&self, len: usize) -> usize {
        if self.capacity <= SMALL {
            return self.capacity;
        }
        len.next_multiple_of(self.step()).min(self.capacity)
    }

    fn block(&self, len: usize) -> Block {
        let now = Instant::now();
        if len > self.capacity {
            return Block::new(len);
        }
        let size = self.size_for(len);
        if let Some(class) = self.class(len) {
            let reused = lock(&self.small[class]).pop(now);
            return reused.unwrap_or_else(|| Block::new(size));
        }
        if size == self.capacity {
            let reused = lock(&self.free).pop(now);
            return reused.unwrap_or_else(|| Block::new(size));
        }
        // An idle buffer that holds `len` bytes, if it is no more than a step larger than a
        // new one would be.
        let most = size + self.step();
        let reused = lock(&self.medium).take_where(now, |cap| (len..=most).contains(&cap));
        reused.unwrap_or_else(|| Block::new(size))
    }

    fn lend(self: &Arc<Self>, block: Block, len: usize) -> PoolBuf {
        PoolBuf {
            block: Some(block),
            len,
            pool: self.clone(),
        }
    }

    fn put(&self, block: Block) {
        let cap = block.capacity();
        let (idle, keep) = if cap == self.capacity {
            (&self.free, self.keep)
        } else if SMALL < cap && cap < self.capacity {
            (&self.medium, self.keep)
        } else {
            match self.class(cap) {
                Some(class) if ALIGN << class == cap => (&self.small[class], SMALL_KEEP),
                _ => return,
            }
        };
        lock(idle).push(block, keep, Instant::now());
    }

    /// Idle buffers held now, small ones included.
    pub fn idle(&self) -> usize {
        [&self.free, &self.medium]
            .into_iter()
            .chain(&self.small)
            .map(|idle| lock(idle).len())
            .sum()
    }
}

/// One [`ALIGN`]-aligned allocation. Only its first `init` bytes have ever been written (by
/// [`Block::zero`], then by users), and only those are ever handed out: the rest is memory
/// the kernel has not had to provide yet, which matters when a 4 MiB buffer holds a small
/// file.
struct Block {
    ptr: NonNull<u8>,
    layout: Layout,
    init: usize,
}

// SAFETY: a Block owns its allocation outright, like a Box<[u8]>.
unsafe impl Send for Block {}
// SAFETY: shared access only reads through `&self`.
unsafe impl Sync for Block {}

impl Block {
    fn new(capacity: usize) -> Self {
        let layout = match Layout::from_size_align(capacity.max(1), ALIGN) {
            Ok(l) => l,
            Err(_) => std::alloc::handle_alloc_error(Layout::new::<u8>()),
        };
        // SAFETY: the layout's size is not zero.
        let ptr = unsafe { std::alloc::alloc(layout) };
        match NonNull::new(ptr) {
            Some(ptr) => Self {
                ptr,
                layout,
                init: 0,
            },
            None => std::alloc::handle_alloc_error(layout),
        }
    }

    fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// Zeroes bytes `from..to` (`to` at most the capacity), which makes them initialised.
    fn zero(&mut self, from: usize, to: usize) {
        let to = to.min(self.capacity());
        if from >= to {
            return;
        }
        // SAFETY: `from..to` lies within the allocation; `write_bytes` needs no initialised
        // contents.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(from), 0, to - from) };
        self.init = self.init.max(to);
    }

    /// The first `len` bytes (at most the initialised ones).
    fn slice(&self, len: usize) -> &[u8] {
        // SAFETY: the first `init` bytes are initialised and owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len.min(self.init)) }
    }

    fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: as in `slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len.min(self.init)) }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Block({} bytes)", self.capacity())
    }
}

/// A buffer on loan from a [`Pool`]: its first `len` bytes, starting on an [`ALIGN`] boundary.
#[derive(Debug)]
pub struct PoolBuf {
    /// Always `Some` until dropped.
    block: Option<Block>,
    len: usize,
    pool: Arc<Pool>,
}

impl PoolBuf {
    /// The most bytes the buffer can hold (see [`PoolBuf::resize`]).
    pub fn capacity(&self) -> usize {
        self.block.as_ref().map_or(0, Block::capacity)
    }

    /// Shortens the buffer to `len` bytes (no effect if it is not longer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Sets the length to `len` bytes (at most the capacity), zeroing any bytes it adds.
    pub fn resize(&mut self, len: usize) {
        let Some(b) = &mut self.block else { return };
        let len = len.min(b.capacity());
        b.zero(self.len, len);
        self.len = len;
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
        match &self.block {
            Some(b) => b.slice(self.len),
            None => &[],
        }
    }
}

impl DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.block {
            Some(b) => b.slice_mut(self.len),
            None => &mut [],
        }
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            self.pool.put(b);
        }
    }
}

/// Whether `data` starts on an [`ALIGN`] boundary.
pub fn is_aligned(data: &[u8]) -> bool {
    (data.as_ptr() as usize) % ALIGN == 0
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
    fn buffers_start_on_a_block_boundary_and_grow_zeroed() {
        let pool = Pool::new(64 << 10, 4);
        let mut a = pool.take(100);
        assert!(is_aligned(&a));
        a.fill(7);
        a.truncate(10);
        a.resize(20);
        assert_eq!(&a[..10], &[7; 10]);
        assert_eq!(&a[10..], &[0; 10], "bytes a resize adds are zero");
        a.resize(1 << 30);
        assert_eq!(a.len(), 64 << 10, "no further than the capacity");
        drop(a);
        // A reused buffer is aligned too, and a request beyond the capacity gets a buffer of
        // its own that is not kept.
        assert!(is_aligned(&pool.take(10)));
        let big = pool.take(100 << 10);
        assert!(is_aligned(&big) && big.len() == 100 << 10);
        drop(big);
        assert_eq!(pool.idle(), 1);
    }

    #[test]
    fn buffers_for_overwrite_skip_only_the_clearing() {
        let pool = Pool::new(4096, 2);
        let mut a = pool.take_for_overwrite(100);
        assert_eq!(a.len(), 100);
        assert!(a.iter().all(|&x| x == 0), "never-written bytes are zeroed");
        a.fill(9);
        drop(a);
        let mut b = pool.take_for_overwrite(200);
        assert_eq!(b.len(), 200);
        assert!(is_aligned(&b));
        assert_eq!(
            &b[..100],
            &[9; 100],
            "what the last user wrote is not cleared"
        );
        assert_eq!(&b[100..], &[0; 100], "what nobody wrote is");
        b.fill(3);
        drop(b);
        assert!(pool.take(200).iter().all(|&x| x == 0), "take still clears");
    }

    #[test]
    fn small_requests_get_small_buffers_of_their_own_size_class() {
        let pool = Pool::new(4 << 20, 2);
        let mut small = pool.take_for_overwrite(3000);
        assert!(is_aligned(&small));
        small.resize(1 << 30);
        assert_eq!(small.len(), ALIGN, "3000 bytes get a 4 KiB buffer");
        let mut mid = pool.take(ALIGN + 1);
        mid.resize(1 << 30);
        assert_eq!(mid.len(), 2 * ALIGN, "4097 bytes get an 8 KiB buffer");
        let mut top = pool.take(SMALL);
        top.resize(1 << 30);
        assert_eq!(top.len(), SMALL);
        let big = pool.take(SMALL + 1);
        drop((small, mid, top, big));
        assert_eq!(pool.idle(), 4);
        // Each comes back to its own class: these reuse three of them and allocate one.
        let a = pool.take(10);
        let b = pool.take(SMALL);
        let c = pool.take(SMALL + 100);
        let d = pool.take(SMALL / 2);
        assert_eq!(pool.idle(), 1, "the 8 KiB buffer is left");
        drop((a, b, c, d));
        assert_eq!(pool.idle(), 5);
        // Many small buffers at once, then back: no more than SMALL_KEEP stay per class.
        let many: Vec<_> = (0..SMALL_KEEP + 10).map(|_| pool.take(100)).collect();
        drop(many);
        assert_eq!(pool.idle(), SMALL_KEEP + 4);
        // A pool whose buffers are small anyway has no classes.
        let plain = Pool::new(SMALL, 2);
        let mut one = plain.take(10);
        one.resize(1 << 30);
        assert_eq!(one.len(), SMALL);
    }

    #[test]
    fn larger_requests_get_buffers_in_sixteenths_of_the_capacity() {
        let cap = 4 << 20;
        let step = cap / STEPS;
        let pool = Pool::new(cap, 4);
        let mut a = pool.take_for_overwrite(2 * step + 1);
        a.resize(usize::MAX);
        assert_eq!((a.capacity(), a.len()), (3 * step, 3 * step));
        let half = pool.take(cap / 2);
        assert_eq!(half.capacity(), cap / 2);
        assert_eq!(
            pool.take(cap - 1).capacity(),
            cap,
            "the last step is the capacity"
        );
        drop((a, half));
        assert_eq!(pool.idle(), 3);
        // An idle buffer is reused for a request up to a step smaller than it is made for,
        // not for one that would leave most of it unused.
        let b = pool.take(cap / 2 - step + 1);
        assert_eq!(b.capacity(), cap / 2);
        let c = pool.take(step);
        assert_eq!(
            c.capacity(),
            step,
            "a new buffer, not the idle one of three steps"
        );
        assert_eq!(pool.idle(), 2);
        drop((b, c));
        assert_eq!(pool.idle(), 4);
    }

    #[test]
    fn fit_moves_what_was_written_into_a_buffer_of_its_size() {
        let cap = 4 << 20;
        let pool = Pool::new(cap, 4);
        let mut big = pool.take_for_overwrite(cap);
        for (i, x) in big.iter_mut().enumerate() {
            *x = i as u8;
        }
        let want: Vec<u8> = big[..300_000].to_vec();
        big.truncate(300_000);
        let fitted = pool.fit(big);
        assert_eq!(&fitted[..], &want[..]);
        assert_eq!(fitted.capacity(), 2 * cap / STEPS);
        assert_eq!(pool.idle(), 1, "the chunk-sized buffer went back at once");
        // Already of its size: kept as it is, not copied.
        let at = fitted.as_ptr();
        let same = pool.fit(fitted);
        assert_eq!(same.as_ptr(), at);
        // Small enough for a small class.
        let mut small = same;
        small.truncate(5000);
        let small = pool.fit(small);
        assert_eq!((small.capacity(), &small[..]), (2 * ALIGN, &want[..5000]));
    }

    #[test]
    fn buffers_idle_for_long_are_freed_the_oldest_first() {
        // Taking and returning buffers trims each kind as it goes; this does all at once.
        let trim = |pool: &Pool, now: Instant| {
            for idle in [&pool.free, &pool.medium].into_iter().chain(&pool.small) {
                lock(idle).trim(now);
            }
        };
        let pool = Pool::new(4 << 20, 8);
        let bufs = [pool.take(4 << 20), pool.take(1 << 20), pool.take(100)];
        drop(bufs);
        assert_eq!(pool.idle(), 3);
        trim(&pool, Instant::now());
        assert_eq!(pool.idle(), 3, "just returned");
        trim(&pool, Instant::now() + IDLE_FOR + Duration::from_millis(1));
        assert_eq!(pool.idle(), 1, "large ones are freed, small ones stay");

        let t0 = Instant::now();
        let mut idle = Idle::new(true);
        idle.push(Block::new(ALIGN), 8, t0);
        idle.push(Block::new(2 * ALIGN), 8, t0 + IDLE_FOR / 2);
        idle.push(Block::new(3 * ALIGN), 8, t0 + IDLE_FOR);
        let later = t0 + IDLE_FOR + IDLE_FOR / 4;
        assert_eq!(idle.pop(later).map(|b| b.capacity()), Some(3 * ALIGN));
        assert_eq!(idle.len(), 1, "the oldest went, the newest was taken");
        assert_eq!(
            idle.take_where(later, |c| c == ALIGN).map(|b| b.capacity()),
            None
        );
        assert_eq!(idle.pop(later).map(|b| b.capacity()), Some(2 * ALIGN));
    }

    #[test]
    fn keeps_at_most_keep_idle_buffers() {
        let pool = Pool::new(64, 2);
        let bufs: Vec<_> = (0..5).map(|_| pool.take(64)).collect();
        drop(bufs);
        assert_eq!(pool.idle(), 2);
    }
}
