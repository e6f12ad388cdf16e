//! The watch tier's programs (`rt-ebpf-trace watch`): always on, so none of
//! them runs per poll. What they cost grows with what they watch:
//!
//! - `watch_park_start` / `watch_park_end` (uprobe + uretprobe on the
//!   schedulers' park function): per park. They keep each worker's park
//!   state in `WORKERS` and send the park to user space (busy share, and
//!   "no park in between" for hogs).
//! - `watch_switch` (BTF tracepoint `sched_switch`, no tracefs needed): runs
//!   on every context switch of the machine, but does real work only when a
//!   worker of the target that is *not* parked goes off CPU: that worker is
//!   blocked, or preempted, while it should be polling. A voluntary switch
//!   (the thread sleeps: a lock, a file read, `thread::sleep`) captures the
//!   user and kernel stacks; preemptions only send their duration. When the
//!   thread comes back, its off-CPU time is sent if it reached
//!   `MIN_OFF_CPU_NS`.
//! - `watch_sample` (perf event): a CPU sample with the user stack *and*,
//!   when the thread was in the kernel, the kernel stack and the user
//!   registers saved at the kernel entry (so no sample is dropped).
//!
//! The task a sample or a switch belongs to is not known here (no per-poll
//! probe): user space finds the task's `raw::poll` frame on the unwound
//! user stack.

use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, generated},
    macros::{btf_tracepoint, map, perf_event, uprobe, uretprobe},
    maps::{LruHashMap, RingBuf},
    programs::{BtfTracePointContext, PerfEventContext, ProbeContext, RetProbeContext},
};
use tracer_common::watch::{
    KERNEL_FRAMES_MAX, WATCH_IN_KERNEL, WATCH_PARKED, WATCH_WORKER, WatchEvent, WatchEventKind,
    WatchStackHeader, WatchStackKind,
};
use tracer_common::{Counter, STACK_BYTES_MAX};

use crate::config::{attach_cookie, enabled, stack_bytes, target_tgid, target_thread};
use crate::emit::NO_WAKEUP;
use crate::maps::count;

/// Off-CPU spans shorter than this are not sent (set by user space).
#[unsafe(no_mangle)]
static MIN_OFF_CPU_NS: u64 = 1_000_000;

/// Parks, and worker off-CPU spans.
#[map]
static WATCH_EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Samples' and blocking switches' stacks.
#[map]
static WATCH_STACKS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// The target's workers (threads seen parking), by thread id: 1 while
/// inside the park function, 0 otherwise.
#[map]
static WORKERS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(4096, 0);

/// A worker that went off CPU while not parked, until it comes back.
#[derive(Clone, Copy)]
struct OffCpu {
    ts_ns: u64,
    tid: u32,
    state: u32,
    preempted: u32,
    _pad: u32,
}

/// Keyed by the thread's `task_struct` address: at the switch back in, the
/// thread is `next`, and its pid can't be read without the struct's layout.
#[map]
static OFF_CPU: LruHashMap<u64, OffCpu> = LruHashMap::with_max_entries(4096, 0);

#[repr(C)]
struct WatchStackRecord {
    header: WatchStackHeader,
    data: [u8; STACK_BYTES_MAX],
}

#[inline(always)]
fn min_off_cpu_ns() -> u64 {
    unsafe { core::ptr::read_volatile(&MIN_OFF_CPU_NS) }
}

#[inline(always)]
fn send(event: WatchEvent) {
    match WATCH_EVENTS.reserve::<WatchEvent>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(NO_WAKEUP);
        }
        None => count(Counter::WatchLost),
    }
}

#[inline(always)]
fn park_event(kind: WatchEventKind, tid: u32, site: u32) {
    send(WatchEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tid,
        kind: kind as u32,
        duration_ns: 0,
        site_or_state: site,
        preempted: 0,
    });
}

#[uprobe]
pub fn watch_park_start(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let _ = WORKERS.insert(&tid, &1, 0);
    park_event(WatchEventKind::ParkStart, tid, attach_cookie(&ctx) as u32);
    0
}

#[uretprobe]
pub fn watch_park_end(ctx: RetProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let _ = WORKERS.insert(&tid, &0, 0);
    park_event(WatchEventKind::ParkEnd, tid, attach_cookie(&ctx) as u32);
    0
}

/// WATCH_* flags for a thread: is it a worker, is it parked.
#[inline(always)]
fn worker_flags(tid: u32) -> u32 {
    match unsafe { WORKERS.get(&tid) } {
        Some(parked) if *parked != 0 => WATCH_WORKER | WATCH_PARKED,
        Some(_) => WATCH_WORKER,
        None => 0,
    }
}

/// The user registers the current thread entered the kernel with.
#[inline(always)]
fn saved_user_regs() -> Option<(u64, u64, u64)> {
    unsafe {
        let task = generated::bpf_get_current_task_btf();
        let regs = generated::bpf_task_pt_regs(task) as *const pt_regs;
        if regs.is_null() {
            return None;
        }
        let ip = bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rip)).ok()?;
        let sp = bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rsp)).ok()?;
        let bp = bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rbp)).ok()?;
        Some((ip, sp, bp))
    }
}

/// Sends one capture: the kernel stack (when `in_kernel`), then up to
/// `STACK_BYTES` of user stack from `sp` up (shorter where that would run
/// off the stack's top).
#[inline(always)]
fn capture<C: EbpfContext>(
    ctx: &C,
    kind: WatchStackKind,
    tid: u32,
    ts_ns: u64,
    user: (u64, u64, u64),
    in_kernel: bool,
    flags: u32,
) {
    let Some(mut record) = WATCH_STACKS.reserve::<WatchStackRecord>(0) else {
        count(Counter::WatchLost);
        return;
    };
    let record_ptr = record.as_mut_ptr();
    let mut kernel_frames = 0u32;
    if in_kernel {
        let kernel = unsafe { core::ptr::addr_of_mut!((*record_ptr).header.kernel) };
        let got = unsafe {
            generated::bpf_get_stack(
                ctx.as_ptr(),
                kernel.cast(),
                (KERNEL_FRAMES_MAX * 8) as u32,
                0,
            )
        };
        if got > 0 {
            kernel_frames = (got as u32) / 8;
        }
    }
    let (ip, sp, bp) = user;
    let mut want = stack_bytes() as usize;
    if want > STACK_BYTES_MAX {
        want = STACK_BYTES_MAX;
    }
    let mut len = 0u32;
    for _ in 0..6 {
        if want == 0 || sp == 0 {
            break;
        }
        let data = unsafe { core::ptr::addr_of_mut!((*record_ptr).data) };
        let read =
            unsafe { generated::bpf_probe_read_user(data.cast(), want as u32, sp as *const _) };
        if read == 0 {
            len = want as u32;
            break;
        }
        want /= 2;
    }
    unsafe {
        let header = core::ptr::addr_of_mut!((*record_ptr).header);
        core::ptr::addr_of_mut!((*header).ts_ns).write(ts_ns);
        core::ptr::addr_of_mut!((*header).tid).write(tid);
        core::ptr::addr_of_mut!((*header).kind).write(kind as u32);
        core::ptr::addr_of_mut!((*header).ip).write(ip);
        core::ptr::addr_of_mut!((*header).sp).write(sp);
        core::ptr::addr_of_mut!((*header).bp).write(bp);
        core::ptr::addr_of_mut!((*header).user_len).write(len);
        core::ptr::addr_of_mut!((*header).kernel_frames).write(kernel_frames);
        let flags = flags | if in_kernel { WATCH_IN_KERNEL } else { 0 };
        core::ptr::addr_of_mut!((*header).flags).write(flags);
        core::ptr::addr_of_mut!((*header)._pad).write(0);
    }
    record.submit(NO_WAKEUP);
}

/// A CPU sample (every CPU, `--sample-hz`): user stack always, kernel stack
/// too when the thread was in the kernel.
#[perf_event]
pub fn watch_sample(ctx: PerfEventContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    let regs = unsafe { &(*ctx.ctx).regs };
    let in_kernel = regs.cs & 3 == 0;
    let user = if in_kernel {
        saved_user_regs().unwrap_or((0, 0, 0))
    } else {
        (regs.rip, regs.rsp, regs.rbp)
    };
    capture(
        &ctx,
        WatchStackKind::Sample,
        tid,
        ts_ns,
        user,
        in_kernel,
        worker_flags(tid),
    );
    0
}

/// `sched_switch(bool preempt, task_struct *prev, task_struct *next,
/// unsigned int prev_state)`, in `prev`'s context.
#[btf_tracepoint(function = "sched_switch")]
pub fn watch_switch(ctx: BtfTracePointContext) -> u32 {
    if !enabled() {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let next: u64 = ctx.arg(2);
    // Back in: a worker we saw leave while it was not parked.
    if let Some(out) = unsafe { OFF_CPU.get(&next) } {
        let out = *out;
        let _ = OFF_CPU.remove(&next);
        let duration_ns = now.saturating_sub(out.ts_ns);
        if duration_ns >= min_off_cpu_ns() {
            send(WatchEvent {
                ts_ns: out.ts_ns,
                tid: out.tid,
                kind: WatchEventKind::OffCpu as u32,
                duration_ns,
                site_or_state: out.state,
                preempted: out.preempted,
            });
        }
    }
    // Out: `prev` is the current thread.
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != target_tgid() {
        return 0;
    }
    let tid = pid_tgid as u32;
    let flags = worker_flags(tid);
    if flags != WATCH_WORKER {
        // Not a worker, or parked: off CPU is what it should be.
        return 0;
    }
    let preempt: u64 = ctx.arg(0);
    let prev: u64 = ctx.arg(1);
    let prev_state: u64 = ctx.arg(3);
    let preempted = (preempt & 1) != 0 || prev_state == 0;
    let out = OffCpu {
        ts_ns: now,
        tid,
        state: prev_state as u32,
        preempted: u32::from(preempted),
        _pad: 0,
    };
    let _ = OFF_CPU.insert(&prev, &out, 0);
    if !preempted {
        // It goes to sleep: where, is what a blocking report shows.
        let user = saved_user_regs().unwrap_or((0, 0, 0));
        capture(&ctx, WatchStackKind::Switch, tid, now, user, true, flags);
    }
    0
}
