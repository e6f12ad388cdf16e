//! From a captured watch stack to "which task type, doing what".
//!
//! A capture is unwound as it is drained (the target's files must be mapped
//! to read their CFI), and the task running is read off the unwound stack:
//! the innermost return address inside a task type's poll code (see
//! `tracer_probes::poll_code`). Frames are named only for what gets
//! reported or written (findings, the kept window), with the kernel's from
//! `/proc/kallsyms`.

use std::ops::Range;

use anyhow::{Context, Result};
use tracer_common::STACK_BYTES_MAX;
use tracer_common::watch::{WATCH_STACK_HEADER_SIZE, WatchStackHeader, WatchStackKind};
use tracer_symbolize::{CapturedStack, Mapping, ProcessMaps, Symbolizer, Unwinder};

use tracer_timeline::symbols::SymbolFrame;
use tracer_timeline::watch::KERNEL_MODULE;

use super::kernel::{KernelSymbols, is_machinery};
use crate::record::stacks::symbol_frame;

/// One unwound capture.
#[derive(Clone, Debug)]
pub struct Capture {
    pub ts_ns: u64,
    pub tid: u32,
    pub kind: WatchStackKind,
    /// `WATCH_*` flags.
    pub flags: u32,
    /// User return addresses, innermost first (the first is the ip).
    pub user: Vec<u64>,
    /// Kernel return addresses, innermost first (empty in user mode).
    pub kernel: Vec<u64>,
    /// The poll site (plan index) of the task running, if a poll was on the stack.
    pub site: Option<usize>,
    /// How many user frames lie inside that task's poll (above its poll frame).
    pub task_depth: usize,
    /// A park function's frame is on the user stack, with no task's poll
    /// inside it: the worker is in its park.
    pub in_park: bool,
    /// How many times the worker had entered its park function (the
    /// kernel's count: a hog run ends when it changes).
    pub parks: u32,
    /// In the kernel: the system call (-1 when none) and its first argument.
    pub syscall: u64,
    pub arg0: u64,
}

impl Capture {
    /// Bytes this capture holds in memory (for the flight recorder's bound).
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + 8 * (self.user.capacity() + self.kernel.capacity())
    }
}

pub struct StackReader {
    pid: u32,
    unwinder: Option<Unwinder>,
    /// Why unwinding is impossible, once known.
    unwind_error: Option<String>,
    /// The executable's mappings, to turn addresses into file offsets.
    exe_mappings: Vec<Mapping>,
    /// (file-offset range, poll site), sorted by range start.
    poll_code: Vec<(Range<u64>, usize)>,
    /// The park functions' file-offset ranges.
    park_code: Vec<Range<u64>>,
    symbolizer: Option<Symbolizer>,
    kernel: Option<KernelSymbols>,
    pub malformed: u64,
}

impl StackReader {
    pub fn new(
        pid: u32,
        exe: &std::path::Path,
        poll_code: &[tracer_probes::poll_code::PollCode],
        park_code: &[tracer_probes::poll_code::PollCode],
    ) -> Result<Self> {
        let maps = ProcessMaps::read(pid).with_context(|| format!("reading /proc/{pid}/maps"))?;
        let exe_path = std::fs::read_link(exe)
            .with_context(|| format!("reading {}", exe.display()))?
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string();
        let exe_mappings = maps
            .mappings()
            .iter()
            .filter(|mapping| mapping.path == exe_path)
            .cloned()
            .collect();
        let mut ranges: Vec<(Range<u64>, usize)> = poll_code
            .iter()
            .flat_map(|code| {
                code.ranges
                    .iter()
                    .map(move |range| (range.clone(), code.site))
            })
            .collect();
        ranges.sort_by_key(|(range, _)| range.start);
        let (unwinder, unwind_error) = match Unwinder::new(&maps) {
            Ok(unwinder) => (Some(unwinder), None),
            Err(err) => {
                log::warn!("stacks will not be unwound: {err:#}");
                (None, Some(format!("{err:#}")))
            }
        };
        Ok(StackReader {
            pid,
            unwinder,
            unwind_error,
            exe_mappings,
            poll_code: ranges,
            park_code: park_code
                .iter()
                .flat_map(|code| code.ranges.iter().cloned())
                .collect(),
            symbolizer: None,
            kernel: None,
            malformed: 0,
        })
    }

    /// Parses and unwinds one `WATCH_STACKS` record.
    pub fn read(&mut self, record: &[u8]) -> Option<Capture> {
        if record.len() < WATCH_STACK_HEADER_SIZE {
            self.malformed += 1;
            return None;
        }
        // SAFETY: the eBPF side writes a `WatchStackHeader` first.
        let header: WatchStackHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
        let kind = match header.kind {
            1 => WatchStackKind::Sample,
            2 => WatchStackKind::Switch,
            _ => {
                self.malformed += 1;
                return None;
            }
        };
        let len = (header.user_len as usize)
            .min(STACK_BYTES_MAX)
            .min(record.len() - WATCH_STACK_HEADER_SIZE);
        let data = &record[WATCH_STACK_HEADER_SIZE..WATCH_STACK_HEADER_SIZE + len];
        let user = match (&mut self.unwinder, header.ip) {
            (Some(unwinder), ip) if ip != 0 => unwinder.unwind(&CapturedStack {
                ip,
                sp: header.sp,
                bp: header.bp,
                stack: data,
            }),
            _ => Vec::new(),
        };
        let frames = (header.kernel_frames as usize).min(header.kernel.len());
        let kernel = header.kernel[..frames].to_vec();
        let (site, task_depth) = match self.task_frame(&user) {
            Some((depth, site)) => (Some(site), depth),
            None => (None, user.len()),
        };
        // Only a switch's: samples don't need it.
        let in_park = kind == WatchStackKind::Switch
            && site.is_none()
            && (self.park_frame(&user) || self.park_word(data));
        Some(Capture {
            ts_ns: header.ts_ns,
            tid: header.tid,
            kind,
            flags: header.flags,
            user,
            kernel,
            site,
            task_depth,
            in_park,
            parks: header.parks,
            syscall: header.syscall,
            arg0: header.arg0,
        })
    }

    /// Whether a word of the raw stack looks like a return address into a
    /// park function: the fallback when unwinding stopped short of the
    /// park's frame (no CFI, or no unwinder at all), so that a condvar park
    /// is not taken for blocking. Switches with no task frame only: a poll
    /// frame, when found, settles it.
    fn park_word(&self, stack: &[u8]) -> bool {
        stack.chunks_exact(8).any(|word| {
            let address = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            address > 0
                && self.file_offset(address - 1).is_some_and(|offset| {
                    self.park_code.iter().any(|range| range.contains(&offset))
                })
        })
    }

    /// Whether a return address on the stack lies in a park function.
    fn park_frame(&self, user: &[u64]) -> bool {
        user.iter().skip(1).any(|&address| {
            self.file_offset(address.saturating_sub(1))
                .is_some_and(|offset| self.park_code.iter().any(|range| range.contains(&offset)))
        })
    }

    /// The innermost frame in a task type's poll code: (its depth, the site).
    fn task_frame(&self, user: &[u64]) -> Option<(usize, usize)> {
        user.iter().enumerate().find_map(|(depth, &address)| {
            // A return address points after its call; the call is before it.
            let address = if depth == 0 {
                address
            } else {
                address.saturating_sub(1)
            };
            let offset = self.file_offset(address)?;
            let at = self
                .poll_code
                .partition_point(|(range, _)| range.start <= offset);
            let (range, site) = self.poll_code.get(at.checked_sub(1)?)?;
            range.contains(&offset).then_some((depth, *site))
        })
    }

    fn file_offset(&self, address: u64) -> Option<u64> {
        self.exe_mappings
            .iter()
            .find(|mapping| (mapping.start..mapping.end).contains(&address))
            .map(|mapping| address - mapping.start + mapping.file_offset)
    }

    /// Names the user frames of a capture that run inside its task (all of
    /// them when no task was found), innermost first, inlined functions
    /// included: `function (file:line)`. A sample in the poll function's
    /// own code names that function (the task's `async fn`), not nothing.
    pub fn user_frames(&mut self, capture: &Capture) -> Vec<String> {
        if self.symbolizer.is_none() {
            let maps = ProcessMaps::read(self.pid).unwrap_or_default();
            self.symbolizer = Some(Symbolizer::new(&maps));
        }
        let symbolizer = self.symbolizer.as_mut().expect("made above");
        let mut names = Vec::new();
        let frames = match capture.site {
            Some(_) => capture.task_depth.max(1),
            None => capture.task_depth,
        };
        for (depth, &address) in capture.user.iter().take(frames).enumerate() {
            for frame in symbolizer.symbolize(address, depth > 0) {
                let function = match &frame.function {
                    Some(name) => name.to_string(),
                    None => format!("{address:#x}"),
                };
                let name = match (&frame.file, frame.line) {
                    (Some(file), Some(line)) => {
                        let file = file.rsplit('/').next().unwrap_or(file);
                        format!("{function} ({file}:{line})")
                    }
                    _ => function,
                };
                names.push(name);
            }
        }
        names
    }

    /// The capture's whole stack, named, for a trace's callstack: the
    /// kernel frames innermost first (module `[kernel.kallsyms]`; the
    /// sampling and scheduling machinery at the top left out), then every
    /// user frame, inlined functions included, down to the thread's start.
    pub fn symbol_frames(&mut self, capture: &Capture) -> Vec<SymbolFrame> {
        let kernel = self.kernel.get_or_insert_with(KernelSymbols::load);
        let mut frames: Vec<SymbolFrame> = capture
            .kernel
            .iter()
            .map(|&address| (address, kernel.name(address)))
            .skip_while(|(_, name)| is_machinery(name))
            .map(|(address, name)| SymbolFrame {
                address,
                function: Some(name.into()),
                module: KERNEL_MODULE.into(),
                ..SymbolFrame::default()
            })
            .collect();
        if self.symbolizer.is_none() {
            let maps = ProcessMaps::read(self.pid).unwrap_or_default();
            self.symbolizer = Some(Symbolizer::new(&maps));
        }
        let symbolizer = self.symbolizer.as_mut().expect("made above");
        for (depth, &address) in capture.user.iter().enumerate() {
            frames.extend(
                symbolizer
                    .symbolize(address, depth > 0)
                    .iter()
                    .map(symbol_frame),
            );
        }
        frames
    }

    /// Names the kernel frames, innermost first.
    pub fn kernel_frames(&mut self, capture: &Capture) -> Vec<String> {
        let kernel = self.kernel.get_or_insert_with(KernelSymbols::load);
        capture
            .kernel
            .iter()
            .map(|&address| kernel.name(address).to_string())
            .collect()
    }

    /// Why stacks can't be unwound, if they can't.
    pub fn unwind_error(&self) -> Option<&str> {
        self.unwind_error.as_deref()
    }
}

/// Where a thread was, for people: the innermost kernel function that is
/// not scheduling machinery, then the innermost user frames.
pub fn where_line(kernel: &[String], user: &[String], user_frames: usize) -> String {
    let mut parts: Vec<&str> = Vec::new();
    if let Some(inner) = kernel.iter().find(|name| !is_machinery(name)) {
        parts.push(inner);
    }
    parts.extend(user.iter().take(user_frames).map(String::as_str));
    if parts.is_empty() {
        return "(no stack)".to_string();
    }
    parts.join(" <- ")
}
