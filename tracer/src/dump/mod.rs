//! `rt-ebpf-trace dump --pid PID`: which tasks exist in a running tokio
//! program, and what each one is waiting for.
//!
//! Why: a trace shows tasks that run; a task stuck on a lock or a channel
//! is never polled, so only a look at the tasks themselves finds it.
//! tokio's own `Handle::dump()` needs `tokio_unstable` + `tokio_taskdump`
//! and a rebuild; this reads an unmodified binary's memory from outside.
//!
//! How, in order ([`dump`]):
//! 1. the binary's symbols give every `raw::poll::<T, S>` instance
//!    (`tracer_probes::discover`), and its data the task vtables that start
//!    with them (`tracer_probes::vtables`);
//! 2. its DWARF (or a separate debug file) the layouts: where each task's
//!    future sits, the async state machines (`tracer_probes::futures`);
//! 3. the heap is scanned for headers pointing at those vtables and each is
//!    validated ([`tasks`]), without stopping the target: reads are
//!    `process_vm_readv` ([`memory`]), the target is never written to;
//! 4. each task's await chain is read ([`chain`]), twice, together with its
//!    state: if they differ the task moved while read, and after three tries
//!    it is reported as raced rather than printed from mixed reads;
//! 5. [`output`] groups identical chains (text) or lists every task (JSON).

pub mod chain;
pub mod memory;
pub mod output;
pub mod tasks;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSegment};
use tracer_probes::futures::FutureLayouts;
use tracer_probes::{SiteKind, vtables};
use tracer_symbolize::{DebugFile, DebugInfoLocator};

use chain::{ChainReader, Frame};
use memory::{ProcessMemory, ReadError};
use tasks::{FoundTask, HeaderLayout, ScanStats};

/// Task ids at or above this are not ids (2^48: a million spawns a second
/// for nine years).
const MAX_TASK_ID: u64 = 1 << 48;

/// Reads of one task before it is reported as raced.
const ATTEMPTS: usize = 3;

/// What the binary's debug info allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugLevel {
    /// Type DIEs: futures, state machines and await points are read.
    Types,
    /// DWARF without the task types (line tables only, or `debug = 1`).
    NoTypes,
    /// No DWARF at all.
    None,
}

/// One live task.
#[derive(Clone, Debug)]
pub struct Task {
    pub header: u64,
    pub id: Option<u64>,
    /// The future type's full path, or `task@<poll address>`.
    pub future_type: String,
    pub state: u64,
    /// The runtime's `OwnedTasks` id.
    pub owner_id: Option<u64>,
    /// Empty when not readable (see `chain_note`).
    pub chain: Vec<Frame>,
    /// Why there is no chain, when there is none.
    pub chain_note: Option<&'static str>,
    /// Its state or chain changed in every read.
    pub raced: bool,
}

/// A whole dump.
#[derive(Clone, Debug)]
pub struct Dump {
    pub pid: u32,
    pub binary: String,
    pub tokio_version: Option<String>,
    pub debug: DebugLevel,
    /// Where the DWARF came from, when not the binary itself.
    pub debug_file: Option<PathBuf>,
    pub tasks: Vec<Task>,
    pub stats: ScanStats,
    pub raced: usize,
    /// Reading the binary and its DWARF.
    pub setup_ms: f64,
    /// Scanning and reading the tasks.
    pub read_ms: f64,
    /// Things the reader should know (what could not be read and why).
    pub notes: Vec<String>,
}

/// Dumps the tasks of process `pid`.
pub fn dump(pid: u32) -> Result<Dump> {
    let regions = memory::read_regions(pid)?;
    if has_exited(pid) {
        bail!("process {pid} has exited");
    }
    // Whatever failed from here on, a target that is gone is the reason.
    dump_process(pid, regions).map_err(|err| {
        if has_exited(pid) {
            anyhow::anyhow!("process {pid} exited during the dump")
        } else {
            err
        }
    })
}

fn dump_process(pid: u32, regions: Vec<memory::Region>) -> Result<Dump> {
    let setup_start = Instant::now();
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    let exe_path = match std::fs::read_link(&exe) {
        Ok(path) => path,
        Err(_) if has_exited(pid) => bail!("process {pid} exited during the dump"),
        Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
            bail!(
                "no permission to inspect process {pid}: run as root, or as its user where ptrace is allowed"
            )
        }
        Err(err) => return Err(err).with_context(|| format!("reading {}", exe.display())),
    };
    let data = std::fs::read(&exe).with_context(|| format!("reading {}", exe.display()))?;
    let inode = std::fs::metadata(&exe)?.ino();
    let plan = tracer_probes::discover(&exe).map_err(|err| {
        anyhow::anyhow!(
            "{}",
            format!("{err:#}").replace(&exe.display().to_string(), &exe_path.display().to_string())
        )
    })?;
    let file = object::File::parse(&*data).context("parsing the executable")?;

    // Every poll instance, including ones the tracer does not probe.
    let polls: Vec<(u64, String)> = plan
        .sites
        .iter()
        .chain(plan.skipped.iter().map(|(site, _)| site))
        .filter(|site| site.kind == SiteKind::Poll)
        .map(|site| {
            let name = site
                .task_type
                .as_ref()
                .map_or_else(|| format!("task@{:#x}", site.address), |t| t.full.clone());
            (site.address, name)
        })
        .collect();
    let poll_addresses: Vec<u64> = polls.iter().map(|(address, _)| *address).collect();
    let task_vtables = vtables::task_vtables(&file, &poll_addresses);
    if task_vtables.is_empty() {
        bail!(
            "{}: found tokio's poll functions but no task vtable holding them; this tokio layout is not supported",
            exe_path.display()
        );
    }

    let mut notes = Vec::new();
    let locator = DebugInfoLocator::default();
    let in_root = |path: &Path| PathBuf::from(format!("/proc/{pid}/root{}", path.display()));
    let (layouts, debug, debug_file) = match locator.find(&exe_path, &data, &in_root) {
        Some(found) => {
            let separate = match &found {
                DebugFile::Itself => None,
                DebugFile::Separate(path) => Some(path.clone()),
            };
            let debug_data: std::borrow::Cow<[u8]> = match &separate {
                Some(path) => std::fs::read(path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .into(),
                None => data.as_slice().into(),
            };
            let debug_object =
                object::File::parse(&*debug_data).context("parsing the debug file")?;
            let layouts = FutureLayouts::read(&debug_object, &poll_addresses)
                .context("reading the debug info")?;
            let level = if layouts.is_empty() {
                DebugLevel::NoTypes
            } else {
                DebugLevel::Types
            };
            (layouts, level, separate)
        }
        None => (FutureLayouts::default(), DebugLevel::None, None),
    };
    match debug {
        DebugLevel::Types => {}
        DebugLevel::NoTypes => notes.push(
            "the debug info has no type descriptions (line tables only?): tasks are listed with their \
             future types, but not where they wait; build with `debug = true` (or `debug = 2`) in the \
             profile, or install a debug file with full debug info, to see await points"
                .to_string(),
        ),
        DebugLevel::None => notes.push(
            "no debug info: tasks are listed with their future types, but not where they wait; build \
             with `debug = true` in the profile (a separate debug file found by build-id or \
             .gnu_debuglink works too) to see await points"
                .to_string(),
        ),
    }

    let header_layout = header_layout(&layouts, plan.tokio_version.as_deref(), &mut notes)?;
    let bias = load_bias(&file, &regions, inode).with_context(|| {
        format!(
            "cannot find where {} is loaded in process {pid}",
            exe_path.display()
        )
    })?;
    let poll_of_vtable: HashMap<u64, u64> = task_vtables
        .iter()
        .map(|v| (v.address.wrapping_add(bias), v.poll))
        .collect();
    let vtable_set: HashSet<u64> = poll_of_vtable.keys().copied().collect();
    let memory = ProcessMemory::new(pid);
    // The owned-list links: from DWARF, else tokio ≥ 1.23's trailer (its
    // offset in the vtable's word 7, `owned` its first field).
    let links: HashMap<u64, u64> = poll_of_vtable
        .iter()
        .filter_map(|(&vtable, poll)| {
            let offset = match layouts.tasks.get(poll) {
                Some(layout) => layout.links_offset?,
                None if debug != DebugLevel::Types => memory
                    .read_u64(vtable + 7 * 8)
                    .ok()
                    .filter(|&off| off < 1 << 16 && off.is_multiple_of(8))?,
                None => return None,
            };
            Some((vtable, offset))
        })
        .collect();
    let setup_ms = setup_start.elapsed().as_secs_f64() * 1e3;

    let read_start = Instant::now();
    let (found, stats) = tasks::scan(&memory, &regions, &vtable_set, &header_layout, &links)
        .map_err(|err| read_error(err, pid))?;
    if has_exited(pid) {
        bail!("process {pid} exited during the dump");
    }
    let names: HashMap<u64, &str> = polls.iter().map(|(a, n)| (*a, n.as_str())).collect();
    let mut reader = ChainReader::new(&memory, &layouts, bias);
    let mut tasks = Vec::with_capacity(found.len());
    for task in &found {
        let poll = poll_of_vtable[&task.vtable];
        let read = read_task(&mut reader, &memory, task, poll, &header_layout, debug);
        let mut task = match read {
            Ok(Some(task)) => task,
            Ok(None) | Err(ReadError::Unmapped) => continue, // freed meanwhile
            Err(err) => return Err(read_error(err, pid)),
        };
        task.future_type = names.get(&poll).copied().unwrap_or("?").to_string();
        tasks.push(task);
    }
    let ids: HashMap<u64, Option<u64>> = tasks.iter().map(|t| (t.header, t.id)).collect();
    for task in &mut tasks {
        chain::resolve_joins(&mut task.chain, &|header| ids.get(&header).copied());
    }
    let raced = tasks.iter().filter(|t| t.raced).count();
    tasks.sort_by_key(|t| (t.id.unwrap_or(u64::MAX), t.header));
    Ok(Dump {
        pid,
        binary: exe_path.display().to_string(),
        tokio_version: plan.tokio_version.clone(),
        debug,
        debug_file,
        tasks,
        stats,
        raced,
        setup_ms,
        read_ms: read_start.elapsed().as_secs_f64() * 1e3,
        notes,
    })
}

/// Reads one task: header again, id, and chain, until two reads agree.
fn read_task(
    reader: &mut ChainReader,
    memory: &ProcessMemory,
    found: &FoundTask,
    poll: u64,
    header_layout: &HeaderLayout,
    debug: DebugLevel,
) -> Result<Option<Task>, ReadError> {
    let layout = reader.layouts.tasks.get(&poll);
    let id_offset = match layout {
        Some(layout) => layout.id_offset,
        // tokio ≥ 1.23 without DWARF: the vtable's `id_offset` (word 9).
        None => {
            Some(memory.read_u64(found.vtable + 9 * 8)?).filter(|&off| off < 4096 && off % 8 == 0)
        }
    };
    let read_id = || -> Result<Option<u64>, ReadError> {
        match id_offset {
            Some(offset) => Ok(Some(memory.read_u64(found.header + offset)?).filter(|&id| id != 0)),
            None => Ok(None),
        }
    };
    // Ids count up from 1: a huge one is not a task's (a stale cell's).
    let implausible = |task: &Task| task.id.is_some_and(|id| id >= MAX_TASK_ID);
    // The cell up to the end of its future, copied at once per attempt.
    let cell_bytes = layout
        .and_then(|l| Some(l.future_offset + reader.layouts.types.get(&l.future_type)?.size))
        .unwrap_or(0)
        .max(id_offset.unwrap_or(0) + 8)
        .clamp(64, 64 << 10) as usize;
    let mut previous: Option<Task> = None;
    for _attempt in 0..ATTEMPTS {
        memory.snapshot(found.header, cell_bytes)?;
        let read = (|| {
            let Some(header) = tasks::read_header(memory, found.header, header_layout)? else {
                return Ok(None);
            };
            let (chain, note) =
                read_chain(reader, memory, found.header, header.state, layout, debug)?;
            Ok(Some(task(
                found,
                header.state,
                header.owner_id,
                read_id()?,
                chain,
                note,
            )))
        })();
        memory.forget_snapshot();
        let Some(task) = read? else {
            return Ok(None);
        };
        if implausible(&task) {
            return Ok(None);
        }
        // Read afresh: did the task change meanwhile?
        let state_after = memory.read_u64(found.header)?;
        let state_held = state_after & 0x3f == task.state & 0x3f;
        let chain_held =
            task.chain_note.is_some() || previous.as_ref().is_some_and(|p| p.chain == task.chain);
        if state_held && chain_held {
            return Ok(Some(task));
        }
        previous = Some(task);
    }
    let mut task = previous.expect("read at least once");
    task.raced = true;
    Ok(Some(task))
}

fn task(
    found: &FoundTask,
    state: u64,
    owner_id: Option<u64>,
    id: Option<u64>,
    chain: Vec<Frame>,
    chain_note: Option<&'static str>,
) -> Task {
    Task {
        header: found.header,
        id,
        future_type: String::new(),
        state,
        owner_id,
        chain,
        chain_note,
        raced: false,
    }
}

fn read_chain(
    reader: &mut ChainReader,
    memory: &ProcessMemory,
    header: u64,
    state: u64,
    layout: Option<&tracer_probes::futures::TaskFuture>,
    debug: DebugLevel,
) -> Result<(Vec<Frame>, Option<&'static str>), ReadError> {
    let Some(layout) = layout else {
        let note = match debug {
            DebugLevel::Types => "the debug info does not describe this task type",
            _ => "no type debug info",
        };
        return Ok((Vec::new(), Some(note)));
    };
    if state & tasks::COMPLETE != 0 {
        return Ok((
            Vec::new(),
            Some("finished: its output waits for the JoinHandle"),
        ));
    }
    if state & tasks::RUNNING != 0 {
        return Ok((Vec::new(), Some("running on a worker now")));
    }
    if let Some((discriminant, gone)) = &layout.stage {
        let value = memory.read_uint(header + discriminant.offset, discriminant.size)?;
        if gone.contains(&value) {
            return Ok((Vec::new(), Some("its future is gone (finished or dropped)")));
        }
    }
    let chain = reader.chain(header + layout.future_offset, layout.future_type)?;
    Ok((chain, None))
}

/// The header's field offsets: from DWARF, else tokio ≥ 1.23's.
fn header_layout(
    layouts: &FutureLayouts,
    version: Option<&str>,
    notes: &mut Vec<String>,
) -> Result<HeaderLayout> {
    if let Some(header) = layouts.header {
        return Ok(HeaderLayout {
            vtable: header.vtable,
            owner_id: header.owner_id,
            queue_next: header.queue_next,
        });
    }
    let minor = version
        .and_then(|v| v.strip_prefix("1."))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    if let Some(minor) = minor.filter(|&m| m < 23) {
        bail!(
            "tokio 1.{minor} without type debug info: its task header layout differs from 1.23's and is \
             only read from DWARF; build with `debug = true` to dump it"
        );
    }
    if minor.is_none() {
        notes.push(
            "the tokio version is unknown: assumed the task header of tokio ≥ 1.23 (vtable at offset 16, owner id at 24)"
                .into(),
        );
    }
    Ok(HeaderLayout {
        vtable: 16,
        owner_id: Some(24),
        queue_next: Some(8),
    })
}

/// Runtime minus ELF address of the executable's first loadable segment.
fn load_bias(file: &object::File, regions: &[memory::Region], inode: u64) -> Option<u64> {
    let first = file
        .segments()
        .map(|s| (s.address(), s.file_range().0))
        .min_by_key(|&(address, _)| address)?;
    memory::load_bias(regions, inode, first)
}

/// Gone, or a zombie (exited, not yet reaped: no memory left to read).
fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name's closing parenthesis.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

fn read_error(err: ReadError, pid: u32) -> anyhow::Error {
    match err {
        ReadError::Exited => anyhow::anyhow!("process {pid} exited during the dump"),
        ReadError::Permission => anyhow::anyhow!(
            "no permission to read process {pid}'s memory: run as root, or as its user where ptrace is allowed"
        ),
        ReadError::Unmapped => anyhow::anyhow!("process {pid}'s memory changed under the dump"),
    }
}
