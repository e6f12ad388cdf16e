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
    /// same key, sent once per task and key). `other_task_id` is not a task
    /// here: it is how long (ns) the thread was preempted during the poll,
    /// runnable but off CPU (the kernel's doing, not the task's).
    PollEnd = 2,
    /// A worker entered a park function of its scheduler.
    ParkStart = 3,
    /// That park function returned: the worker is running again.
    ParkEnd = 4,
    /// A task was spawned (bound to its runtime's task list): `task` and
    /// `task_id` are the new task, `other_task_id` the task that spawned it
    /// (0 when not spawned from a task), `addr` the call site: the address
    /// the probed spawn function returns to (0 when it could not be read).
    /// Where tokio's spawn path is inlined into the code calling
    /// `tokio::spawn`, that is the caller's own code (with line tables, its
    /// `tokio::spawn` line); otherwise it is inside tokio's `spawn`.
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

/// What the eBPF side counts instead of recording: the slots of the per-CPU
/// `COUNTERS` map (one map, one lookup per count, read once at the end).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Events and stack captures dropped because a ring buffer was full.
    Lost = 0,
    /// Polls shorter than `--min-poll`: timed in the kernel, not recorded.
    ShortPolls = 1,
    /// CPU samples that hit the target in the kernel (no user stack to show).
    KernelSamples = 2,
    /// Watch-tier records (`WATCH_EVENTS`, `WATCH_STACKS`) dropped because
    /// their ring buffer was full.
    WatchLost = 3,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 4] = [
        Counter::Lost,
        Counter::ShortPolls,
        Counter::KernelSamples,
        Counter::WatchLost,
    ];
    /// The number of slots of the `COUNTERS` map.
    pub const SLOTS: u32 = Self::ALL.len() as u32;
}

/// The names both sides know the eBPF object's parts by: the one place they
/// are spelled. The eBPF side declares each under exactly this identifier
/// (aya-ebpf's `#[map]`, `#[uprobe]` and `#[unsafe(no_mangle)]` name a part
/// after its identifier, and their `name = ` arguments take only literals),
/// and a test of the tracer (`object_names`) checks the built object against
/// these lists: every name here is in it, and it has no other.
pub mod names {
    /// The maps.
    pub mod maps {
        /// Events, the kernel-to-tracer ring buffer (`--ring-buffer-size`).
        pub const EVENTS: &str = "EVENTS";
        /// Stack captures, a ring buffer of their own.
        pub const STACKS: &str = "STACKS";
        /// Per-CPU counts, slots by [`crate::Counter`].
        pub const COUNTERS: &str = "COUNTERS";
        /// Slot 0 non-zero while recording.
        pub const ENABLED: &str = "ENABLED";
        /// The polls each thread of the target is in.
        pub const CURRENT_TASK: &str = "CURRENT_TASK";
        /// The task-id offset of each poll site, cached.
        pub const SITE_ID_OFFSET: &str = "SITE_ID_OFFSET";
        /// Await points whose stack was captured, by task.
        pub const AWAIT_SEEN: &str = "AWAIT_SEEN";
        /// Whether a warning was logged already.
        pub const WARNED: &str = "WARNED";
        /// Watch tier: parks and worker off-CPU spans.
        pub const WATCH_EVENTS: &str = "WATCH_EVENTS";
        /// Watch tier: samples' and blocking switches' stacks.
        pub const WATCH_STACKS: &str = "WATCH_STACKS";
        /// Watch tier: the target's workers and how often each has parked.
        pub const WORKERS: &str = "WORKERS";
        /// Watch tier: workers off CPU, until they return.
        pub const OFF_CPU: &str = "OFF_CPU";
        /// The threads inside a `block_on` loop.
        pub const BLOCK_ON: &str = "BLOCK_ON";
        /// The root future each thread parker parks for.
        pub const ROOT_OF_PARKER: &str = "ROOT_OF_PARKER";
        /// Watch tier: how many `OFF_CPU` entries there are (slot 0).
        pub const OFF_CPU_PENDING: &str = "OFF_CPU_PENDING";
        /// Watch tier: futex words the workers park on (learnt by user space).
        pub const PARK_FUTEX: &str = "PARK_FUTEX";
        /// Threads preempted inside a poll, until they run again.
        pub const PREEMPTED: &str = "PREEMPTED";
        /// How many `PREEMPTED` entries there are (slot 0).
        pub const PREEMPTED_PENDING: &str = "PREEMPTED_PENDING";
        pub const ALL: [&str; 18] = [
            EVENTS,
            STACKS,
            COUNTERS,
            ENABLED,
            CURRENT_TASK,
            SITE_ID_OFFSET,
            AWAIT_SEEN,
            WARNED,
            WATCH_EVENTS,
            WATCH_STACKS,
            WORKERS,
            OFF_CPU,
            BLOCK_ON,
            ROOT_OF_PARKER,
            OFF_CPU_PENDING,
            PARK_FUTEX,
            PREEMPTED,
            PREEMPTED_PENDING,
        ];
    }

    /// The global variables user space sets before loading.
    pub mod globals {
        pub const TARGET_TGID: &str = "TARGET_TGID";
        pub const TASK_ID_LAYOUT: &str = "TASK_ID_LAYOUT";
        pub const MIN_POLL_NS: &str = "MIN_POLL_NS";
        pub const STACK_BYTES: &str = "STACK_BYTES";
        pub const POLL_END_AT_RETURN_SITES: &str = "POLL_END_AT_RETURN_SITES";
        /// Watch tier: off-CPU spans shorter than this are not sent.
        pub const MIN_OFF_CPU_NS: &str = "MIN_OFF_CPU_NS";
        pub const ALL: [&str; 6] = [
            TARGET_TGID,
            TASK_ID_LAYOUT,
            MIN_POLL_NS,
            STACK_BYTES,
            POLL_END_AT_RETURN_SITES,
            MIN_OFF_CPU_NS,
        ];
    }

    /// The programs.
    pub mod programs {
        /// Entry of `raw::poll` (uprobe).
        pub const POLL_START: &str = "poll_start";
        /// Return of `raw::poll` (uretprobe), where no return sites were found.
        pub const POLL_END: &str = "poll_end";
        /// Where `raw::poll` returns to (uprobe).
        pub const POLL_RETURNED: &str = "poll_returned";
        /// Entry of a park function (uprobe).
        pub const PARK_START: &str = "park_start";
        /// Return of a park function (uretprobe).
        pub const PARK_END: &str = "park_end";
        /// A scheduler event with the task header in RDI (uprobe).
        pub const TASK_EVENT_ARG0: &str = "task_event_arg0";
        /// ... in RSI (uprobe).
        pub const TASK_EVENT_ARG1: &str = "task_event_arg1";
        /// ... at `[RSI]` (uprobe).
        pub const TASK_EVENT_ARG1_DEREF: &str = "task_event_arg1_deref";
        /// ... returned in RAX or RDX (uretprobe).
        pub const TASK_EVENT_RET: &str = "task_event_ret";
        /// A scheduler event about no task (uprobe).
        pub const THREAD_EVENT: &str = "thread_event";
        /// A waker clone during a poll (uprobe).
        pub const AWAIT_POINT: &str = "await_point";
        /// A CPU sample (perf event).
        pub const SAMPLE: &str = "sample";
        /// Entry of a `block_on<F>` loop: the root future's first poll (uprobe).
        pub const BLOCK_ON_START: &str = "block_on_start";
        /// Return of the `block_on<F>` loop (uretprobe).
        pub const BLOCK_ON_END: &str = "block_on_end";
        /// Entry of the thread parker's park inside `block_on` (uprobe).
        pub const ROOT_PARK_START: &str = "root_park_start";
        /// Its return (uretprobe).
        pub const ROOT_PARK_END: &str = "root_park_end";
        /// A wake of the thread parker's waker: the root future's (uprobe).
        pub const ROOT_WAKE: &str = "root_wake";
        /// Entry of the current-thread scheduler's root poll (uprobe).
        pub const ROOT_POLL_START: &str = "root_poll_start";
        /// Its return (uretprobe).
        pub const ROOT_POLL_END: &str = "root_poll_end";
        /// Watch tier: entry of a park function (uprobe).
        pub const WATCH_PARK_START: &str = "watch_park_start";
        /// Watch tier: a CPU sample with kernel stacks (perf event).
        pub const WATCH_SAMPLE: &str = "watch_sample";
        /// Watch tier: `sched_switch` (BTF tracepoint).
        pub const WATCH_SWITCH: &str = "watch_switch";
        /// Watch tier: `sched_wakeup` (BTF tracepoint).
        pub const WATCH_WAKEUP: &str = "watch_wakeup";
        /// `sched_switch` (BTF tracepoint): time a thread spent preempted
        /// inside a poll.
        pub const POLL_PREEMPTED: &str = "poll_preempted";
        /// The watch tier's uprobe programs (no uretprobe: one trap per park).
        pub const WATCH_UPROBES: [&str; 1] = [WATCH_PARK_START];
        /// The record mode's uprobe and uretprobe programs (every program
        /// but [`SAMPLE`] and the watch tier's).
        pub const UPROBES: [&str; 18] = [
            POLL_START,
            POLL_END,
            POLL_RETURNED,
            PARK_START,
            PARK_END,
            TASK_EVENT_ARG0,
            TASK_EVENT_ARG1,
            TASK_EVENT_ARG1_DEREF,
            TASK_EVENT_RET,
            THREAD_EVENT,
            AWAIT_POINT,
            BLOCK_ON_START,
            BLOCK_ON_END,
            ROOT_PARK_START,
            ROOT_PARK_END,
            ROOT_WAKE,
            ROOT_POLL_START,
            ROOT_POLL_END,
        ];
    }
}

/// The task ids the eBPF side gives `block_on` root futures start here
/// (`ROOT_ID_BASE | tid << 8 | n`): tokio's own ids count up from 1 and
/// never get near 2^52, and these stay below 2^53, exact in JSON.
pub const ROOT_ID_BASE: u64 = 1 << 52;

/// Whether a task id is one of a `block_on` root future's.
pub const fn is_root_id(task_id: u64) -> bool {
    task_id & ROOT_ID_BASE != 0 && task_id < (1 << 53)
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
