//! The eBPF side of rt-ebpf-trace: uprobes on tokio's task poll and worker
//! park functions. Each probe stamps the time and thread, filters on the target
//! process, and writes one [`Event`] into the `EVENTS` ring buffer. Everything
//! else (pairing starts with ends, naming tasks, writing traces) happens in user
//! space, after the fact, where it costs the target nothing.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, bpf_get_attach_cookie},
    macros::{map, uprobe, uretprobe},
    maps::{PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{DEFAULT_RING_BYTES, Event, EventKind, TaskIdLayout};

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

/// Resized by user space (`--ring-buffer-size`).
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Events dropped because the ring buffer was full, per CPU.
#[map(name = "LOST")]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

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
    if (pid_tgid >> 32) as u32 != target_tgid() {
        return None;
    }
    Some(pid_tgid as u32)
}

#[inline(always)]
fn attach_cookie<C: EbpfContext>(ctx: &C) -> u32 {
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) as u32 }
}

/// Reads tokio's task id: header -> vtable -> id_offset -> id.
#[inline(always)]
fn read_task_id(header: u64) -> u64 {
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
    // A task is a few hundred bytes to a few KiB; anything larger is not an offset.
    if id_offset == 0 || id_offset > 1 << 16 {
        return 0;
    }
    unsafe { bpf_probe_read_user((header + id_offset) as *const u64) }.unwrap_or(0)
}

#[inline(always)]
fn emit(kind: EventKind, tid: u32, site: u32, task: u64, task_id: u64) {
    // Stamp before reserving so the time is as close to the probe hit as possible.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event {
                ts_ns,
                tid,
                kind: kind as u32,
                site,
                _pad: 0,
                task,
                task_id,
            });
            entry.submit(0);
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
    emit(EventKind::PollStart, tid, attach_cookie(&ctx), header, read_task_id(header));
    0
}

/// Return of `raw::poll`.
#[uretprobe]
pub fn poll_end(ctx: RetProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    emit(EventKind::PollEnd, tid, attach_cookie(&ctx), 0, 0);
    0
}

/// Entry of a worker's park function.
#[uprobe]
pub fn park_start(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    emit(EventKind::ParkStart, tid, attach_cookie(&ctx), 0, 0);
    0
}

/// Return of a worker's park function.
#[uretprobe]
pub fn park_end(ctx: RetProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    emit(EventKind::ParkEnd, tid, attach_cookie(&ctx), 0, 0);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
