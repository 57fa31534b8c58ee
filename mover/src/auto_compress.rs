//! `--compress auto`: the source picks each chunk's zstd level from what holds the transfer
//! back at that moment.
//!
//! - A data-stream writer waits with no frame queued: the link is waiting for the CPU, so the
//!   chunk goes as it is (raw).
//! - The encoding threads were busy nearly all of the last moment, and a writer found the
//!   queue empty in it: the CPU is what limits (or is about to), so the chunk goes at zstd's
//!   fast level, which keeps most of the saving for well under half the work at both ends.
//!   Busy threads alone are not enough: on a host whose cores other work shares (the database,
//!   or the target in a test on one machine) they look busy while the link still limits.
//! - Otherwise the link is what holds the data back and the CPU has time to spare: the
//!   chunk goes at the transfer's level (1).
//!
//! How busy the threads are is measured over windows of [`WINDOW`]: the time spent encoding,
//! all threads together, over the window's length times the number of threads. A signal from
//! the queues alone cannot tell the two cases apart: the in-flight budget keeps the frame
//! queue from filling even when the link is slow, and jobs bunch up behind the encoding
//! threads after every burst of sends.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// zstd's fast level used when the encoding threads are the bottleneck. On the benchmark
/// tree it compresses about 1.7x as fast as level 1 and decompresses about 1.4x as fast, for
/// output about 13% larger.
pub const FAST_LEVEL: i32 = -1;

/// The length of one measuring window.
pub const WINDOW: Duration = Duration::from_millis(200);

/// The share of a window, in thousandths, that the encoding threads must have been busy for
/// chunks to go at [`FAST_LEVEL`]. A source that keeps up with its link at level 1 has time
/// to spare: two threads at about 200 MB/s each feed a 1 Gbit/s link (about 240 MB/s of data
/// at a 1.9x ratio) with 40% of their time free. At 0.9 the fast level came in too late to
/// help much in CPU-bound benchmark runs; at 0.75 it did (see the README's 1 Gbit/s runs).
pub const BUSY: u64 = 750;

/// The level chooser for one transfer, shared by every encoding job.
pub struct Auto {
    workers: u64,
    /// Nanoseconds spent encoding since the start, all threads together.
    busy_ns: AtomicU64,
    /// The window under way: when it started, `busy_ns` then, and the busy share (in
    /// thousandths) of the window before it.
    window: Mutex<Window>,
    /// Whether a writer found the frame queue empty in the window under way.
    starved: AtomicBool,
    /// Bytes sent raw, and at [`FAST_LEVEL`]; the rest went at the transfer's level.
    raw: AtomicU64,
    fast: AtomicU64,
}

struct Window {
    start: Instant,
    busy_ns: u64,
    share: u64,
    /// Whether a writer found the queue empty in the window before.
    starved: bool,
}

impl Auto {
    /// A chooser for `workers` encoding threads, its first window starting at `now`.
    pub fn new(workers: usize, now: Instant) -> Self {
        Self {
            workers: workers.max(1) as u64,
            busy_ns: AtomicU64::new(0),
            window: Mutex::new(Window {
                start: now,
                busy_ns: 0,
                share: 0,
                starved: false,
            }),
            starved: AtomicBool::new(false),
            raw: AtomicU64::new(0),
            fast: AtomicU64::new(0),
        }
    }

    /// Records that an encoding thread spent `took` on a job.
    pub fn encoded(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.busy_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The share (in thousandths) of the last whole window that the encoding threads were
    /// busy; a window that has run its length at `now` is closed and a new one begun.
    pub fn busy_share(&self, now: Instant) -> u64 {
        self.sample(now).0
    }

    /// The busy share as [`Auto::busy_share`] gives it, and whether a writer found the queue
    /// empty in the last whole window or the one under way.
    fn sample(&self, now: Instant) -> (u64, bool) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let span = now.saturating_duration_since(w.start);
        if span >= WINDOW {
            let busy = self.busy_ns.load(Ordering::Relaxed);
            let capacity = u64::try_from(span.as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_mul(self.workers);
            let done = busy.saturating_sub(w.busy_ns);
            w.share = (done.saturating_mul(1000) / capacity.max(1)).min(1000);
            w.starved = self.starved.swap(false, Ordering::Relaxed);
            w.start = now;
            w.busy_ns = busy;
        }
        (w.share, w.starved || self.starved.load(Ordering::Relaxed))
    }

    /// Records that a data-stream writer found no frame queued and has to wait for one.
    pub fn writer_starved(&self) {
        self.starved.store(true, Ordering::Relaxed);
    }

    /// The level for `len` bytes of chunks about to be encoded at `now`, where the transfer's
    /// level is `level` and `starved` says whether a writer waits with nothing queued.
    pub fn level(&self, level: i32, starved: bool, len: u64, now: Instant) -> i32 {
        if starved {
            self.raw.fetch_add(len, Ordering::Relaxed);
            return 0;
        }
        match self.sample(now) {
            (share, true) if share >= BUSY => {
                self.fast.fetch_add(len, Ordering::Relaxed);
                FAST_LEVEL
            }
            _ => level,
        }
    }

    /// Bytes sent raw.
    pub fn raw_bytes(&self) -> u64 {
        self.raw.load(Ordering::Relaxed)
    }

    /// Bytes sent at [`FAST_LEVEL`].
    pub fn fast_bytes(&self) -> u64 {
        self.fast.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_transfers_level_until_a_window_shows_the_threads_busy_and_the_link_waiting() {
        let t0 = Instant::now();
        let a = Auto::new(2, t0);
        // Nothing measured yet: the link is the safer guess.
        assert_eq!(a.level(1, false, 10, t0), 1);
        // Two threads busy 190 ms each of a 200 ms window: 950 thousandths.
        a.encoded(190 * MS);
        a.encoded(190 * MS);
        a.writer_starved();
        // The window has not run its length: still the share of the one before.
        assert_eq!(a.level(1, false, 10, t0 + 100 * MS), 1);
        assert_eq!(a.level(1, false, 10, t0 + WINDOW), FAST_LEVEL);
        assert_eq!(a.busy_share(t0 + WINDOW), 950);
        // The next window: the threads mostly wait (the link is what limits again).
        a.encoded(40 * MS);
        assert_eq!(a.level(1, false, 10, t0 + WINDOW + 150 * MS), FAST_LEVEL);
        assert_eq!(a.level(1, false, 10, t0 + 2 * WINDOW), 1);
        assert_eq!(a.busy_share(t0 + 2 * WINDOW), 100);
        assert_eq!((a.raw_bytes(), a.fast_bytes()), (0, 20));
    }

    #[test]
    fn busy_threads_alone_keep_the_level_while_the_link_has_frames_waiting() {
        // The cores are shared with other work: the threads look busy, but every writer
        // always found a frame queued, so the link is still what limits.
        let t0 = Instant::now();
        let a = Auto::new(2, t0);
        a.encoded(2 * WINDOW);
        assert_eq!(a.level(1, false, 10, t0 + WINDOW), 1);
        assert_eq!(a.busy_share(t0 + WINDOW), 1000);
        // A writer runs dry in the window under way: that counts at once ...
        a.writer_starved();
        assert_eq!(a.level(1, false, 10, t0 + WINDOW + MS), FAST_LEVEL);
        // ... and for the whole next window, while the threads stay busy.
        a.encoded(2 * WINDOW);
        assert_eq!(a.level(1, false, 10, t0 + 2 * WINDOW), FAST_LEVEL);
        a.encoded(2 * WINDOW);
        assert_eq!(a.level(1, false, 10, t0 + 3 * WINDOW), 1);
        assert_eq!(a.fast_bytes(), 20);
    }

    #[test]
    fn a_starved_writer_means_raw_whatever_the_threads_do() {
        let t0 = Instant::now();
        let a = Auto::new(1, t0);
        a.encoded(WINDOW);
        a.writer_starved();
        assert_eq!(a.level(1, true, 7, t0 + WINDOW), 0);
        assert_eq!(a.level(1, false, 5, t0 + WINDOW), FAST_LEVEL);
        assert_eq!((a.raw_bytes(), a.fast_bytes()), (7, 5));
    }

    #[test]
    fn the_share_is_per_thread_and_never_above_the_whole() {
        let t0 = Instant::now();
        let a = Auto::new(4, t0);
        // 400 ms of work over 4 threads in 200 ms: half of what they could do.
        a.encoded(400 * MS);
        assert_eq!(a.busy_share(t0 + WINDOW), 500);
        // A long job that finished in this window counts in full, but the share stops at
        // the whole window.
        a.encoded(5 * WINDOW);
        assert_eq!(a.busy_share(t0 + 2 * WINDOW), 1000);
        // A window exactly at the line, then one just under it.
        a.encoded(4 * WINDOW * BUSY as u32 / 1000);
        a.writer_starved();
        assert_eq!(a.busy_share(t0 + 3 * WINDOW), BUSY);
        assert_eq!(a.level(1, false, 1, t0 + 3 * WINDOW), FAST_LEVEL);
        a.encoded(4 * WINDOW * (BUSY as u32 - 1) / 1000);
        a.writer_starved();
        assert_eq!(a.level(1, false, 1, t0 + 4 * WINDOW), 1);
    }
}
