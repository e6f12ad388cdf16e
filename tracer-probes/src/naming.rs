//! Names the `T` of each `tokio::runtime::task::raw::poll::<T, S>` instance.
//!
//! In order of trust:
//! 1. DWARF, when the binary has it (see `dwarf.rs`).
//! 2. The instance's own v0-mangled symbol, which spells out its generics.
//! 3. The functions it calls. Legacy mangling drops generics from
//!    `raw::poll` itself, but the `drop_in_place` glue it reaches keeps them:
//!    `core::ptr::drop_in_place<tokio::runtime::task::core::Stage<my_app::handler::{{closure}}>>`.
//!    We follow direct calls and tail jumps a few levels deep through tokio's
//!    task machinery, collect the types those names carry, and take the most
//!    frequent among the nearest.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::generics;
use crate::image::Image;
use crate::symbols::{FunctionSymbol, SymbolTable};
use crate::{NameSource, TaskType};

pub use crate::generics::short_name;

/// How many calls away from `raw::poll` a hint may be: 3 in default
/// release builds; `opt-level = "s"` builds need 5 (`raw::poll` →
/// `Harness::poll` → `Core::poll` → `UnsafeCell::with_mut` →
/// `BlockingTask::poll` → the closure, on tokio 1.28).
const MAX_CALL_DEPTH: usize = 5;

/// Generic tokio types whose first argument is the task's future type.
const TYPES_HOLDING_THE_FUTURE: &[&str] = &[
    "tokio::runtime::task::core::Stage",
    "tokio::runtime::task::core::CoreStage",
    "tokio::runtime::task::core::Cell",
    "tokio::runtime::task::core::Core",
    "tokio::runtime::task::harness::Harness",
];

/// The path prefix of the v0 `raw::poll::<T, S>` symbol, before its generic arguments.
const V0_RAW_POLL: &str = "tokio::runtime::task::raw::poll::";

/// Builds a [`TaskType`] from a full type path.
pub fn task_type(full: String, source: NameSource) -> TaskType {
    TaskType {
        short: short_name(&full),
        full,
        source,
        merged: 0,
    }
}

/// `T` from a v0-demangled `tokio::runtime::task::raw::poll::<T, S>`.
pub fn task_type_from_v0_poll_symbol(name: &str) -> Option<String> {
    generics::first_args_of(name, V0_RAW_POLL)
        .into_iter()
        .next()
}

/// The future types a callee's name carries, e.g. `X` in
/// `core::ptr::drop_in_place<tokio::runtime::task::core::Cell<X,alloc::sync::Arc<…>>>`.
/// Placeholders like the `T` of a legacy `Harness<T,S>::poll` are not types
/// and are left out.
pub fn future_types_in(callee: &str) -> Vec<String> {
    let mut found = Vec::new();
    for holder in TYPES_HOLDING_THE_FUTURE {
        for argument in generics::first_args_of(callee, holder) {
            if argument.contains("::") && !found.contains(&argument) {
                found.push(argument);
            }
        }
    }
    found
}

/// A weaker hint: a callee that is itself a closure or async body of the
/// program (`my_app::handler::{{closure}}`), likely the future's `poll`.
pub fn program_closure(callee: &str) -> Option<&str> {
    const LIBRARY_CRATES: &[&str] = &["tokio::", "std::", "core::", "alloc::"];
    let is_closure =
        callee.ends_with("{{closure}}") || callee.ends_with('}') && callee.contains("{closure#");
    let is_library =
        callee.starts_with('<') || LIBRARY_CRATES.iter().any(|krate| callee.starts_with(krate));
    (is_closure && !is_library).then_some(callee)
}

/// A function of the program itself (not of tokio, std, core, alloc, nor
/// a trait impl or compiler glue).
fn is_program_function(callee: &str) -> bool {
    const LIBRARY_CRATES: &[&str] = &["tokio::", "std::", "core::", "alloc::"];
    !callee.starts_with(['<', '_'])
        && callee.contains("::")
        && !LIBRARY_CRATES.iter().any(|krate| callee.starts_with(krate))
}

/// Is this a function whose callees may still tell the task type? tokio's own
/// task machinery and drop glue, but not arbitrary code (which would lead
/// anywhere).
fn worth_following(symbol: &FunctionSymbol) -> bool {
    let path = symbol.name.trim_start_matches('<');
    path.starts_with("tokio::runtime::task::")
        || path.contains("drop_in_place")
        // `opt-level = "s"` keeps these out of line: the future's poll is
        // called from `UnsafeCell::with_mut` inside `Core::poll`, a
        // `spawn_blocking` closure from `BlockingTask::poll`.
        || path.starts_with("tokio::loom::std::unsafe_cell::UnsafeCell")
        || path.starts_with(BLOCKING_TASK)
}

/// `spawn_blocking` work's future type (generics stripped).
const BLOCKING_TASK: &str = "tokio::runtime::blocking::task::BlockingTask";

/// A type name found `depth` calls away from `raw::poll`.
struct Hint {
    type_name: String,
    depth: usize,
    strong: bool,
}

/// Names the task type of the `raw::poll` instance at `address` (with the
/// symbols `site_symbols`), from `dwarf_name` if DWARF had it, else from symbols.
pub(crate) fn name_poll_site(
    address: u64,
    site_symbols: &[&FunctionSymbol],
    dwarf_name: Option<&String>,
    symbols: &SymbolTable,
    image: &Image,
) -> Option<TaskType> {
    if let Some(name) = dwarf_name {
        return Some(task_type(name.clone(), NameSource::Dwarf));
    }
    let from_v0: Vec<String> = site_symbols
        .iter()
        .filter_map(|symbol| task_type_from_v0_poll_symbol(&symbol.name))
        .collect();
    if let Some(name) = join_distinct(from_v0) {
        return Some(task_type(name, NameSource::Symbols));
    }
    let size = site_symbols.iter().map(|symbol| symbol.size).max()?;
    let hints = hints_from_callees(address, size, symbols, image);
    let name = best_hint(&hints)?;
    let mut task_type = task_type(name, NameSource::Symbols);
    let merged = merged_types(&hints);
    if merged > 0 {
        mark_merged(&mut task_type, merged);
    }
    Some(task_type)
}

/// How many other future types the nearest strong hints name besides the
/// winners: one `raw::poll` whose callees carry several types' names is
/// code that several task types share (LLVM merged identical functions,
/// most often under fat LTO), so its polls may be any of them.
fn merged_types(hints: &[Hint]) -> usize {
    let Some(nearest) = hints.iter().filter(|h| h.strong).map(|h| h.depth).min() else {
        return 0;
    };
    let mut names: Vec<&str> = hints
        .iter()
        .filter(|h| h.strong && h.depth == nearest)
        .map(|h| h.type_name.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    let winners = best_hint(hints).map_or(0, |name| name.split(" | ").count());
    names.len().saturating_sub(winners)
}

/// Says in the type's names that its polls may be another type's:
/// `ticker::{{closure}} (or 2 other types merged by LTO)`, so that traces,
/// the summary and findings don't blame one type for another's polls.
pub fn mark_merged(task_type: &mut TaskType, others: usize) {
    let marker = match others {
        1 => " (or 1 other type merged by LTO)".to_owned(),
        n => format!(" (or {n} other types merged by LTO)"),
    };
    task_type.merged = others;
    task_type.short.push_str(&marker);
    task_type.full.push_str(&marker);
}

/// Breadth-first over direct calls and tail jumps from the function at `start`.
fn hints_from_callees(
    start: u64,
    start_size: u64,
    symbols: &SymbolTable,
    image: &Image,
) -> Vec<Hint> {
    let mut hints = Vec::new();
    let mut visited = HashSet::from([start]);
    // (function, its size, calls away from `raw::poll`, reached through
    // `BlockingTask::poll`: a closure found there is `spawn_blocking` work).
    let mut queue = VecDeque::from([(start, start_size, 0usize, false)]);
    while let Some((address, size, depth, in_blocking_task)) = queue.pop_front() {
        let Some(code) = image.bytes(address, size) else {
            continue;
        };
        // Direct calls, and calls through GOT slots (`opt-level = "s"`
        // builds call tokio's task machinery that way: 5 of 23 task types
        // and the blocking pool's were unnamed on tokio 1.28 before).
        let through_pointers = crate::disasm::pointer_call_slots(code, address)
            .into_iter()
            .filter_map(|slot| image.pointer_at(slot));
        let targets: Vec<u64> = crate::disasm::direct_call_targets(code, address)
            .into_iter()
            .chain(through_pointers)
            .collect();
        for target in targets {
            if !visited.insert(target) {
                continue;
            }
            let callees = symbols.at(target);
            for callee in callees {
                for type_name in future_types_in(&callee.name) {
                    hints.push(Hint {
                        type_name,
                        depth: depth + 1,
                        strong: true,
                    });
                }
                if in_blocking_task
                    && program_closure(&callee.name).is_none()
                    && is_program_function(&callee.name)
                {
                    // The closure inlined into `BlockingTask::poll`: what
                    // it calls is all the binary says about it.
                    hints.push(Hint {
                        type_name: format!("{BLOCKING_TASK}<a closure calling {}>", callee.path),
                        depth: depth + 1,
                        strong: false,
                    });
                }
                if let Some(closure) = program_closure(&callee.name) {
                    let type_name = if in_blocking_task {
                        format!("{BLOCKING_TASK}<{closure}>")
                    } else {
                        closure.to_string()
                    };
                    hints.push(Hint {
                        type_name,
                        depth: depth + 1,
                        strong: false,
                    });
                }
            }
            if depth + 1 < MAX_CALL_DEPTH && callees.iter().any(worth_following) {
                let callee_size = callees.iter().map(|callee| callee.size).max().unwrap_or(0);
                let blocking = in_blocking_task
                    || callees
                        .iter()
                        .any(|callee| callee.path.starts_with(&format!("<{BLOCKING_TASK} as ")));
                queue.push_back((target, callee_size, depth + 1, blocking));
            }
        }
    }
    hints
}

/// Strong hints beat weak ones; then the nearest; then the most frequent. A
/// tie (e.g. identical code folding gave one function two names) joins the
/// names with " | " rather than picking one at random.
fn best_hint(hints: &[Hint]) -> Option<String> {
    let any_strong = hints.iter().any(|hint| hint.strong);
    let usable = || hints.iter().filter(|hint| hint.strong == any_strong);
    let nearest = usable().map(|hint| hint.depth).min()?;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for hint in usable().filter(|hint| hint.depth == nearest) {
        *counts.entry(&hint.type_name).or_default() += 1;
    }
    let most = counts.values().copied().max()?;
    let winners: Vec<String> = counts
        .into_iter()
        .filter(|(_, count)| *count == most)
        .map(|(name, _)| name.to_string())
        .collect();
    join_distinct(winners)
}

/// Sorted, deduplicated, joined with " | "; `None` if empty.
fn join_distinct(mut names: Vec<String>) -> Option<String> {
    names.sort();
    names.dedup();
    (!names.is_empty()).then(|| names.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_future_in_drop_glue_names() {
        assert_eq!(
            future_types_in(
                "core::ptr::drop_in_place<tokio::runtime::task::core::Stage<multi_worker::fixture_sleeper::{{closure}}>>"
            ),
            ["multi_worker::fixture_sleeper::{{closure}}"]
        );
        assert_eq!(
            future_types_in(
                "core::ptr::drop_in_place<tokio::runtime::task::core::Cell<tokio::runtime::blocking::task::BlockingTask<a::b::{{closure}}>,tokio::runtime::blocking::schedule::BlockingSchedule>>"
            ),
            ["tokio::runtime::blocking::task::BlockingTask<a::b::{{closure}}>"]
        );
        // Legacy mangling names the generic parameters, not the types.
        assert!(future_types_in("tokio::runtime::task::harness::Harness<T,S>::poll").is_empty());
    }

    #[test]
    fn reads_t_from_a_v0_poll_symbol() {
        assert_eq!(
            task_type_from_v0_poll_symbol(
                "tokio::runtime::task::raw::poll::<m::f::{closure#0}, alloc::sync::Arc<h::Handle>>"
            )
            .as_deref(),
            Some("m::f::{closure#0}")
        );
        assert_eq!(
            task_type_from_v0_poll_symbol("tokio::runtime::task::raw::poll"),
            None
        );
    }

    #[test]
    fn program_closures_are_weak_hints_library_ones_are_not() {
        assert_eq!(
            program_closure("my_app::serve::{{closure}}"),
            Some("my_app::serve::{{closure}}")
        );
        assert_eq!(program_closure("tokio::runtime::x::{{closure}}"), None);
        assert_eq!(program_closure("my_app::serve"), None);
    }

    #[test]
    fn nearest_most_frequent_strong_hint_wins_and_ties_join() {
        let hint = |type_name: &str, depth, strong| Hint {
            type_name: type_name.into(),
            depth,
            strong,
        };
        let hints = [
            hint("a::far", 2, true),
            hint("a::near", 1, true),
            hint("a::near", 1, true),
            hint("a::other", 1, true),
            hint("a::weak", 1, false),
        ];
        assert_eq!(best_hint(&hints).as_deref(), Some("a::near"));
        assert_eq!(merged_types(&hints), 1, "a::other shares the code");
        let tied = [hint("a::x", 1, true), hint("a::y", 1, true)];
        assert_eq!(best_hint(&tied).as_deref(), Some("a::x | a::y"));
        assert_eq!(merged_types(&tied), 0, "both named already");
        assert_eq!(merged_types(&[hint("a::weak", 2, false)]), 0);
        assert_eq!(
            best_hint(&[hint("a::weak", 2, false)]).as_deref(),
            Some("a::weak")
        );
        assert_eq!(best_hint(&[]), None);
    }
}
