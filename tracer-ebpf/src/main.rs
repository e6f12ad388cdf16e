//! The eBPF side of rt-ebpf-trace: uprobes on tokio's task poll and worker
//! park functions, on its spawn, wake, task-end and unpark functions, on
//! waker clones inside a poll (where a task waits), and a CPU-sampling perf
//! event. Each probe filters on the target process, stamps the time and
//! thread, and writes one [`Event`] into the `EVENTS` ring buffer; await
//! points and samples also copy the user stack into `STACKS`. Everything else
//! (pairing starts with ends, naming tasks, unwinding, writing traces)
//! happens in user space, where it costs the target nothing.
#![no_std]
#![no_main]

use aya_log_ebpf::warn;
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated,
    },
    macros::{map, perf_event, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{PerfEventContext, ProbeContext, RetProbeContext},
};
use tracer_common::{
    DEFAULT_RING_BYTES, Event, EventKind, STACK_BYTES_MAX, StackHeader, StackKind, TaskIdLayout,
};

/// Only this process is traced (the uprobes are also attached for this pid;
/// checking here as well keeps other processes that map the same binary out).
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

/// How to read a task's id from its header; set by user space.
#[unsafe(no_mangle)]
static TASK_ID_LAYOUT: TaskIdLayout = TaskIdLayout {
    enabled: 0,
    _pad: 0,
    vtable_offset: 0,
    id_offset_slot: 0,
};

/// `--min-poll`: when non-zero, a poll is recorded only if it lasted at least
/// this long; shorter ones are only counted (`SHORT_POLLS`). The filter runs
/// here, in the kernel, so that short polls cost no ring-buffer traffic.
#[unsafe(no_mangle)]
static MIN_POLL_NS: u64 = 0;

/// A poll in progress, kept per thread while `MIN_POLL_NS` filters.
#[derive(Clone, Copy)]
struct OpenPoll {
    start_ns: u64,
    header: u64,
    task_id: u64,
    site: u32,
}

#[map(name = "OPEN_POLL")]
static OPEN_POLL: HashMap<u32, OpenPoll> = HashMap::with_max_entries(16384, 0);

/// Polls shorter than `MIN_POLL_NS`, counted but not recorded, per CPU.
#[map(name = "SHORT_POLLS")]
static SHORT_POLLS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `BPF_RB_NO_WAKEUP`: records are committed without waking the tracer.
/// Waking it costs the probed thread an interrupt per event; the tracer
/// drains on a timer instead (every few milliseconds).
const NO_WAKEUP: u64 = 1;

/// Resized by user space (`--ring-buffer-size`).
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// What a thread of the target is polling right now.
#[derive(Clone, Copy)]
struct CurrentTask {
    task_id: u64,
    /// The stack pointer at `raw::poll`'s entry: how deep an await point
    /// sits below it tells await points apart.
    entry_sp: u64,
    /// `raw::poll`'s return address, read at its entry before the
    /// uretprobe replaces it: stack captures need it to unwind past the poll.
    poll_return: u64,
}

/// The task each thread of the target is polling right now (thread id →
/// task), so that a wake, spawn, await point or sample can say which task.
#[map(name = "CURRENT_TASK")]
static CURRENT_TASK: HashMap<u32, CurrentTask> = HashMap::with_max_entries(16384, 0);

/// How many bytes of stack a capture copies (at most `STACK_BYTES_MAX`).
#[unsafe(no_mangle)]
static STACK_BYTES: u32 = STACK_BYTES_MAX as u32;

/// A stack capture: header and stack bytes, reserved whole in `STACKS`.
#[repr(C)]
struct StackRecord {
    header: StackHeader,
    data: [u8; STACK_BYTES_MAX],
}

/// Stack captures, apart from the small fixed events so that these stay
/// cheap to drain.
#[map(name = "STACKS")]
static STACKS: RingBuf = RingBuf::with_byte_size(32 * 1024 * 1024, 0);

/// Await points whose stack was already captured, by (task id, key): each is
/// captured once per task.
#[map(name = "AWAIT_SEEN")]
static AWAIT_SEEN: LruHashMap<[u64; 2], u8> = LruHashMap::with_max_entries(65536, 0);

/// Samples that hit the target in the kernel (no user stack to show), per CPU.
#[map(name = "KERNEL_SAMPLES")]
static KERNEL_SAMPLES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Events dropped because the ring buffer was full, per CPU.
#[map(name = "LOST")]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: non-zero while recording. User space clears it to stop at once:
/// removing the probes themselves takes seconds.
#[map(name = "ENABLED")]
static ENABLED: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
fn enabled() -> bool {
    ENABLED.get(0).is_some_and(|flag| *flag != 0)
}

#[inline(always)]
fn target_tgid() -> u32 {
    // A volatile read, so the compiler does not fold the initial 0 in.
    unsafe { core::ptr::read_volatile(&TARGET_TGID) }
}

#[inline(always)]
fn task_id_layout() -> TaskIdLayout {
    unsafe { core::ptr::read_volatile(&TASK_ID_LAYOUT) }
}

/// Returns the current thread id if it belongs to the target process.
#[inline(always)]
fn target_thread() -> Option<u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != target_tgid() || !enabled() {
        return None;
    }
    Some(pid_tgid as u32)
}

#[inline(always)]
fn attach_cookie<C: EbpfContext>(ctx: &C) -> u32 {
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) as u32 }
}

/// Set once the task-id layout warning was logged, so it is logged once.
#[map(name = "WARNED")]
static WARNED: Array<u32> = Array::with_max_entries(1, 0);

/// Reads tokio's task id: header -> vtable -> id_offset -> id.
#[inline(always)]
fn read_task_id<C: EbpfContext>(ctx: &C, header: u64) -> u64 {
    let layout = task_id_layout();
    if layout.enabled == 0 || header == 0 {
        return 0;
    }
    let vtable: u64 = match unsafe { bpf_probe_read_user((header + layout.vtable_offset) as *const u64) } {
        Ok(v) => v,
        Err(_) => return 0,
    };
    let id_offset: u64 =
        match unsafe { bpf_probe_read_user((vtable + layout.id_offset_slot * 8) as *const u64) } {
            Ok(v) => v,
            Err(_) => return 0,
        };
    // A task is a few hundred bytes to a few KiB; anything larger is not an
    // offset: this tokio's task layout is not the one user space expected.
    if id_offset == 0 || id_offset > 1 << 16 {
        if let Some(warned) = WARNED.get_ptr_mut(0)
            && unsafe { *warned } == 0
        {
            unsafe { *warned = 1 };
            warn!(
                ctx,
                "task ids can't be read: the task vtable at {:x} holds {} where id_offset was expected",
                vtable,
                id_offset
            );
        }
        return 0;
    }
    unsafe { bpf_probe_read_user((header + id_offset) as *const u64) }.unwrap_or(0)
}

/// The fields of an event besides its kind, time and thread.
#[derive(Default)]
struct Detail {
    site: u32,
    task: u64,
    task_id: u64,
    other_task_id: u64,
}

#[inline(always)]
fn min_poll_ns() -> u64 {
    unsafe { core::ptr::read_volatile(&MIN_POLL_NS) }
}

#[inline(always)]
fn emit(kind: EventKind, tid: u32, detail: Detail) {
    // Stamp before reserving so the time is as close to the probe hit as possible.
    emit_at(unsafe { bpf_ktime_get_ns() }, kind, tid, detail)
}

#[inline(always)]
fn emit_await(tid: u32, detail: Detail, key: u64) {
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event {
                ts_ns,
                tid,
                kind: EventKind::AwaitPoint as u32,
                site: detail.site,
                _pad: 0,
                task: 0,
                task_id: detail.task_id,
                other_task_id: 0,
                addr: key,
            });
            entry.submit(NO_WAKEUP);
        }
        None => count(&LOST),
    }
}

#[inline(always)]
fn emit_at(ts_ns: u64, kind: EventKind, tid: u32, detail: Detail) {
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
                addr: 0,
            });
            entry.submit(NO_WAKEUP);
        }
        None => {
            if let Some(lost) = LOST.get_ptr_mut(0) {
                unsafe { *lost += 1 };
            }
        }
    }
}

/// Entry of `tokio::runtime::task::raw::poll::<T, S>(ptr: NonNull<Header>)`.
#[uprobe]
pub fn poll_start(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let header: u64 = ctx.arg(0).unwrap_or(0);
    let task_id = read_task_id(&ctx, header);
    // Failing to record the current task only costs the waker attribution.
    let entry_sp = unsafe { (*ctx.regs).rsp };
    let poll_return = unsafe { bpf_probe_read_user(entry_sp as *const u64) }.unwrap_or(0);
    let current = CurrentTask { task_id, entry_sp, poll_return };
    let _ = CURRENT_TASK.insert(&tid, &current, 0);
    let site = attach_cookie(&ctx);
    if min_poll_ns() > 0 {
        // Decide at the end, when the duration is known.
        let open = OpenPoll { start_ns: unsafe { bpf_ktime_get_ns() }, header, task_id, site };
        let _ = OPEN_POLL.insert(&tid, &open, 0);
        return 0;
    }
    emit(EventKind::PollStart, tid, Detail { site, task: header, task_id, ..Detail::default() });
    0
}

/// Return of `raw::poll`.
#[uretprobe]
pub fn poll_end(ctx: RetProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let _ = CURRENT_TASK.remove(&tid);
    let site = attach_cookie(&ctx);
    let min_poll = min_poll_ns();
    if min_poll > 0 {
        let Some(open) = (unsafe { OPEN_POLL.get(&tid) }).copied() else { return 0 };
        let _ = OPEN_POLL.remove(&tid);
        let end_ns = unsafe { bpf_ktime_get_ns() };
        if end_ns.saturating_sub(open.start_ns) < min_poll {
            if let Some(count) = SHORT_POLLS.get_ptr_mut(0) {
                unsafe { *count += 1 };
            }
            return 0;
        }
        // A long poll: both ends at once, in order, so user space sees the
        // same pair it sees without the filter.
        let start = Detail { site: open.site, task: open.header, task_id: open.task_id, ..Detail::default() };
        emit_at(open.start_ns, EventKind::PollStart, tid, start);
        emit_at(end_ns, EventKind::PollEnd, tid, Detail { site, ..Detail::default() });
        return 0;
    }
    emit(EventKind::PollEnd, tid, Detail { site, ..Detail::default() });
    0
}

/// Entry of a worker's park function.
#[uprobe]
pub fn park_start(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    emit(EventKind::ParkStart, tid, Detail { site: attach_cookie(&ctx), ..Detail::default() });
    0
}

/// Return of a worker's park function.
#[uretprobe]
pub fn park_end(ctx: RetProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    emit(EventKind::ParkEnd, tid, Detail { site: attach_cookie(&ctx), ..Detail::default() });
    0
}

/// The task running on this thread, by id (0 when none).
#[inline(always)]
fn current_task(tid: u32) -> u64 {
    unsafe { CURRENT_TASK.get(&tid) }.map_or(0, |current| current.task_id)
}

/// Copies the registers and up to `STACK_BYTES` of user stack from `sp` up
/// into the `STACKS` ring buffer. Where the copy would run past the top of
/// the stack (unmapped memory), it is retried shorter.
#[inline(always)]
fn capture_stack(kind: StackKind, tid: u32, current: Option<CurrentTask>, key: u64, ip: u64, sp: u64, bp: u64) {
    let Some(mut record) = STACKS.reserve::<StackRecord>(0) else {
        count(&LOST);
        return;
    };
    let record_ptr = record.as_mut_ptr();
    let mut want = unsafe { core::ptr::read_volatile(&STACK_BYTES) } as usize;
    if want > STACK_BYTES_MAX {
        want = STACK_BYTES_MAX;
    }
    let mut len = 0u32;
    for _ in 0..6 {
        if want == 0 {
            break;
        }
        let data = unsafe { core::ptr::addr_of_mut!((*record_ptr).data) };
        let read = unsafe { generated::bpf_probe_read_user(data.cast(), want as u32, sp as *const _) };
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
            ip,
            sp,
            bp,
            len,
            _pad: 0,
            poll_return: current.map_or(0, |c| c.poll_return),
        });
    }
    record.submit(NO_WAKEUP);
}

#[inline(always)]
fn count(counter: &PerCpuArray<u64>) {
    if let Some(value) = counter.get_ptr_mut(0) {
        unsafe { *value += 1 };
    }
}

/// A polled task clones its waker (`task::waker::clone_waker`): it is about
/// to wait. Records the await point, and the first time this task waits
/// here, the stack that says where.
#[uprobe]
pub fn await_point(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let Some(current) = (unsafe { CURRENT_TASK.get(&tid) }).copied() else { return 0 };
    let regs = unsafe { &*ctx.regs };
    // The caller's address and the depth below the poll's entry tell await
    // points apart without unwinding here.
    let caller: u64 = unsafe { bpf_probe_read_user(regs.rsp as *const u64) }.unwrap_or(0);
    let depth = current.entry_sp.wrapping_sub(regs.rsp) & 0xffff;
    let key = caller ^ (depth << 48);
    let detail = Detail { site: attach_cookie(&ctx), task_id: current.task_id, ..Detail::default() };
    emit_await(tid, detail, key);
    let seen_key = [current.task_id, key];
    if unsafe { AWAIT_SEEN.get(&seen_key) }.is_none() {
        let _ = AWAIT_SEEN.insert(&seen_key, &1, 0);
        capture_stack(StackKind::AwaitPoint, tid, Some(current), key, regs.rip, regs.rsp, regs.rbp);
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
        count(&KERNEL_SAMPLES);
        return 0;
    }
    let current = unsafe { CURRENT_TASK.get(&tid) }.copied();
    capture_stack(StackKind::Sample, tid, current, 0, regs.rip, regs.rsp, regs.rbp);
    0
}

/// The scheduler events (spawn, wake, task end, unpark) share programs: the
/// attach cookie carries the event kind in its high half and the site index
/// in its low half, and the program is chosen by which register holds the
/// task's header (or none).
#[inline(always)]
fn task_event<C: EbpfContext>(ctx: &C, cookie: u64, header: u64) {
    let Some(tid) = target_thread() else { return };
    let Some(kind) = EventKind::from_u32((cookie >> 32) as u32) else { return };
    let detail = Detail {
        site: cookie as u32,
        task: header,
        task_id: read_task_id(ctx, header),
        other_task_id: current_task(tid),
    };
    emit(kind, tid, detail);
}

/// A scheduler event whose task header is the first argument (RDI).
#[uprobe]
pub fn task_event_arg0(ctx: ProbeContext) -> u32 {
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    task_event(&ctx, cookie, ctx.arg(0).unwrap_or(0));
    0
}

/// A scheduler event whose task header is the second argument (RSI).
#[uprobe]
pub fn task_event_arg1(ctx: ProbeContext) -> u32 {
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    task_event(&ctx, cookie, ctx.arg(1).unwrap_or(0));
    0
}

/// A scheduler event whose second argument (RSI) points at the task's header
/// pointer (`&Task<S>`).
#[uprobe]
pub fn task_event_arg1_deref(ctx: ProbeContext) -> u32 {
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let pointer: u64 = ctx.arg(1).unwrap_or(0);
    let header = unsafe { bpf_probe_read_user(pointer as *const u64) }.unwrap_or(0);
    task_event(&ctx, cookie, header);
    0
}

/// A scheduler event whose task comes back in the return value: a pair of
/// pointers to the task in RAX and RDX (either may be a null `None`).
#[uretprobe]
pub fn task_event_ret(ctx: RetProbeContext) -> u32 {
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let regs = unsafe { &*ctx.regs };
    let header = if regs.rax != 0 { regs.rax } else { regs.rdx };
    task_event(&ctx, cookie, header);
    0
}

/// A scheduler event about no task in particular (an unpark).
#[uprobe]
pub fn thread_event(ctx: ProbeContext) -> u32 {
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    task_event(&ctx, cookie, 0);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
