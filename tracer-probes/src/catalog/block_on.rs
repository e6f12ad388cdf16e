//! The catalog's `block_on` part: where each tokio version's `block_on`
//! loop, its parks and its root future's wakes are (tracer-probes'
//! `block_on.rs` reads it; the issue-12 notes in NOTES.md say why the loop's
//! structure and not the root future's own poll).

/// The `block_on` loops, each generic over the root future `F` (one
/// instance per `F`): `loop { if let Ready(v) = budget(|| f.poll(cx)) {
/// return v } self.park() }`, in every tokio 1.x (read at tokio-1.8.0,
/// 1.20, 1.38, 1.54 and checked in the matrix's builds). Runtimes' and
/// handles' `block_on` of the multi-thread scheduler end here, as do
/// tokio's own blocking helpers (`blocking_recv`, `blocking_send`, …); the
/// current-thread scheduler's `CoreGuard::block_on` only while another
/// thread holds its core.
pub const BLOCK_ON_LOOPS: &[&str] = &[
    // tokio ≥ 1.2x (`runtime/park.rs`).
    "tokio::runtime::park::CachedParkThread::block_on",
    // tokio 1.8–1.2x (`park/thread.rs`; `Enter::block_on` calls it).
    "tokio::park::thread::CachedParkThread::block_on",
];

/// The `block_on` loop's own park method: only `block_on` loops call it, so
/// a thread seen parking here is inside one even when its entry was not
/// seen (the tracer attached to a running program, the usual case). Absent
/// where inlined (tokio 1.8's loop calls `Inner::park` itself).
pub const BLOCK_ON_PARKS: &[&str] = &[
    "tokio::runtime::park::CachedParkThread::park",
    "<tokio::park::thread::CachedParkThread as tokio::park::Park>::park",
];

/// The thread parker's park, which `block_on` loops sleep in between polls
/// of their root future (`CachedParkThread::park` calls it; it stays a
/// function where that is inlined, e.g. under fat LTO). Also used by
/// runtime drivers built without I/O and time, on threads not in a
/// `block_on`: the eBPF side ignores those.
pub const ROOT_PARKS: &[&str] = &[
    "tokio::runtime::park::Inner::park",
    "tokio::park::thread::Inner::park",
];

/// The current-thread scheduler's `Context::enter(core, f)`, generic over
/// `f`: its `CoreGuard::block_on` loop polls the root future inside one
/// instance (`enter(core, || budget(|| future.poll(cx)))`, tokio ≥ 1.2x,
/// read at 1.25, 1.38 and 1.54), runs tasks inside another (`run_task`)
/// and parks inside others: the instance that calls none of
/// [`NOT_ROOT_POLL_CALLEES`] is the root's (see `block_on.rs`).
pub const CURRENT_THREAD_ENTER: &[&str] = &[
    "tokio::runtime::scheduler::current_thread::Context::enter",
    // tokio 1.17–1.2x's current-thread scheduler (checked: 1.20.6).
    "tokio::runtime::basic_scheduler::Context::enter",
];

/// Callees that make a `Context::enter` instance a task's or a park's
/// rather than the root future's poll.
pub const NOT_ROOT_POLL_CALLEES: &[&str] = &[
    "tokio::runtime::task::raw::RawTask::poll",
    "tokio::runtime::task::raw::poll",
    "tokio::runtime::task::harness::Harness::poll",
    "tokio::runtime::task::LocalNotified::run",
    "tokio::runtime::scheduler::current_thread::Context::run_task",
    "tokio::runtime::scheduler::current_thread::Context::park",
    "tokio::runtime::scheduler::current_thread::Context::park_yield",
    "tokio::runtime::scheduler::current_thread::Context::park_internal",
    "tokio::runtime::driver::Driver::park",
    "tokio::runtime::driver::Driver::park_timeout",
    "tokio::runtime::basic_scheduler::Context::run_task",
    "tokio::runtime::basic_scheduler::Context::park",
    "tokio::runtime::basic_scheduler::Context::park_yield",
    "<tokio::runtime::driver::Driver as tokio::park::Park>::park",
    "<tokio::runtime::driver::Driver as tokio::park::Park>::park_timeout",
];

/// The thread parker's waker functions (vtable entries, so never inlined;
/// RDI is the parker's `Inner`): the root future's wakes.
pub const ROOT_WAKES: &[&str] = &[
    "tokio::runtime::park::wake",
    "tokio::runtime::park::wake_by_ref",
    "tokio::park::thread::wake",
    "tokio::park::thread::wake_by_ref",
];
