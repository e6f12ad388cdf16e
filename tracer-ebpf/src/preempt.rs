//! Preemption inside polls: `poll_preempted` (BTF tracepoint `sched_switch`,
//! no tracefs needed) adds the time a target thread spends runnable but off
//! CPU, taken off by the scheduler in the middle of a poll, to its
//! `ThreadPolls::preempted_ns`; each poll's end sends its share
//! (`EventKind::PollEnd`'s `other_task_id`).
//!
//! Why: a poll's wall time is what held the worker, but on a loaded machine
//! (the on-call case: a box at 100 % CPU) a 1 ms poll preempted for 11 ms
//! reads as a 12 ms hog. With this, user space judges a hog by the poll's
//! time minus its preemptions, and the trace shows both. A voluntary sleep
//! inside a poll (a lock, a blocking read, `thread::sleep`) is not counted:
//! that is the task holding its worker, which is what a hog report is for.
//!
//! Every context switch of the machine runs it, so the common case exits
//! early: no target thread preempted in a poll is pending
//! (`PREEMPTED_PENDING` is 0) and `prev` is not in the target: two map
//! loads and the current pid, no clock read.
//!
//! It reads `sched_switch`'s fourth argument (`prev_state`), which kernels
//! before 5.18 do not pass: there the verifier refuses the program, the
//! tracer warns, and polls are timed without it (as the watch tier's
//! `watch_switch` needs 5.18 too). A poll still running at the stop ends
//! there by wall time (its preemptions are not read back). The switch
//! back in is known by `next`'s `task_struct` address only (its thread id
//! can't be read without the struct's layout), hence that key.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::config::{enabled, target_tgid};
use crate::maps::{CURRENT_TASK, PREEMPTED, PREEMPTED_PENDING, Preempted, atomic_add};

/// `sched_switch(bool preempt, task_struct *prev, task_struct *next,
/// unsigned int prev_state)`, in `prev`'s context.
#[btf_tracepoint(function = "sched_switch")]
pub fn poll_preempted(ctx: BtfTracePointContext) -> u32 {
    if !enabled() {
        return 0;
    }
    let Some(pending) = PREEMPTED_PENDING.get_ptr_mut(0) else {
        return 0;
    };
    // Back in: a thread we saw preempted in a poll. Only this program
    // writes `preempted_ns`, and the thread is not running.
    if unsafe { core::ptr::read_volatile(pending) } != 0 {
        let next: u64 = ctx.arg(2);
        if let Some(out) = unsafe { PREEMPTED.get(&next) } {
            let out = *out;
            if PREEMPTED.remove(&next).is_ok() {
                atomic_add(pending, u64::MAX);
            }
            let now = unsafe { bpf_ktime_get_ns() };
            if let Some(slot) = CURRENT_TASK.get_ptr_mut(&out.tid) {
                unsafe { (*slot).preempted_ns += now.saturating_sub(out.ts_ns) };
            }
        }
    }
    // Out: `prev` is the current thread.
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != target_tgid() {
        return 0;
    }
    let preempt: u64 = ctx.arg(0);
    let prev_state: u64 = ctx.arg(3);
    // Still runnable (TASK_RUNNING is 0): taken off, not gone to sleep.
    if preempt & 1 == 0 && prev_state != 0 {
        return 0;
    }
    let tid = pid_tgid as u32;
    if !unsafe { CURRENT_TASK.get(&tid) }.is_some_and(|polls| polls.depth != 0) {
        return 0;
    }
    let prev: u64 = ctx.arg(1);
    let out = Preempted {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tid,
        _pad: 0,
    };
    // Counted first, so that no switch back in can find it at 0 while the
    // entry exists.
    atomic_add(pending, 1);
    if PREEMPTED.insert(&prev, &out, 0).is_err() {
        atomic_add(pending, u64::MAX);
    }
    0
}
