//! Stack captures: unwound as they are drained (cheap, and only possible
//! while the target's files are mapped), interned, and symbolized once after
//! recording.
//!
//! Two kinds arrive from the eBPF side: the stack of a task registering its
//! waker (where it waits; one capture per task and await point) and CPU
//! samples. [`StackTable::symbolize`] names them all once recording ends,
//! before the trace is written: the result is `tracer_timeline`'s typed
//! [`Symbols`], which the trace writers look up (and intern) as they go.

use std::collections::{HashMap, HashSet};
use std::io::Write;

use super::await_chain::{
    described_chain, harness_at, reaches_harness, registration_frames, spawned_at,
};
use super::symbol_prep::SymbolPrep;
use super::waits_on::waits_on;
use anyhow::{Context, Result};
use tracer_common::{STACK_HEADER_SIZE, StackHeader, StackKind};
use tracer_symbolize::{CapturedStack, Frame, ProcessMaps, Symbolizer, Unwinder};
pub use tracer_timeline::symbols::StackId;
use tracer_timeline::symbols::{AwaitPoint, SymbolFrame, Symbols};

/// Unwinding state, made at the first capture (for a launched command the
/// program's libraries are only mapped by then).
/// How often /proc/PID/maps is read while the uretprobe trampoline is not
/// mapped yet (a read costs tens of microseconds; samples come thousands of
/// times a second).
const TRAMPOLINE_LOOKUP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// How often at most it is read when a stack has a frame outside every
/// mapping known at the start: the trampoline, mapped since (a park's
/// uretprobe returned between two periodic reads; seen in the stack tests
/// as a bare `0x7fffffffe000` frame).
const UNKNOWN_FRAME_LOOKUP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);

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
    /// The same, parsed: which frames lie in known code.
    maps: ProcessMaps,
}

impl Unwinding {
    fn look_for_trampoline(&mut self, pid: u32) {
        self.trampoline_looked_for = std::time::Instant::now();
        self.trampoline = ProcessMaps::read(pid)
            .ok()
            .and_then(|maps| maps.uprobes_trampoline());
        if let Some(trampoline) = &self.trampoline {
            self.unwinder.set_uprobes_trampoline(trampoline.clone());
        }
    }

    /// A frame outside every file mapping known at the start, and not in
    /// the vDSO.
    fn has_unknown_frame(&self, addresses: &[u64]) -> bool {
        let vdso = self.maps.vdso().unwrap_or_default();
        addresses
            .iter()
            .any(|address| self.maps.find(*address).is_none() && !vdso.contains(address))
    }
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
    /// Spawn call sites seen (the address the spawn function returns to).
    call_sites: HashSet<u64>,
    /// /proc/PID/maps at the first call site, for when no capture came and
    /// the process is gone by the end.
    call_site_maps: Option<String>,
    /// The binary's symbols, being loaded while recording.
    prep: Option<SymbolPrep>,
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
            call_sites: HashSet::new(),
            call_site_maps: None,
            prep: None,
            await_captures: 0,
            empty_captures: 0,
        }
    }

    /// Starts loading the symbols of `exe` (the binary the probes are in)
    /// now, while recording, for [`Self::symbolize`] to use.
    pub fn prepare_symbols(&mut self, exe: &std::path::Path) {
        self.prep = SymbolPrep::start(self.pid, exe);
    }

    /// Notes a spawn's call site, to be symbolized with the stacks.
    pub fn add_call_site(&mut self, address: u64) {
        if address == 0 {
            return;
        }
        if self.call_sites.insert(address)
            && let Some(prep) = &self.prep
        {
            prep.look_up_soon([(address, true)]);
        }
        if self.call_site_maps.is_none() && self.unwinding.is_none() {
            // A process that has already exited (a zombie) has empty maps:
            // try again at the next spawn.
            self.call_site_maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid))
                .ok()
                .filter(|maps| !maps.is_empty());
        }
    }

    /// Unwinds and interns one capture. Returns the stack, if it unwound.
    pub fn add(&mut self, capture: &Capture) -> Option<StackId> {
        let header = &capture.header;
        let id = self.unwind(capture)?;
        if header.kind == StackKind::AwaitPoint as u32 {
            self.await_captures += 1;
            self.await_stacks.insert((header.task_id, header.key), id);
        }
        Some(id)
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
            unwinding.look_for_trampoline(self.pid);
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
        if unwinding.trampoline.is_none()
            && unwinding.trampoline_looked_for.elapsed() >= UNKNOWN_FRAME_LOOKUP_INTERVAL
            && unwinding.has_unknown_frame(&addresses)
        {
            unwinding.look_for_trampoline(self.pid);
        }
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
            if let Some(prep) = &self.prep {
                // Frames below the innermost are return addresses.
                let frames = addresses.iter().enumerate();
                prep.look_up_soon(frames.map(|(depth, &address)| (address, depth > 0)));
            }
            self.stacks.push(addresses);
        }
        Some(id)
    }

    /// Symbolizes every stack seen (with a progress bar on a terminal when
    /// it takes a while), and works out where each captured await point is.
    /// Also returns the CPU time the symbols' preparing took while recording
    /// (0 if none was started).
    pub fn symbolize(self) -> (Symbols, u64) {
        // Waits for the preparing if it is not done: it is further along
        // than starting over.
        let prepared = self.prep.map(SymbolPrep::finish);
        let prepare_cpu_ns = prepared.as_ref().map_or(0, |p| p.cpu_ns);
        // While the process lives, its files open through /proc (other mount
        // namespaces, replaced files); afterwards, by path. A launched
        // command that exited is a zombie until the end: /proc/PID is still
        // there, its maps are empty.
        let live_maps = || {
            ProcessMaps::read(self.pid)
                .ok()
                .filter(|maps| !maps.mappings().is_empty())
        };
        // The maps read at the first capture, or else at the first spawn.
        let maps_text = self
            .unwinding
            .as_ref()
            .map(|unwinding| unwinding.maps_text.as_str())
            .or(self.call_site_maps.as_deref());
        let maps = maps_text.map(|text| live_maps().unwrap_or_else(|| ProcessMaps::parse(text)));
        let mut stacks = Vec::with_capacity(self.stacks.len());
        let mut call_sites = HashMap::new();
        if let Some(maps) = maps {
            let mut symbolizer = Symbolizer::new(&maps);
            if let Some(prepared) = prepared.and_then(|p| p.symbolizer) {
                let adopted = symbolizer.adopt(prepared);
                log::info!("symbolizing with {adopted} module(s) loaded while recording");
            }
            for &address in &self.call_sites {
                // A return address: the call is the instruction before it.
                let frames: Vec<SymbolFrame> = symbolizer
                    .symbolize(address, true)
                    .iter()
                    .map(symbol_frame)
                    .collect();
                if let Some(at) = spawned_at(&frames) {
                    call_sites.insert(address, at);
                }
            }
            let progress = Progress::new(self.stacks.len());
            for (done, addresses) in self.stacks.iter().enumerate() {
                let mut stack = Vec::with_capacity(addresses.len());
                for (depth, &address) in addresses.iter().enumerate() {
                    let frames = symbolizer.symbolize(address, depth > 0);
                    stack.extend(frames.iter().map(symbol_frame));
                }
                stacks.push(stack);
                progress.update(done + 1);
            }
            progress.finish();
            // Not freed: the process exits once the trace is written, and
            // freeing addr2line's parsed units one allocation at a time
            // took ~30 ms of CPU after the stop (8 % of rendering 5 s of
            // the HTTP benchmark), for memory the exit returns at once.
            std::mem::forget(symbolizer);
        }
        // One chain per distinct stack, shared by every task waiting there.
        let mut chain_of_stack: HashMap<StackId, Option<u32>> = HashMap::new();
        let mut await_chains = Vec::new();
        let mut await_points = tracer_timeline::FastMap::default();
        for (&key, &id) in &self.await_stacks {
            let index = *chain_of_stack.entry(id).or_insert_with(|| {
                let frames = stacks.get(id as usize)?;
                if log::log_enabled!(log::Level::Trace) {
                    let described: Vec<String> = frames.iter().map(SymbolFrame::describe).collect();
                    log::trace!("await stack {id}: {}", described.join(" <- "));
                }
                let chain = described_chain(frames);
                let inlined_into_harness = chain.is_empty() && reaches_harness(frames);
                if chain.is_empty() && !inlined_into_harness {
                    return None;
                }
                await_chains.push(AwaitPoint {
                    chain,
                    inlined_into_harness,
                    harness_at: inlined_into_harness.then(|| harness_at(frames)).flatten(),
                    waits_on: waits_on(registration_frames(frames)),
                });
                Some(await_chains.len() as u32 - 1)
            });
            if let Some(index) = index {
                await_points.insert(key, index);
            }
        }
        let symbols = Symbols {
            stacks,
            await_points,
            await_chains,
            call_sites,
        };
        (symbols, prepare_cpu_ns)
    }
}

/// The symbolizer's frame as the timeline's (sharing its names).
pub(crate) fn symbol_frame(frame: &Frame) -> SymbolFrame {
    SymbolFrame {
        address: frame.address,
        function: frame.function.clone(),
        file: frame.file.clone(),
        line: frame.line,
        inlined: frame.inlined,
        module: frame.module.clone(),
        symbol_offset: frame.symbol_offset,
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
        maps,
    })
}

/// Writes CPU samples as `task;outermost;…;innermost count` lines, the
/// collapsed-stack format flamegraph tools read. `counts` are samples by
/// (task type name, stack).
pub fn write_folded(
    file: &mut std::fs::File,
    symbols: &Symbols,
    counts: &HashMap<(String, StackId), u64>,
) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(file);
    let mut lines: Vec<(String, u64)> = counts
        .iter()
        .map(|((task, id), &count)| {
            let mut names: Vec<String> = symbols.stack(*id).iter().rev().map(folded_name).collect();
            names.insert(0, folded_task(task));
            (names.join(";"), count)
        })
        .collect();
    lines.sort();
    for (stack, count) in lines {
        writeln!(out, "{stack} {count}")?;
    }
    out.flush()?;
    Ok(())
}

/// A frame name for the folded format: no spaces or semicolons.
fn folded_name(frame: &SymbolFrame) -> String {
    frame.function_name().replace([' ', ';'], "_")
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

    use crate::record::await_chain::tests::frame;

    #[test]
    fn folded_names_have_no_separators() {
        assert_eq!(folded_name(&frame("a b;c", 1)), "a_b_c");
    }
}
