//! The `block_on` root future: where its polls can be probed, and its type.
//!
//! Why not the future's own `poll`: `Runtime::block_on(f)` polls `f`
//! inline in the monomorphized `CachedParkThread::block_on<F>` loop, and on
//! release builds `F::poll` has that one caller and is inlined into it: no
//! symbol of `compat_root`'s poll is left in the compat service on tokio
//! 1.8, 1.38 or 1.54, nor of the fixtures' or the demo's `main` bodies.
//! `block_on<F>` itself stays a function (one per `F`, 0.15–3.5 KiB), and
//! so does the thread parker's `Inner::park` it sleeps in. The loop is the
//! same in every tokio 1.x — poll, return if ready, park — so on the thread
//! inside `block_on<F>` the root is being polled exactly when the thread is
//! not parked: the eBPF side (`tracer-ebpf/src/block_on.rs`) opens a poll
//! at `block_on`'s entry and each park's return and closes it at each
//! park's entry and `block_on`'s return.
//!
//! The root's type `F`: legacy symbols drop `block_on`'s generic argument,
//! but other symbols keep it (`drop_in_place<…MultiThread::block_on<F>::
//! {{closure}}>`, `enter_runtime<…block_on<F>…>`): those name the program's
//! root futures. An instance is given the one whose name its direct callees
//! carry (its drop glue, its future's poll where that was not inlined), else
//! the only root future the program has; a v0 symbol names its `F` itself.
//!
//! The current-thread scheduler polls its root future in its own loop
//! (`CoreGuard::block_on`), between task polls with no park in between, so
//! parks don't delimit its polls. There (tokio ≥ 1.2x) the poll is wrapped
//! in `context.enter(core, || budget(|| future.poll(cx)))`, and that
//! `Context::enter` instance stays a function on release builds (tokio
//! 1.38 and 1.54, the fixtures): it is the instance that neither runs a
//! task nor parks, told apart by its callees, counting calls through the
//! GOT (`RawTask::poll` is one on 1.38). Its entry and return are the
//! root poll's (1.20's `basic_scheduler` has it too). Where it is inlined
//! (fat LTO) or absent (tokio 1.8 and 1.14's `basic_scheduler`) the
//! current-thread root is not traced.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;

use crate::catalog;
use crate::discover::{Code, group_by_address, site};
use crate::generics::{self, short_name};
use crate::image::Image;
use crate::symbols::{FunctionSymbol, SymbolTable};
use crate::{NameSource, TaskType};
use crate::{ProbeSite, ReturnSite, SiteKind, TaskArg};

/// The `block_on` root future's sites: every
/// `block_on<F>` loop, named after its `F`, and the thread parker's park
/// and wake functions; none when the binary has no `block_on` loop or no
/// parker's park (a `block_on` whose parks can't be seen would show one
/// poll as long as the program).
pub(crate) fn sites(code: &Code, poll_returns: &[ReturnSite]) -> anyhow::Result<Vec<ProbeSite>> {
    let symbols = code.symbols;
    let paths = |list: &'static [&'static str]| {
        group_by_address(list.iter().flat_map(|path| symbols.with_path(path)))
    };
    let mut loops = paths(catalog::BLOCK_ON_LOOPS);
    let parks = paths(catalog::ROOT_PARKS);
    if parks.is_empty() {
        // A `block_on` whose parks can't be seen would show one poll as
        // long as the program.
        loops.clear();
    }
    let enters = paths(catalog::CURRENT_THREAD_ENTER);
    let task_calls: Vec<u64> = poll_returns.iter().map(|site| site.call_address).collect();
    let root_polls: BTreeMap<u64, Vec<&FunctionSymbol>> =
        current_thread_root_polls(&enters, symbols, code.image, &task_calls)
            .into_iter()
            .filter_map(|address| Some((address, enters.get(&address)?.clone())))
            .collect();
    if loops.is_empty() && root_polls.is_empty() {
        return Ok(Vec::new());
    }
    if loops.is_empty() {
        // Wakes are told apart by the parker a `block_on` loop parks on.
        return block_on_kind_sites(code, &[(SiteKind::RootPoll, TaskArg::None, &root_polls)]);
    }
    block_on_kind_sites(
        code,
        &[
            (SiteKind::BlockOn, TaskArg::None, &loops),
            (SiteKind::RootPark, TaskArg::None, &parks),
            (
                SiteKind::BlockOnPark,
                TaskArg::None,
                &paths(catalog::BLOCK_ON_PARKS),
            ),
            (
                SiteKind::RootWake,
                TaskArg::Rdi,
                &paths(catalog::ROOT_WAKES),
            ),
            (SiteKind::RootPoll, TaskArg::None, &root_polls),
        ],
    )
}

type SiteGroups<'a> = BTreeMap<u64, Vec<&'a FunctionSymbol>>;

fn block_on_kind_sites(
    code: &Code,
    kinds: &[(SiteKind, TaskArg, &SiteGroups)],
) -> anyhow::Result<Vec<ProbeSite>> {
    let roots = root_future_types(code.symbols, code.image);
    let mut sites = Vec::new();
    for &(kind, task_arg, groups) in kinds {
        for (&address, group) in groups {
            let mut site = site(kind, task_arg, address, group, code).with_context(|| {
                format!(
                    "{} function at {address:#x} is outside the file's sections",
                    kind.name()
                )
            })?;
            if matches!(kind, SiteKind::BlockOn | SiteKind::RootPoll) {
                site.task_type = Some(name_block_on_site(
                    address,
                    group,
                    &roots,
                    code.symbols,
                    code.image,
                ));
            }
            sites.push(site);
        }
    }
    // A current-thread root poll whose own code does not name its type
    // takes the one the `block_on` loops agree on (the same program's root).
    let named: Vec<String> = sites
        .iter()
        .filter(|site| site.kind == SiteKind::BlockOn)
        .filter_map(|site| site.task_type.as_ref())
        .filter(|t| !t.full.is_empty())
        .map(|t| t.full.clone())
        .collect();
    if let Some(first) = named.first()
        && named.iter().all(|name| name == first)
    {
        for site in &mut sites {
            if site.kind == SiteKind::RootPoll
                && let Some(t) = &mut site.task_type
                && t.full.is_empty()
            {
                *t = root_task_type(first.clone());
            }
        }
    }
    Ok(sites)
}

/// Crates whose types are not a program's root future.
const LIBRARY_PREFIXES: &[&str] = &["tokio::", "core::", "std::", "alloc::", "<", "F", "T"];

/// The first generic argument of every `block_on<…>` / `block_on::<…>` in
/// `name`.
fn block_on_args(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for needle in ["block_on<", "block_on::<"] {
        let mut from = 0;
        while let Some(position) = name[from..].find(needle) {
            let open = from + position + needle.len() - 1;
            if let Some(first) =
                generics::generic_args_at(name, open).and_then(|args| args.into_iter().next())
            {
                found.push(first);
            }
            from = open + 1;
        }
    }
    found
}

/// Whether a type named in a generic argument is the program's own future
/// (not a placeholder like legacy's `F`, nor a library's type).
fn is_program_type(type_name: &str) -> bool {
    type_name.contains("::")
        && !LIBRARY_PREFIXES
            .iter()
            .any(|prefix| type_name.starts_with(prefix))
}

/// The program's root futures: every `F` of a `block_on<F>` that some
/// symbol's name spells out, and the program's futures that tokio's
/// `block_on` functions drop (legacy symbols of `Runtime::block_on`,
/// `BasicScheduler::block_on`… keep no generics, but their drop glue's
/// names do: `block_on(compat_root(…))` is named nowhere else on 1.8–1.20),
/// sorted and deduplicated.
pub(crate) fn root_future_types(symbols: &SymbolTable, image: &Image) -> Vec<String> {
    let mut roots: Vec<String> = symbols
        .functions()
        .flat_map(|(_, group)| group.iter())
        .filter(|symbol| symbol.name.contains("block_on"))
        .flat_map(|symbol| block_on_args(&symbol.name))
        .filter(|type_name| is_program_type(type_name))
        .collect();
    for (address, group) in symbols.functions() {
        let is_tokio_block_on = group.iter().any(|symbol| {
            symbol.path.starts_with("tokio::")
                && symbol.path.ends_with("::block_on")
                && !catalog::BLOCK_ON_LOOPS.contains(&symbol.path.as_str())
        });
        if !is_tokio_block_on {
            continue;
        }
        let size = group.iter().map(|symbol| symbol.size).max().unwrap_or(0);
        for callee in callees(address, size, symbols, image, false) {
            roots.extend(
                generics::first_args_of(&callee.name, "core::ptr::drop_in_place")
                    .into_iter()
                    .filter(|type_name| is_program_type(type_name)),
            );
        }
    }
    roots.sort();
    roots.dedup();
    roots
}

/// The functions the function at `address` calls directly or, if
/// `through_got`, through the GOT (`call [rip+…]`: how a PIE calls a
/// function of another codegen unit).
pub(crate) fn callees<'a>(
    address: u64,
    size: u64,
    symbols: &'a SymbolTable,
    image: &Image,
    through_got: bool,
) -> Vec<&'a FunctionSymbol> {
    let Some(code) = image.bytes(address, size) else {
        return Vec::new();
    };
    let through_got = crate::disasm::pointer_call_slots(code, address)
        .into_iter()
        .filter(|_| through_got)
        .filter_map(|slot| image.pointer_at(slot));
    crate::disasm::direct_call_targets(code, address)
        .into_iter()
        .chain(through_got)
        .flat_map(|target| symbols.at(target))
        .collect()
}

/// The current-thread scheduler's root-poll `Context::enter` instances:
/// those that call none of [`catalog::NOT_ROOT_POLL_CALLEES`] and hold no
/// task vtable call (`task_calls`, the return sites' call addresses).
pub(crate) fn current_thread_root_polls(
    groups: &BTreeMap<u64, Vec<&FunctionSymbol>>,
    symbols: &SymbolTable,
    image: &Image,
    task_calls: &[u64],
) -> Vec<u64> {
    groups
        .iter()
        .filter(|(address, group)| {
            let size = group.iter().map(|symbol| symbol.size).max().unwrap_or(0);
            let runs_tasks = task_calls
                .iter()
                .any(|call| (**address..**address + size).contains(call));
            let not_root = callees(**address, size, symbols, image, true)
                .iter()
                .any(|callee| catalog::NOT_ROOT_POLL_CALLEES.contains(&callee.path.as_str()));
            !runs_tasks && !not_root
        })
        .map(|(address, _)| *address)
        .collect()
}

/// The root future type of the `block_on<F>` instance at `address`.
pub(crate) fn name_block_on_site(
    address: u64,
    group: &[&FunctionSymbol],
    roots: &[String],
    symbols: &SymbolTable,
    image: &Image,
) -> TaskType {
    let full = root_type_of(address, group, roots, symbols, image).unwrap_or_default();
    root_task_type(full)
}

/// The task type a root future of type `full` is shown as: "block_on root"
/// and its short type name ("" when unknown).
pub fn root_task_type(full: String) -> TaskType {
    let short = if full.is_empty() {
        "block_on root".to_string()
    } else {
        format!("block_on root {}", short_name(&full))
    };
    TaskType {
        full,
        short,
        source: NameSource::Symbols,
        merged: 0,
    }
}

fn root_type_of(
    address: u64,
    group: &[&FunctionSymbol],
    roots: &[String],
    symbols: &SymbolTable,
    image: &Image,
) -> Option<String> {
    // v0 names the instance's own `F`.
    if let Some(own) = group
        .iter()
        .flat_map(|symbol| block_on_args(&symbol.name))
        .find(|type_name| is_program_type(type_name))
    {
        return Some(own);
    }
    let size = group.iter().map(|symbol| symbol.size).max()?;
    let called = |address: u64, size: u64| -> Vec<&FunctionSymbol> {
        image
            .bytes(address, size)
            .map(|code| crate::disasm::direct_call_targets(code, address))
            .unwrap_or_default()
            .into_iter()
            .flat_map(|target| symbols.at(target))
            .collect()
    };
    let mut callees = called(address, size);
    // Older loops poll through a generic wrapper (`<&mut F as Future>::poll`
    // on tokio 1.8) that holds the future's inlined poll and drop glue.
    let wrappers: Vec<(u64, u64)> = callees
        .iter()
        .filter(|callee| {
            callee
                .name
                .ends_with("as core::future::future::Future>::poll")
        })
        .map(|callee| (callee.address, callee.size))
        .collect();
    let through_wrapper = !wrappers.is_empty();
    for (wrapper, wrapper_size) in wrappers {
        callees.extend(called(wrapper, wrapper_size));
    }
    // A root future the program names elsewhere, called or dropped here.
    let mut named: Vec<&String> = callees
        .iter()
        .flat_map(|callee| {
            roots
                .iter()
                .filter(|root| callee.name.contains(root.as_str()))
        })
        .collect();
    named.sort();
    named.dedup();
    if let [one] = named.as_slice() {
        return Some((*one).clone());
    }
    // The loop drops its future where it returns or unwinds: the program
    // type it drops most (the compat service's `block_on(compat_root(…))`
    // names `compat_root` nowhere else).
    let mut dropped: HashMap<String, usize> = HashMap::new();
    for callee in &callees {
        for type_name in generics::first_args_of(&callee.name, "core::ptr::drop_in_place") {
            if is_program_type(&type_name) {
                *dropped.entry(type_name).or_default() += 1;
            }
        }
    }
    let most = dropped.values().copied().max();
    let mut winners: Vec<String> = dropped
        .into_iter()
        .filter(|(_, count)| Some(*count) == most)
        .map(|(name, _)| name)
        .collect();
    if winners.len() == 1 {
        return winners.pop();
    }
    // Without drop glue here (`panic = "abort"` leaves no unwinding path,
    // and the drop at return was inlined): the future's own poll, where
    // it was not inlined (`compat_root::{{closure}}` on 1.54 with
    // `panic = "abort"`), is the one program closure the loop calls.
    let mut closures: Vec<&str> = callees
        .iter()
        .filter(|callee| is_program_type(&callee.name))
        .filter_map(|callee| crate::naming::program_closure(&callee.name))
        .collect();
    closures.sort();
    closures.dedup();
    if let [one] = closures.as_slice() {
        return Some((*one).to_string());
    }
    // The only root future the program has, unless this loop polls
    // another future through a wrapper (tokio's own `block_on`s, e.g. at a
    // runtime's shutdown, 6 µs once in the current_thread fixture).
    match roots {
        [only] if !through_wrapper => Some(only.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_root_futures_in_legacy_and_v0_names() {
        assert_eq!(
            block_on_args(
                "core::ptr::drop_in_place<tokio::runtime::scheduler::multi_thread::MultiThread::block_on<demo_service::main::{{closure}}>::{{closure}}>"
            ),
            ["demo_service::main::{{closure}}"]
        );
        assert_eq!(
            block_on_args(
                "<tokio::runtime::park::CachedParkThread>::block_on::<compat_service::compat_root::{closure#0}>"
            ),
            ["compat_service::compat_root::{closure#0}"]
        );
        assert!(block_on_args("tokio::runtime::park::CachedParkThread::block_on").is_empty());
    }

    #[test]
    fn library_types_and_placeholders_are_not_root_futures() {
        assert!(is_program_type("demo_service::main::{{closure}}"));
        assert!(!is_program_type("F"));
        assert!(!is_program_type(
            "tokio::future::poll_fn::PollFn<tokio::runtime::scheduler::current_thread::CurrentThread::block_on::{{closure}}>"
        ));
        assert!(!is_program_type("&mut F"));
    }

    #[test]
    fn root_task_type_says_block_on_root() {
        let named = root_task_type("demo_service::main::{{closure}}".into());
        assert!(named.short.starts_with("block_on root "), "{}", named.short);
        assert!(named.short.contains("main::{{closure}}"), "{}", named.short);
        assert_eq!(root_task_type(String::new()).short, "block_on root");
    }
}
