//! What a task waits *on*: the tokio primitive its await stack registered
//! its waker through (a timer, a socket's readiness, a channel, a lock…),
//! told from the names of the captured frames alone.
//!
//! Why names: the most common production build is cargo's default release
//! profile, with no DWARF. There the user's future is often the only frame
//! of its own, and `waits_at` alone says little (the demo's `echo_client`:
//! all 4,835 polls said `demo_service::echo_client::{{closure}}`, though it
//! awaits a timer and a socket). What tokio did not inline between the
//! waker's clone and the user's code still has its symbol, and those names
//! say which primitive it was.
//!
//! How: the frames above the task's own code (tokio's and std's part of
//! the capture) are matched against [`BY_PATH`] (function paths, generics
//! stripped) and, for DWARF's short names (`poll_elapsed` with line tables
//! only), [`BY_FILE`] (tokio's source file). The match *outermost* in that
//! part wins: it is the API the program called (`Interval::tick` rather
//! than the `TimerEntry` it polls, `Mutex::lock` rather than its semaphore).
//! No match, no answer: a wrong primitive is worse than none.
//!
//! Paths moved between tokio releases, so patterns name the part that did
//! not (checked against the sources of 1.8, 1.20, 1.38 and 1.54 and the
//! symbols of the compatibility matrix's builds): the time driver is
//! `tokio::time::driver` up to 1.2x and `tokio::runtime::time` after, I/O
//! `tokio::io::driver` then `tokio::runtime::io`; `tokio::sync` kept its
//! paths.

use tracer_probes::generics::strip_generic_args;
use tracer_timeline::symbols::{SymbolFrame as Frame, WaitKind, WaitsOn};

use WaitKind::*;

/// A function path pattern: every part must occur in the path (generics
/// stripped), in any order; one ending in a word must end a word there.
type PathPattern = (&'static [&'static str], WaitKind, &'static str);

/// Function path patterns, most specific first (the first match of a frame
/// is its answer).
pub const BY_PATH: &[PathPattern] = &[
    // Time.
    (
        &["tokio::time::interval::Interval"],
        Timer,
        "time::Interval::tick",
    ),
    // `tokio::time::sleep::Sleep`; `tokio::time::driver::sleep::Sleep` ≤ 1.2x.
    (&["tokio::time::", "::sleep::Sleep"], Timer, "time::Sleep"),
    (&["::time::entry::TimerEntry"], Timer, "time::Sleep"),
    (&["tokio::time::driver::"], Timer, "time::Sleep"),
    (&["tokio::runtime::time::"], Timer, "time::Sleep"),
    // I/O: the program's call first (it has the direction).
    (&["tokio::io::util::read"], IoRead, "AsyncReadExt::read"),
    (&["tokio::io::util::write"], IoWrite, "AsyncWriteExt::write"),
    (&["tokio::io::util::flush"], IoWrite, "AsyncWriteExt::flush"),
    (
        &["tokio::io::util::shutdown"],
        IoWrite,
        "AsyncWriteExt::shutdown",
    ),
    (&["::accept"], IoRead, "accept (read readiness)"),
    (
        &["tokio::net::", "connect"],
        IoWrite,
        "connect (write readiness)",
    ),
    (
        &["tokio::net::", "::readable"],
        IoRead,
        "readable (read readiness)",
    ),
    (
        &["tokio::net::", "::writable"],
        IoWrite,
        "writable (write readiness)",
    ),
    (&["tokio::net::", "::poll_read"], IoRead, "socket read"),
    (&["tokio::net::", "::poll_peek"], IoRead, "socket read"),
    (&["tokio::net::", "::recv"], IoRead, "socket read"),
    (&["tokio::net::", "::peek"], IoRead, "socket read"),
    (&["tokio::net::", "::poll_write"], IoWrite, "socket write"),
    (&["tokio::net::", "::send"], IoWrite, "socket write"),
    // `poll_read`, `poll_read_ready`, `poll_read_io` (not `poll_ready`).
    (
        &["tokio::io::poll_evented::", "::poll_read"],
        IoRead,
        "socket read",
    ),
    (
        &["tokio::io::poll_evented::", "::poll_write"],
        IoWrite,
        "socket write",
    ),
    (
        &["io::registration::Registration", "::poll_read"],
        IoRead,
        "socket read",
    ),
    (
        &["io::registration::Registration", "::poll_write"],
        IoWrite,
        "socket write",
    ),
    (&["io::registration::Registration"], Io, "socket readiness"),
    (&["io::scheduled_io::"], Io, "socket readiness"),
    (&["tokio::io::driver::"], Io, "socket readiness"),
    (&["tokio::runtime::io::"], Io, "socket readiness"),
    // Channels.
    (
        &["tokio::sync::mpsc::", "Sender", "closed"],
        Send,
        "mpsc::Sender::closed",
    ),
    (
        &["tokio::sync::mpsc::", "Sender"],
        Send,
        "mpsc::Sender::send",
    ),
    (
        &["tokio::sync::mpsc::", "Permit"],
        Send,
        "mpsc::Sender::send",
    ),
    (&["tokio::sync::mpsc::", "Tx"], Send, "mpsc::Sender::send"),
    (&["tokio::sync::mpsc::"], Recv, "mpsc::Receiver::recv"),
    (
        &["tokio::sync::oneshot::Sender"],
        Send,
        "oneshot::Sender::closed",
    ),
    (&["tokio::sync::oneshot::"], Recv, "oneshot::Receiver"),
    (
        &["tokio::sync::broadcast::"],
        Recv,
        "broadcast::Receiver::recv",
    ),
    (
        &["tokio::sync::watch::Sender"],
        Send,
        "watch::Sender::closed",
    ),
    (&["tokio::sync::watch::"], Recv, "watch::Receiver::changed"),
    // Locks and semaphores.
    (&["tokio::sync::mutex::"], Lock, "Mutex::lock"),
    (&["tokio::sync::rwlock::", "write"], Lock, "RwLock::write"),
    (&["tokio::sync::rwlock::"], Lock, "RwLock::read"),
    (&["tokio::sync::once_cell::"], Lock, "OnceCell::get_or_init"),
    (
        &["tokio::sync::semaphore::"],
        Semaphore,
        "Semaphore::acquire",
    ),
    // Mutex, RwLock, Semaphore and a bounded mpsc's send all wait here.
    (
        &["tokio::sync::batch_semaphore::"],
        Semaphore,
        "semaphore acquire (a Semaphore, Mutex, RwLock or bounded mpsc send)",
    ),
    (&["tokio::sync::barrier::"], Notify, "Barrier::wait"),
    (&["tokio::sync::notify::"], Notify, "Notify::notified"),
    // Another task.
    (&["tokio::task::join_set::"], Join, "JoinSet::join_next"),
    (&["tokio::runtime::task::join::"], Join, "JoinHandle"),
    (
        &["tokio::runtime::task::", "read_output"],
        Join,
        "JoinHandle",
    ),
    (
        &["tokio::runtime::task::", "join_waker"],
        Join,
        "JoinHandle",
    ),
    // Giving the worker back.
    (&["tokio::task::yield_now"], Yield, "yield_now"),
    (&["::coop::"], Yield, "cooperative budget used up"),
    // `runtime::scheduler::defer::Defer` (1.2x on), `runtime::defer::Defer`.
    (
        &["tokio::runtime::", "::defer::Defer"],
        Yield,
        "yield_now (or the cooperative budget)",
    ),
    (
        &["tokio::runtime::context::defer"],
        Yield,
        "yield_now (or the cooperative budget)",
    ),
];

/// tokio source files (under the crate's `src/`) for frames named by
/// DWARF's short names, e.g. `poll_elapsed` with line tables only.
pub const BY_FILE: &[(&str, WaitKind, &str)] = &[
    ("/time/interval.rs", Timer, "time::Interval::tick"),
    ("/time/sleep.rs", Timer, "time::Sleep"),
    ("/time/entry.rs", Timer, "time::Sleep"),
    ("/io/util/read", IoRead, "AsyncReadExt::read"),
    ("/io/util/write", IoWrite, "AsyncWriteExt::write"),
    ("/sync/mpsc/bounded.rs", Recv, "mpsc::Receiver::recv"),
    ("/sync/mpsc/unbounded.rs", Recv, "mpsc::Receiver::recv"),
    ("/sync/mpsc/chan.rs", Recv, "mpsc::Receiver::recv"),
    ("/sync/oneshot.rs", Recv, "oneshot::Receiver"),
    ("/sync/broadcast.rs", Recv, "broadcast::Receiver::recv"),
    ("/sync/watch.rs", Recv, "watch::Receiver::changed"),
    ("/sync/mutex.rs", Lock, "Mutex::lock"),
    ("/sync/semaphore.rs", Semaphore, "Semaphore::acquire"),
    (
        "/sync/batch_semaphore.rs",
        Semaphore,
        "semaphore acquire (a Semaphore, Mutex, RwLock or bounded mpsc send)",
    ),
    ("/sync/notify.rs", Notify, "Notify::notified"),
    ("/runtime/task/join.rs", Join, "JoinHandle"),
    ("/task/yield_now.rs", Yield, "yield_now"),
];

/// The primitive the waker-registration part of a capture (`library`,
/// innermost first: the frames above the task's own code) shows, if any.
pub(super) fn waits_on(library: &[Frame]) -> Option<WaitsOn> {
    library
        .iter()
        .rev()
        .find_map(frame_waits_on)
        .or_else(|| mpsc_recv_in_poll_fn(library))
}

/// tokio ≥ 1.4x release builds inline `chan::Rx::recv` into the
/// `poll_fn` that `Receiver::recv` awaits: the capture is then
/// `AtomicWaker::register_by_ref` ← `PollFn::poll` ← the program. tokio's
/// `AtomicWaker` is crate-private and only the time driver's `StateCell`,
/// mpsc's receiver and `LocalSet` register with it (1.8.5, 1.20.6, 1.38.2,
/// 1.53.1 sources); of those only mpsc's `recv`/`recv_many` and
/// `Interval::tick` await a `poll_fn` over it, and the interval's path
/// goes through `Sleep::poll`, a large non-generic function that no build
/// of the matrix inlined (it has a frame of its own wherever seen).
fn mpsc_recv_in_poll_fn(library: &[Frame]) -> Option<WaitsOn> {
    let name = |i: usize| library.get(i)?.function.as_deref();
    let register = (0..library.len()).find(|&i| {
        name(i).is_some_and(|f| {
            f.starts_with("tokio::sync::task::atomic_waker::AtomicWaker::register")
        })
    })?;
    let poll_fn = register + 1;
    let is_poll_fn = name(poll_fn).is_some_and(|f| f.contains("::future::poll_fn::PollFn<"));
    // The poll_fn is what the program awaited: nothing of tokio's outside it.
    (is_poll_fn && poll_fn + 1 == library.len()).then_some(WaitsOn {
        kind: Recv,
        name: "mpsc::Receiver::recv",
    })
}

fn frame_waits_on(frame: &Frame) -> Option<WaitsOn> {
    if let Some(function) = frame.function.as_deref()
        && let Some(found) = by_path(function)
    {
        return Some(found);
    }
    let file = frame.file.as_deref()?;
    if !file.contains("tokio") {
        return None;
    }
    let function = frame.function.as_deref().unwrap_or("");
    BY_FILE
        .iter()
        .find(|(suffix, _, _)| file.contains(suffix))
        .map(|&(_, kind, name)| refine(kind, name, file, function))
}

fn by_path(function: &str) -> Option<WaitsOn> {
    let path = strip_generic_args(function);
    if !path.trim_start_matches('<').starts_with("tokio::") {
        return None;
    }
    let (_, kind, name) = BY_PATH
        .iter()
        .find(|(parts, _, _)| parts.iter().all(|part| has_part(&path, part)))?;
    Some(refine(*kind, name, &path, function))
}

/// Whether `part` occurs in `path`, and where it ends in a word, not
/// followed by a letter or digit: `::poll_read` matches `poll_read_priv` and `poll_read_ready`, not
/// `poll_ready` or `poll_readiness`.
fn has_part(path: &str, part: &str) -> bool {
    let whole_word = part.ends_with(char::is_alphanumeric);
    path.match_indices(part).any(|(at, _)| {
        !whole_word
            || !path[at + part.len()..]
                .chars()
                .next()
                .is_some_and(char::is_alphanumeric)
    })
}

/// What the pattern alone cannot say: a `JoinHandle` of `spawn_blocking`
/// work (its generics name a `BlockingTask`, where the name has them:
/// DWARF or v0 symbols), an mpsc send seen only by its file.
fn refine(kind: WaitKind, name: &'static str, path: &str, function: &str) -> WaitsOn {
    match kind {
        Join if function.contains("BlockingTask<") => WaitsOn {
            kind: Blocking,
            name: "spawn_blocking JoinHandle",
        },
        Recv if path.contains("/mpsc/")
            && (function.contains("send") || function.contains("reserve")) =>
        {
            WaitsOn {
                kind: Send,
                name: "mpsc::Sender::send",
            }
        }
        _ => WaitsOn { kind, name },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbol(function: &str) -> Frame {
        Frame {
            function: Some(function.into()),
            module: "/app".into(),
            ..Frame::default()
        }
    }

    fn kind_of(functions: &[&str]) -> Option<(WaitKind, &'static str)> {
        let frames: Vec<Frame> = functions.iter().map(|f| symbol(f)).collect();
        waits_on(&frames).map(|w| (w.kind, w.name))
    }

    #[test]
    fn the_outermost_primitive_is_the_one_the_program_called() {
        assert_eq!(
            kind_of(&[
                "tokio::runtime::task::waker::clone_waker",
                "tokio::runtime::time::entry::TimerEntry::poll_elapsed",
                "tokio::time::interval::Interval::poll_tick",
            ]),
            Some((Timer, "time::Interval::tick"))
        );
    }

    /// The waker-registration part of real captures (default release
    /// builds of the compat service, no DWARF), innermost first, with what
    /// the program awaited there.
    #[test]
    fn real_release_captures_across_tokio_versions() {
        let clone = "tokio::runtime::task::waker::clone_waker";
        let register = "tokio::sync::task::atomic_waker::AtomicWaker::register_by_ref";
        /// What was awaited, the capture's registration part, the answer.
        type Case<'a> = (&'a str, &'a [&'a str], Option<(WaitKind, &'a str)>);
        let cases: &[Case] = &[
            // tokio 1.54.1
            (
                "1.54 interval.tick()",
                &[
                    clone,
                    register,
                    "<tokio::time::sleep::Sleep as core::future::future::Future>::poll",
                    "tokio::time::interval::Interval::poll_tick",
                ],
                Some((Timer, "time::Interval::tick")),
            ),
            (
                "1.54 sleep()",
                &[
                    clone,
                    register,
                    "<tokio::time::sleep::Sleep as core::future::future::Future>::poll",
                ],
                Some((Timer, "time::Sleep")),
            ),
            (
                "1.54 stream.read()",
                &[
                    clone,
                    "tokio::runtime::io::scheduled_io::ScheduledIo::poll_readiness",
                    "tokio::runtime::io::registration::Registration::poll_ready",
                    "tokio::net::tcp::stream::TcpStream::poll_read_priv",
                ],
                Some((IoRead, "socket read")),
            ),
            (
                "1.54 notify.notified()",
                &[
                    clone,
                    "tokio::sync::notify::NotifiedProject::poll_notified",
                    "<tokio::sync::notify::Notified as core::future::future::Future>::poll",
                ],
                Some((Notify, "Notify::notified")),
            ),
            (
                "1.54 join_handle.await",
                &[
                    clone,
                    "tokio::runtime::task::harness::can_read_output",
                    "tokio::runtime::task::harness::Harness<T,S>::try_read_output",
                    "<tokio::runtime::task::join::JoinHandle<T> as core::future::future::Future>::poll",
                ],
                Some((Join, "JoinHandle")),
            ),
            (
                "1.54 rx.recv()",
                &[
                    clone,
                    register,
                    "<core::future::poll_fn::PollFn<F> as core::future::future::Future>::poll",
                ],
                Some((Recv, "mpsc::Receiver::recv")),
            ),
            (
                "1.54 yield_now() inlined into the harness",
                &[clone, "tokio::runtime::scheduler::defer::Defer::defer"],
                Some((Yield, "yield_now (or the cooperative budget)")),
            ),
            // tokio 1.38.2
            (
                "1.38 yield_now()",
                &[
                    clone,
                    "tokio::runtime::scheduler::defer::Defer::defer",
                    "<tokio::task::yield_now::yield_now::{{closure}}::YieldNow as core::future::future::Future>::poll",
                ],
                Some((Yield, "yield_now")),
            ),
            (
                "1.38 rx.recv()",
                &[clone, register, "tokio::sync::mpsc::chan::Rx<T,S>::recv"],
                Some((Recv, "mpsc::Receiver::recv")),
            ),
            (
                "1.38 sleep()",
                &[
                    clone,
                    register,
                    "tokio::runtime::time::entry::TimerEntry::poll_elapsed",
                    "<tokio::time::sleep::Sleep as core::future::future::Future>::poll",
                ],
                Some((Timer, "time::Sleep")),
            ),
            (
                "1.38 notify.notified()",
                &[clone, "tokio::sync::notify::Notified::poll_notified"],
                Some((Notify, "Notify::notified")),
            ),
            // tokio 1.8.5: the drivers under `tokio::time::driver`, `tokio::io::driver`.
            (
                "1.8 sleep()",
                &[
                    clone,
                    "tokio::time::driver::entry::TimerEntry::poll_elapsed",
                    "<tokio::time::driver::sleep::Sleep as core::future::future::Future>::poll",
                ],
                Some((Timer, "time::Sleep")),
            ),
            (
                "1.8 stream.read()",
                &[
                    clone,
                    "tokio::io::driver::scheduled_io::ScheduledIo::poll_readiness",
                    "tokio::io::driver::registration::Registration::poll_ready",
                    "tokio::io::driver::registration::Registration::poll_io",
                    "<tokio::net::tcp::stream::TcpStream as tokio::io::async_read::AsyncRead>::poll_read",
                ],
                Some((IoRead, "socket read")),
            ),
            (
                "1.8 notify.notified()",
                &[
                    clone,
                    "<tokio::sync::notify::Notified as core::future::future::Future>::poll",
                ],
                Some((Notify, "Notify::notified")),
            ),
            (
                "1.8 rx.recv()",
                &[clone, register, "tokio::sync::mpsc::chan::Rx<T,S>::recv"],
                Some((Recv, "mpsc::Receiver::recv")),
            ),
            (
                "a readiness poll without the caller",
                &[
                    clone,
                    "tokio::runtime::io::scheduled_io::ScheduledIo::poll_readiness",
                    "tokio::runtime::io::registration::Registration::poll_ready",
                ],
                Some((Io, "socket readiness")),
            ),
            (
                "the timer's AtomicWaker alone (Sleep inlined into the program)",
                &[clone, register],
                None,
            ),
        ];
        for (what, functions, expected) in cases {
            assert_eq!(&kind_of(functions), expected, "{what}");
        }
    }

    #[test]
    fn a_poll_fn_that_is_not_the_awaited_future_is_not_mpsc() {
        let frames = [
            "tokio::runtime::task::waker::clone_waker",
            "tokio::sync::task::atomic_waker::AtomicWaker::register_by_ref",
            "<core::future::poll_fn::PollFn<F> as core::future::future::Future>::poll",
            "<tokio::task::local::RunUntil<T> as core::future::future::Future>::poll",
        ];
        assert_eq!(kind_of(&frames), None);
    }

    #[test]
    fn an_unknown_stack_says_nothing() {
        assert_eq!(
            kind_of(&[
                "tokio::runtime::task::waker::clone_waker",
                "<futures_util::future::select::Select<A,B> as core::future::future::Future>::poll",
            ]),
            None
        );
        assert_eq!(kind_of(&[]), None);
        // A program's own module named like a tokio one is not tokio.
        assert_eq!(kind_of(&["my_app::sync::mutex::lock"]), None);
    }

    #[test]
    fn blocking_join_handles_are_told_by_their_generics() {
        assert_eq!(
            kind_of(&[
                "try_read_output<tokio::runtime::blocking::task::BlockingTask<app::hash::{closure_env#0}>, tokio::runtime::blocking::schedule::BlockingSchedule>"
            ]),
            None,
            "a DWARF short name without a tokio path and no file"
        );
        assert_eq!(
            kind_of(&[
                "tokio::runtime::task::harness::Harness<tokio::runtime::blocking::task::BlockingTask<app::hash::{{closure}}>,tokio::runtime::blocking::schedule::BlockingSchedule>::try_read_output"
            ]),
            Some((Blocking, "spawn_blocking JoinHandle"))
        );
        assert_eq!(
            kind_of(&["tokio::runtime::task::harness::Harness<T,S>::try_read_output"]),
            Some((Join, "JoinHandle"))
        );
    }

    #[test]
    fn short_dwarf_names_are_placed_by_their_file() {
        let mut frame = symbol("poll_elapsed");
        frame.file = Some(
            "/root/.cargo/registry/src/index.crates.io-1949/tokio-1.54.1/src/runtime/time/entry.rs"
                .into(),
        );
        assert_eq!(waits_on(&[frame]).map(|w| w.kind), Some(Timer));
        let mut own = symbol("poll_elapsed");
        own.file = Some("/src/app/src/time/entry.rs".into());
        assert_eq!(waits_on(&[own]), None, "not tokio's file");
    }
}
