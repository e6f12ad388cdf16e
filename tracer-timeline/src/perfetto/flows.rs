//! Wake flows' ids on the wire: small, recycled numbers instead of the
//! timeline's ever-growing ones.
//!
//! Why: a flow id is written twice per request (the wake that starts the
//! arrow, the poll that ends it) as a varint, so its size is paid twice.
//! The timeline numbers flows 1, 2, 3… over the whole recording: 3 bytes
//! each after 16 k wakes, 4 after 2 M (a minute of the HTTP benchmark flat
//! out). Only the flows in flight need distinct ids — on that benchmark a
//! few dozen — so the writer hands out the ids of ended flows again: one
//! byte each while fewer than 128 are in use, about 4 bytes a request saved (5 s of
//! HTTP: 3 → 1 byte an id).
//!
//! Trace processor allows it: an id that is not active begins a new flow,
//! and a terminating id closes its flow (`MaybeParseTrackEventFlows`,
//! track_event_event_importer.h). It reads packets in timestamp order,
//! not file order, so an id is reused only by a wake written strictly
//! after the poll that ended its last flow (the written time: a clamped
//! timestamp counts as written); until then the id waits in a queue.
//!
//! The woken task's id is not written on the wake either: the arrow leads
//! to a poll of that task, which carries it. A flow still open at the end
//! (the task was not polled again) ends at a "woken, not polled before
//! the end" instant that carries it instead ([`Flows::drain_open`]).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::output::FlowId;

#[derive(Default)]
pub struct Flows {
    /// Timeline flow id -> (wire id, the woken task's id).
    open: HashMap<FlowId, (u64, u64), BuildHasherDefault<FlowHasher>>,
    /// Ids whose flow ended, with the written time of that end, oldest
    /// first.
    free: VecDeque<(u64, u64)>,
    /// The next never-used id (ids start at 1).
    next: u64,
}

impl Flows {
    /// The wire id for the flow `flow` starting at written time `ts_ns`.
    pub fn start(&mut self, flow: FlowId, ts_ns: u64, task_id: u64) -> u64 {
        let id = match self.free.front() {
            Some(&(id, ended_ns)) if ended_ns < ts_ns => {
                self.free.pop_front();
                id
            }
            _ => {
                self.next += 1;
                self.next
            }
        };
        self.open.insert(flow, (id, task_id));
        id
    }

    /// The wire id of `flow`, which ends at written time `ts_ns`; `None` if
    /// it was never started (the wake was not written).
    pub fn end(&mut self, flow: FlowId, ts_ns: u64) -> Option<u64> {
        let (id, _) = self.open.remove(&flow)?;
        self.free.push_back((id, ts_ns));
        Some(id)
    }

    /// The flows still open, as (wire id, woken task's id), by wire id.
    pub fn drain_open(&mut self) -> Vec<(u64, u64)> {
        let mut open: Vec<(u64, u64)> = self.open.drain().map(|(_, ends)| ends).collect();
        open.sort_unstable();
        open
    }

    /// The most ids in use at once so far.
    #[cfg(test)]
    pub fn ids_used(&self) -> u64 {
        self.next
    }
}

/// Hashes flow ids (the timeline's sequential `u64`s) by one multiply
/// instead of std's SipHash (an insert and a remove per wake): the
/// synthetic render (`tests::render_rate`) went from 160 to 150 ns an event.
#[derive(Default)]
pub struct FlowHasher(u64);

impl Hasher for FlowHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(byte as u64);
        }
    }

    fn write_u64(&mut self, value: u64) {
        // Fibonacci hashing: the high bits (hashbrown's control bytes) and
        // the low ones (the bucket) both vary with every bit of the id.
        self.0 = (self.0 ^ value)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_reused_only_after_their_end_in_time() {
        let mut flows = Flows::default();
        assert_eq!(flows.start(10, 100, 7), 1);
        assert_eq!(flows.start(11, 110, 8), 2);
        assert_eq!(flows.end(10, 200), Some(1));
        // Written at the same time as that end: trace processor could sort
        // it before the end, so a fresh id.
        assert_eq!(flows.start(12, 200, 9), 3);
        // Strictly later: id 1 again.
        assert_eq!(flows.start(13, 201, 9), 1);
        assert_eq!(flows.end(99, 300), None, "never started");
        assert_eq!(flows.drain_open(), vec![(1, 9), (2, 8), (3, 9)]);
        assert_eq!(flows.ids_used(), 3);
    }
}
