//! Worker parks: the schedulers' `park_internal` (multi-thread and
//! current-thread), entry and return (a uretprobe). `park` and `park_yield`
//! both call it, so probing only the inner function counts each park once
//! (tracer-probes' catalog).

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::EventKind;

use crate::config::{attach_cookie, target_thread};
use crate::emit::{Detail, emit};

/// Entry of a worker's park function.
#[uprobe]
pub fn park_start(ctx: ProbeContext) -> u32 {
    park_event(EventKind::ParkStart, attach_cookie(&ctx));
    0
}

/// Return of a worker's park function.
#[uretprobe]
pub fn park_end(ctx: RetProbeContext) -> u32 {
    park_event(EventKind::ParkEnd, attach_cookie(&ctx));
    0
}

/// Sends a park's start or end at the park site the cookie names.
#[inline(always)]
fn park_event(kind: EventKind, cookie: u64) {
    let Some(tid) = target_thread() else { return };
    let detail = Detail {
        site: cookie as u32,
        ..Detail::default()
    };
    emit(kind, tid, detail);
}
