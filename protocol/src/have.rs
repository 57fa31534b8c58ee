//! What the targets already hold, as the source needs to know it: a chunk is skipped only when
//! every target holds it, with one hash.
//!
//! Before `Ready`, each target lists the chunks it holds from before the transfer (an
//! interrupted run, an older copy) in `Have` messages. On a reseed onto an older copy that is
//! nearly every chunk of every target, so how the source keeps the lists is what its memory
//! grows with. [`HaveMerge`] folds each message in as it arrives rather than keeping them: it
//! keeps one entry per chunk that the *first* target to report holds (28 bytes), and counts
//! the other targets against it. A chunk the first target lacks can never be held by every
//! target, so nothing the others add beyond that list needs a place.
//!
//! An entry keeps 16 of the hash's 32 bytes. That is enough to tell chunks apart (two different
//! chunks agree on them by chance with probability 2^-128), and it decides only what is not
//! sent: each target checks every chunk it holds against the full hash it computed itself, and
//! at the end its whole tree's digest against the source's, so a wrongly skipped chunk would
//! fail the transfer rather than go unnoticed.

use std::collections::HashMap;

use crate::message::Held;

/// How many of a hash's bytes an entry keeps.
const KEPT: usize = 16;

/// A target count no entry reaches: two targets disagreed on the chunk's bytes.
const SPLIT: u16 = u16::MAX;

#[derive(Debug, Clone, Copy)]
struct Entry {
    file: u32,
    /// The chunk's index in its file (its offset over the chunk size).
    index: u32,
    hash: [u8; KEPT],
    /// How many targets reported it with this hash, or [`SPLIT`].
    count: u16,
}

/// Folds the targets' `Have` lists together as they arrive.
///
/// A target lists its chunks in increasing (file, offset) order, in as many messages as it
/// takes; an entry that does not come after the same node's previous one (a list sent again
/// after a relay died and the node was linked anew, or out of order) is ignored. Ignoring
/// an entry can only make the source send a chunk it could have skipped.
#[derive(Debug)]
pub struct HaveMerge {
    targets: u16,
    chunk_size: u64,
    /// Sorted by (file, index): only the first reporting node appends.
    entries: Vec<Entry>,
    first: Option<String>,
    /// Each node's last (file, index) taken.
    last: HashMap<String, (u32, u32)>,
}

impl HaveMerge {
    /// For a transfer to `targets` targets in chunks of `chunk_size` bytes. With no targets
    /// nothing is ever skipped.
    pub fn new(targets: usize, chunk_size: u32) -> Self {
        Self {
            // Plans have at most `MAX_PLAN_NODES` (1,024) nodes; a count this high never
            // matches, which is the safe side.
            targets: u16::try_from(targets).unwrap_or(SPLIT),
            chunk_size: u64::from(chunk_size.max(1)),
            entries: Vec::new(),
            first: None,
            last: HashMap::new(),
        }
    }

    /// Takes one `Have` message's chunks from `node`.
    pub fn add(&mut self, node: &str, chunks: &[Held]) {
        if chunks.is_empty() {
            return;
        }
        let founder = match &self.first {
            Some(f) => f == node,
            None => {
                self.first = Some(node.to_owned());
                true
            }
        };
        let mut last = self.last.get(node).copied();
        for h in chunks {
            let Some(key) = key(self.chunk_size, h.file, h.offset) else {
                continue;
            };
            if last.is_some_and(|l| key <= l) {
                continue;
            }
            last = Some(key);
            let hash = kept(&h.hash);
            if founder {
                self.entries.push(Entry {
                    file: key.0,
                    index: key.1,
                    hash,
                    count: 1,
                });
            } else if let Ok(i) = find(&self.entries, key) {
                let e = &mut self.entries[i];
                e.count = if e.count == SPLIT || e.hash != hash {
                    SPLIT
                } else {
                    e.count.saturating_add(1)
                };
            }
        }
        if let Some(l) = last {
            self.last.insert(node.to_owned(), l);
        }
    }

    /// The chunks every target holds alike.
    pub fn finish(mut self) -> Skips {
        let targets = self.targets;
        self.entries
            .retain(|e| targets > 0 && e.count == targets && e.count != SPLIT);
        self.entries.shrink_to_fit();
        Skips {
            chunk_size: self.chunk_size,
            entries: self.entries,
        }
    }
}

/// The chunks every target already holds, with their hashes: what the source need not send.
#[derive(Debug, Default)]
pub struct Skips {
    chunk_size: u64,
    entries: Vec<Entry>,
}

impl Skips {
    /// Whether every target holds the chunk of `file` at `offset` with the hash `hash` that
    /// the source computed for it.
    pub fn skip(&self, file: u32, offset: u64, hash: &[u8; 32]) -> bool {
        key(self.chunk_size, file, offset)
            .and_then(|k| find(&self.entries, k).ok())
            .is_some_and(|i| self.entries[i].hash == kept(hash))
    }

    /// How many chunks are skipped.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A chunk's place: its file and its index there; `None` for an offset that is not a chunk's
/// start (or a chunk size of 0, as in an empty [`Skips`]).
fn key(chunk_size: u64, file: u32, offset: u64) -> Option<(u32, u32)> {
    if chunk_size == 0 || offset % chunk_size != 0 {
        return None;
    }
    Some((file, u32::try_from(offset / chunk_size).ok()?))
}

fn find(entries: &[Entry], key: (u32, u32)) -> Result<usize, usize> {
    entries.binary_search_by_key(&key, |e| (e.file, e.index))
}

fn kept(hash: &[u8; 32]) -> [u8; KEPT] {
    let mut k = [0; KEPT];
    k.copy_from_slice(&hash[..KEPT]);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u32 = 4096;

    fn held(file: u32, index: u64, fill: u8) -> Held {
        Held {
            file,
            offset: index * u64::from(CS),
            hash: [fill; 32],
        }
    }

    #[test]
    fn a_chunk_is_skipped_only_when_every_target_holds_the_same_bytes() {
        let mut m = HaveMerge::new(3, CS);
        m.add(
            "a",
            &[held(1, 0, 7), held(1, 1, 7), held(1, 2, 7), held(2, 0, 9)],
        );
        m.add(
            "b",
            &[held(1, 0, 7), held(1, 1, 8), held(1, 2, 7), held(2, 0, 9)],
        );
        m.add(
            "c",
            &[held(1, 0, 7), held(1, 1, 7), held(2, 0, 9), held(3, 0, 1)],
        );
        let s = m.finish();
        assert!(s.skip(1, 0, &[7; 32]));
        assert!(!s.skip(1, 0, &[8; 32]), "the source read other bytes");
        assert!(!s.skip(1, 4096, &[7; 32]), "b holds other bytes");
        assert!(!s.skip(1, 4096, &[8; 32]), "a and c hold other bytes");
        assert!(!s.skip(1, 8192, &[7; 32]), "c lacks it");
        assert!(!s.skip(3, 0, &[1; 32]), "only c holds it");
        assert!(s.skip(2, 0, &[9; 32]));
        assert!(!s.skip(2, 1, &[9; 32]), "not a chunk's start");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn the_full_hash_decides_beyond_the_kept_bytes_only_through_the_digest() {
        // Two hashes that agree on the kept bytes count as the same chunk here; the targets'
        // own checks and the tree digest are what tell them apart (see the module docs).
        let mut other = [7; 32];
        other[KEPT] = 8;
        let mut m = HaveMerge::new(1, CS);
        m.add("a", &[held(1, 0, 7)]);
        let s = m.finish();
        assert!(s.skip(1, 0, &other));
        other[KEPT - 1] = 8;
        assert!(!s.skip(1, 0, &other));
    }

    #[test]
    fn a_list_sent_again_counts_once() {
        let mut m = HaveMerge::new(2, CS);
        m.add("a", &[held(1, 0, 7), held(1, 1, 7)]);
        m.add("b", &[held(1, 0, 7)]);
        // b's relay died and b was linked anew: it lists everything again.
        m.add("b", &[held(1, 0, 7), held(1, 1, 7)]);
        m.add("a", &[held(1, 0, 7), held(1, 1, 7)]);
        let s = m.finish();
        assert!(s.skip(1, 0, &[7; 32]) && s.skip(1, 4096, &[7; 32]));

        // Without b's second list, 1/1 is held by one target of two.
        let mut m = HaveMerge::new(2, CS);
        m.add("a", &[held(1, 0, 7), held(1, 1, 7)]);
        m.add("b", &[held(1, 0, 7)]);
        m.add("b", &[held(1, 0, 7)]);
        let s = m.finish();
        assert!(s.skip(1, 0, &[7; 32]));
        assert!(
            !s.skip(1, 4096, &[7; 32]),
            "counted b's repeat of 1/0 as 1/1"
        );
    }

    #[test]
    fn a_list_in_several_messages_is_one_list() {
        let mut m = HaveMerge::new(2, CS);
        let all: Vec<Held> = (0..10).map(|i| held(4, i, 3)).collect();
        for part in all.chunks(3) {
            m.add("a", part);
        }
        for part in all.chunks(4) {
            m.add("b", part);
        }
        let s = m.finish();
        assert_eq!(s.len(), 10);
        assert!((0..10).all(|i| s.skip(4, i * u64::from(CS), &[3; 32])));
    }

    #[test]
    fn out_of_order_and_misaligned_entries_are_never_skipped() {
        let mut m = HaveMerge::new(1, CS);
        m.add(
            "a",
            &[
                held(1, 5, 1),
                held(1, 2, 1),
                Held {
                    file: 1,
                    offset: 6 * u64::from(CS) + 1,
                    hash: [1; 32],
                },
                held(1, 7, 1),
            ],
        );
        let s = m.finish();
        assert!(s.skip(1, 5 * u64::from(CS), &[1; 32]));
        assert!(!s.skip(1, 2 * u64::from(CS), &[1; 32]), "out of order");
        assert!(!s.skip(1, 6 * u64::from(CS), &[1; 32]));
        assert!(s.skip(1, 7 * u64::from(CS), &[1; 32]));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn with_no_targets_or_no_lists_nothing_is_skipped() {
        let mut m = HaveMerge::new(0, CS);
        m.add("a", &[held(1, 0, 7)]);
        assert!(m.finish().is_empty());
        let s = HaveMerge::new(2, CS).finish();
        assert!(!s.skip(1, 0, &[7; 32]));
        assert!(!Skips::default().skip(1, 0, &[7; 32]));
    }

    mod model {
        use std::collections::{BTreeMap, BTreeSet};

        use proptest::prelude::*;

        use super::*;

        /// Each target's list: chunk (file, index) with a hash byte from a small set, so that
        /// targets often agree and sometimes do not.
        fn lists() -> impl Strategy<Value = Vec<BTreeMap<(u32, u32), u8>>> {
            proptest::collection::vec(
                proptest::collection::btree_map((0u32..3, 0u32..40), 0u8..3, 0..60),
                1..5,
            )
        }

        /// The plain rule: skip what every target holds with one hash.
        fn reference(lists: &[BTreeMap<(u32, u32), u8>]) -> BTreeSet<((u32, u32), u8)> {
            let mut out: BTreeSet<_> = lists[0].iter().map(|(k, h)| (*k, *h)).collect();
            for l in &lists[1..] {
                out.retain(|(k, h)| l.get(k) == Some(h));
            }
            out
        }

        fn as_held(l: &BTreeMap<(u32, u32), u8>) -> Vec<Held> {
            l.iter()
                .map(|(&(file, index), &h)| held(file, u64::from(index), h))
                .collect()
        }

        fn skipped(s: &Skips) -> BTreeSet<((u32, u32), u8)> {
            let mut out = BTreeSet::new();
            for file in 0..3 {
                for index in 0..40 {
                    for h in 0..3 {
                        if s.skip(file, u64::from(index) * u64::from(CS), &[h; 32]) {
                            out.insert(((file, index), h));
                        }
                    }
                }
            }
            out
        }

        proptest! {
            /// Lists that arrive one target after another, each cut into messages anywhere,
            /// some sent twice: the merge skips exactly what the plain rule does.
            #[test]
            fn one_target_after_another_matches_the_plain_rule(
                lists in lists(),
                cut in 1usize..20,
                again in proptest::collection::vec(any::<bool>(), 5),
            ) {
                let mut m = HaveMerge::new(lists.len(), CS);
                for (i, l) in lists.iter().enumerate() {
                    let name = format!("t{i}");
                    let held = as_held(l);
                    for part in held.chunks(cut) {
                        m.add(&name, part);
                    }
                    if again[i] {
                        m.add(&name, &held);
                    }
                }
                prop_assert_eq!(skipped(&m.finish()), reference(&lists));
            }

            /// Messages of different targets interleaved in any order: the merge may skip
            /// less than the plain rule, never more.
            #[test]
            fn interleaved_lists_never_skip_more_than_the_plain_rule(
                lists in lists(),
                order in proptest::collection::vec(0usize..4, 0..200),
            ) {
                let held: Vec<Vec<Held>> = lists.iter().map(as_held).collect();
                let mut next = vec![0; held.len()];
                let mut m = HaveMerge::new(lists.len(), CS);
                for t in order.iter().map(|o| o % held.len()) {
                    let end = held[t].len().min(next[t] + 3);
                    m.add(&format!("t{t}"), &held[t][next[t]..end]);
                    next[t] = end;
                }
                for (t, h) in held.iter().enumerate() {
                    m.add(&format!("t{t}"), &h[next[t]..]);
                }
                let got = skipped(&m.finish());
                let want = reference(&lists);
                prop_assert!(got.is_subset(&want), "skipped {:?} beyond {:?}", got, want);
            }
        }
    }
}
