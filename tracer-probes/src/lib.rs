//! Finds where to put uprobes in an unmodified tokio program, and names the
//! task types those probes will see.
//!
//! The flow, in [`discover()`]: read the ELF's function symbols, match them
//! against the [`catalog`] of tokio functions, work out each site's file offset
//! (what the kernel's uprobe attach wants), choose the instruction its entry
//! probe replaces so the kernel can emulate it ([`placement`]), and name the
//! `T` of each `tokio::runtime::task::raw::poll::<T, S>` instance
//! ([`naming`]), from DWARF when the binary has it, else from its symbols.
//!
//! For `dump`: where each task type's vtable is ([`vtables`]), and the
//! layouts of task cells and async state machines from DWARF ([`futures`]).

pub mod block_on;
pub mod catalog;
pub mod disasm;
pub mod discover;
pub mod features;
pub mod futures;
pub mod naming;
pub mod placement;
pub mod poll_code;
pub mod return_sites;
pub mod vtables;

mod dwarf;
pub mod generics;
mod image;
mod symbols;
mod table;
mod unwind;
mod version;

pub use discover::discover;
pub use placement::Cost;
pub use table::write_table;

/// Which kind of tokio function a probe site is. Poll and park sites measure
/// a span: a park gets an entry uprobe and a uretprobe; a poll gets an entry
/// uprobe, and its end is probed where `raw::poll` returns to
/// ([`ProbePlan::poll_returns`]), or by a uretprobe when no such place was
/// found. The others mark an instant with one probe: an entry uprobe, or a
/// uretprobe where the task comes back in the return value
/// ([`TaskArg::ReturnValue`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SiteKind {
    /// `tokio::runtime::task::raw::poll`: one task is polled once.
    Poll,
    /// A scheduler's park function: the worker has nothing to do and sleeps.
    Park,
    /// A new task joins the runtime's owned-task list (`OwnedTasks::bind_inner`;
    /// where that is inlined, the schedulers' `bind_new_task` /
    /// `current_thread::Handle::spawn`, then `OwnedTasks::bind`).
    Spawn,
    /// A task's waker is woken (`task::waker::wake_by_val` / `wake_by_ref`).
    Wake,
    /// A task leaves its runtime's owned-task list, completed or cancelled
    /// (`OwnedTasks::remove`); where that is inlined (fat LTO), its memory is
    /// freed (`task::raw::dealloc`), which misses tasks freed inside tokio's
    /// harness.
    TaskEnd,
    /// A sleeping multi-thread worker is woken (`park::Unparker::unpark`).
    Unpark,
    /// A polled task clones its waker: where it waits (`waker::clone_waker`).
    AwaitPoint,
    /// A `block_on<F>` loop (`CachedParkThread::block_on`): its root future
    /// `F` is polled inline there, between the thread parker's parks (see
    /// [`block_on`]). The site's task type is `F`.
    BlockOn,
    /// The thread parker's park (`park::Inner::park`): inside a `block_on`
    /// loop, the root future's poll ended and the thread sleeps.
    RootPark,
    /// The `block_on` loop's own park (`CachedParkThread::park`), which only
    /// `block_on` calls: a thread parking there is in a `block_on` loop
    /// even when the loop's entry was not seen.
    BlockOnPark,
    /// The thread parker's waker is woken (`park::wake`): the root future's.
    RootWake,
    /// The current-thread scheduler's poll of its root future: the
    /// `Context::enter` instance its `block_on` loop polls the root in (see
    /// [`block_on`]). The site's task type is the root future's.
    RootPoll,
}

impl SiteKind {
    /// Does this kind measure a span? Its sites may get a uretprobe (parks
    /// always, polls where no return site was found), so their entry probe
    /// stays on the first instruction.
    pub fn needs_return_probe(self) -> bool {
        matches!(
            self,
            SiteKind::Poll
                | SiteKind::Park
                | SiteKind::BlockOn
                | SiteKind::RootPark
                | SiteKind::BlockOnPark
                | SiteKind::RootPoll
        )
    }

    /// The lower-case name used in tables and messages.
    pub fn name(self) -> &'static str {
        match self {
            SiteKind::Poll => "poll",
            SiteKind::Park => "park",
            SiteKind::Spawn => "spawn",
            SiteKind::Wake => "wake",
            SiteKind::TaskEnd => "task end",
            SiteKind::Unpark => "unpark",
            SiteKind::AwaitPoint => "await",
            SiteKind::BlockOn => "block_on",
            SiteKind::RootPark => "root park",
            SiteKind::BlockOnPark => "block_on park",
            SiteKind::RootWake => "root wake",
            SiteKind::RootPoll => "root poll",
        }
    }
}

/// Which argument register holds the task's `Header` pointer when the entry
/// probe fires: what the eBPF program for the site must read (System V
/// x86-64 calling convention: argument 0 in RDI, argument 1 in RSI).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskArg {
    /// No argument identifies a task (park, unpark).
    None,
    /// Argument 0.
    Rdi,
    /// Argument 1.
    Rsi,
    /// Argument 1 points at the header pointer (`&Task<S>`).
    RsiDeref,
    /// Not on entry: the header is in the return value (RAX, or RDX when RAX
    /// is null), read by a return probe. For `OwnedTasks::bind`, which
    /// returns `(JoinHandle, Option<Notified>)` — two pointers to the new
    /// task, in registers.
    ReturnValue,
}

impl TaskArg {
    /// The registers an entry probe reading this argument depends on: where
    /// [`placement`] must not let the probe move past a write.
    pub fn probe_inputs(self) -> placement::ProbeInputs {
        use iced_x86::Register;
        let registers: &'static [Register] = match self {
            TaskArg::None | TaskArg::ReturnValue => &[],
            TaskArg::Rdi => &[Register::RDI],
            TaskArg::Rsi | TaskArg::RsiDeref => &[Register::RSI],
        };
        placement::ProbeInputs {
            registers,
            reads_stack: false,
        }
    }
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
    /// How many other future types may be polled by this same code (LLVM
    /// merged identical functions, see `naming::mark_merged`); 0 when the
    /// name is the only one. The names then say so.
    pub merged: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameSource {
    /// The debug info's description of the `raw::poll` instance.
    Dwarf,
    /// The names of functions the `raw::poll` instance calls (or its own v0 symbol).
    Symbols,
}

/// One function to probe.
#[derive(Clone, Debug)]
pub struct ProbeSite {
    pub kind: SiteKind,
    /// Demangled, without the hash. When identical code folding gave several
    /// symbols the same address, their names joined with " | ".
    pub symbol: String,
    /// ELF virtual address (`st_value`) of the function.
    pub address: u64,
    /// Offset in the file of the function's first instruction: where the
    /// uretprobe attaches (see [`ProbeSite::needs_return_probe`]).
    pub file_offset: u64,
    /// The first instruction in Intel syntax, e.g. `jmp 2EF80h`; "?" if undecodable.
    pub first_instruction: String,
    /// Offset in the file where the entry uprobe goes: `file_offset` or, for
    /// an entry-only site, a cheaper instruction further on (see [`placement`]).
    pub probe_offset: u64,
    /// The instruction at `probe_offset` in Intel syntax; "?" if undecodable.
    pub probe_instruction: String,
    /// Whether the kernel emulates or single-steps the probed instruction.
    pub cost: Cost,
    /// A uretprobe may go at `file_offset` too (parks, spawns read on
    /// return, and polls when the plan has no `poll_returns`), so the entry
    /// probe stays on the first instruction.
    pub needs_return_probe: bool,
    /// Which register the entry probe's eBPF program reads the task from.
    pub task_arg: TaskArg,
    /// Poll sites only; `None` when nothing named it (shown as `task@<address>`).
    pub task_type: Option<TaskType>,
}

/// Everything the tracer needs to attach to one binary.
#[derive(Clone, Debug)]
pub struct ProbePlan {
    pub binary: std::path::PathBuf,
    /// The binary has no `.symtab`.
    pub stripped: bool,
    /// The binary has DWARF (`.debug_info`): file:line in stacks.
    pub debug_info: bool,
    /// The tokio version compiled in, e.g. "1.54.1", if the binary says.
    pub tokio_version: Option<String>,
    /// The attach cookie of a site is its index here. Poll sites come first,
    /// then park, spawn, wake, task end, unpark and await sites, then the
    /// `block_on` root's (loops, parks, wakes, current-thread root polls),
    /// each kind in address order.
    pub sites: Vec<ProbeSite>,
    /// Where the eBPF side finds a task's id, for this tokio version.
    pub task_id_layout: tracer_common::TaskIdLayout,
    /// Where `raw::poll` returns to: the instruction after each call of a
    /// task vtable's `poll` (see [`return_sites`]), deduplicated, in order
    /// of the probed address.
    pub poll_returns: Vec<ReturnSite>,
    /// Poll ends need uretprobes on `raw::poll` too: no return site was
    /// found for some scheduler the binary runs (or none at all). Where
    /// both fire, the uretprobe ends the poll and the return site finds
    /// nothing open.
    pub poll_end_uretprobes: bool,
    /// Poll sites found but not probed, with why (see
    /// [`catalog::RUNTIME_THREAD_TASKS`]).
    pub skipped: Vec<(ProbeSite, &'static str)>,
    /// Things the user should know that don't stop tracing (e.g. no park
    /// function found: polls are traced, idle time is not).
    pub warnings: Vec<PlanWarning>,
}

/// Something the user should know that doesn't stop tracing: which probes
/// it concerns (the watch tier uses only the park probes, so the others'
/// warnings matter to it only when it escalates to the full probes), and
/// the text for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanWarning {
    pub about: WarningAbout,
    pub text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WarningAbout {
    /// The park probes: idle time, and the watch tier's busy share and hogs.
    Parks,
    /// Poll probes: where poll ends are probed, and at what cost.
    Polls,
    /// Spawn, wake, end, unpark and await probes.
    Events,
    /// Task ids read from the task header.
    TaskIds,
}

impl PlanWarning {
    fn new(about: WarningAbout, text: impl Into<String>) -> Self {
        PlanWarning {
            about,
            text: text.into(),
        }
    }
}

impl std::fmt::Display for PlanWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// One place `raw::poll` returns to, and the entry-style probe that marks
/// the end of the poll there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReturnSite {
    /// The demangled function holding the call (folded symbols' names
    /// joined with " | ").
    pub function: String,
    /// Virtual address of the `call qword ptr [reg]`.
    pub call_address: u64,
    /// Virtual address of the instruction after the call.
    pub return_address: u64,
    /// Virtual address of the probed instruction: the return address or an
    /// instruction on the straight-line run after it.
    pub address: u64,
    /// Offset in the file of the probed instruction: where the uprobe attaches.
    pub file_offset: u64,
    /// The probed instruction in Intel syntax.
    pub instruction: String,
    /// Whether the kernel emulates or single-steps the probed instruction.
    pub cost: Cost,
}
