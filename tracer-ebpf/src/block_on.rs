//! The `block_on` root future's polls: the future a thread hands to
//! `Runtime::block_on` (`#[tokio::main]`'s body), polled inline by the
//! thread parker's loop, not through `raw::poll` and with no task header.
//!
//! Why the loop's structure and not the future's own `poll`: on release
//! builds the root future's poll has one caller and is inlined into the
//! monomorphized `CachedParkThread::block_on<F>` (the compat service on
//! tokio 1.38 and 1.54, the fixtures, the demo: no symbol of it is left),
//! whereas `block_on<F>` itself and the parker's `Inner::park` stay
//! functions. The loop is `loop { if let Ready(v) = budget(|| f.poll(cx))
//! { return v } self.park() }` in every tokio 1.x (`Enter::block_on` /
//! `park::thread::CachedParkThread::block_on` before 1.2x), so on the thread
//! inside `block_on<F>` the root future is being polled exactly when the
//! thread is not parked: a poll runs from `block_on`'s entry or a park's
//! return to the next park's entry or `block_on`'s return. The few
//! instructions of the loop itself (the coop budget, the park call) are
//! inside those polls.
//!
//! A root poll goes into `CURRENT_TASK` like a task poll, so await points,
//! samples and wakes made during it are the root's. Its task id is made
//! here (`ROOT_ID_BASE | tid << 8 | n`, n counting this thread's `block_on`
//! calls): tokio's ids count up from 1 and never get near 2^52, and the id
//! stays below 2^53 so JSON readers keep it exact. The id is also its
//! "header", so that user space keeps one task per `block_on` call; the
//! root's waker wakes the thread's parker (`park::wake`, RDI the parker's
//! `Inner`), which `ROOT_OF_PARKER` maps back to the root.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{EventKind, ROOT_ID_BASE};

use crate::config::{attach_cookie, target_thread};
use crate::emit::{Detail, emit, emit_at};
use crate::maps::{BLOCK_ON, BlockOnThread, CURRENT_TASK, CurrentTask, ROOT_OF_PARKER};
use crate::poll::{current_poll, current_task, pop_poll, push_poll};

/// Entry of a `block_on<F>` loop (`CachedParkThread::block_on`): the root
/// future's first poll starts.
#[uprobe]
pub fn block_on_start(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    if current_poll(tid).is_some() {
        // A `block_on` inside a task's poll (`spawn_blocking` or
        // `block_in_place` work, or inside a root poll): a third level of
        // polls (its `LocalSet`'s tasks) would not fit `CURRENT_TASK`, and
        // its parks would cut the task's poll. Not traced.
        return 0;
    }
    let site = attach_cookie(&ctx) as u32;
    let state = match BLOCK_ON.get_ptr_mut(&tid) {
        Some(state) => state,
        None => {
            let fresh = BlockOnThread {
                depth: 0,
                calls: 0,
                site,
                polling: 0,
                parked: 0,
                _pad: 0,
                root_id: 0,
                entry_sp: 0,
            };
            if BLOCK_ON.insert(&tid, &fresh, 0).is_err() {
                return 0;
            }
            match BLOCK_ON.get_ptr_mut(&tid) {
                Some(state) => state,
                None => return 0,
            }
        }
    };
    unsafe {
        (*state).depth += 1;
        if (*state).depth != 1 {
            // A `block_on` inside a root poll (tokio refuses that for
            // runtimes; other callers of the parker's `block_on` may not):
            // the outer root stays the one polled.
            return 0;
        }
        (*state).calls = (*state).calls.wrapping_add(1);
        (*state).site = site;
        (*state).parked = 0;
        (*state).root_id = ROOT_ID_BASE | (u64::from(tid) << 8) | u64::from((*state).calls & 0xff);
        // Every poll of this root is keyed from here, so that an await
        // point has one key across its polls (see `stacks::await_point`).
        (*state).entry_sp = (*ctx.regs).rsp;
    }
    start_root_poll(tid, state);
    0
}

/// Return of the `block_on<F>` loop: the root future completed (or the
/// loop unwound); its last poll ends.
#[uretprobe]
pub fn block_on_end(_ctx: RetProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let Some(state) = BLOCK_ON.get_ptr_mut(&tid) else {
        return 0;
    };
    unsafe {
        if (*state).depth == 0 {
            return 0;
        }
        (*state).depth -= 1;
        if (*state).depth == 0 {
            end_root_poll(tid, state);
        }
    }
    0
}

/// Entry of a park inside a `block_on` loop: the loop's own
/// `CachedParkThread::park` or the parker's `Inner::park(&self)` it calls
/// (only one of them may be a function): the root poll ended Pending and
/// the thread goes to sleep. The cookie: the site index (bits 0–31), the
/// loop to assume plus one (bits 32–62) and, in bit 63, whether only
/// `block_on` calls the function, so that a thread parking there is in a
/// loop whose entry was not seen (tracing began inside it).
#[uprobe]
pub fn root_park_start(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let cookie = attach_cookie(&ctx);
    let state = match BLOCK_ON.get_ptr_mut(&tid) {
        Some(state) => state,
        None if cookie >> 63 == 1 && current_poll(tid).is_none() => {
            let assumed = ((cookie >> 32) & 0x7fff_ffff) as u32;
            let joined = BlockOnThread {
                depth: 1,
                calls: 0,
                site: assumed.wrapping_sub(1),
                polling: 0,
                parked: 0,
                _pad: 0,
                root_id: ROOT_ID_BASE | (u64::from(tid) << 8),
                // Await points are keyed from the loop's frame: here,
                // just above this call.
                entry_sp: unsafe { (*ctx.regs).rsp } + 8,
            };
            if BLOCK_ON.insert(&tid, &joined, 0).is_err() {
                return 0;
            }
            match BLOCK_ON.get_ptr_mut(&tid) {
                Some(state) => state,
                None => return 0,
            }
        }
        None => return 0,
    };
    if unsafe { (*state).depth } == 0 {
        return 0;
    }
    let parker: u64 = ctx.arg(0).unwrap_or(0);
    let root_id = unsafe { (*state).root_id };
    if parker != 0 && cookie >> 63 == 0 {
        // `Inner::park(&self)`: RDI is the parker its waker wakes.
        let _ = ROOT_OF_PARKER.insert(&parker, &root_id, 0);
    }
    if unsafe { (*state).parked } != 0 {
        // The inner park of the outer one already seen.
        return 0;
    }
    unsafe {
        (*state).parked = 1;
        end_root_poll(tid, state);
    }
    let detail = Detail {
        site: cookie as u32,
        ..Detail::default()
    };
    emit(EventKind::ParkStart, tid, detail);
    0
}

/// Return of a park inside a `block_on` loop: woken, the loop polls the
/// root future again.
#[uretprobe]
pub fn root_park_end(ctx: RetProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let Some(state) = BLOCK_ON.get_ptr_mut(&tid) else {
        return 0;
    };
    if unsafe { (*state).depth == 0 || (*state).parked == 0 } {
        return 0;
    }
    unsafe { (*state).parked = 0 };
    let detail = Detail {
        site: attach_cookie(&ctx) as u32,
        ..Detail::default()
    };
    emit(EventKind::ParkEnd, tid, detail);
    start_root_poll(tid, state);
    0
}

/// The root future's waker was woken (`park::wake` / `wake_by_ref`, RDI
/// the parker's `Inner`): a wake of the root whose thread parks there.
#[uprobe]
pub fn root_wake(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let parker: u64 = ctx.arg(0).unwrap_or(0);
    // A parker that never parked inside a traced `block_on` is not a root's.
    let Some(&root_id) = (unsafe { ROOT_OF_PARKER.get(&parker) }) else {
        return 0;
    };
    let detail = Detail {
        site: attach_cookie(&ctx) as u32,
        task: root_id,
        task_id: root_id,
        other_task_id: current_task(tid),
        addr: 0,
    };
    emit(EventKind::Wake, tid, detail);
    0
}

/// Entry of the current-thread scheduler's root-poll closure (a
/// `Context::enter` instance, see tracer-probes' `block_on`): its loop
/// polls the root between task polls, so the poll is this function's span.
/// There is no `block_on` entry to count calls from: the root's id is one
/// per thread.
#[uprobe]
pub fn root_poll_start(ctx: ProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    if current_poll(tid).is_some() {
        // Inside a task's poll (see `block_on_start`), or the root's own.
        return 0;
    }
    let site = attach_cookie(&ctx) as u32;
    let entry_sp = unsafe { (*ctx.regs).rsp };
    let fresh = BlockOnThread {
        depth: 0,
        calls: 1,
        site,
        polling: 0,
        parked: 0,
        _pad: 0,
        root_id: ROOT_ID_BASE | (u64::from(tid) << 8),
        entry_sp,
    };
    let state = match BLOCK_ON.get_ptr_mut(&tid) {
        Some(state) => state,
        None => {
            if BLOCK_ON.insert(&tid, &fresh, 0).is_err() {
                return 0;
            }
            match BLOCK_ON.get_ptr_mut(&tid) {
                Some(state) => state,
                None => return 0,
            }
        }
    };
    unsafe {
        if (*state).depth != 0 || (*state).polling != 0 {
            // Inside a multi-thread `block_on`'s root poll, or its own
            // start seen twice: the poll already open stays.
            return 0;
        }
        (*state).site = site;
        (*state).entry_sp = entry_sp;
        if (*state).root_id == 0 {
            (*state).root_id = fresh.root_id;
        }
    }
    start_root_poll(tid, state);
    0
}

/// Return of the current-thread root-poll closure.
#[uretprobe]
pub fn root_poll_end(_ctx: RetProbeContext) -> u32 {
    let Some(tid) = target_thread() else { return 0 };
    let Some(state) = BLOCK_ON.get_ptr_mut(&tid) else {
        return 0;
    };
    if unsafe { (*state).depth } != 0 {
        return 0;
    }
    unsafe { end_root_poll(tid, state) };
    0
}

#[inline(always)]
fn start_root_poll(tid: u32, state: *mut BlockOnThread) {
    let start_ns = unsafe { bpf_ktime_get_ns() };
    let (site, root_id) = unsafe { ((*state).site, (*state).root_id) };
    let current = CurrentTask {
        site,
        _pad: 0,
        header: root_id,
        task_id: root_id,
        start_ns,
        entry_sp: unsafe { (*state).entry_sp },
        poll_return: 0,
        await_key: 0,
        preempted_at_start: 0,
    };
    push_poll(tid, current);
    unsafe { (*state).polling = 1 };
    let detail = Detail {
        site,
        task: root_id,
        task_id: root_id,
        ..Detail::default()
    };
    emit_at(start_ns, EventKind::PollStart, tid, detail);
}

/// Ends the root poll if one is open on this thread, with the await point
/// it registered its waker at last.
#[inline(always)]
unsafe fn end_root_poll(tid: u32, state: *mut BlockOnThread) {
    unsafe {
        if (*state).polling == 0 {
            return;
        }
        (*state).polling = 0;
        let end_ns = bpf_ktime_get_ns();
        let root_id = (*state).root_id;
        let (mut await_key, mut preempted_ns) = (0, 0);
        if let Some(slot) = CURRENT_TASK.get_ptr_mut(&tid)
            && (*slot).depth != 0
            && (*slot).inner.task_id == root_id
        {
            let ended = pop_poll(slot);
            (await_key, preempted_ns) = (ended.await_key, ended.preempted_at_start);
        }
        let detail = Detail {
            site: (*state).site,
            task_id: root_id,
            addr: await_key,
            other_task_id: preempted_ns,
            ..Detail::default()
        };
        emit_at(end_ns, EventKind::PollEnd, tid, detail);
    }
}
