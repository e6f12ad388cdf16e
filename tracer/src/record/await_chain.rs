//! Where a task waits, from the stack captured when it cloned its waker:
//! which frames are the task's own (between the waker registration in
//! tokio or std and tokio's task harness), and how to name them.
//!
//! Measured on the compatibility matrix (`tests/compat`): before the chain
//! was cut at the harness, every poll on tokio < 1.25 said `waits_at:
//! main` (the user's future inlined into `Harness::poll`, symbols only, so
//! the first "own" frame was where `block_on` was inlined); dev builds said
//! `__rust_try` for most polls; line-table builds said `{async_fn#0}` with
//! no path, which rustc's DWARF does not hold (no namespace DIEs).

use tracer_timeline::symbols::SymbolFrame as Frame;

/// The frames of an await stack that say where the task waits: from the
/// innermost frame of the program's own code (tokio's and the standard
/// library's frames of the waker registration trimmed off the top) out to
/// the task's future (tokio's harness and scheduler trimmed off the bottom).
pub(super) fn await_chain(frames: &[Frame]) -> Vec<&Frame> {
    // Only the task's own stack: a first "own" frame found beyond tokio's
    // harness is the scheduler's caller (e.g. `main`, where `block_on` was
    // inlined), not where the task waits.
    let own_task = match first_harness(frames) {
        Some(harness) => &frames[..harness],
        None => frames,
    };
    own_task
        .iter()
        .skip_while(|frame| is_library_frame(frame))
        .collect()
}

/// The waker registration's part of an await stack: the frames above the
/// program's own code (tokio's and std's), innermost first; the whole
/// task's stack when none of it is the program's own.
pub(super) fn registration_frames(frames: &[Frame]) -> &[Frame] {
    let own_task = match first_harness(frames) {
        Some(harness) => &frames[..harness],
        None => frames,
    };
    let first_own = own_task
        .iter()
        .position(|frame| !is_library_frame(frame))
        .unwrap_or(own_task.len());
    &own_task[..first_own]
}

/// The await chain, described. With line tables only, rustc names an
/// inlined async fn `{async_fn#0}` with no path (and emits no namespace
/// for it): the outermost one, the task's own future, gets its path from
/// the harness frame right outside it, whose generic arguments name its
/// type (`poll<app::handler::{async_fn_env#0}, …>`).
pub(super) fn described_chain(frames: &[Frame]) -> Vec<String> {
    let chain = await_chain(frames);
    let mut described: Vec<String> = chain.iter().map(|frame| frame.describe()).collect();
    if let (Some(last), Some(harness)) = (described.last_mut(), first_harness(frames))
        && last.starts_with('{')
        && let Some(path) = frames[harness]
            .function
            .as_deref()
            .and_then(future_path_in_generics)
    {
        *last = format!("{path}::{last}");
    }
    described
}

/// `poll<app::handler::{async_fn_env#0}, …>` → `app::handler`.
fn future_path_in_generics(function: &str) -> Option<&str> {
    let args = &function[function.find('<')? + 1..];
    let end = args
        .find("::{async_fn_env#")
        .or_else(|| args.find("::{closure_env#"))?;
    let path = &args[..end];
    (!path.is_empty() && !path.contains(['<', ',', ' '])).then_some(path)
}

/// Where the task's stack ends: the first frame of tokio's harness.
fn first_harness(frames: &[Frame]) -> Option<usize> {
    frames.iter().position(is_task_harness)
}

pub(super) fn reaches_harness(frames: &[Frame]) -> bool {
    first_harness(frames).is_some()
}

/// The harness frame the task's own stack ends at, described with its
/// offset (`tokio::runtime::task::raw::poll+0x203`), when the symbol table
/// gives one: where a future inlined into the harness waits.
pub(super) fn harness_at(frames: &[Frame]) -> Option<String> {
    let harness = &frames[first_harness(frames)?];
    harness.symbol_offset.is_some().then(|| harness.describe())
}

/// tokio's task harness, where a task's poll starts (`raw::poll`,
/// `Harness::poll`, `Core::poll`…): the bottom of the task's own stack.
/// Not the rest of the task module, which captures start in (the waker's
/// clone, its inlined `State::ref_inc`), nor a `JoinHandle`'s read of its
/// task's output (`Harness::try_read_output`, in harness.rs too).
fn is_task_harness(frame: &Frame) -> bool {
    const HARNESS_PATHS: [&str; 6] = [
        "tokio::runtime::task::harness::",
        "tokio::runtime::task::core::",
        "tokio::runtime::task::raw::poll",
        // Where a `block_on` root future's poll starts (tracer-probes'
        // `block_on`): its loop, or the current-thread root poll's closure.
        "tokio::runtime::park::CachedParkThread::block_on",
        "tokio::park::thread::CachedParkThread::block_on",
        "tokio::runtime::scheduler::current_thread::Context::enter",
    ];
    const HARNESS_FILES: [&str; 2] = ["/runtime/task/harness.rs", "/runtime/task/core.rs"];
    let Some(function) = frame.function.as_deref() else {
        return false;
    };
    if function.contains("read_output") || function.contains("join_waker") {
        return false;
    }
    // The path itself, not its generic arguments (DWARF's short names
    // carry them: `with_mut<tokio::runtime::task::core::Stage<…>>`).
    let path = function.trim_start_matches('<');
    HARNESS_PATHS.iter().any(|p| path.starts_with(p))
        || frame.file.as_deref().is_some_and(|file| {
            file.contains("tokio") && HARNESS_FILES.iter().any(|f| file.ends_with(f))
        })
}

/// A frame of code that is not the program's own: by its source file (a
/// crate from the cargo registry, or the standard library, whose paths are
/// `/rustc/<hash>/library/…`) when debug info gives one, else by its path.
pub(super) fn is_library_frame(frame: &Frame) -> bool {
    match (&frame.file, &frame.function) {
        (Some(file), _) => {
            file.contains("/.cargo/registry/")
                || file.starts_with("/rustc/")
                || file.contains("/library/")
        }
        // Compiler-made helpers with no source (`__rust_try`, the
        // catch_unwind frame in every debug build's await stack) are not
        // the program's either.
        (None, Some(function)) => function.starts_with("__") || is_library_function(function),
        (None, None) => true,
    }
}

/// By path: tokio, the standard library, and the trait-impl forms of their
/// paths (`<tokio::… as core::…>::poll`).
fn is_library_function(function: &str) -> bool {
    const LIBRARIES: [&str; 5] = ["tokio::", "core::", "std::", "alloc::", "futures"];
    let path = function.trim_start_matches('<');
    LIBRARIES.iter().any(|library| path.starts_with(library))
}

/// Where a spawn was called: the innermost frame of the program's own code
/// at the spawn function's return address (tokio's `spawn` →
/// `spawn_inner` → `Handle::spawn` are often inlined there; their frames
/// are skipped), else the outermost frame there.
pub(super) fn spawned_at(frames: &[Frame]) -> Option<String> {
    frames
        .iter()
        .find(|frame| !is_library_frame(frame))
        .or(frames.last())
        .map(Frame::describe)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A frame of the program's own code, with line tables.
    pub(in crate::record) fn frame(function: &str, line: u32) -> Frame {
        Frame {
            address: 0x1000,
            function: Some(function.into()),
            file: Some("/src/app/src/main.rs".into()),
            line: Some(line),
            inlined: true,
            module: "/app".into(),
            symbol_offset: None,
        }
    }

    /// A frame without debug info: named from the symbol table only.
    fn symbol_only(function: &str) -> Frame {
        Frame {
            file: None,
            line: None,
            inlined: false,
            ..frame(function, 0)
        }
    }

    #[test]
    fn a_spawn_is_placed_at_the_programs_own_frame() {
        let tokio = |function: &str| Frame {
            file: Some("/root/.cargo/registry/src/x/tokio-1.54.1/src/task/spawn.rs".into()),
            ..frame(function, 168)
        };
        // tokio's spawn path inlined into the caller, innermost first.
        let frames = [
            tokio("tokio::runtime::handle::Handle::spawn"),
            tokio("tokio::task::spawn::spawn_inner"),
            tokio("tokio::task::spawn::spawn"),
            frame("app::main::{{closure}}", 12),
            frame("app::main", 10),
        ];
        assert_eq!(
            spawned_at(&frames).as_deref(),
            Some("app::main::{{closure}} (main.rs:12)")
        );
        // Not inlined: the address is inside tokio; say so rather than nothing.
        assert_eq!(
            spawned_at(&frames[..1]).as_deref(),
            Some("tokio::runtime::handle::Handle::spawn (spawn.rs:168)")
        );
        assert_eq!(spawned_at(&[]), None);
    }

    #[test]
    fn await_chain_keeps_the_programs_frames_between_waker_and_harness() {
        let frames = [
            symbol_only("tokio::runtime::task::waker::clone_waker"),
            symbol_only("<tokio::sync::notify::Notified as core::future::future::Future>::poll"),
            frame("app::middle::{{closure}}", 30),
            frame("app::outer::{{closure}}", 20),
            symbol_only("tokio::runtime::task::core::Core<T,S>::poll"),
            symbol_only("tokio::runtime::task::raw::poll"),
        ];
        let chain: Vec<String> = await_chain(&frames)
            .into_iter()
            .map(Frame::describe)
            .collect();
        assert_eq!(
            chain,
            [
                "app::middle::{{closure}} (main.rs:30)",
                "app::outer::{{closure}} (main.rs:20)"
            ]
        );
    }

    #[test]
    fn library_frames_are_recognised_by_their_source_file() {
        let mut std_frame = frame("clone", 619);
        std_frame.file = Some("/rustc/59807616e1fa/library/core/src/task/wake.rs".into());
        let mut tokio_frame = frame("defer", 25);
        tokio_frame.file = Some(
            "/root/.cargo/registry/src/index.crates.io-1949/tokio-1.54.1/src/runtime/defer.rs"
                .into(),
        );
        let mut harness = frame("poll_inner<app::outer::{async_fn_env#0}>", 3);
        harness.file = Some("/root/.cargo/registry/src/index.crates.io-1949/tokio-1.54.1/src/runtime/task/harness.rs".into());
        let frames = [std_frame, tokio_frame, frame("outer", 20), harness];
        let chain: Vec<String> = await_chain(&frames)
            .into_iter()
            .map(Frame::describe)
            .collect();
        assert_eq!(chain, ["outer (main.rs:20)"]);
    }

    #[test]
    fn library_functions_are_recognised_in_impl_form() {
        assert!(is_library_function(
            "<tokio::time::Sleep as core::future::Future>::poll"
        ));
        assert!(is_library_function("std::thread::sleep"));
        assert!(!is_library_function("my_app::handler::{{closure}}"));
    }

    #[test]
    fn a_chain_stops_at_the_harness_even_without_an_own_frame_before_it() {
        // The user's future inlined into Harness::poll (symbols only): the
        // first "own" frame beyond the harness is where block_on was
        // inlined, not where the task waits.
        let frames = [
            symbol_only("tokio::runtime::task::waker::clone_waker"),
            symbol_only("tokio::runtime::task::harness::Harness<T,S>::poll"),
            symbol_only("tokio::runtime::scheduler::current_thread::CoreGuard::block_on"),
            symbol_only("app::main"),
        ];
        assert!(await_chain(&frames).is_empty());
        assert!(reaches_harness(&frames));
        assert_eq!(harness_at(&frames), None, "no offset known");
        let mut with_offsets = frames.clone();
        with_offsets[1].symbol_offset = Some(0x5c);
        assert_eq!(
            harness_at(&with_offsets).as_deref(),
            Some("tokio::runtime::task::harness::Harness<T,S>::poll+0x5c")
        );
        // A JoinHandle's read of its output is not the harness.
        let join = [
            symbol_only("tokio::runtime::task::waker::clone_waker"),
            symbol_only("tokio::runtime::task::harness::Harness<T,S>::try_read_output"),
            frame("app::outer::{{closure}}", 20),
            symbol_only("tokio::runtime::task::raw::poll"),
        ];
        let chain: Vec<String> = await_chain(&join)
            .into_iter()
            .map(Frame::describe)
            .collect();
        assert_eq!(chain, ["app::outer::{{closure}} (main.rs:20)"]);
    }

    #[test]
    fn without_line_tables_two_awaits_of_one_function_differ_by_offset() {
        let at = |offset| Frame {
            symbol_offset: Some(offset),
            ..symbol_only("app::requester::{{closure}}")
        };
        let chain = |offset| {
            described_chain(&[
                symbol_only("tokio::runtime::task::waker::clone_waker"),
                symbol_only(
                    "<tokio::runtime::task::join::JoinHandle<T> as core::future::future::Future>::poll",
                ),
                at(offset),
                symbol_only("tokio::runtime::task::harness::Harness<T,S>::poll"),
            ])
        };
        assert_eq!(chain(0x80), ["app::requester::{{closure}}+0x80"]);
        assert_eq!(chain(0x13d), ["app::requester::{{closure}}+0x13d"]);
        // With a line, the line says it; an inlined frame has no offset.
        assert_eq!(
            Frame {
                symbol_offset: Some(0x80),
                ..frame("app::requester::{{closure}}", 7)
            }
            .describe(),
            "app::requester::{{closure}} (main.rs:7)"
        );
    }

    #[test]
    fn compiler_helpers_are_not_the_programs_frames() {
        assert!(is_library_frame(&symbol_only("__rust_try")));
        assert!(!is_library_frame(&symbol_only("app::handler::{{closure}}")));
    }

    #[test]
    fn line_table_async_fns_get_their_path_from_the_harness() {
        let mut harness = frame(
            "poll<app::handler::{async_fn_env#0}, alloc::sync::Arc<tokio::runtime::scheduler::multi_thread::handle::Handle>>",
            369,
        );
        harness.file =
            Some("/root/.cargo/registry/src/x/tokio-1.54.1/src/runtime/task/core.rs".into());
        let frames = [
            symbol_only("tokio::runtime::task::waker::clone_waker"),
            frame("{async_fn#0}", 30),
            frame("{async_fn#0}", 20),
            harness,
        ];
        assert_eq!(
            described_chain(&frames),
            [
                "{async_fn#0} (main.rs:30)",
                "app::handler::{async_fn#0} (main.rs:20)"
            ]
        );
        assert_eq!(future_path_in_generics("poll<T>"), None);
    }
}
