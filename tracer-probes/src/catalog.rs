//! THE table of tokio functions we probe, for every tokio version we know.
//!
//! Matching is exact equality on the demangled path with the hash, any
//! `.llvm.NNN` suffix and any `::<…>` generic arguments removed (see
//! `symbols::match_path`). Adding support for another tokio version means
//! adding a line here and nothing else.

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
        RUNTIME_THREAD_TASKS
            .iter()
            .any(|prefix| one.trim().starts_with(prefix))
    })
}

/// Every path in the catalog, polls first: for error messages.
pub fn all_paths() -> Vec<&'static str> {
    let parks = PARK_FAMILIES
        .iter()
        .flat_map(|family| family.alternatives.iter())
        .flat_map(|alternative| alternative.iter().copied());
    POLL_PATHS.iter().copied().chain(parks).collect()
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
        assert_eq!(paths.len(), 1 + 3 + 1 + 2 + 1 + 2 + 2);
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
    }
}
