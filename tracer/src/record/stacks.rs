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

use super::await_chain::{describe, described_chain, reaches_harness};

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
    #[test]
    fn folded_names_have_no_separators() {
        assert_eq!(folded_name(&frame("a b;c", 1)), "a_b_c");
    }
}
