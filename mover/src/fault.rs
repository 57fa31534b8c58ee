//! Fault injection for tests, off unless an environment variable turns it on. Documented in the
//! README as test-only: nothing in a production run sets these.
//!
//! - `MOVER_TEST_FLIP_CHUNKS=N`: the agent flips one bit in the payload of the first N chunks
//!   it receives for its own copy, after forwarding them untouched, before verifying them.
//! - `MOVER_TEST_FLIP_STAGING=N`: with `staging_verify = "read-back"`, the agent flips one bit
//!   in the staging copy of the first N chunks it writes, after the write and before it reads
//!   the chunk back to check it.
//! - `MOVER_TEST_HOLD_END_MS=N`: a relay waits N ms after its parent's `End` before passing it
//!   on, so that a test can stop it in that window.
//! - `MOVER_TEST_DROP_COMMIT_REPORTS=N`: a relay drops the first N reports of a commit that
//!   its children send up, as if the link had been lost just before they arrived.

use std::sync::atomic::{AtomicU64, Ordering};

/// The faults this agent injects.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    flip_chunks: AtomicU64,
    flip_staging: AtomicU64,
    hold_end_ms: u64,
    drop_commit_reports: AtomicU64,
}

impl Faults {
    pub fn from_env() -> Self {
        let get = |name: &str| {
            let n = std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            if n > 0 {
                tracing::warn!(variable = name, count = n, "TEST FAULT INJECTION IS ON");
            }
            n
        };
        Self {
            flip_chunks: AtomicU64::new(get("MOVER_TEST_FLIP_CHUNKS")),
            flip_staging: AtomicU64::new(get("MOVER_TEST_FLIP_STAGING")),
            hold_end_ms: get("MOVER_TEST_HOLD_END_MS"),
            drop_commit_reports: AtomicU64::new(get("MOVER_TEST_DROP_COMMIT_REPORTS")),
        }
    }

    fn take(counter: &AtomicU64) -> bool {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Whether to damage the next received chunk.
    pub fn flip_chunk(&self) -> bool {
        Self::take(&self.flip_chunks)
    }

    /// How long a relay holds its parent's `End` back.
    pub fn hold_end(&self) -> Option<std::time::Duration> {
        (self.hold_end_ms > 0).then(|| std::time::Duration::from_millis(self.hold_end_ms))
    }

    /// Whether to drop the commit report a child just sent up.
    pub fn drop_commit_report(&self) -> bool {
        Self::take(&self.drop_commit_reports)
    }

    /// Whether to damage the chunk just written to staging.
    pub fn flip_staging(&self) -> bool {
        Self::take(&self.flip_staging)
    }
}

/// Flips the lowest bit of the byte in the middle of `data`.
pub(crate) fn flip(data: &mut [u8]) {
    if let Some(b) = data.get_mut(data.len() / 2) {
        *b ^= 1;
    }
}
