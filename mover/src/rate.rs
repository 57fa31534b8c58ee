//! `--max-rate`: paces a transfer's outgoing bytes so that, on average, no more than a set
//! number of bytes per second leave the source, whatever the number of data streams.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How far ahead of the average rate a burst may go: enough that one stream waiting does not
/// leave the link idle, little enough that the rate holds over any second.
const BURST: Duration = Duration::from_millis(50);

/// Paces bytes to `rate` per second on average (a virtual-clock token bucket). Shared by the
/// data streams of one transfer: each takes its frame's bytes before writing it.
#[derive(Debug)]
pub(crate) struct Pacer {
    bytes_per_sec: f64,
    /// When the bytes taken so far will all have gone out at the rate.
    due: Mutex<Instant>,
}

impl Pacer {
    /// `None` for no limit (0).
    pub fn new(bytes_per_sec: u64) -> Option<Self> {
        (bytes_per_sec > 0).then(|| Self {
            bytes_per_sec: bytes_per_sec as f64,
            due: Mutex::new(Instant::now()),
        })
    }

    /// Waits until `bytes` more may go out.
    pub async fn take(&self, bytes: u64) {
        let wait_until = {
            let mut due = self.due.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // Time the link sat idle is not saved up beyond the burst.
            let start = (*due).max(now);
            *due = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
            start.checked_sub(BURST).filter(|t| *t > now)
        };
        if let Some(t) = wait_until {
            tokio::time::sleep_until(t).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_average_rate_across_streams() {
        let pacer = std::sync::Arc::new(Pacer::new(10 << 20).unwrap());
        let started = Instant::now();
        // Four streams write 10 MiB each in 256 KiB frames: 40 MiB at 10 MiB/s is 4 s.
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let p = pacer.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..40 {
                    p.take(256 << 10).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        assert!((3.9..=4.0).contains(&secs), "took {secs} s");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_is_not_saved_up_beyond_a_burst() {
        let pacer = Pacer::new(1 << 20).unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let started = Instant::now();
        // After 10 s idle, 2 MiB at 1 MiB/s still takes about 2 s, not nothing.
        for _ in 0..8 {
            pacer.take(256 << 10).await;
        }
        let secs = started.elapsed().as_secs_f64();
        assert!((1.7..=2.0).contains(&secs), "took {secs} s");
    }

    #[test]
    fn zero_is_no_limit() {
        assert!(Pacer::new(0).is_none());
    }
}
