//! Each thread's dense index by tid, as the timeline and the Perfetto
//! writer ask for it: once or twice per output.
//!
//! Why not only a map: outputs come in runs on one thread, but a runtime's
//! workers take turns. On the HTTP benchmark (two workers) a one-entry
//! "last thread" cache missed on 26 % of events, and each miss was a hash
//! lookup: ~3 % of rendering in the timeline and again in the writer
//! (perf, NOTES.md "Rendering rate, third round"). The last answers are
//! kept by `tid % 4` instead: a runtime starts its workers one after the
//! other, so their tids are mostly consecutive and up to four of them do
//! not evict each other.

use crate::FastMap;

const RECENT: usize = 4;

pub(crate) struct ThreadIndex {
    map: FastMap<u32, usize>,
    /// (tid, index) of the last thread looked up in each slot: slot
    /// `tid % RECENT`.
    recent: [(u32, usize); RECENT],
}

impl Default for ThreadIndex {
    fn default() -> Self {
        ThreadIndex {
            map: FastMap::default(),
            // Empty: each slot holds a tid that belongs to another slot,
            // so no lookup matches it.
            recent: std::array::from_fn(|slot| (slot as u32 + 1, 0)),
        }
    }
}

impl ThreadIndex {
    /// `tid`'s index, if it has one; keeps the answer at hand.
    #[inline]
    pub(crate) fn get(&mut self, tid: u32) -> Option<usize> {
        let slot = &mut self.recent[tid as usize % RECENT];
        if slot.0 == tid {
            return Some(slot.1);
        }
        let index = *self.map.get(&tid)?;
        *slot = (tid, index);
        Some(index)
    }

    /// `tid`'s index, without keeping the answer (for `&self` callers).
    pub(crate) fn peek(&self, tid: u32) -> Option<usize> {
        self.map.get(&tid).copied()
    }

    pub(crate) fn insert(&mut self, tid: u32, index: usize) {
        self.map.insert(tid, index);
        self.recent[tid as usize % RECENT] = (tid, index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_thread_whatever_evicted_its_slot() {
        let mut index = ThreadIndex::default();
        // 4 and 8 share a slot with 0; 5 is never inserted.
        for (i, tid) in [0, 1, 4, 8, 2].into_iter().enumerate() {
            index.insert(tid, i);
        }
        for _ in 0..2 {
            for (i, tid) in [0, 1, 4, 8, 2].into_iter().enumerate() {
                assert_eq!(index.get(tid), Some(i), "tid {tid}");
                assert_eq!(index.peek(tid), Some(i), "tid {tid}");
            }
        }
        // Never inserted; 3 and 7 share the slot that starts out empty.
        let mut empty = ThreadIndex::default();
        for tid in [0, 1, 2, 3, 4, 5, 7, u32::MAX] {
            assert_eq!(empty.get(tid), None, "tid {tid}");
        }
        assert_eq!(index.get(5), None);
        assert_eq!(index.get(3), None);
    }
}
