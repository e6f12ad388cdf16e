//! The watch tier's programs (`rt-ebpf-trace watch`): always on, so none of
//! them runs per poll, and what they send grows with what a worker does
//! that matters (sleeping, blocking), not with how busy it is:
//!
//! - `watch_park_start` (uprobe on the schedulers' park function): per park,
//!   one trap and a counter (`WORKERS`): no record is sent. The count marks
//!   the thread as a worker and rides on every sample and switch, so user
//!   space tells "no park between these two samples" (hogs) without a
//!   record per park. There is no uretprobe: it was a second trap per park
//!   (~0.47 µs + a 358 ns program) for what `sched_switch` below says at
//!   the rate workers really sleep.
//! - `watch_switch` (BTF tracepoint `sched_switch`, no tracefs needed): runs
//!   on every context switch of the machine, so the common case exits
//!   early: nothing off CPU (`OFF_CPU_PENDING` is 0) and `prev` not in the
//!   target. When a worker goes off CPU voluntarily, the system call it
//!   sleeps in, read from its saved user registers, says whether that is
//!   its park (an epoll wait — the I/O driver — or a futex wait on a word
//!   in `PARK_FUTEX`, the park condvars user space learnt) or a blocking
//!   call inside a poll (anything else: a lock, a file read,
//!   `thread::sleep`), which captures the user and kernel stacks.
//!   Preemptions only send their duration. A park that returns without
//!   sleeping never switches, and costs nothing here.
//! - `watch_wakeup` (BTF tracepoint `sched_wakeup`): a park sleep ends when
//!   the worker is woken, not when a CPU takes it (on a loaded machine that
//!   wait is milliseconds, and the worker has work by then). Every wakeup
//!   of the machine runs it; it looks anything up only while some worker
//!   is off CPU.
//! - `watch_sample` (perf event): a CPU sample with the user stack *and*,
//!   when the thread was in the kernel, the kernel stack and the user
//!   registers saved at the kernel entry (so no sample is dropped).
//!
//! The task a sample or a switch belongs to is not known here (no per-poll
//! probe): user space finds the task's `raw::poll` frame on the unwound
//! user stack. A worker's first sleep on a park futex it has not learnt is
//! captured like a blocking call; user space sees the park function on its
//! stack, files it as a park and adds the word to `PARK_FUTEX`.

use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, generated},
    macros::{btf_tracepoint, map, perf_event, uprobe},
    maps::{Array, HashMap, LruHashMap, RingBuf},
    programs::{BtfTracePointContext, PerfEventContext, ProbeContext},
};
use tracer_common::watch::{
    KERNEL_FRAMES_MAX, WATCH_IN_KERNEL, WATCH_PARKED, WATCH_WORKER, WatchEvent, WatchEventKind,
    WatchStackHeader, WatchStackKind,
};
use tracer_common::{Counter, STACK_BYTES_MAX};

use crate::config::{enabled, stack_bytes, target_tgid, target_thread};
use crate::emit::NO_WAKEUP;
use crate::maps::{atomic_add, count};

/// x86_64 system call numbers a park sleeps in.
const SYS_FUTEX: u64 = 202;
const SYS_EPOLL_WAIT: u64 = 232;
const SYS_EPOLL_PWAIT: u64 = 281;
const SYS_EPOLL_PWAIT2: u64 = 441;

/// Off-CPU spans shorter than this are not sent (set by user space).
#[unsafe(no_mangle)]
static MIN_OFF_CPU_NS: u64 = 1_000_000;

/// Park sleeps, and worker off-CPU spans.
#[map]
static WATCH_EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Samples' and blocking switches' stacks.
#[map]
static WATCH_STACKS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// The target's workers (threads seen parking), by thread id: how many
/// times each entered its park function.
#[map]
static WORKERS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(4096, 0);

/// Futex words the workers park on (their park condvars), learnt by user
/// space from the stacks of the first sleeps on them.
#[map]
static PARK_FUTEX: HashMap<u64, u32> = HashMap::with_max_entries(1024, 0);

/// A worker that went off CPU, until it comes back.
#[derive(Clone, Copy)]
struct OffCpu {
    ts_ns: u64,
    tid: u32,
    state: u32,
    preempted: u32,
    /// 1: asleep in its park.
    parked: u32,
    parks: u32,
    _pad: u32,
    /// When `sched_wakeup` made it runnable again (0: not yet): a park
    /// sleep ends there, not when a CPU takes it (on a loaded machine the
    /// wait for a CPU is milliseconds, and the worker has work by then).
    woken_ns: u64,
}

/// Keyed by the thread's `task_struct` address: at the switch back in, the
/// thread is `next`, and its pid can't be read without the struct's layout.
#[map]
static OFF_CPU: LruHashMap<u64, OffCpu> = LruHashMap::with_max_entries(4096, 0);

/// Slot 0: how many entries `OFF_CPU` holds, so that the switches of the
/// rest of the machine skip its lookup while no worker is off CPU.
#[map]
static OFF_CPU_PENDING: Array<u64> = Array::with_max_entries(1, 0);

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

#[uprobe]
pub fn watch_park_start(_ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    match WORKERS.get_ptr_mut(&tid) {
        // Only the thread itself writes its count.
        Some(parks) => unsafe { *parks = (*parks).wrapping_add(1) },
        None => {
            let _ = WORKERS.insert(&tid, &1, 0);
        }
    }
    0
}

/// The user registers the current thread entered the kernel with, and the
/// system call it entered with (`orig_ax`, -1 when none) and its first
/// argument.
#[derive(Clone, Copy, Default)]
struct UserRegs {
    ip: u64,
    sp: u64,
    bp: u64,
    syscall: u64,
    arg0: u64,
}

#[inline(always)]
fn saved_user_regs() -> UserRegs {
    unsafe {
        let task = generated::bpf_get_current_task_btf();
        let regs = generated::bpf_task_pt_regs(task) as *const pt_regs;
        if regs.is_null() {
            return UserRegs::default();
        }
        let read = |field: *const u64| bpf_probe_read_kernel(field).unwrap_or(0);
        UserRegs {
            ip: read(core::ptr::addr_of!((*regs).rip)),
            sp: read(core::ptr::addr_of!((*regs).rsp)),
            bp: read(core::ptr::addr_of!((*regs).rbp)),
            syscall: read(core::ptr::addr_of!((*regs).orig_rax)),
            arg0: read(core::ptr::addr_of!((*regs).rdi)),
        }
    }
}

/// Whether a thread in system call `syscall` (first argument `arg0`) is
/// asleep in its park.
#[inline(always)]
fn park_syscall(syscall: u64, arg0: u64) -> bool {
    match syscall {
        SYS_EPOLL_WAIT | SYS_EPOLL_PWAIT | SYS_EPOLL_PWAIT2 => true,
        SYS_FUTEX => unsafe { PARK_FUTEX.get(&arg0) }.is_some(),
        _ => false,
    }
}

/// Whose stack a capture is: the thread, its `WATCH_*` flags and its park
/// count.
#[derive(Clone, Copy)]
struct Captured {
    tid: u32,
    flags: u32,
    parks: u32,
}

/// Sends one capture: the kernel stack (when `in_kernel`), then up to
/// `STACK_BYTES` of user stack from `sp` up (shorter where that would run
/// off the stack's top).
#[inline(always)]
fn capture<C: EbpfContext>(
    ctx: &C,
    kind: WatchStackKind,
    thread: Captured,
    ts_ns: u64,
    user: UserRegs,
    in_kernel: bool,
) {
    let Captured { tid, flags, parks } = thread;
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
    let sp = user.sp;
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
    let (syscall, arg0) = if in_kernel {
        (user.syscall, user.arg0)
    } else {
        (u64::MAX, 0)
    };
    unsafe {
        let header = core::ptr::addr_of_mut!((*record_ptr).header);
        core::ptr::addr_of_mut!((*header).ts_ns).write(ts_ns);
        core::ptr::addr_of_mut!((*header).tid).write(tid);
        core::ptr::addr_of_mut!((*header).kind).write(kind as u32);
        core::ptr::addr_of_mut!((*header).ip).write(user.ip);
        core::ptr::addr_of_mut!((*header).sp).write(sp);
        core::ptr::addr_of_mut!((*header).bp).write(user.bp);
        core::ptr::addr_of_mut!((*header).user_len).write(len);
        core::ptr::addr_of_mut!((*header).kernel_frames).write(kernel_frames);
        let flags = flags | if in_kernel { WATCH_IN_KERNEL } else { 0 };
        core::ptr::addr_of_mut!((*header).flags).write(flags);
        core::ptr::addr_of_mut!((*header).parks).write(parks);
        core::ptr::addr_of_mut!((*header).syscall).write(syscall);
        core::ptr::addr_of_mut!((*header).arg0).write(arg0);
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
        saved_user_regs()
    } else {
        UserRegs {
            ip: regs.rip,
            sp: regs.rsp,
            bp: regs.rbp,
            syscall: u64::MAX,
            arg0: 0,
        }
    };
    let (flags, parks) = match unsafe { WORKERS.get(&tid) } {
        Some(parks) => {
            let parked = in_kernel && park_syscall(user.syscall, user.arg0);
            let flags = WATCH_WORKER | if parked { WATCH_PARKED } else { 0 };
            (flags, *parks)
        }
        None => (0, 0),
    };
    let thread = Captured { tid, flags, parks };
    capture(&ctx, WatchStackKind::Sample, thread, ts_ns, user, in_kernel);
    0
}

/// `sched_switch(bool preempt, task_struct *prev, task_struct *next,
/// unsigned int prev_state)`, in `prev`'s context.
#[btf_tracepoint(function = "sched_switch")]
pub fn watch_switch(ctx: BtfTracePointContext) -> u32 {
    if !enabled() {
        return 0;
    }
    let Some(pending) = OFF_CPU_PENDING.get_ptr_mut(0) else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // Back in: a worker we saw leave.
    if unsafe { core::ptr::read_volatile(pending) } != 0 {
        let next: u64 = ctx.arg(2);
        if let Some(out) = unsafe { OFF_CPU.get(&next) } {
            let out = *out;
            if OFF_CPU.remove(&next).is_ok() {
                atomic_add(pending, u64::MAX);
            }
            back_in(&out, now);
        }
    }
    // Out: `prev` is the current thread.
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != target_tgid() {
        return 0;
    }
    let tid = pid_tgid as u32;
    let Some(parks) = (unsafe { WORKERS.get(&tid) }).copied() else {
        // Not a worker: off CPU is none of our business.
        return 0;
    };
    let preempt: u64 = ctx.arg(0);
    let prev: u64 = ctx.arg(1);
    let prev_state: u64 = ctx.arg(3);
    let preempted = (preempt & 1) != 0 || prev_state == 0;
    let user = if preempted {
        UserRegs::default()
    } else {
        saved_user_regs()
    };
    let parked = !preempted && park_syscall(user.syscall, user.arg0);
    let out = OffCpu {
        ts_ns: now,
        tid,
        state: prev_state as u32,
        preempted: u32::from(preempted),
        parked: u32::from(parked),
        parks,
        _pad: 0,
        woken_ns: 0,
    };
    // Counted first, so that no switch back in can find it at 0 while the
    // entry exists.
    atomic_add(pending, 1);
    if OFF_CPU.insert(&prev, &out, 0).is_err() {
        atomic_add(pending, u64::MAX);
    }
    if parked {
        send(WatchEvent {
            ts_ns: now,
            tid,
            kind: WatchEventKind::ParkSleep as u32,
            duration_ns: 0,
            site_or_state: prev_state as u32,
            preempted: 0,
            parks,
            _pad: 0,
        });
    } else if !preempted {
        // It goes to sleep outside its park: where, is what a blocking
        // report shows.
        let thread = Captured {
            tid,
            flags: WATCH_WORKER,
            parks,
        };
        capture(&ctx, WatchStackKind::Switch, thread, now, user, true);
    }
    0
}

/// `sched_wakeup(task_struct *p)`: a thread became runnable. Notes when, if
/// it is a worker asleep in its park (a lookup only while some worker is
/// off CPU).
#[btf_tracepoint(function = "sched_wakeup")]
pub fn watch_wakeup(ctx: BtfTracePointContext) -> u32 {
    let Some(pending) = OFF_CPU_PENDING.get_ptr_mut(0) else {
        return 0;
    };
    if unsafe { core::ptr::read_volatile(pending) } == 0 {
        return 0;
    }
    let task: u64 = ctx.arg(0);
    if let Some(out) = OFF_CPU.get_ptr_mut(&task) {
        unsafe {
            if (*out).parked != 0 && (*out).woken_ns == 0 {
                (*out).woken_ns = bpf_ktime_get_ns();
            }
        }
    }
    0
}

/// A worker seen leaving is back on CPU: its park sleep ends (when it was
/// woken), or its off-CPU span is sent if it reached `MIN_OFF_CPU_NS`.
#[inline(always)]
fn back_in(out: &OffCpu, now: u64) {
    let (kind, ts_ns, duration_ns) = if out.parked != 0 {
        let woken_ns = if out.woken_ns != 0 { out.woken_ns } else { now };
        (
            WatchEventKind::ParkWake,
            woken_ns,
            woken_ns.saturating_sub(out.ts_ns),
        )
    } else {
        let duration_ns = now.saturating_sub(out.ts_ns);
        if duration_ns < min_off_cpu_ns() {
            return;
        }
        (WatchEventKind::OffCpu, out.ts_ns, duration_ns)
    };
    send(WatchEvent {
        ts_ns,
        tid: out.tid,
        kind: kind as u32,
        duration_ns,
        site_or_state: out.state,
        preempted: out.preempted,
        parks: out.parks,
        _pad: 0,
    });
}
