//! Stack captures: unwound as they are drained (cheap, and only possible
//! while the target's files are mapped), interned, and symbolized once after
//! recording.
//!
//! Two kinds arrive from the eBPF side: the stack of a task registering its
//! waker (where it waits; one capture per task and await point) and CPU
//! samples. The trace refers to stacks through deferred values that
//! [`StackTable::resolve`] fills in when the trace file is finished.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tracer_common::{STACK_HEADER_SIZE, StackHeader, StackKind};
use tracer_symbolize::{CapturedStack, Frame, ProcessMaps, Symbolizer, Unwinder};

/// An interned stack: its index in [`StackTable::stacks`].
pub type StackId = u32;

/// Unwinding state, made at the first capture (for a launched command the
/// program's libraries are only mapped by then).
/// How often /proc/PID/maps is read while the uretprobe trampoline is not
/// mapped yet (a read costs tens of microseconds; samples come thousands of
/// times a second).
const TRAMPOLINE_LOOKUP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

struct Unwinding {
    unwinder: Unwinder,
    /// The kernel's uretprobe trampoline: a frame there whose real return
    /// address is unknown (a probed park function's) is cut, not shown.
    trampoline: Option<std::ops::Range<u64>>,
    /// When /proc/PID/maps was last read for the trampoline while it was not
    /// mapped yet.
    trampoline_looked_for: std::time::Instant,
    /// The maps as read then, to reopen the files by path once the process
    /// is gone.
    maps_text: String,
}

pub struct StackTable {
    pid: u32,
    unwinding: Option<Unwinding>,
    /// Why unwinding could not start, if it couldn't (reported once).
    unwind_error: Option<String>,
    stacks: Vec<Vec<u64>>,
    ids: HashMap<Vec<u64>, StackId>,
    /// Where each task waits: (task id, await key) → stack.
    await_stacks: HashMap<(u64, u64), StackId>,
    /// CPU samples by (task type site, stack), for `--folded`.
    folded: HashMap<(Option<u32>, StackId), u64>,
    pub samples: u64,
    pub await_captures: u64,
    /// Captures with no stack to show: none could be read, or it unwound
    /// to no frame.
    pub empty_captures: u64,
}

/// A stack capture read from the ring buffer.
pub struct Capture<'a> {
    pub header: StackHeader,
    pub data: &'a [u8],
}

impl<'a> Capture<'a> {
    /// Splits a `STACKS` ring-buffer record; None if it is too short.
    pub fn parse(record: &'a [u8]) -> Option<Self> {
        if record.len() < STACK_HEADER_SIZE {
            return None;
        }
        // SAFETY: the eBPF side writes a `StackHeader` first; read_unaligned
        // copes with the ring buffer's alignment.
        let header: StackHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
        let len = (header.len as usize).min(record.len() - STACK_HEADER_SIZE);
        Some(Capture {
            header,
            data: &record[STACK_HEADER_SIZE..STACK_HEADER_SIZE + len],
        })
    }
}

impl StackTable {
    pub fn new(pid: u32) -> Self {
        StackTable {
            pid,
            unwinding: None,
            unwind_error: None,
            stacks: Vec::new(),
            ids: HashMap::new(),
            await_stacks: HashMap::new(),
            folded: HashMap::new(),
            samples: 0,
            await_captures: 0,
            empty_captures: 0,
        }
    }

    /// Unwinds and interns one capture. Returns the stack, if it unwound; a
    /// sample's is counted by [`count_sample`](Self::count_sample) once its
    /// task's type is known.
    pub fn add(&mut self, capture: &Capture) -> Option<StackId> {
        let header = &capture.header;
        let id = self.unwind(capture)?;
        if header.kind == StackKind::AwaitPoint as u32 {
            self.await_captures += 1;
            self.await_stacks.insert((header.task_id, header.key), id);
        }
        Some(id)
    }

    /// Counts a CPU sample of `stack` in a task of type `site` (None: no
    /// task, or one of unknown type), for the metadata and `--folded`.
    pub fn count_sample(&mut self, site: Option<u32>, stack: StackId) {
        self.samples += 1;
        *self.folded.entry((site, stack)).or_default() += 1;
    }

    fn unwind(&mut self, capture: &Capture) -> Option<StackId> {
        if capture.data.is_empty() {
            self.empty_captures += 1;
            return None;
        }
        if self.unwinding.is_none() && self.unwind_error.is_none() {
            match start_unwinding(self.pid) {
                Ok(unwinding) => self.unwinding = Some(unwinding),
                Err(err) => {
                    log::warn!("stacks will not be unwound: {err:#}");
                    self.unwind_error = Some(format!("{err:#}"));
                }
            }
        }
        let unwinding = self.unwinding.as_mut()?;
        let header = &capture.header;
        // The kernel maps the trampoline at the process's first uretprobe
        // return: a poll's (when polls end by uretprobe, which `poll_return`
        // says) or a park's, which nothing announces; so look for it again
        // now and then until it is there.
        let look_again = header.poll_return != 0
            || unwinding.trampoline_looked_for.elapsed() >= TRAMPOLINE_LOOKUP_INTERVAL;
        if unwinding.trampoline.is_none() && look_again {
            unwinding.trampoline_looked_for = std::time::Instant::now();
            unwinding.trampoline = ProcessMaps::read(self.pid)
                .ok()
                .and_then(|maps| maps.uprobes_trampoline());
            if let Some(trampoline) = &unwinding.trampoline {
                unwinding
                    .unwinder
                    .set_uprobes_trampoline(trampoline.clone());
            }
        }
        let stack = CapturedStack {
            ip: header.ip,
            sp: header.sp,
            bp: header.bp,
            stack: capture.data,
        };
        // The running poll's uretprobe put the kernel's trampoline where its
        // return address was; the probe recorded the real one.
        let real_returns: &[u64] = if header.poll_return != 0 {
            &[header.poll_return]
        } else {
            &[]
        };
        let mut addresses = unwinding
            .unwinder
            .unwind_through_uretprobes(&stack, real_returns);
        if let Some(trampoline) = &unwinding.trampoline
            && let Some(cut) = addresses
                .iter()
                .position(|address| trampoline.contains(address))
        {
            addresses.truncate(cut);
        }
        if addresses.is_empty() {
            // Taken in the trampoline itself (a poll returning through its
            // uretprobe): nothing of the task's own stack to show, and a
            // folded line needs at least one frame.
            self.empty_captures += 1;
            return None;
        }
        let next_id = self.stacks.len() as StackId;
        let id = *self.ids.entry(addresses.clone()).or_insert(next_id);
        if id == next_id {
            self.stacks.push(addresses);
        }
        Some(id)
    }

    /// The deferred-value keys of a task's await point: where it waits (the
    /// innermost frame of the program's own code) and the async call chain
    /// out from there.
    /// `site` is the polled task's probe site: where the program's own
    /// code was inlined into tokio's harness (no frame of its own without
    /// DWARF), the task's type names where it waits.
    pub fn await_keys(task_id: u64, key: u64, site: u32) -> (String, String) {
        (
            format!("waits_at:{task_id}:{key}:{site}"),
            format!("await_stack:{task_id}:{key}:{site}"),
        )
    }

    /// The deferred-value key of a stack.
    pub fn stack_key(id: StackId) -> String {
        format!("stack:{id}")
    }

    /// Symbolizes every stack seen; the result answers the trace's deferred
    /// values and writes `--folded`.
    pub fn symbolize(self, task_name: &dyn Fn(Option<u32>) -> String) -> Symbolized {
        let maps = match &self.unwinding {
            // While the process lives, its files open through /proc (other
            // mount namespaces, replaced files); afterwards, by path.
            Some(_) if Path::new(&format!("/proc/{}", self.pid)).exists() => {
                ProcessMaps::read(self.pid).ok()
            }
            Some(unwinding) => Some(ProcessMaps::parse(&unwinding.maps_text)),
            None => None,
        };
        let mut frames = Vec::with_capacity(self.stacks.len());
        if let Some(maps) = maps {
            let mut symbolizer = Symbolizer::new(&maps);
            let progress = Progress::new(self.stacks.len());
            for (done, addresses) in self.stacks.iter().enumerate() {
                let stack: Vec<Frame> = addresses
                    .iter()
                    .enumerate()
                    .flat_map(|(depth, &address)| symbolizer.symbolize(address, depth > 0))
                    .collect();
                frames.push(stack);
                progress.update(done + 1);
            }
            progress.finish();
        }
        let folded = self
            .folded
            .iter()
            .map(|(&(site, id), &count)| (task_name(site), id, count))
            .collect();
        Symbolized {
            frames,
            await_stacks: self.await_stacks,
            folded,
        }
    }
}

fn start_unwinding(pid: u32) -> Result<Unwinding> {
    let maps_text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading /proc/{pid}/maps"))?;
    let maps = ProcessMaps::read(pid)?;
    let unwinder = Unwinder::new(&maps)?;
    for (path, reason) in unwinder.skipped_modules() {
        log::info!("no unwind info for {path}: {reason}");
    }
    Ok(Unwinding {
        unwinder,
        trampoline: maps.uprobes_trampoline(),
        trampoline_looked_for: std::time::Instant::now(),
        maps_text,
    })
}

/// Stacks with names.
pub struct Symbolized {
    /// By stack id: frames innermost first, inlined frames included.
    frames: Vec<Vec<Frame>>,
    await_stacks: HashMap<(u64, u64), StackId>,
    /// (task name, stack, samples).
    folded: Vec<(String, StackId, u64)>,
}

impl Symbolized {
    /// The value for a deferred key (see [`StackTable::await_keys`] and
    /// [`StackTable::stack_key`]).
    /// `task_type` names a poll site's task type (see [`StackTable::await_keys`]).
    pub fn resolve(&self, key: &str, task_type: &dyn Fn(u32) -> Option<String>) -> Value {
        if let Some(rest) = key.strip_prefix("stack:") {
            let frames = rest
                .parse::<usize>()
                .ok()
                .and_then(|id| self.frames.get(id));
            return frames.map_or(Value::Null, |frames| {
                json!(frames.iter().map(describe).collect::<Vec<_>>())
            });
        }
        let Some((what, rest)) = key.split_once(':') else {
            return Value::Null;
        };
        let mut parts = rest.split(':').map(|p| p.parse::<u64>().unwrap_or(0));
        let (task_id, await_key) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        let site = parts.next().map(|site| site as u32);
        let frames = self
            .await_stacks
            .get(&(task_id, await_key))
            .and_then(|&id| self.frames.get(id as usize));
        let chain: Vec<String> = frames
            .map(|frames| described_chain(frames))
            .unwrap_or_default();
        match (what, chain.first()) {
            ("waits_at", Some(innermost)) => json!(innermost),
            ("await_stack", Some(_)) => json!(chain),
            // The stack reached tokio's harness without a frame of the
            // program's own: its future was inlined there (symbols only).
            ("waits_at", None) if frames.is_some_and(|f| reaches_harness(f)) => {
                site.and_then(task_type).map_or(Value::Null, |name| {
                    json!(format!("{name} (inlined into tokio's task harness)"))
                })
            }
            _ => Value::Null,
        }
    }

    /// Writes `task;outermost;…;innermost count` lines, the collapsed-stack
    /// format flamegraph tools read.
    pub fn write_folded(&self, path: &Path) -> Result<()> {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        let mut lines: Vec<(String, u64)> = self
            .folded
            .iter()
            .map(|(task, id, count)| {
                let frames = self
                    .frames
                    .get(*id as usize)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let mut names: Vec<String> = frames.iter().rev().map(folded_name).collect();
                names.insert(0, folded_task(task));
                (names.join(";"), *count)
            })
            .collect();
        lines.sort();
        for (stack, count) in lines {
            writeln!(out, "{stack} {count}")?;
        }
        out.flush()?;
        Ok(())
    }
}

/// The frames of an await stack that say where the task waits: from the
/// innermost frame of the program's own code (tokio's and the standard
/// library's frames of the waker registration trimmed off the top) out to
/// the task's future (tokio's harness and scheduler trimmed off the bottom).
fn await_chain(frames: &[Frame]) -> Vec<&Frame> {
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

/// The await chain, described. With line tables only, rustc names an
/// inlined async fn `{async_fn#0}` with no path (and emits no namespace
/// for it): the outermost one, the task's own future, gets its path from
/// the harness frame right outside it, whose generic arguments name its
/// type (`poll<app::handler::{async_fn_env#0}, …>`).
fn described_chain(frames: &[Frame]) -> Vec<String> {
    let chain = await_chain(frames);
    let mut described: Vec<String> = chain.iter().map(|frame| describe(frame)).collect();
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

fn reaches_harness(frames: &[Frame]) -> bool {
    first_harness(frames).is_some()
}

/// tokio's task harness, where a task's poll starts (`raw::poll`,
/// `Harness::poll`, `Core::poll`…): the bottom of the task's own stack.
/// Not the rest of the task module, which captures start in (the waker's
/// clone, its inlined `State::ref_inc`), nor a `JoinHandle`'s read of its
/// task's output (`Harness::try_read_output`, in harness.rs too).
fn is_task_harness(frame: &Frame) -> bool {
    const HARNESS_PATHS: [&str; 3] = [
        "tokio::runtime::task::harness::",
        "tokio::runtime::task::core::",
        "tokio::runtime::task::raw::poll",
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
fn is_library_frame(frame: &Frame) -> bool {
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

/// "function (file:line)", or as much of it as is known.
fn describe(frame: &Frame) -> String {
    let function = frame
        .function
        .clone()
        .unwrap_or_else(|| format!("{:#x}", frame.address));
    match (&frame.file, frame.line) {
        (Some(file), Some(line)) => format!("{function} ({}:{line})", short_file(file)),
        (Some(file), None) => format!("{function} ({})", short_file(file)),
        _ => function,
    }
}

fn short_file(file: &str) -> &str {
    file.rsplit('/').next().unwrap_or(file)
}

/// A frame name for the folded format: no spaces or semicolons.
fn folded_name(frame: &Frame) -> String {
    let name = frame
        .function
        .clone()
        .unwrap_or_else(|| format!("{:#x}", frame.address));
    name.replace([' ', ';'], "_")
}

fn folded_task(task: &str) -> String {
    task.replace([' ', ';'], "_")
}

/// A progress bar on stderr, only when symbolizing takes long enough to
/// wonder about, and only on a terminal.
struct Progress {
    total: usize,
    started: std::time::Instant,
    enabled: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        use std::io::IsTerminal;
        Progress {
            total,
            started: std::time::Instant::now(),
            enabled: std::io::stderr().is_terminal(),
        }
    }

    fn update(&self, done: usize) {
        if self.enabled
            && self.started.elapsed().as_millis() > 300
            && (done.is_multiple_of(64) || done == self.total)
        {
            let width = 30;
            let filled = done * width / self.total.max(1);
            eprint!(
                "\r\x1b[2Ksymbolizing [{}{}] {done}/{} stacks",
                "#".repeat(filled),
                " ".repeat(width - filled),
                self.total
            );
        }
    }

    fn finish(&self) {
        if self.enabled && self.started.elapsed().as_millis() > 300 {
            eprint!("\r\x1b[2K");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, line: u32) -> Frame {
        Frame {
            address: 0x1000,
            function: Some(function.to_string()),
            file: Some("/src/app/src/main.rs".to_string()),
            line: Some(line),
            inlined: true,
            module: "/app".to_string(),
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
    fn await_chain_keeps_the_programs_frames_between_waker_and_harness() {
        let frames = [
            symbol_only("tokio::runtime::task::waker::clone_waker"),
            symbol_only("<tokio::sync::notify::Notified as core::future::future::Future>::poll"),
            frame("app::middle::{{closure}}", 30),
            frame("app::outer::{{closure}}", 20),
            symbol_only("tokio::runtime::task::core::Core<T,S>::poll"),
            symbol_only("tokio::runtime::task::raw::poll"),
        ];
        let chain: Vec<String> = await_chain(&frames).into_iter().map(describe).collect();
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
        let chain: Vec<String> = await_chain(&frames).into_iter().map(describe).collect();
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
        // A JoinHandle's read of its output is not the harness.
        let join = [
            symbol_only("tokio::runtime::task::waker::clone_waker"),
            symbol_only("tokio::runtime::task::harness::Harness<T,S>::try_read_output"),
            frame("app::outer::{{closure}}", 20),
            symbol_only("tokio::runtime::task::raw::poll"),
        ];
        let chain: Vec<String> = await_chain(&join).into_iter().map(describe).collect();
        assert_eq!(chain, ["app::outer::{{closure}} (main.rs:20)"]);
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

    #[test]
    fn folded_names_have_no_separators() {
        assert_eq!(folded_name(&frame("a b;c", 1)), "a_b_c");
    }
}
