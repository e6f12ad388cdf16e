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

mod watch;

use aya_log_ebpf::warn;
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated,
    },
    macros::{map, perf_event, uprobe, uretprobe},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
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

/// Polls shorter than `MIN_POLL_NS`, counted but not recorded, per CPU.
#[map(name = "SHORT_POLLS")]
static SHORT_POLLS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `BPF_RB_NO_WAKEUP`: records are committed without waking the tracer.
/// Waking it costs the probed thread an interrupt per event; the tracer
/// drains on a timer instead (every few milliseconds).
pub(crate) const NO_WAKEUP: u64 = 1;

/// Resized by user space (`--ring-buffer-size`).
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// One poll in progress.
#[derive(Clone, Copy)]
struct CurrentTask {
    /// The poll site (attach cookie).
    site: u32,
    _pad: u32,
    header: u64,
    task_id: u64,
    start_ns: u64,
    /// The stack pointer at `raw::poll`'s entry: where the poll returns to
    /// it is this plus 8, and how deep an await point sits below it tells
    /// await points apart.
    entry_sp: u64,
    /// `raw::poll`'s return address, read at its entry before the
    /// uretprobe replaces it: stack captures need it to unwind past the poll.
    poll_return: u64,
    /// The key of the last await point this poll registered a waker at (0
    /// when none): sent with the poll's end rather than as an event of its own.
    await_key: u64,
}

/// What a thread of the target is polling right now: the innermost poll,
/// and the one it interrupted when polls nest (a `LocalSet` or runtime
/// driven from inside a task polls its own tasks within that task's poll).
/// Deeper nesting forgets the outermost (its end is then reported as an
/// abandoned poll). Kept per thread and updated in place: a hash-map lookup
/// costs the traced thread far less than an insert or a delete (measured:
/// ~150 ns per update on the VM of BENCHMARKS.md).
#[derive(Clone, Copy)]
struct ThreadPolls {
    /// 0: not polling; 1: `inner` is; 2: `inner` within `outer`.
    depth: u32,
    _pad: u32,
    inner: CurrentTask,
    outer: CurrentTask,
}

/// The polls each thread of the target is in (thread id → polls), so that a
/// wake, spawn, await point or sample can say which task, and a poll's end
/// which poll. LRU so that threads that exited make room for new ones.
#[map(name = "CURRENT_TASK")]
static CURRENT_TASK: LruHashMap<u32, ThreadPolls> = LruHashMap::with_max_entries(16384, 0);

/// The task-id offset of each poll site's task type, by site index (the
/// attach cookie), 0 until the site's first poll reads it from the vtable.
/// `id_offset` is fixed per `raw::poll::<T, S>` instance, so caching it
/// saves two user-memory reads per poll.
#[map(name = "SITE_ID_OFFSET")]
static SITE_ID_OFFSET: Array<u64> = Array::with_max_entries(MAX_CACHED_SITES, 0);

const MAX_CACHED_SITES: u32 = 65536;

/// Non-zero when poll ends are probed where `raw::poll` returns to
/// (`poll_returned`) rather than by a uretprobe (`poll_end`).
#[unsafe(no_mangle)]
static POLL_END_AT_RETURN_SITES: u32 = 0;

#[inline(always)]
fn poll_end_at_return_sites() -> bool {
    (unsafe { core::ptr::read_volatile(&POLL_END_AT_RETURN_SITES) }) != 0
}

/// How many bytes of stack a capture copies (at most `STACK_BYTES_MAX`); 0
/// when nothing captures stacks (no samples, no await points).
#[unsafe(no_mangle)]
static STACK_BYTES: u32 = STACK_BYTES_MAX as u32;

#[inline(always)]
pub(crate) fn stack_bytes() -> u32 {
    unsafe { core::ptr::read_volatile(&STACK_BYTES) }
}

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
pub(crate) fn enabled() -> bool {
    ENABLED.get(0).is_some_and(|flag| *flag != 0)
}

#[inline(always)]
pub(crate) fn target_tgid() -> u32 {
    // A volatile read, so the compiler does not fold the initial 0 in.
    unsafe { core::ptr::read_volatile(&TARGET_TGID) }
}

#[inline(always)]
fn task_id_layout() -> TaskIdLayout {
    unsafe { core::ptr::read_volatile(&TASK_ID_LAYOUT) }
}

/// Returns the current thread id if it belongs to the target process.
#[inline(always)]
pub(crate) fn target_thread() -> Option<u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != target_tgid() || !enabled() {
        return None;
    }
    Some(pid_tgid as u32)
}

#[inline(always)]
pub(crate) fn attach_cookie<C: EbpfContext>(ctx: &C) -> u32 {
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) as u32 }
}

/// Set once the task-id layout warning was logged, so it is logged once.
#[map(name = "WARNED")]
static WARNED: Array<u32> = Array::with_max_entries(1, 0);

/// Reads tokio's task id: header -> vtable -> id_offset -> id.
#[inline(always)]
fn read_task_id<C: EbpfContext>(ctx: &C, header: u64) -> u64 {
    match id_offset(ctx, header) {
        0 => 0,
        offset => read_id(header, offset),
    }
}

/// The id of the task polled at poll site `site`, with the site's id offset
/// read once and cached in `SITE_ID_OFFSET`.
#[inline(always)]
fn read_polled_task_id<C: EbpfContext>(ctx: &C, site: u32, header: u64) -> u64 {
    let Some(cached) = SITE_ID_OFFSET.get_ptr_mut(site) else {
        return read_task_id(ctx, header);
    };
    let mut offset = unsafe { *cached };
    if offset == 0 {
        offset = id_offset(ctx, header);
        unsafe { *cached = offset };
    }
    if offset == 0 {
        return 0;
    }
    read_id(header, offset)
}

#[inline(always)]
fn read_id(header: u64, id_offset: u64) -> u64 {
    unsafe { bpf_probe_read_user((header + id_offset) as *const u64) }.unwrap_or(0)
}

/// The byte offset of the task id from the header, read from the task's
/// vtable; 0 when ids are not read or the vtable holds no plausible offset.
#[inline(always)]
fn id_offset<C: EbpfContext>(ctx: &C, header: u64) -> u64 {
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
    id_offset
}

/// The fields of an event besides its kind, time and thread.
#[derive(Default)]
struct Detail {
    site: u32,
    task: u64,
    task_id: u64,
    other_task_id: u64,
    addr: u64,
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
                addr: detail.addr,
            });
            entry.submit(NO_WAKEUP);
        }
        None => count(&LOST),
    }
}

/// Entry of `tokio::runtime::task::raw::poll::<T, S>(ptr: NonNull<Header>)`.
#[uprobe]
pub fn poll_start(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let start_ns = unsafe { bpf_ktime_get_ns() };
    let header: u64 = ctx.arg(0).unwrap_or(0);
    let site = attach_cookie(&ctx);
    let filtering = min_poll_ns() > 0;
    // Under `--min-poll` most polls are short and never sent: their task id
    // is read at the end, for the long ones only (the task is alive until
    // its poll returns). A user-memory read costs ~150 ns here.
    let task_id = if filtering { 0 } else { read_polled_task_id(&ctx, site, header) };
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
    };
    match CURRENT_TASK.get_ptr_mut(&tid) {
        Some(slot) => unsafe {
            // The stack grows down: a poll within a poll starts deeper than
            // the one it interrupts. One that doesn't means the polls in the
            // slot ended unseen (a missed end must not leave a stale task
            // attributed to this thread).
            let depth = (*slot).depth;
            (*slot).depth = if depth != 0 && entry_sp < (*slot).inner.entry_sp {
                (*slot).outer = (*slot).inner;
                2
            } else if depth == 2 && entry_sp < (*slot).outer.entry_sp {
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
            let polls = ThreadPolls { depth: 1, _pad: 0, inner: current, outer: current };
            let _ = CURRENT_TASK.insert(&tid, &polls, 0);
        }
    }
    if filtering {
        // Decided at the end, when the duration is known.
        return 0;
    }
    emit_at(start_ns, EventKind::PollStart, tid, Detail { site, task: header, task_id, ..Detail::default() });
    0
}

/// Return of `raw::poll`, by uretprobe: used where no return sites were found.
#[uretprobe]
pub fn poll_end(ctx: RetProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let end_ns = unsafe { bpf_ktime_get_ns() };
    let site = attach_cookie(&ctx);
    let current = match CURRENT_TASK.get_ptr_mut(&tid) {
        Some(slot) if unsafe { (*slot).depth } != 0 => Some(unsafe { pop_poll(slot) }),
        _ => None,
    };
    let Some(current) = current else {
        // Its start was not seen (tracing began mid-poll, or the start was
        // lost): user space counts the unmatched end. Under `--min-poll` only
        // whole polls are sent.
        if min_poll_ns() == 0 {
            emit_at(end_ns, EventKind::PollEnd, tid, Detail { site, ..Detail::default() });
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
    let Some(slot) = CURRENT_TASK.get_ptr_mut(&tid) else { return 0 };
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

/// Ends the thread's innermost poll (`depth` must be non-zero) and returns
/// it; the poll it interrupted, if any, is the innermost again.
#[inline(always)]
unsafe fn pop_poll(slot: *mut ThreadPolls) -> CurrentTask {
    unsafe {
        let ended = (*slot).inner;
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
            count(&SHORT_POLLS);
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
        ..Detail::default()
    };
    emit_at(end_ns, EventKind::PollEnd, tid, end);
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

/// The poll in progress on this thread, if any.
#[inline(always)]
fn current_poll(tid: u32) -> Option<CurrentTask> {
    unsafe { CURRENT_TASK.get(&tid) }
        .filter(|polls| polls.depth != 0)
        .map(|polls| polls.inner)
}

/// The task running on this thread, by id (0 when none).
#[inline(always)]
fn current_task(tid: u32) -> u64 {
    current_poll(tid).map_or(0, |current| current.task_id)
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
/// to wait. Notes the await point for the poll's end event, and the first
/// time this task waits here, captures the stack that says where.
#[uprobe]
pub fn await_point(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let Some(slot) = CURRENT_TASK.get_ptr_mut(&tid) else { return 0 };
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
    let mut current = current_poll(tid);
    if let Some(current) = &mut current
        && current.task_id == 0
    {
        // Under `--min-poll` the poll's start did not read the id.
        current.task_id = read_polled_task_id(&ctx, current.site, current.header);
    }
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
    // Wakes are the hot kind (one or more per poll); their task is known
    // to user space by its header, so its id is not read for them.
    let task_id = if kind == EventKind::Wake { 0 } else { read_task_id(ctx, header) };
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
