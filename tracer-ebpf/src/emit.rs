//! One event into the `EVENTS` ring buffer.
//!
//! Records are committed with `BPF_RB_NO_WAKEUP`: waking the tracer costs
//! the probed thread an interrupt per event, and with the default adaptive
//! wakeup most events woke it; the tracer drains on a 5 ms timer instead.
//! That alone took full mode from ~25 µs to 5–10 µs per poll (NOTES.md).
//! A full ring buffer drops the event and counts it (`Counter::Lost`).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use tracer_common::{Counter, Event, EventKind};

use crate::maps::{EVENTS, count};

/// `BPF_RB_NO_WAKEUP`: records are committed without waking the tracer.
pub const NO_WAKEUP: u64 = 1;

/// The fields of an event besides its kind, time and thread.
#[derive(Default)]
pub struct Detail {
    pub site: u32,
    pub task: u64,
    pub task_id: u64,
    pub other_task_id: u64,
    pub addr: u64,
}

/// Sends an event stamped now.
#[inline(always)]
pub fn emit(kind: EventKind, tid: u32, detail: Detail) {
    // Stamp before reserving so the time is as close to the probe hit as possible.
    emit_at(unsafe { bpf_ktime_get_ns() }, kind, tid, detail)
}

/// Sends an event stamped `ts_ns`.
#[inline(always)]
pub fn emit_at(ts_ns: u64, kind: EventKind, tid: u32, detail: Detail) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event {
                ts_ns,
                tid,
                kind: kind as u32,
                site: detail.site,
                _pad: 0,
                task: detail.task,
                task_id: detail.task_id,
                other_task_id: detail.other_task_id,
                addr: detail.addr,
            });
            entry.submit(NO_WAKEUP);
        }
        None => count(Counter::Lost),
    }
}
