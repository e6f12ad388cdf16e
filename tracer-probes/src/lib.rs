//! Finds where to put uprobes in an unmodified tokio program, and names the
//! task types those probes will see.
//!
//! The flow, in [`discover()`]: read the ELF's function symbols, match them
//! against the [`catalog`] of tokio functions, work out each site's file offset
//! (what the kernel's uprobe attach wants), decode its first instruction, and
//! name the `T` of each `tokio::runtime::task::raw::poll::<T, S>` instance
//! ([`naming`]), from DWARF when the binary has it, else from its symbols.

pub mod catalog;
pub mod disasm;
pub mod discover;
pub mod naming;

mod dwarf;
mod generics;
mod image;
mod symbols;
mod table;
mod version;

pub use discover::discover;
pub use table::write_table;

/// Which kind of tokio function a probe site is. Each site gets an entry
/// uprobe and a uretprobe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SiteKind {
    /// `tokio::runtime::task::raw::poll`: one task is polled once.
    Poll,
    /// A scheduler's park function: the worker has nothing to do and sleeps.
    Park,
}

/// The future type `T` of one `raw::poll::<T, S>` instance.
#[derive(Clone, Debug)]
pub struct TaskType {
    /// The full type path, e.g. `multi_worker::fixture_busy_task::{{closure}}`.
    pub full: String,
    /// A short display name: the last path segments that say what it is,
    /// keeping the function name, e.g. `fixture_busy_task::{{closure}}`.
    pub short: String,
    /// Where the name came from.
    pub source: NameSource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameSource {
    /// The debug info's description of the `raw::poll` instance.
    Dwarf,
    /// The names of functions the `raw::poll` instance calls (or its own v0 symbol).
    Symbols,
    /// Nothing said what it is.
    Unknown,
}

/// One function to probe.
#[derive(Clone, Debug)]
pub struct ProbeSite {
    pub kind: SiteKind,
    /// Demangled, without the hash. When identical code folding gave several
    /// symbols the same address, their names joined with " | ".
    pub symbol: String,
    /// ELF virtual address (`st_value`).
    pub address: u64,
    /// Offset in the file: what the kernel's uprobe attach wants.
    pub file_offset: u64,
    /// The first instruction in Intel syntax, e.g. `jmp 2EF80h`; "?" if undecodable.
    pub first_instruction: String,
    /// Poll sites only; `None` when nothing named it (shown as `task@<address>`).
    pub task_type: Option<TaskType>,
}

/// Everything the tracer needs to attach to one binary.
#[derive(Clone, Debug)]
pub struct ProbePlan {
    pub binary: std::path::PathBuf,
    /// The binary has no `.symtab`.
    pub stripped: bool,
    /// The tokio version compiled in, e.g. "1.54.1", if the binary says.
    pub tokio_version: Option<String>,
    /// The attach cookie of a site is its index here. Poll sites come first,
    /// then park sites, each in address order.
    pub sites: Vec<ProbeSite>,
    /// Where the eBPF side finds a task's id, for this tokio version.
    pub task_id_layout: tracer_common::TaskIdLayout,
    /// Poll sites found but not probed, with why (see
    /// [`catalog::RUNTIME_THREAD_TASKS`]).
    pub skipped: Vec<(ProbeSite, &'static str)>,
    /// Things the user should know that don't stop tracing (e.g. no park
    /// function found: polls are traced, idle time is not).
    pub warnings: Vec<String>,
}
