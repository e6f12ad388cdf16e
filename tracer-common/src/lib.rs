//! Records shared by the eBPF programs (`tracer-ebpf`) and the user-space
//! tracer (`rt-ebpf-trace`). Everything here is `#[repr(C)]` plain data: the
//! kernel writes it into the ring buffer and user space reads it back as bytes.
#![no_std]

pub mod watch;

/// What happened. Stored as a `u32` in [`Event::kind`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A worker entered `tokio::runtime::task::raw::poll` for a task.
    PollStart = 1,
    /// That poll returned: `task_id` is the polled task (0 when its start
    /// was not seen), `addr` the key of the last await point where the poll
    /// registered the task's waker (0 when none): where the task now waits.
    /// The key names the stack captured for it (a [`StackHeader`] with the
    /// same key, sent once per task and key).
    PollEnd = 2,
    /// A worker entered a park function of its scheduler.
    ParkStart = 3,
    /// That park function returned: the worker is running again.
    ParkEnd = 4,
    /// A task was spawned (bound to its runtime's task list): `task` and
    /// `task_id` are the new task, `other_task_id` the task that spawned it
    /// (0 when not spawned from a task), `addr` the address `spawn` was called
    /// from (0 when unknown).
    Spawn = 5,
    /// A task's waker was called: `task` is the woken task's header,
    /// `other_task_id` the task running on the waking thread (0 when none:
    /// the I/O driver or timer inside a park, or a thread outside the runtime).
    /// `task_id` is 0: wakes are frequent and the woken task is already known
    /// by its header (from its spawn or polls), so the id is not read here.
    Wake = 6,
    /// A task ended (tokio released it from its task list, or freed it):
    /// `task`/`task_id`.
    TaskEnd = 7,
    /// A parked worker was unparked; `other_task_id` is the task running on
    /// the unparking thread (0 when none).
    Unpark = 8,
}

impl EventKind {
    pub fn from_u32(raw: u32) -> Option<Self> {
        Some(match raw {
            1 => Self::PollStart,
            2 => Self::PollEnd,
            3 => Self::ParkStart,
            4 => Self::ParkEnd,
            5 => Self::Spawn,
            6 => Self::Wake,
            7 => Self::TaskEnd,
            8 => Self::Unpark,
            _ => return None,
        })
    }
}

/// One record in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC in nanoseconds.
    pub ts_ns: u64,
    /// The thread (kernel tid) the probe fired on.
    pub tid: u32,
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    /// The probe site's index in the tracer's probe plan (the attach cookie),
    /// so user space knows which `raw::poll<T, S>` instance ran.
    pub site: u32,
    pub _pad: u32,
    /// The task's header address (tokio's `NonNull<Header>`), for kinds
    /// about a task.
    pub task: u64,
    /// That task's `tokio::task::Id`, or 0 where it could not be read.
    pub task_id: u64,
    /// Another task involved (the waker, the spawner), by id; 0 for none.
    pub other_task_id: u64,
    /// An instruction address in the target, for kinds that say so.
    pub addr: u64,
}

/// Size of [`Event`] in bytes, for the ring-buffer sizing arithmetic.
pub const EVENT_SIZE: usize = core::mem::size_of::<Event>();

/// Where the task id lives, for the tokio version in the target.
///
/// tokio (1.23 and later) keeps `id_offset` in the task's vtable:
/// `header.vtable` is a pointer at `vtable_offset` in the header and
/// `*(vtable + id_offset_slot * 8)` is the byte offset of the id from the
/// header. User space sets this from what it knows of the binary; `enabled == 0`
/// means "don't read ids".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskIdLayout {
    pub enabled: u32,
    pub _pad: u32,
    /// Byte offset of the `vtable` pointer inside tokio's `Header`.
    pub vtable_offset: u64,
    /// Index (in 8-byte words) of `id_offset` inside tokio's `Vtable`.
    pub id_offset_slot: u64,
}

/// Most bytes of user stack one capture copies.
pub const STACK_BYTES_MAX: usize = 16384;

/// Why a stack was captured. Stored as a `u32` in [`StackHeader::kind`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackKind {
    /// A task registered its waker: where it waits.
    AwaitPoint = 1,
    /// A CPU sample of a thread of the target.
    Sample = 2,
}

/// The start of a record in the `STACKS` ring buffer; `len` bytes of user
/// stack memory, from `sp` upwards, follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackHeader {
    pub ts_ns: u64,
    pub tid: u32,
    /// A [`StackKind`] as `u32`.
    pub kind: u32,
    /// The task running on the thread (0 when none).
    pub task_id: u64,
    /// `AwaitPoint`: the await key a [`EventKind::PollEnd`] event refers to.
    pub key: u64,
    /// User registers where the stack was taken.
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Bytes of stack that follow (0 when none could be read).
    pub len: u32,
    pub _pad: u32,
    /// The real return address of the task poll running on the thread (0
    /// when none): its uretprobe replaced it on the stack with the kernel's
    /// trampoline, and unwinding needs it back.
    pub poll_return: u64,
}

pub const STACK_HEADER_SIZE: usize = core::mem::size_of::<StackHeader>();

/// Names of the maps and globals, so both sides spell them the same way.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const LOST: &str = "LOST";
    pub const TARGET_TGID: &str = "TARGET_TGID";
    pub const TASK_ID_LAYOUT: &str = "TASK_ID_LAYOUT";
    pub const MIN_POLL_NS: &str = "MIN_POLL_NS";
    pub const SHORT_POLLS: &str = "SHORT_POLLS";
    pub const STACKS: &str = "STACKS";
    pub const ENABLED: &str = "ENABLED";
    pub const STACK_BYTES: &str = "STACK_BYTES";
    pub const KERNEL_SAMPLES: &str = "KERNEL_SAMPLES";
    pub const POLL_END_AT_RETURN_SITES: &str = "POLL_END_AT_RETURN_SITES";
}

/// Default size of the ring buffer, in bytes (a power of two, as the kernel wants).
pub const DEFAULT_RING_BYTES: u32 = 16 * 1024 * 1024;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `repr(C)` data with no padding holes that matter and no pointers.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::TaskIdLayout {}
    unsafe impl aya::Pod for super::StackHeader {}
    unsafe impl aya::Pod for super::watch::WatchEvent {}
    unsafe impl aya::Pod for super::watch::WatchStackHeader {}
}
