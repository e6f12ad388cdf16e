//! Every map of the eBPF side, declared once, with the records the per-thread
//! ones hold. Each is named after its identifier, which is its name in
//! `tracer_common::names::maps`.
//!
//! Sizes: `CURRENT_TASK` holds 16384 threads and `AWAIT_SEEN` 65536 (task,
//! await point) pairs, both LRU so that old entries make room; `EVENTS` is
//! resized by user space (`--ring-buffer-size`, 16 MiB by default), `STACKS`
//! is 32 MiB (a capture is up to 16 KiB of stack plus its header).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{Counter, DEFAULT_RING_BYTES, STACK_BYTES_MAX, StackHeader};

/// Events (`tracer_common::Event`), to user space.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Stack captures, apart from the small fixed events so that these stay
/// cheap to drain.
#[map]
pub static STACKS: RingBuf = RingBuf::with_byte_size(32 * 1024 * 1024, 0);

/// A stack capture: header and stack bytes, reserved whole in `STACKS`.
#[repr(C)]
pub struct StackRecord {
    pub header: StackHeader,
    pub data: [u8; STACK_BYTES_MAX],
}

/// What the programs count instead of recording, per CPU, one slot per
/// [`Counter`]: one map rather than one per count, summed by user space at
/// the end.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::SLOTS, 0);

/// Adds `delta` (wrapping) to `*slot` atomically: the BPF target has no
/// `AtomicU64` read-modify-write, its instruction set has (`lock … +=`).
#[inline(always)]
pub fn atomic_add(slot: *mut u64, delta: u64) {
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({slot} + 0) += {delta}",
            slot = in(reg) slot,
            delta = in(reg) delta,
        )
    }
}

/// Adds one to a counter of this CPU.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        unsafe { *value += 1 };
    }
}

/// Slot 0: non-zero while recording. User space clears it to stop at once:
/// removing the probes themselves takes seconds.
#[map]
pub static ENABLED: Array<u32> = Array::with_max_entries(1, 0);

/// One poll in progress.
#[derive(Clone, Copy)]
pub struct CurrentTask {
    /// The poll site (attach cookie).
    pub site: u32,
    pub _pad: u32,
    pub header: u64,
    pub task_id: u64,
    pub start_ns: u64,
    /// The stack pointer at `raw::poll`'s entry: where the poll returns to
    /// it is this plus 8, and how deep an await point sits below it tells
    /// await points apart.
    pub entry_sp: u64,
    /// `raw::poll`'s return address, read at its entry before the
    /// uretprobe replaces it: stack captures need it to unwind past the poll.
    pub poll_return: u64,
    /// The key of the last await point this poll registered a waker at (0
    /// when none): sent with the poll's end rather than as an event of its own.
    pub await_key: u64,
    /// The thread's `ThreadPolls::preempted_ns` when the poll started; once
    /// `poll::pop_poll` ended the poll, how long it was preempted during it.
    pub preempted_at_start: u64,
}

/// What a thread of the target is polling right now: the innermost poll,
/// and the one it interrupted when polls nest (a `LocalSet` or runtime
/// driven from inside a task polls its own tasks within that task's poll).
/// Deeper nesting forgets the outermost (its end is then reported as an
/// abandoned poll). Kept per thread and updated in place: a hash-map lookup
/// costs the traced thread far less than an insert or a delete (measured:
/// ~150 ns per update on the VM of BENCHMARKS.md).
#[derive(Clone, Copy)]
pub struct ThreadPolls {
    /// 0: not polling; 1: `inner` is; 2: `inner` within `outer`.
    pub depth: u32,
    pub _pad: u32,
    pub inner: CurrentTask,
    pub outer: CurrentTask,
    /// Nanoseconds this thread has spent preempted inside polls, all told
    /// (added by [`crate::preempt`]): a poll's share is the difference
    /// between its end and its start.
    pub preempted_ns: u64,
}

/// The polls each thread of the target is in (thread id → polls), so that a
/// wake, spawn, await point or sample can say which task, and a poll's end
/// which poll. LRU so that threads that exited make room for new ones.
#[map]
pub static CURRENT_TASK: LruHashMap<u32, ThreadPolls> = LruHashMap::with_max_entries(16384, 0);

/// Poll sites whose task-id offset `SITE_ID_OFFSET` caches (site indexes
/// past it read the offset every time).
pub const MAX_CACHED_SITES: u32 = 65536;

/// The task-id offset of each poll site's task type, by site index (the
/// attach cookie), 0 until the site's first poll reads it from the vtable.
/// `id_offset` is fixed per `raw::poll::<T, S>` instance, so caching it
/// saves two user-memory reads per poll.
#[map]
pub static SITE_ID_OFFSET: Array<u64> = Array::with_max_entries(MAX_CACHED_SITES, 0);

/// Await points whose stack was already captured, by (task id, key): each is
/// captured once per task.
#[map]
pub static AWAIT_SEEN: LruHashMap<[u64; 2], u8> = LruHashMap::with_max_entries(65536, 0);

/// Slot 0: set once the task-id layout warning was logged, so it is logged
/// once.
#[map]
pub static WARNED: Array<u32> = Array::with_max_entries(1, 0);

/// A thread inside a `block_on` loop (see `block_on`).
#[derive(Clone, Copy)]
pub struct BlockOnThread {
    /// Nested `block_on` calls; only the outermost one's root is polled.
    pub depth: u32,
    /// `block_on` calls this thread made, for the root's id.
    pub calls: u32,
    /// The `block_on<F>` site (attach cookie), which names `F`.
    pub site: u32,
    /// 1 while the root future is being polled.
    pub polling: u32,
    /// 1 while the thread is parked in the loop (the outer park function
    /// calls the inner one: only the first entry and its return count).
    pub parked: u32,
    pub _pad: u32,
    /// The root's id (and header) for user space.
    pub root_id: u64,
    /// RSP at `block_on`'s entry: where the root's await points are keyed from.
    pub entry_sp: u64,
}

/// The threads inside a `block_on` loop (thread id → state), LRU like
/// `CURRENT_TASK`.
#[map]
pub static BLOCK_ON: LruHashMap<u32, BlockOnThread> = LruHashMap::with_max_entries(4096, 0);

/// The root future each thread parker (its `Inner`'s address) parks for, so
/// that a wake of the parker is a wake of that root.
#[map]
pub static ROOT_OF_PARKER: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// A target thread preempted inside a poll, until it runs again.
#[derive(Clone, Copy)]
pub struct Preempted {
    pub ts_ns: u64,
    pub tid: u32,
    pub _pad: u32,
}

/// By the thread's `task_struct` address (see [`crate::preempt`]). Not an
/// LRU map: every entry ends at the thread's switch back in, and an LRU map
/// may evict live entries before it is full (per-CPU free lists), which
/// would lose their time and leave `PREEMPTED_PENDING` counting them.
#[map]
pub static PREEMPTED: HashMap<u64, Preempted> = HashMap::with_max_entries(4096, 0);

/// Slot 0: how many entries `PREEMPTED` holds (an upper bound), so that the
/// switches of the rest of the machine skip its lookup while none is
/// pending.
#[map]
pub static PREEMPTED_PENDING: Array<u64> = Array::with_max_entries(1, 0);
