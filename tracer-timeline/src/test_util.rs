//! Helpers shared by the tests.

use tracer_common::{Event, EventKind};

/// An event of `kind` at `ts_ns` on thread `tid`, every other field zero.
pub fn event(ts_ns: u64, tid: u32, kind: EventKind) -> Event {
    Event {
        ts_ns,
        tid,
        kind: kind as u32,
        ..Event::default()
    }
}

pub fn poll_end(ts_ns: u64, tid: u32) -> Event {
    event(ts_ns, tid, EventKind::PollEnd)
}

pub fn park_start(ts_ns: u64, tid: u32) -> Event {
    event(ts_ns, tid, EventKind::ParkStart)
}

pub fn park_end(ts_ns: u64, tid: u32) -> Event {
    event(ts_ns, tid, EventKind::ParkEnd)
}
