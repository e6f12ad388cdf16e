//! What user space sets before loading (`EbpfLoader::override_global`), and
//! the checks every program starts with: is this the target, is recording on.
//!
//! The globals are read with volatile reads: they are constants to the
//! compiler (0 in the object), which would otherwise fold them away.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid},
};
use tracer_common::{STACK_BYTES_MAX, TaskIdLayout};

use crate::maps::ENABLED;

/// Only this process is traced (the uprobes are also attached for this pid;
/// checking here as well keeps other processes that map the same binary out).
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

/// How to read a task's id from its header.
#[unsafe(no_mangle)]
static TASK_ID_LAYOUT: TaskIdLayout = TaskIdLayout {
    enabled: 0,
    _pad: 0,
    vtable_offset: 0,
    id_offset_slot: 0,
};

/// `--min-poll`: when non-zero, a poll is recorded only if it lasted at least
/// this long; shorter ones are only counted (`Counter::ShortPolls`). The
/// filter runs here, in the kernel, so that short polls cost no ring-buffer
/// traffic.
#[unsafe(no_mangle)]
static MIN_POLL_NS: u64 = 0;

/// Non-zero when poll ends are probed where `raw::poll` returns to
/// (`poll_returned`) rather than by a uretprobe (`poll_end`).
#[unsafe(no_mangle)]
static POLL_END_AT_RETURN_SITES: u32 = 0;

/// How many bytes of stack a capture copies (at most `STACK_BYTES_MAX`); 0
/// when nothing captures stacks (no samples, no await points).
#[unsafe(no_mangle)]
static STACK_BYTES: u32 = STACK_BYTES_MAX as u32;

#[inline(always)]
pub fn task_id_layout() -> TaskIdLayout {
    unsafe { core::ptr::read_volatile(&TASK_ID_LAYOUT) }
}

#[inline(always)]
pub fn min_poll_ns() -> u64 {
    unsafe { core::ptr::read_volatile(&MIN_POLL_NS) }
}

#[inline(always)]
pub fn poll_end_at_return_sites() -> bool {
    (unsafe { core::ptr::read_volatile(&POLL_END_AT_RETURN_SITES) }) != 0
}

#[inline(always)]
pub fn stack_bytes() -> u32 {
    unsafe { core::ptr::read_volatile(&STACK_BYTES) }
}

/// The process traced (or watched).
#[inline(always)]
pub fn target_tgid() -> u32 {
    unsafe { core::ptr::read_volatile(&TARGET_TGID) }
}

/// Returns the current thread id if it belongs to the target process and
/// recording is on.
#[inline(always)]
pub fn target_thread() -> Option<u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != target_tgid() || !enabled() {
        return None;
    }
    Some(pid_tgid as u32)
}

/// Slot 0 of `ENABLED`: user space clears it to stop at once (removing the
/// probes themselves takes seconds).
#[inline(always)]
pub fn enabled() -> bool {
    ENABLED.get(0).is_some_and(|flag| *flag != 0)
}

/// The cookie the probe was attached with: the site's index in the probe
/// plan (scheduler events: the event kind in the high half, see
/// [`crate::scheduler`]).
#[inline(always)]
pub fn attach_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) }
}
