//! Task polls: `tokio::runtime::task::raw::poll::<T, S>`, one instance per
//! (future type, scheduler), called only through the task vtable.
//!
//! A poll starts at `raw::poll`'s entry (`poll_start`) and ends where it
//! returns to: tracer-probes finds the vtable call sites (the schedulers'
//! `run_task`, the blocking pool; 8 in each fixture) and `poll_returned`
//! sits on the first emulated instruction after each. That costs less than
//! a uretprobe (measured on `bench-work pingpong --mode polls`: 1.91–1.96 µs
//! per poll against 2.08–2.13); where no call site is found (an unknown tokio
//! layout) the uretprobe `poll_end` is used instead.
//!
//! The thread's open polls live in `CURRENT_TASK` (at most two, for a
//! runtime or `LocalSet` driven inside a task), so that scheduler events,
//! await points and samples know the running task, and under `--min-poll`
//! a poll is decided at its end, in the kernel.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{Counter, EventKind};

use crate::config::{
    attach_cookie, min_poll_ns, poll_end_at_return_sites, stack_bytes, target_thread,
};
use crate::emit::{Detail, emit_at};
use crate::maps::{CURRENT_TASK, CurrentTask, ThreadPolls, count};
use crate::task_id::read_polled_task_id;

/// Entry of `tokio::runtime::task::raw::poll::<T, S>(ptr: NonNull<Header>)`.
#[uprobe]
pub fn poll_start(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let start_ns = unsafe { bpf_ktime_get_ns() };
    let header: u64 = ctx.arg(0).unwrap_or(0);
    let site = attach_cookie(&ctx) as u32;
    let filtering = min_poll_ns() > 0;
    // Under `--min-poll` most polls are short and never sent: their task id
    // is read at the end, for the long ones only (the task is alive until
    // its poll returns). A user-memory read costs ~150 ns here.
    let task_id = if filtering {
        0
    } else {
        read_polled_task_id(&ctx, site, header)
    };
    let entry_sp = unsafe { (*ctx.regs).rsp };
    // Only stack captures need it, and only while a uretprobe hides it from
    // them; a user-memory read costs ~150 ns.
    let poll_return = if stack_bytes() == 0 || poll_end_at_return_sites() {
        0
    } else {
        unsafe { bpf_probe_read_user(entry_sp as *const u64) }.unwrap_or(0)
    };
    let current = CurrentTask {
        site,
        _pad: 0,
        header,
        task_id,
        start_ns,
        entry_sp,
        poll_return,
        await_key: 0,
        preempted_at_start: 0,
    };
    push_poll(tid, current);
    if filtering {
        // Decided at the end, when the duration is known.
        return 0;
    }
    let detail = Detail {
        site,
        task: header,
        task_id,
        ..Detail::default()
    };
    emit_at(start_ns, EventKind::PollStart, tid, detail);
    0
}

/// Return of `raw::poll`, by uretprobe: used where no return sites were found.
#[uretprobe]
pub fn poll_end(ctx: RetProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let end_ns = unsafe { bpf_ktime_get_ns() };
    let site = attach_cookie(&ctx) as u32;
    let current = match CURRENT_TASK.get_ptr_mut(&tid) {
        Some(slot) if unsafe { (*slot).depth } != 0 => Some(unsafe { pop_poll(slot) }),
        _ => None,
    };
    let Some(current) = current else {
        // Its start was not seen (tracing began mid-poll, or the start was
        // lost): user space counts the unmatched end. Under `--min-poll` only
        // whole polls are sent.
        if min_poll_ns() == 0 {
            let detail = Detail {
                site,
                ..Detail::default()
            };
            emit_at(end_ns, EventKind::PollEnd, tid, detail);
        }
        return 0;
    };
    finish_poll(&ctx, tid, end_ns, current);
    0
}

/// The instruction `raw::poll` returns to, after one of the task vtable's
/// `poll` call sites (tracer-probes finds them): the poll's end, without
/// a uretprobe, which costs more on the kernels we measured.
#[uprobe]
pub fn poll_returned(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let end_ns = unsafe { bpf_ktime_get_ns() };
    let sp = unsafe { (*ctx.regs).rsp };
    let Some(slot) = CURRENT_TASK.get_ptr_mut(&tid) else {
        return 0;
    };
    // Only the return of the innermost poll this thread is in counts: RSP
    // is back where it was at `raw::poll`'s entry, its return address
    // popped. Any other way to this instruction (a call site that was not a
    // poll, or code that reaches it otherwise) leaves RSP elsewhere or no
    // poll open.
    let open = unsafe { (*slot).depth != 0 && (*slot).inner.entry_sp.wrapping_add(8) == sp };
    if !open {
        return 0;
    }
    let current = unsafe { pop_poll(slot) };
    finish_poll(&ctx, tid, end_ns, current);
    0
}

/// Makes `current` the thread's innermost poll.
#[inline(always)]
pub fn push_poll(tid: u32, mut current: CurrentTask) {
    match CURRENT_TASK.get_ptr_mut(&tid) {
        Some(slot) => unsafe {
            current.preempted_at_start = (*slot).preempted_ns;
            // The stack grows down: a poll within a poll starts deeper than
            // the one it interrupts. One that doesn't means the polls in the
            // slot ended unseen (a missed end must not leave a stale task
            // attributed to this thread).
            let depth = (*slot).depth;
            (*slot).depth = if depth != 0 && current.entry_sp < (*slot).inner.entry_sp {
                (*slot).outer = (*slot).inner;
                2
            } else if depth == 2 && current.entry_sp < (*slot).outer.entry_sp {
                2
            } else {
                1
            };
            (*slot).inner = current;
        },
        // The thread's first poll. Failing to record it (the map is full)
        // costs this poll's waker attribution and await points, and where
        // poll ends are probed at return sites, its end (the poll is then
        // counted as abandoned).
        None => {
            let polls = ThreadPolls {
                depth: 1,
                _pad: 0,
                inner: current,
                outer: current,
                preempted_ns: 0,
            };
            let _ = CURRENT_TASK.insert(&tid, &polls, 0);
        }
    }
}

/// Ends the thread's innermost poll (`depth` must be non-zero) and returns
/// it, its `preempted_at_start` turned into how long the thread was
/// preempted during it; the poll it interrupted, if any, is the innermost
/// again.
#[inline(always)]
pub unsafe fn pop_poll(slot: *mut ThreadPolls) -> CurrentTask {
    unsafe {
        let mut ended = (*slot).inner;
        ended.preempted_at_start = (*slot).preempted_ns.wrapping_sub(ended.preempted_at_start);
        if (*slot).depth >= 2 {
            (*slot).inner = (*slot).outer;
            (*slot).depth = 1;
        } else {
            (*slot).depth = 0;
        }
        ended
    }
}

/// Sends a poll that ended at `end_ns`: its end, and under `--min-poll`
/// its start too if it was long enough (only counted otherwise).
#[inline(always)]
fn finish_poll<C: EbpfContext>(ctx: &C, tid: u32, end_ns: u64, mut current: CurrentTask) {
    let min_poll = min_poll_ns();
    if min_poll > 0 {
        if end_ns.saturating_sub(current.start_ns) < min_poll {
            count(Counter::ShortPolls);
            return;
        }
        current.task_id = read_polled_task_id(ctx, current.site, current.header);
        // A long poll: both ends at once, in order, so user space sees the
        // same pair it sees without the filter.
        let start = Detail {
            site: current.site,
            task: current.header,
            task_id: current.task_id,
            ..Detail::default()
        };
        emit_at(current.start_ns, EventKind::PollStart, tid, start);
    }
    let end = Detail {
        site: current.site,
        task_id: current.task_id,
        addr: current.await_key,
        // `pop_poll` made it the time preempted during the poll.
        other_task_id: current.preempted_at_start,
        ..Detail::default()
    };
    emit_at(end_ns, EventKind::PollEnd, tid, end);
}

/// The poll in progress on this thread, if any.
#[inline(always)]
pub fn current_poll(tid: u32) -> Option<CurrentTask> {
    unsafe { CURRENT_TASK.get(&tid) }
        .filter(|polls| polls.depth != 0)
        .map(|polls| polls.inner)
}

/// The task running on this thread, by id (0 when none).
#[inline(always)]
pub fn current_task(tid: u32) -> u64 {
    current_poll(tid).map_or(0, |current| current.task_id)
}
