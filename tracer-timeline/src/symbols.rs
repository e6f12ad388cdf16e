//! Stacks with names, as typed values the writers look up while writing.
//!
//! Symbolization needs the whole recording's stacks and runs once, after
//! recording and before the trace is written (tracer's `stacks` module fills
//! this in). Outputs refer to stacks by [`StackId`] and to await points by
//! (task id, await key); writers intern what they need on first use, so
//! nothing in the trace is a placeholder to patch up later.

use std::collections::HashMap;
use std::sync::Arc;

pub use crate::output::StackId;

/// One frame of a symbolized stack (inlined calls are frames of their own).
///
/// The names are shared with the symbolizer's answer for the address and
/// with every other stack through it (a clone is a reference count, not a
/// copy of three strings: see `tracer_symbolize::Frame`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SymbolFrame {
    /// The instruction's address in the target.
    pub address: u64,
    /// The function's name, when known.
    pub function: Option<Arc<str>>,
    pub file: Option<Arc<str>>,
    pub line: Option<u32>,
    /// Inlined into the frame below it (same address).
    pub inlined: bool,
    /// The file the address is in (executable or library).
    pub module: Arc<str>,
    /// The address's offset in its symbol, on the frame whose code it is
    /// (not an inlined one), when the symbol table covers it.
    pub symbol_offset: Option<u64>,
}

impl SymbolFrame {
    /// The function's name, or its address when unknown.
    pub fn function_name(&self) -> String {
        match &self.function {
            Some(name) => name.to_string(),
            None => format!("{:#x}", self.address),
        }
    }

    /// "function (file.rs:line)", or as much of it as is known; without
    /// line tables "function+0x1a3" (the offset in the function's symbol),
    /// so that two calls in one function are told apart.
    pub fn describe(&self) -> String {
        let function = self.function_name();
        let short_file = |file: &str| file.rsplit('/').next().unwrap_or(file).to_owned();
        match (&self.file, self.line, self.symbol_offset) {
            (Some(file), Some(line), _) => format!("{function} ({}:{line})", short_file(file)),
            (Some(file), None, _) => format!("{function} ({})", short_file(file)),
            (None, _, Some(offset)) if self.function.is_some() => {
                format!("{function}+{offset:#x}")
            }
            _ => function,
        }
    }
}

/// What kind of tokio primitive a task waits on (see [`WaitsOn`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WaitKind {
    /// A `Sleep`, an `Interval`, a timeout's deadline.
    Timer,
    /// A socket's (or any I/O resource's) read readiness: read, accept, recv.
    IoRead,
    /// Write readiness: write, connect, send.
    IoWrite,
    /// I/O readiness whose direction the stack does not show.
    Io,
    /// A channel's receive (mpsc, oneshot, broadcast, watch).
    Recv,
    /// A channel's send (a bounded mpsc's capacity) or its `closed()`.
    Send,
    /// A `Mutex`, `RwLock` or `OnceCell`.
    Lock,
    /// A `Semaphore` acquire.
    Semaphore,
    /// A `Notify`.
    Notify,
    /// A `JoinHandle` (another task's end).
    Join,
    /// A `spawn_blocking` call's `JoinHandle`.
    Blocking,
    /// `yield_now`, or tokio's cooperative budget ran out.
    Yield,
}

impl WaitKind {
    /// The name in traces and `--summary-json`.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitKind::Timer => "timer",
            WaitKind::IoRead => "io_read",
            WaitKind::IoWrite => "io_write",
            WaitKind::Io => "io",
            WaitKind::Recv => "recv",
            WaitKind::Send => "send",
            WaitKind::Lock => "lock",
            WaitKind::Semaphore => "semaphore",
            WaitKind::Notify => "notify",
            WaitKind::Join => "join",
            WaitKind::Blocking => "blocking",
            WaitKind::Yield => "yield",
        }
    }
}

/// The tokio primitive a task waits on: the leaf of its await stack,
/// nearest the waker registration (`time::Interval::tick`, kind
/// `timer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WaitsOn {
    pub kind: WaitKind,
    /// For people: the API the program called, as tokio's docs name it.
    pub name: &'static str,
}

impl WaitsOn {
    /// `"timer: time::Interval::tick"`: the traces' `waits_on`
    /// (the kind, up to the first ": ", is for queries).
    pub fn label(&self) -> String {
        format!("{}: {}", self.kind.as_str(), self.name)
    }
}

/// Where a task waits after a poll: the await chain from the innermost frame
/// of the program's own code out to the task's future, described.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AwaitPoint {
    /// Innermost first; empty only when `inlined_into_harness`.
    pub chain: Vec<String>,
    /// The stack reached tokio's task harness without a frame of the
    /// program's own: the task's future was inlined there (a build without
    /// DWARF), so only the task's type can say where it waits.
    pub inlined_into_harness: bool,
    /// Where in the harness, when `inlined_into_harness` and the symbol
    /// table says (`tokio::runtime::task::raw::poll+0x203`): tells two
    /// awaits of such a future apart.
    pub harness_at: Option<String>,
    /// The tokio primitive it waits on, when the stack shows one.
    pub waits_on: Option<WaitsOn>,
}

impl AwaitPoint {
    /// Where the task waits: the innermost frame of the program's own code,
    /// or, where its future was inlined into tokio's harness, its type
    /// (`task_type`, the polled task's full type name).
    pub fn waits_at(&self, task_type: Option<&str>) -> Option<String> {
        match self.chain.first() {
            Some(innermost) => Some(innermost.clone()),
            None if self.inlined_into_harness => task_type.map(|name| match &self.harness_at {
                Some(at) => format!("{name} (inlined into tokio's task harness at {at})"),
                None => format!("{name} (inlined into tokio's task harness)"),
            }),
            None => None,
        }
    }

    /// The await stack, one frame per entry (the `waits_at` alone where the
    /// task's future was inlined into the harness).
    pub fn stack(&self, task_type: Option<&str>) -> Vec<String> {
        if self.chain.is_empty() {
            self.waits_at(task_type).into_iter().collect()
        } else {
            self.chain.clone()
        }
    }
}

/// Every stack of a recording, symbolized.
///
/// Await points are kept once per distinct chain: every task of a type
/// waits at the same few places, and a busy server makes millions of tasks.
#[derive(Clone, Debug, Default)]
pub struct Symbols {
    /// By [`StackId`]: frames innermost first.
    pub stacks: Vec<Vec<SymbolFrame>>,
    /// (task id, await key) → index in `await_chains`.
    pub await_points: crate::FastMap<(u64, u64), u32>,
    pub await_chains: Vec<AwaitPoint>,
    /// Spawn call sites (the address `spawn` returns to) → where the spawn
    /// was called, described ("app::main (main.rs:12)").
    pub call_sites: HashMap<u64, String>,
}

impl Symbols {
    /// Where a spawn with this call site was called from, if symbolized.
    pub fn call_site(&self, address: u64) -> Option<&str> {
        if address == 0 {
            return None;
        }
        self.call_sites.get(&address).map(String::as_str)
    }

    pub fn stack(&self, id: StackId) -> &[SymbolFrame] {
        self.stacks.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Where task `task_id` waits at await point `key` (the key a poll's
    /// slice carries), with the chain's index (the same for every task
    /// waiting there); None when the key is 0 or its stack is unknown.
    pub fn await_point(&self, task_id: u64, key: u64) -> Option<(u32, &AwaitPoint)> {
        if key == 0 {
            return None;
        }
        let index = *self.await_points.get(&(task_id, key))?;
        let point = self.await_chains.get(index as usize)?;
        (!point.chain.is_empty() || point.inlined_into_harness).then_some((index, point))
    }
}
