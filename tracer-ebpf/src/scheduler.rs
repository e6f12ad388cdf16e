//! Scheduler events: spawns, wakes, task ends and unparks.
//!
//! The four kinds share programs: the attach cookie carries the event kind
//! in its high half and the site index in its low half, and the program is
//! chosen by where the task's header is at the probed instruction (which
//! register, behind a pointer, the return value, or no task at all), which
//! tracer-probes' catalog says per function. Wakes are the hot kind (one or
//! more per poll, ~170 ns each): their task is known to user space by its
//! header, so its id is not read for them.
//!
//! A spawn also says where the spawn function was called from: its return
//! address, which is `[rsp]` at an entry probe (tracer-probes places spawn
//! probes only where RSP is still the entry's, like await points) and the
//! instruction pointer in a uretprobe (the kernel puts the real return
//! address back there before the programs run). Only spawns read it: it is
//! one more user-memory read (~150 ns) at entry probes.

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

/// Where the probed function's return address is, at the probed instruction.
#[derive(Clone, Copy)]
enum Caller {
    /// On the stack, at this address (an entry probe: `[rsp]`).
    OnStack(u64),
    /// Already read: the address returned to (a uretprobe's `rip`).
    Returned(u64),
}

impl Caller {
    #[inline(always)]
    fn address(self) -> u64 {
        match self {
            Caller::OnStack(sp) => unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0),
            Caller::Returned(address) => address,
        }
    }
}

/// Sends the event the cookie names about the task whose header is `header`
/// (0: none), from the task running on this thread (if any); a spawn with
/// the address its function returns to.
#[inline(always)]
fn task_event<C: EbpfContext>(ctx: &C, cookie: u64, header: u64, caller: Caller) {
    let Some(tid) = target_thread() else { return };
    let Some(kind) = EventKind::from_u32((cookie >> 32) as u32) else {
        return;
    };
    let task_id = if kind == EventKind::Wake {
        0
    } else {
        read_task_id(ctx, header)
    };
    let call_site = if kind == EventKind::Spawn {
        caller.address()
    } else {
        0
    };
    let detail = Detail {
        site: cookie as u32,
        task: header,
        task_id,
        other_task_id: current_task(tid),
        addr: call_site,
    };
    emit(kind, tid, detail);
}

/// At an entry probe: the return address is at `[rsp]`.
#[inline(always)]
fn caller_on_stack(ctx: &ProbeContext) -> Caller {
    Caller::OnStack(unsafe { (*ctx.regs).rsp })
}

/// A scheduler event whose task header is the first argument (RDI).
#[uprobe]
pub fn task_event_arg0(ctx: ProbeContext) -> u32 {
    let header = ctx.arg(0).unwrap_or(0);
    task_event(&ctx, attach_cookie(&ctx), header, caller_on_stack(&ctx));
    0
}

/// A scheduler event whose task header is the second argument (RSI).
#[uprobe]
pub fn task_event_arg1(ctx: ProbeContext) -> u32 {
    let header = ctx.arg(1).unwrap_or(0);
    task_event(&ctx, attach_cookie(&ctx), header, caller_on_stack(&ctx));
    0
}

/// A scheduler event whose second argument (RSI) points at the task's header
/// pointer (`&Task<S>`).
#[uprobe]
pub fn task_event_arg1_deref(ctx: ProbeContext) -> u32 {
    let pointer: u64 = ctx.arg(1).unwrap_or(0);
    let header = unsafe { bpf_probe_read_user(pointer as *const u64) }.unwrap_or(0);
    task_event(&ctx, attach_cookie(&ctx), header, caller_on_stack(&ctx));
    0
}

/// A scheduler event whose task comes back in the return value: a pair of
/// pointers to the task in RAX and RDX (either may be a null `None`).
#[uretprobe]
pub fn task_event_ret(ctx: RetProbeContext) -> u32 {
    let regs = unsafe { &*ctx.regs };
    let header = if regs.rax != 0 { regs.rax } else { regs.rdx };
    task_event(
        &ctx,
        attach_cookie(&ctx),
        header,
        Caller::Returned(regs.rip),
    );
    0
}

/// A scheduler event about no task in particular (an unpark).
#[uprobe]
pub fn thread_event(ctx: ProbeContext) -> u32 {
    task_event(&ctx, attach_cookie(&ctx), 0, caller_on_stack(&ctx));
    0
}
