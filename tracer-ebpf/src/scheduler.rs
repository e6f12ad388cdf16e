//! Scheduler events: spawns, wakes, task ends and unparks.
//!
//! The four kinds share programs: the attach cookie carries the event kind
//! in its high half and the site index in its low half, and the program is
//! chosen by where the task's header is at the probed instruction (which
//! register, behind a pointer, the return value, or no task at all), which
//! tracer-probes' catalog says per function. Wakes are the hot kind (one or
//! more per poll, ~170 ns each): their task is known to user space by its
//! header, so its id is not read for them.

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_probe_read_user,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::EventKind;

use crate::config::{attach_cookie, target_thread};
use crate::emit::{Detail, emit};
use crate::poll::current_task;
use crate::task_id::read_task_id;

/// Sends the event the cookie names about the task whose header is `header`
/// (0: none), from the task running on this thread (if any).
#[inline(always)]
fn task_event<C: EbpfContext>(ctx: &C, cookie: u64, header: u64) {
    let Some(tid) = target_thread() else { return };
    let Some(kind) = EventKind::from_u32((cookie >> 32) as u32) else {
        return;
    };
    let task_id = if kind == EventKind::Wake {
        0
    } else {
        read_task_id(ctx, header)
    };
    let detail = Detail {
        site: cookie as u32,
        task: header,
        task_id,
        other_task_id: current_task(tid),
        addr: 0,
    };
    emit(kind, tid, detail);
}

/// A scheduler event whose task header is the first argument (RDI).
#[uprobe]
pub fn task_event_arg0(ctx: ProbeContext) -> u32 {
    task_event(&ctx, attach_cookie(&ctx), ctx.arg(0).unwrap_or(0));
    0
}

/// A scheduler event whose task header is the second argument (RSI).
#[uprobe]
pub fn task_event_arg1(ctx: ProbeContext) -> u32 {
    task_event(&ctx, attach_cookie(&ctx), ctx.arg(1).unwrap_or(0));
    0
}

/// A scheduler event whose second argument (RSI) points at the task's header
/// pointer (`&Task<S>`).
#[uprobe]
pub fn task_event_arg1_deref(ctx: ProbeContext) -> u32 {
    let pointer: u64 = ctx.arg(1).unwrap_or(0);
    let header = unsafe { bpf_probe_read_user(pointer as *const u64) }.unwrap_or(0);
    task_event(&ctx, attach_cookie(&ctx), header);
    0
}

/// A scheduler event whose task comes back in the return value: a pair of
/// pointers to the task in RAX and RDX (either may be a null `None`).
#[uretprobe]
pub fn task_event_ret(ctx: RetProbeContext) -> u32 {
    let regs = unsafe { &*ctx.regs };
    let header = if regs.rax != 0 { regs.rax } else { regs.rdx };
    task_event(&ctx, attach_cookie(&ctx), header);
    0
}

/// A scheduler event about no task in particular (an unpark).
#[uprobe]
pub fn thread_event(ctx: ProbeContext) -> u32 {
    task_event(&ctx, attach_cookie(&ctx), 0);
    0
}
