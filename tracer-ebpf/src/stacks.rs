//! Stack captures: where a task waits (`await_point`, on tokio's
//! `task::waker::clone_waker` during a poll) and what runs (`sample`, a CPU
//! clock perf event on every CPU, 999 Hz by default).
//!
//! A capture copies the registers and up to `STACK_BYTES` (16 KiB by
//! default) of user stack into `STACKS`; user space unwinds it from
//! `.eh_frame` while the process is alive. Copying is the expensive part, so
//! an await point's stack is captured once per (task, await point) —
//! `AWAIT_SEEN` — and the poll's end carries the await point's key instead
//! (an await point costs ~310 ns per hit, NOTES.md).

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user, generated},
    macros::{perf_event, uprobe},
    programs::{PerfEventContext, ProbeContext},
};
use tracer_common::{Counter, STACK_BYTES_MAX, StackHeader, StackKind};

use crate::config::{stack_bytes, target_thread};
use crate::emit::NO_WAKEUP;
use crate::maps::{AWAIT_SEEN, CURRENT_TASK, CurrentTask, STACKS, StackRecord, count};
use crate::poll::current_poll;
use crate::task_id::read_polled_task_id;

/// A polled task clones its waker (`task::waker::clone_waker`): it is about
/// to wait. Notes the await point for the poll's end event, and the first
/// time this task waits here, captures the stack that says where.
#[uprobe]
pub fn await_point(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let Some(slot) = CURRENT_TASK.get_ptr_mut(&tid) else {
        return 0;
    };
    if unsafe { (*slot).depth } == 0 {
        return 0;
    }
    let current = unsafe { (*slot).inner };
    let regs = unsafe { &*ctx.regs };
    // The caller's address and the depth below the poll's entry tell await
    // points apart without unwinding here.
    let caller: u64 = unsafe { bpf_probe_read_user(regs.rsp as *const u64) }.unwrap_or(0);
    let depth = current.entry_sp.wrapping_sub(regs.rsp) & 0xffff;
    let key = caller ^ (depth << 48);
    // The last await point of a poll is where the task waits; the poll's
    // end carries it, which saves a ring-buffer record per await.
    unsafe { (*slot).inner.await_key = key };
    let seen_key = [current.task_id, key];
    if unsafe { AWAIT_SEEN.get(&seen_key) }.is_none() {
        let _ = AWAIT_SEEN.insert(&seen_key, &1, 0);
        let at = Registers {
            ip: regs.rip,
            sp: regs.rsp,
            bp: regs.rbp,
        };
        capture_stack(StackKind::AwaitPoint, tid, Some(current), key, at);
    }
    0
}

/// A CPU sample (perf event, every CPU): if it hit the target in user mode,
/// capture the stack for the task running there.
#[perf_event]
pub fn sample(ctx: PerfEventContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let regs = unsafe { &(*ctx.ctx).regs };
    if regs.cs & 3 == 0 {
        // In the kernel: the user registers are not at hand here.
        count(Counter::KernelSamples);
        return 0;
    }
    let mut current = current_poll(tid);
    if let Some(current) = &mut current
        && current.task_id == 0
    {
        // Under `--min-poll` the poll's start did not read the id.
        current.task_id = read_polled_task_id(&ctx, current.site, current.header);
    }
    let at = Registers {
        ip: regs.rip,
        sp: regs.rsp,
        bp: regs.rbp,
    };
    capture_stack(StackKind::Sample, tid, current, 0, at);
    0
}

/// The user registers unwinding starts from.
struct Registers {
    ip: u64,
    sp: u64,
    bp: u64,
}

/// Copies the registers and up to `STACK_BYTES` of user stack from `sp` up
/// into the `STACKS` ring buffer. Where the copy would run past the top of
/// the stack (unmapped memory), it is retried shorter.
#[inline(always)]
fn capture_stack(kind: StackKind, tid: u32, current: Option<CurrentTask>, key: u64, at: Registers) {
    let Some(mut record) = STACKS.reserve::<StackRecord>(0) else {
        count(Counter::Lost);
        return;
    };
    let record_ptr = record.as_mut_ptr();
    let mut want = stack_bytes() as usize;
    if want > STACK_BYTES_MAX {
        want = STACK_BYTES_MAX;
    }
    let mut len = 0u32;
    for _ in 0..6 {
        if want == 0 {
            break;
        }
        let data = unsafe { core::ptr::addr_of_mut!((*record_ptr).data) };
        let read =
            unsafe { generated::bpf_probe_read_user(data.cast(), want as u32, at.sp as *const _) };
        if read == 0 {
            len = want as u32;
            break;
        }
        want /= 2;
    }
    unsafe {
        core::ptr::addr_of_mut!((*record_ptr).header).write(StackHeader {
            ts_ns: bpf_ktime_get_ns(),
            tid,
            kind: kind as u32,
            task_id: current.map_or(0, |c| c.task_id),
            key,
            ip: at.ip,
            sp: at.sp,
            bp: at.bp,
            len,
            _pad: 0,
            poll_return: current.map_or(0, |c| c.poll_return),
        });
    }
    record.submit(NO_WAKEUP);
}
