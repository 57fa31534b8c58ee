//! What the targets already hold, as the source needs to know it: a chunk is skipped only when
//! every target holds it, with one hash.
//!
//! Before `Ready`, each target lists the chunks it holds from before the transfer (an
//! interrupted run, an older copy) in `Have` messages. On a reseed onto an older copy that is
//! nearly every chunk of every target, so where the source keeps the lists decides how its
//! memory grows. [`HaveMerge`] folds each message in as it arrives into a [`Table`] with one
//! 18-byte record per chunk of the manifest, at the chunk's place: 16 of its hash's 32 bytes
//! and how many targets reported it with them. Agents keep the table in an unlinked file, so
//! the process itself keeps only each node's place in its list, whatever the dataset's size.
//!
//! A record keeps 16 of the hash's 32 bytes. That is enough to tell chunks apart (two different
//! chunks agree on them by chance with probability 2^-128), and it decides only what is not
//! sent: each target checks every chunk it holds against the full hash it computed itself, and
//! at the end its whole tree's digest against the source's, so a wrongly skipped chunk would
//! fail the transfer rather than go unnoticed.

use std::collections::HashMap;
use std::io;

use crate::message::Held;
use crate::table::{ChunkIndex, Table};

/// How many of a hash's bytes a record keeps.
const KEPT: usize = 16;
/// Bytes per record: the kept hash, then the count (big endian).
const RECORD: usize = KEPT + 2;

/// A target count no record reaches: two targets disagreed on the chunk's bytes.
const SPLIT: u16 = u16::MAX;

/// Folds the targets' `Have` lists together as they arrive.
///
/// A target lists its chunks in increasing (file, offset) order, in as many messages as it
/// takes; an entry that does not come after the same node's previous one (a list sent again
/// after a relay died and the node was linked anew, or out of order) is ignored. Ignoring
/// an entry can only make the source send a chunk it could have skipped.
#[derive(Debug)]
pub struct HaveMerge {
    targets: u16,
    index: ChunkIndex,
    /// `None` once the table failed: nothing is skipped then.
    table: Option<Box<dyn Table>>,
    /// Why the table failed.
    failure: Option<io::Error>,
    /// Each node's last chunk taken (its index in the manifest).
    last: HashMap<String, u64>,
    /// Chunks every target reported alike.
    agreed: u64,
    /// One message's accepted chunks, and the records of a run of them.
    taken: Vec<(u64, [u8; KEPT])>,
    buf: Vec<u8>,
}

impl HaveMerge {
    /// For a transfer to `targets` targets of the manifest `index` numbers, keeping its records
    /// in `table` (which must read as zeros). With no targets nothing is ever skipped.
    pub fn new(targets: usize, index: ChunkIndex, table: Box<dyn Table>) -> Self {
        Self {
            // Plans have at most `MAX_PLAN_NODES` (1,024) nodes; a count this high never
            // matches, which is the safe side.
            targets: u16::try_from(targets).unwrap_or(SPLIT),
            index,
            table: Some(table),
            failure: None,
            last: HashMap::new(),
            agreed: 0,
            taken: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Takes one `Have` message's chunks from `node`. If the table fails, the merge gives up:
    /// nothing will be skipped, and [`HaveMerge::failure`] says why.
    pub fn add(&mut self, node: &str, chunks: &[Held]) {
        if self.targets == 0 || self.targets == SPLIT || self.table.is_none() {
            return;
        }
        let mut last = self.last.get(node).copied();
        self.taken.clear();
        for h in chunks {
            let Some(i) = self.index.index(h.file, h.offset) else {
                continue;
            };
            if last.is_some_and(|l| i <= l) {
                continue;
            }
            last = Some(i);
            self.taken.push((i, kept(&h.hash)));
        }
        if let Some(l) = last {
            self.last.insert(node.to_owned(), l);
        }
        if let Err(e) = self.fold_taken() {
            self.table = None;
            self.agreed = 0;
            self.failure = Some(e);
        }
    }

    /// Why the merge gave up, if it did.
    pub fn failure(&self) -> Option<&io::Error> {
        self.failure.as_ref()
    }

    /// Folds `taken` into the table: each run of consecutive chunks with one read and one
    /// write.
    fn fold_taken(&mut self) -> io::Result<()> {
        let Some(table) = &self.table else {
            return Ok(());
        };
        let mut start = 0;
        while start < self.taken.len() {
            let first = self.taken[start].0;
            let mut end = start + 1;
            while end < self.taken.len() && self.taken[end].0 == first + (end - start) as u64 {
                end += 1;
            }
            let run = &self.taken[start..end];
            self.buf.clear();
            self.buf.resize(run.len() * RECORD, 0);
            let pos = first * RECORD as u64;
            table.read_at(pos, &mut self.buf)?;
            for (&(_, hash), rec) in run.iter().zip(self.buf.chunks_exact_mut(RECORD)) {
                let count = u16::from_be_bytes([rec[KEPT], rec[KEPT + 1]]);
                let now = match count {
                    0 => 1,
                    SPLIT => SPLIT,
                    n if rec[..KEPT] == hash => n.saturating_add(1).min(SPLIT - 1),
                    _ => SPLIT,
                };
                if count == self.targets {
                    self.agreed -= 1;
                }
                if now == self.targets {
                    self.agreed += 1;
                }
                rec[..KEPT].copy_from_slice(&hash);
                rec[KEPT..].copy_from_slice(&now.to_be_bytes());
            }
            table.write_at(pos, &self.buf)?;
            start = end;
        }
        Ok(())
    }

    /// The chunks every target holds alike.
    pub fn finish(self) -> Skips {
        match self.table {
            Some(table) if self.agreed > 0 => Skips {
                targets: self.targets,
                agreed: self.agreed,
                held: Some((self.index, table)),
            },
            _ => Skips::default(),
        }
    }
}

/// The chunks every target already holds, with their hashes: what the source need not send.
#[derive(Debug, Default)]
pub struct Skips {
    targets: u16,
    agreed: u64,
    held: Option<(ChunkIndex, Box<dyn Table>)>,
}

impl Skips {
    /// Whether every target holds the chunk of `file` at `offset` with the hash `hash` that
    /// the source computed for it. A record that cannot be read is not skipped.
    pub fn skip(&self, file: u32, offset: u64, hash: &[u8; 32]) -> bool {
        let Some((index, table)) = &self.held else {
            return false;
        };
        let Some(i) = index.index(file, offset) else {
            return false;
        };
        let mut rec = [0u8; RECORD];
        table.read_at(i * RECORD as u64, &mut rec).is_ok()
            && u16::from_be_bytes([rec[KEPT], rec[KEPT + 1]]) == self.targets
            && rec[..KEPT] == kept(hash)
    }

    /// How many chunks are skipped.
    pub fn len(&self) -> u64 {
        self.agreed
    }

    pub fn is_empty(&self) -> bool {
        self.agreed == 0
    }
}

fn kept(hash: &[u8; 32]) -> [u8; KEPT] {
    let mut k = [0; KEPT];
    k.copy_from_slice(&hash[..KEPT]);
    k
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const CS: u32 = 4096;

    /// A merge over files 1 to 4 of 64 chunks each, in memory.
    fn merge(targets: usize) -> HaveMerge {
        use crate::manifest::tests::{dir, file};
        let mut entries = vec![dir("")];
        entries.extend((1..=4).map(|f| file(&format!("f{f}"), 64 * u64::from(CS))));
        let m = crate::manifest::Manifest::from_entries(entries).unwrap();
        HaveMerge::new(
            targets,
            ChunkIndex::new(&m, CS).unwrap(),
            Box::<crate::table::MemTable>::default(),
        )
    }

    fn held(file: u32, index: u64, fill: u8) -> Held {
        Held {
            file,
            offset: index * u64::from(CS),
            hash: [fill; 32],
        }
    }

    #[test]
    fn a_chunk_is_skipped_only_when_every_target_holds_the_same_bytes() {
        let mut m = merge(3);
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
        let mut m = merge(1);
        m.add("a", &[held(1, 0, 7)]);
        let s = m.finish();
        assert!(s.skip(1, 0, &other));
        other[KEPT - 1] = 8;
        assert!(!s.skip(1, 0, &other));
    }

    #[test]
    fn a_list_sent_again_counts_once() {
        let mut m = merge(2);
        m.add("a", &[held(1, 0, 7), held(1, 1, 7)]);
        m.add("b", &[held(1, 0, 7)]);
        // b's relay died and b was linked anew: it lists everything again.
        m.add("b", &[held(1, 0, 7), held(1, 1, 7)]);
        m.add("a", &[held(1, 0, 7), held(1, 1, 7)]);
        let s = m.finish();
        assert!(s.skip(1, 0, &[7; 32]) && s.skip(1, 4096, &[7; 32]));

        // Without b's second list, 1/1 is held by one target of two.
        let mut m = merge(2);
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
        let mut m = merge(2);
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
        let mut m = merge(1);
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
        let mut m = merge(0);
        m.add("a", &[held(1, 0, 7)]);
        assert!(m.finish().is_empty());
        let s = merge(2).finish();
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
                proptest::collection::btree_map((1u32..4, 0u32..40), 0u8..3, 0..60),
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
            for file in 1..4 {
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
                let mut m = merge(lists.len());
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

            /// Messages of different targets interleaved in any order: the merge skips
            /// exactly what the plain rule does.
            #[test]
            fn interleaved_lists_match_the_plain_rule(
                lists in lists(),
                order in proptest::collection::vec(0usize..4, 0..200),
            ) {
                let held: Vec<Vec<Held>> = lists.iter().map(as_held).collect();
                let mut next = vec![0; held.len()];
                let mut m = merge(lists.len());
                for t in order.iter().map(|o| o % held.len()) {
                    let end = held[t].len().min(next[t] + 3);
                    m.add(&format!("t{t}"), &held[t][next[t]..end]);
                    next[t] = end;
                }
                for (t, h) in held.iter().enumerate() {
                    m.add(&format!("t{t}"), &h[next[t]..]);
                }
                prop_assert_eq!(skipped(&m.finish()), reference(&lists));
            }
        }
    }
}
