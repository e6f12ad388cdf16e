//! THE table of tokio functions we probe, for every tokio version we know.
//!
//! Matching is exact equality on the demangled path with the hash, any
//! `.llvm.NNN` suffix and every generic argument list removed (see
//! `generics::strip_generic_args`): legacy mangling prints the impl's
//! parameters literally (`OwnedTasks<S>::bind_inner`), v0 prints the real
//! types (`<OwnedTasks<Arc<…>>>::bind_inner`); both match the catalog's
//! `OwnedTasks::bind_inner`. Adding support for another tokio version means
//! adding a line here and nothing else.

use crate::{SiteKind, TaskArg};

mod block_on;
pub use block_on::*;

/// Functions that poll one task: one instance per future type (`raw::poll::<T, S>`).
/// Every tokio 1.x has this one.
pub const POLL_PATHS: &[&str] = &["tokio::runtime::task::raw::poll"];

/// The park functions of one scheduler, as ordered alternatives: the first
/// alternative with at least one symbol present in the binary wins, and the
/// later ones are ignored. The outer functions of an alternative call the inner
/// ones of an earlier alternative, so probing both would count each park twice.
#[derive(Clone, Copy, Debug)]
pub struct ParkFamily {
    /// Which scheduler (for messages only).
    pub scheduler: &'static str,
    pub alternatives: &'static [&'static [&'static str]],
}

pub const PARK_FAMILIES: &[ParkFamily] = &[
    ParkFamily {
        scheduler: "multi_thread",
        alternatives: &[
            // tokio ≥ 1.2x: `park` and `park_yield` both call `park_internal`.
            &["tokio::runtime::scheduler::multi_thread::worker::Context::park_internal"],
            &[
                "tokio::runtime::scheduler::multi_thread::worker::Context::park",
                "tokio::runtime::scheduler::multi_thread::worker::Context::park_yield",
                "tokio::runtime::scheduler::multi_thread::worker::Context::park_timeout",
            ],
        ],
    },
    ParkFamily {
        scheduler: "thread_pool (tokio 1.8-era multi_thread)",
        alternatives: &[&[
            "tokio::runtime::thread_pool::worker::Context::park",
            "tokio::runtime::thread_pool::worker::Context::park_timeout",
        ]],
    },
    ParkFamily {
        scheduler: "current_thread",
        alternatives: &[
            // `park` and `park_yield` both call `park_internal`.
            &["tokio::runtime::scheduler::current_thread::Context::park_internal"],
            &[
                "tokio::runtime::scheduler::current_thread::Context::park",
                "tokio::runtime::scheduler::current_thread::Context::park_yield",
            ],
        ],
    },
    ParkFamily {
        scheduler: "basic_scheduler (old current_thread)",
        alternatives: &[&[
            "tokio::runtime::basic_scheduler::Context::park",
            "tokio::runtime::basic_scheduler::Context::park_yield",
        ]],
    },
];

/// One function whose entry marks a scheduler event, and where its eBPF
/// program finds the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventFunction {
    pub path: &'static str,
    pub task_arg: TaskArg,
}

/// The functions that mark one kind of event, as ordered alternatives like a
/// [`ParkFamily`]'s: the first alternative with a symbol present wins.
#[derive(Clone, Copy, Debug)]
pub struct EventFamily {
    pub kind: SiteKind,
    /// What goes untraced when no alternative is present (for the warning).
    pub untraced: &'static str,
    pub alternatives: &'static [&'static [EventFunction]],
}

const fn event(path: &'static str, task_arg: TaskArg) -> EventFunction {
    EventFunction { path, task_arg }
}

/// The scheduler events the tracer marks, one family per [`SiteKind`] other
/// than poll and park. Versions are those whose source we checked (1.54.1,
/// the fixtures'); older lines are kept where the layout is known.
pub const EVENT_FAMILIES: &[EventFamily] = &[
    EventFamily {
        kind: SiteKind::Spawn,
        untraced: "spawns",
        alternatives: &[
            // tokio 1.54: `unsafe fn bind_inner(&self, task: Task<S>, notified:
            // Notified<S>)`; `Task<S>` is one `NonNull<Header>`, so RSI is the
            // header. Called by every `bind`/`bind_local` (spawn, spawn_local,
            // spawn_blocking does not use it).
            &[event(
                "tokio::runtime::task::list::OwnedTasks::bind_inner",
                TaskArg::Rsi,
            )],
            // Where `bind_inner` was inlined: the schedulers' spawn functions
            // return the new task's `JoinHandle`, one pointer to its header,
            // in RAX.
            &[
                event(
                    "tokio::runtime::scheduler::multi_thread::handle::Handle::bind_new_task",
                    TaskArg::ReturnValue,
                ),
                event(
                    "tokio::runtime::scheduler::current_thread::Handle::spawn",
                    TaskArg::ReturnValue,
                ),
            ],
            // Older tokio: `bind<T>(&self, task: T, …) -> (JoinHandle,
            // Option<Notified>)` creates the task itself, so no argument holds
            // a header on entry; both halves of the returned pair point at the
            // new task.
            &[event(
                "tokio::runtime::task::list::OwnedTasks::bind",
                TaskArg::ReturnValue,
            )],
            // tokio ≤ 1.8 (no `OwnedTasks`): the schedulers' spawners return
            // the new task's `JoinHandle { raw: Option<RawTask> }`, one
            // header pointer, in RAX.
            &[
                event(
                    "tokio::runtime::thread_pool::Spawner::spawn",
                    TaskArg::ReturnValue,
                ),
                event(
                    "tokio::runtime::basic_scheduler::Spawner::spawn",
                    TaskArg::ReturnValue,
                ),
            ],
        ],
    },
    EventFamily {
        kind: SiteKind::Wake,
        untraced: "wakes",
        // Every tokio 1.x: the task waker's vtable functions, `ptr` = the
        // header (RDI). Neither calls the other. Tasks tokio schedules
        // without a waker (a new spawn, `yield_now`'s deferral) don't pass here.
        alternatives: &[&[
            event("tokio::runtime::task::waker::wake_by_val", TaskArg::Rdi),
            event("tokio::runtime::task::waker::wake_by_ref", TaskArg::Rdi),
        ]],
    },
    EventFamily {
        kind: SiteKind::TaskEnd,
        untraced: "task ends",
        alternatives: &[
            // A task that completes (or is cancelled) is released from its
            // runtime's list: `OwnedTasks::remove(&self, task: &Task<S>)`,
            // RSI points at the header pointer. Every owned task passes here.
            &[event(
                "tokio::runtime::task::list::OwnedTasks::remove",
                TaskArg::RsiDeref,
            )],
            // Where `remove` was inlined: every task that completes (or is
            // cancelled) goes through `State::transition_to_complete(&self)`,
            // and `State` is the header's first field, so RDI is the header.
            &[event(
                "tokio::runtime::task::state::State::transition_to_complete",
                TaskArg::Rdi,
            )],
            // Where both were inlined (fat LTO): `raw::dealloc::<T, S>(ptr:
            // NonNull<Header>)`, one instance per future type; the header
            // (RDI) is still readable on entry, it is freed inside. Only the
            // frees that go through the task vtable pass here: those that
            // tokio's harness inlines (a JoinHandle dropped last) do not.
            &[event("tokio::runtime::task::raw::dealloc", TaskArg::Rdi)],
        ],
    },
    EventFamily {
        kind: SiteKind::Unpark,
        untraced: "worker unparks",
        alternatives: &[
            // tokio ≥ 1.2x (`scheduler/`): `Unparker::unpark(&self, driver)`.
            &[event(
                "tokio::runtime::scheduler::multi_thread::park::Unparker::unpark",
                TaskArg::None,
            )],
            // tokio 1.8-era multi_thread (not checked against a binary).
            &[event(
                "tokio::runtime::thread_pool::park::Unparker::unpark",
                TaskArg::None,
            )],
            // tokio 1.18–1.2x: the worker's `Unparker` implements the `Unpark`
            // trait (checked: 1.20.6).
            &[event(
                "<tokio::runtime::thread_pool::park::Unparker as tokio::park::Unpark>::unpark",
                TaskArg::None,
            )],
            // tokio ≤ 1.17: the same in `runtime/park.rs` (checked: 1.8.5,
            // 1.14.1); only the thread pool's workers park on it.
            &[event(
                "<tokio::runtime::park::Unparker as tokio::park::Unpark>::unpark",
                TaskArg::None,
            )],
        ],
    },
    EventFamily {
        kind: SiteKind::AwaitPoint,
        untraced: "await points (where tasks wait)",
        // Every tokio 1.x: a future that returns Pending keeps a clone of its
        // task's waker (timers, `Notify`, channels and I/O all do, through
        // `AtomicWaker` or their own lists), so cloning the waker inside a
        // poll marks where the task waits. The probe reads the caller's
        // address at [rsp], so it stays on the first instruction.
        // The `block_on` root future's waker is the thread parker's, whose
        // vtable's `clone` marks where the root waits the same way.
        alternatives: &[&[
            event("tokio::runtime::task::waker::clone_waker", TaskArg::None),
            event("tokio::runtime::park::clone", TaskArg::None),
            event("tokio::park::thread::clone", TaskArg::None),
            // The current-thread scheduler's root waker (its `Handle`'s).
            event("tokio::util::wake::clone_arc_raw", TaskArg::None),
        ]],
    },
];

/// Picks the functions of `family` to probe: those of its first alternative
/// that `is_present` says the binary has.
pub fn choose_event_functions(
    family: &EventFamily,
    is_present: impl Fn(&str) -> bool,
) -> Vec<EventFunction> {
    // An alternative the binary has whole first: where one of a pair was
    // inlined (tokio 1.28 at `opt-level = "s"` keeps `current_thread::
    // Handle::spawn` but inlines `bind_new_task`), taking the half pair
    // missed every multi-thread spawn while `OwnedTasks::bind`, further
    // down, covers both.
    let whole = |alternative: &&&[EventFunction]| {
        alternative.iter().all(|function| is_present(function.path))
    };
    let partial = |alternative: &&&[EventFunction]| {
        alternative.iter().any(|function| is_present(function.path))
    };
    family
        .alternatives
        .iter()
        .find(whole)
        .or_else(|| family.alternatives.iter().find(partial))
        .map(|alternative| {
            alternative
                .iter()
                .copied()
                .filter(|function| is_present(function.path))
                .collect()
        })
        .unwrap_or_default()
}

/// Where tokio's task `Header` keeps its vtable pointer, and whether that
/// vtable holds the task id's offset, from one tokio version on (read from
/// each release's `runtime/task/core.rs` and `raw.rs`; `Header` is
/// `#[repr(C)]` in all of them, and the vtable's first slot is always
/// `poll`). The last entry whose `since` is at most the binary's version
/// applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskLayout {
    pub since: (u64, u64, u64),
    /// Byte offset of `Header::vtable`.
    pub vtable_offset: u64,
    /// Index (in words) of `Vtable::id_offset`; `None` where the vtable has
    /// none (before 1.23 the id, from 1.21, sits in `Core` at an offset that
    /// depends on the future's type, so it can't be read generically).
    pub id_offset_slot: Option<u64>,
}

pub const TASK_LAYOUTS: &[TaskLayout] = &[
    // 1.0–1.8: `{ state, owned: Pointers (2 words), queue_next, stack_next, vtable }`.
    TaskLayout {
        since: (1, 0, 0),
        vtable_offset: 40,
        id_offset_slot: None,
    },
    // 1.9–1.20: `stack_next` gone.
    TaskLayout {
        since: (1, 9, 0),
        vtable_offset: 32,
        id_offset_slot: None,
    },
    // 1.21–1.22: the owned-list pointers moved to the trailer.
    TaskLayout {
        since: (1, 21, 0),
        vtable_offset: 16,
        id_offset_slot: None,
    },
    // 1.23 on: `Vtable { poll, schedule, dealloc, try_read_output,
    // drop_join_handle_slow, drop_abort_handle, shutdown, trailer_offset,
    // scheduler_offset, id_offset, … }`.
    TaskLayout {
        since: (1, 23, 0),
        vtable_offset: 16,
        id_offset_slot: Some(9),
    },
];

/// The task layout of a tokio version.
pub fn task_layout(version: (u64, u64, u64)) -> Option<TaskLayout> {
    TASK_LAYOUTS
        .iter()
        .rev()
        .find(|layout| layout.since <= version)
        .copied()
}

/// The code of each scheduler (and the blocking pool), by the path
/// fragments of its functions: where `raw::poll` is called from must be
/// found for every scheduler the binary runs, or that scheduler's poll ends
/// are lost (current_thread's call site went unrecognised on tokio
/// 1.25–1.48 while multi_thread's was found).
#[derive(Clone, Copy, Debug)]
pub struct PollCaller {
    pub name: &'static str,
    pub path_fragments: &'static [&'static str],
}

pub const POLL_CALLERS: &[PollCaller] = &[
    PollCaller {
        name: "multi_thread",
        path_fragments: &["::scheduler::multi_thread::", "::runtime::thread_pool::"],
    },
    PollCaller {
        name: "current_thread",
        path_fragments: &[
            "::scheduler::current_thread::",
            "::runtime::basic_scheduler::",
        ],
    },
    PollCaller {
        name: "blocking pool",
        path_fragments: &["::runtime::blocking::"],
    },
];

/// Functions every scheduler runs tasks through where they are not
/// inlined: a `raw::poll` call found in one serves them all.
pub const SHARED_POLL_CALLERS: &[&str] = &["tokio::runtime::task::"];

/// Blocking-pool "tasks" that are really a runtime thread's whole life: the
/// multi-thread scheduler starts each worker (and the replacement worker of
/// `block_in_place`) with `spawn_blocking`, so its `raw::poll` never returns
/// while the runtime runs and every task poll and park happens inside it.
/// Probing them would show each worker as one endless poll; they are skipped.
/// Matched as a prefix of the task type.
pub const RUNTIME_THREAD_TASKS: &[&str] = &[
    "tokio::runtime::blocking::task::BlockingTask<tokio::runtime::scheduler::multi_thread::worker::",
    "tokio::runtime::blocking::task::BlockingTask<tokio::runtime::scheduler::multi_thread_alt::worker::",
    "tokio::runtime::blocking::task::BlockingTask<tokio::runtime::thread_pool::worker::",
];

/// Whether a poll site's task type (possibly several joined with " | " where
/// identical code folding merged instances) only runs runtime threads.
pub fn is_runtime_thread_body(task_type: &str) -> bool {
    task_type.split(" | ").all(|one| {
        // v0 spells the inherent method `<…::worker::Launch>::launch`:
        // `BlockingTask<<tokio::…` where legacy has `BlockingTask<tokio::…`.
        let one = one.trim().replacen("BlockingTask<<", "BlockingTask<", 1);
        RUNTIME_THREAD_TASKS
            .iter()
            .any(|prefix| one.starts_with(prefix))
    })
}

/// Every path in the catalog, polls first, then parks, then events: for
/// error messages.
pub fn all_paths() -> Vec<&'static str> {
    let parks = PARK_FAMILIES
        .iter()
        .flat_map(|family| family.alternatives.iter())
        .flat_map(|alternative| alternative.iter().copied());
    let events = EVENT_FAMILIES
        .iter()
        .flat_map(|family| family.alternatives.iter())
        .flat_map(|alternative| alternative.iter().map(|function| function.path));
    POLL_PATHS
        .iter()
        .copied()
        .chain(parks)
        .chain(events)
        .chain(BLOCK_ON_LOOPS.iter().copied())
        .chain(BLOCK_ON_PARKS.iter().copied())
        .chain(ROOT_PARKS.iter().copied())
        .chain(ROOT_WAKES.iter().copied())
        .chain(CURRENT_THREAD_ENTER.iter().copied())
        .collect()
}

/// Picks the park functions to probe: for each family, the paths of the first
/// alternative that `is_present` says the binary has.
pub fn choose_park_paths(is_present: impl Fn(&str) -> bool) -> Vec<&'static str> {
    let mut chosen = Vec::new();
    for family in PARK_FAMILIES {
        let first_present = family
            .alternatives
            .iter()
            .find(|alternative| alternative.iter().any(|path| is_present(path)));
        if let Some(alternative) = first_present {
            chosen.extend(alternative.iter().copied().filter(|path| is_present(path)));
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_layouts_follow_the_header_through_the_versions() {
        let vtable = |v| task_layout(v).map(|l| l.vtable_offset);
        assert_eq!(vtable((1, 8, 5)), Some(40));
        assert_eq!(vtable((1, 9, 0)), Some(32));
        assert_eq!(vtable((1, 20, 6)), Some(32));
        assert_eq!(vtable((1, 21, 0)), Some(16));
        assert_eq!(task_layout((1, 22, 0)).unwrap().id_offset_slot, None);
        assert_eq!(task_layout((1, 23, 0)).unwrap().id_offset_slot, Some(9));
        assert_eq!(task_layout((1, 54, 1)).unwrap().id_offset_slot, Some(9));
        assert_eq!(task_layout((0, 3, 0)), None);
    }

    #[test]
    fn inner_park_function_wins_over_its_callers() {
        let present = [
            "tokio::runtime::scheduler::current_thread::Context::park",
            "tokio::runtime::scheduler::current_thread::Context::park_yield",
            "tokio::runtime::scheduler::current_thread::Context::park_internal",
        ];
        let chosen = choose_park_paths(|p| present.contains(&p));
        assert_eq!(
            chosen,
            ["tokio::runtime::scheduler::current_thread::Context::park_internal"]
        );
    }

    #[test]
    fn falls_back_to_outer_park_functions() {
        let present = [
            "tokio::runtime::scheduler::multi_thread::worker::Context::park",
            "tokio::runtime::scheduler::multi_thread::worker::Context::park_timeout",
        ];
        let chosen = choose_park_paths(|p| present.contains(&p));
        assert_eq!(chosen, present);
    }

    #[test]
    fn all_paths_lists_polls_first_and_every_park() {
        let paths = all_paths();
        assert_eq!(paths[0], "tokio::runtime::task::raw::poll");
        assert!(paths.contains(&"tokio::runtime::basic_scheduler::Context::park_yield"));
        assert!(paths.contains(&"tokio::runtime::task::waker::wake_by_ref"));
        assert_eq!(
            paths.len(),
            1 + 3 + 1 + 2 + 1 + 2 + 2 + (4 + 2 + 3 + 4 + 4) + 2
                // The `block_on` root's: loops, their parks, the parker's
                // parks, its wakes, the current-thread root polls.
                + (2 + 2 + 2 + 4 + 2)
        );
    }

    #[test]
    fn catalog_paths_are_already_generic_free() {
        // A path with generics could never equal a stripped symbol path.
        for path in all_paths() {
            assert_eq!(crate::generics::strip_generic_args(path), path);
        }
    }

    #[test]
    fn every_event_kind_has_a_family_and_no_family_is_a_span() {
        for kind in [
            SiteKind::Spawn,
            SiteKind::Wake,
            SiteKind::TaskEnd,
            SiteKind::Unpark,
        ] {
            assert_eq!(
                EVENT_FAMILIES
                    .iter()
                    .filter(|family| family.kind == kind)
                    .count(),
                1,
                "{kind:?}"
            );
            assert!(!kind.needs_return_probe());
        }
    }

    #[test]
    fn bind_inner_wins_over_bind_and_carries_the_header_in_rsi() {
        let spawn = &EVENT_FAMILIES[0];
        let both = [
            "tokio::runtime::task::list::OwnedTasks::bind_inner",
            "tokio::runtime::task::list::OwnedTasks::bind",
        ];
        let chosen = choose_event_functions(spawn, |p| both.contains(&p));
        assert_eq!(chosen.len(), 1);
        assert_eq!(chosen[0].path, both[0]);
        assert_eq!(chosen[0].task_arg, TaskArg::Rsi);
        let old = choose_event_functions(spawn, |p| p == both[1]);
        assert_eq!(old[0].task_arg, TaskArg::ReturnValue);
        assert!(choose_event_functions(spawn, |_| false).is_empty());
    }

    /// tokio 1.28 at `opt-level = "s"`: `current_thread::Handle::spawn`
    /// kept, `bind_new_task` inlined. Half a pair loses the multi-thread
    /// runtime's spawns; `OwnedTasks::bind` covers both.
    #[test]
    fn a_whole_alternative_wins_over_half_a_pair() {
        let spawn = &EVENT_FAMILIES[0];
        let present = [
            "tokio::runtime::scheduler::current_thread::Handle::spawn",
            "tokio::runtime::task::list::OwnedTasks::bind",
        ];
        let chosen = choose_event_functions(spawn, |p| present.contains(&p));
        let paths: Vec<&str> = chosen.iter().map(|f| f.path).collect();
        assert_eq!(paths, ["tokio::runtime::task::list::OwnedTasks::bind"]);
        // With nothing whole, half a pair is still better than nothing.
        let chosen = choose_event_functions(spawn, |p| p == present[0]);
        let paths: Vec<&str> = chosen.iter().map(|f| f.path).collect();
        assert_eq!(paths, [present[0]]);
    }
}

#[cfg(test)]
mod runtime_thread_tests {
    use super::is_runtime_thread_body;

    #[test]
    fn worker_launch_is_a_runtime_thread_but_user_blocking_work_is_not() {
        assert!(is_runtime_thread_body(
            "tokio::runtime::blocking::task::BlockingTask<tokio::runtime::scheduler::multi_thread::worker::Launch::launch::{{closure}}> | \
             tokio::runtime::blocking::task::BlockingTask<tokio::runtime::scheduler::multi_thread::worker::maybe_move_runtime::{{closure}}::{{closure}}>"
        ));
        assert!(!is_runtime_thread_body(
            "tokio::runtime::blocking::task::BlockingTask<my_app::load::{{closure}}>"
        ));
        // Merged with user work: keep it, the user's task matters more.
        assert!(!is_runtime_thread_body(
            "tokio::runtime::blocking::task::BlockingTask<tokio::runtime::scheduler::multi_thread::worker::Launch::launch::{{closure}}> | \
             tokio::runtime::blocking::task::BlockingTask<my_app::load::{{closure}}>"
        ));
        assert!(!is_runtime_thread_body("my_app::handler::{{closure}}"));
        // v0 demangling.
        assert!(is_runtime_thread_body(
            "tokio::runtime::blocking::task::BlockingTask<<tokio::runtime::scheduler::multi_thread::worker::Launch>::launch::{closure#0}>"
        ));
    }
}
