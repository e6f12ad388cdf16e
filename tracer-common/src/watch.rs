//! Records of the watch tier (`rt-ebpf-trace watch`): no per-poll probe,
//! only context switches of the target's workers and CPU samples (parks are
//! counted in the kernel, not sent one by one).
//! Both sides of the kernel boundary read these as plain bytes.

/// What a [`WatchEvent`] says. Stored as a `u32` in [`WatchEvent::kind`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchEventKind {
    /// A worker went to sleep in its park (an epoll wait, or a futex wait
    /// on a word it parks on, see `PARK_FUTEX`) at `ts_ns`.
    ParkSleep = 1,
    /// That sleep ended: `ts_ns` is when the worker was woken (made
    /// runnable, `sched_wakeup`), `duration_ns` how long it slept.
    ParkWake = 2,
    /// A worker that was *not* parked went off CPU at `ts_ns` and came back
    /// `duration_ns` later: it was blocked (or preempted) inside a poll or
    /// in the scheduler between polls. Its stacks at the switch are the
    /// [`WatchStackKind::Switch`] capture with the same `tid` and `ts_ns`
    /// (voluntary switches only).
    OffCpu = 3,
}

impl WatchEventKind {
    pub fn from_u32(raw: u32) -> Option<Self> {
        Some(match raw {
            1 => Self::ParkSleep,
            2 => Self::ParkWake,
            3 => Self::OffCpu,
            _ => return None,
        })
    }
}

/// One record of the `WATCH_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchEvent {
    /// `bpf_ktime_get_ns()`; for `OffCpu`, when the thread went off CPU.
    pub ts_ns: u64,
    pub tid: u32,
    /// A [`WatchEventKind`] as `u32`.
    pub kind: u32,
    /// `OffCpu`, `ParkWake`: how long the thread stayed off CPU.
    pub duration_ns: u64,
    /// The thread's state when it switched out (`prev_state`: 0 runnable,
    /// else a sleep state).
    pub site_or_state: u32,
    /// `OffCpu`: 1 when the switch was a preemption.
    pub preempted: u32,
    /// How many times the worker had entered its park function when it
    /// switched out (the kernel's count, see `WORKERS`).
    pub parks: u32,
    pub _pad: u32,
}

pub const WATCH_EVENT_SIZE: usize = core::mem::size_of::<WatchEvent>();

/// Why a watch stack was captured. Stored in [`WatchStackHeader::kind`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchStackKind {
    /// A CPU sample of a thread of the target.
    Sample = 1,
    /// A worker switched off CPU voluntarily, not in its park's sleep.
    Switch = 2,
}

/// Kernel frames kept per capture (`bpf_get_stack`).
pub const KERNEL_FRAMES_MAX: usize = 48;

/// `WatchStackHeader::flags`: the thread was in the kernel when captured.
pub const WATCH_IN_KERNEL: u32 = 1;
/// `WatchStackHeader::flags`: the thread was in its park's sleeping system
/// call (an epoll wait, or a futex wait on a word in `PARK_FUTEX`).
pub const WATCH_PARKED: u32 = 2;
/// `WatchStackHeader::flags`: the thread has parked at least once (a worker).
pub const WATCH_WORKER: u32 = 4;

/// The start of a `WATCH_STACKS` record: the user registers, the kernel
/// stack as return addresses, then `user_len` bytes of user stack from `sp`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchStackHeader {
    pub ts_ns: u64,
    pub tid: u32,
    /// A [`WatchStackKind`] as `u32`.
    pub kind: u32,
    /// The thread's *user* registers (from its saved `pt_regs` when it was
    /// in the kernel).
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub user_len: u32,
    /// How many of `kernel` are set (0 when the thread was in user mode).
    pub kernel_frames: u32,
    /// `WATCH_*` flags.
    pub flags: u32,
    /// How many times the thread had entered its park function (workers).
    pub parks: u32,
    /// In the kernel: the system call the thread entered it with (its saved
    /// `orig_ax`; -1 when none) and that call's first argument (`rdi`: for
    /// a futex, the word's address).
    pub syscall: u64,
    pub arg0: u64,
    pub kernel: [u64; KERNEL_FRAMES_MAX],
}

impl Default for WatchStackHeader {
    fn default() -> Self {
        Self {
            ts_ns: 0,
            tid: 0,
            kind: 0,
            ip: 0,
            sp: 0,
            bp: 0,
            user_len: 0,
            kernel_frames: 0,
            flags: 0,
            parks: 0,
            syscall: 0,
            arg0: 0,
            kernel: [0; KERNEL_FRAMES_MAX],
        }
    }
}

pub const WATCH_STACK_HEADER_SIZE: usize = core::mem::size_of::<WatchStackHeader>();
