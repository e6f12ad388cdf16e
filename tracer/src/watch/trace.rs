//! Writes the flight recorder's window as a trace: the thin caller of the
//! timeline's writers. What the window keeps is handed to
//! `tracer_timeline::watch::compose` as typed items (parks, off-CPU
//! spans, findings, samples, health records), which makes them the same
//! outputs a recording makes; the trace is then written by the writer the
//! file's name asks for, like a recording's: Perfetto protobuf by default
//! (`watch.pftrace`), Chrome JSON for `-o x.json`. An incident's trace is
//! this window followed by the detail recording in one file (see
//! [`incident`](super::incident)). Files go through
//! [`TraceFile`]/[`OutputFile`]: they appear, 0600, only when whole.
//!
//! In the trace: one track per worker, named as in the report ("tokio-rt-
//! worker (tid 42)"), with its parks and off-CPU spans (blocked or
//! preempted, with the sleep state) as slices, and its findings as slices
//! around them (the report's line, kind, task type, reason and stacks as
//! annotations; the whole stack as the slice's callstack in Perfetto);
//! CPU samples as callstack samples (kernel frames, then user frames,
//! under a root frame naming the task type), so a selection gives a
//! flamegraph; health records as instants on the process track and
//! counters (busy % per worker, workers busy, ms blocked and preempted).
//!
//! Stacks are named when the window is written, not while watching: the
//! first naming loads the binary's symbols (~200 ms, and tens of MiB of
//! RSS, NOTES.md), which a watcher that never writes never pays. Each
//! distinct stack is named once per trace.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::json;
use tracer_timeline::output::StackId;
use tracer_timeline::symbols::{SymbolFrame, Symbols};
use tracer_timeline::task_types::TaskTypes;
use tracer_timeline::watch::{
    FindingOutput, HealthRecord, TaskCpu, WatchItem, WatchWindow, WorkerShare, compose,
};
use tracer_timeline::writer::TraceInfo;

use super::detect::Health;
use super::keep::{FindingRecord, FlightRecorder, Kept};
use super::report::Names;
use super::stacks::{Capture, StackReader};
use crate::output_file::OutputFile;
use crate::record::trace_file::TraceFile;

/// What the trace's metadata says besides the window itself.
pub struct WindowInfo<'a> {
    pub process: &'a str,
    /// Why it was written: "exit", "SIGUSR1", "incident 2".
    pub reason: &'a str,
    pub keep_memory: u64,
    pub lost: u64,
    pub sample_hz: u64,
    /// Records drained from the rings since watching began.
    pub events: u64,
    /// Records too short or of an unknown kind.
    pub malformed: u64,
    /// An incident's detail start: parks, samples and off-CPU spans from
    /// then on are left out (the detail has them in full), and findings
    /// and health records from then on go to the window's tail.
    pub until_ns: Option<u64>,
}

/// Composes the window the recorder keeps, naming its stacks.
pub fn window(
    pid: u32,
    recorder: &FlightRecorder,
    names: &mut Names,
    reader: &mut StackReader,
    info: &WindowInfo,
) -> WatchWindow {
    let until = info.until_ns.unwrap_or(u64::MAX);
    let mut stacks = Stacks::default();
    let mut tids = BTreeSet::new();
    let mut items = Vec::new();
    for item in recorder.items() {
        let ts = item.ts_ns;
        let detailed = matches!(
            item.kept,
            Kept::Park { .. } | Kept::Sample(_) | Kept::OffCpu { .. }
        );
        if detailed && ts >= until {
            continue;
        }
        items.push(match &item.kept {
            Kept::Park { tid, end_ns } => {
                tids.insert(*tid);
                WatchItem::Park {
                    tid: *tid,
                    start_ns: ts,
                    end_ns: *end_ns,
                }
            }
            Kept::OffCpu {
                tid,
                duration_ns,
                preempted,
                state,
            } => {
                tids.insert(*tid);
                WatchItem::OffCpu {
                    tid: *tid,
                    start_ns: ts,
                    end_ns: ts + duration_ns,
                    preempted: *preempted,
                    state: *state,
                }
            }
            Kept::Sample(capture) => {
                tids.insert(capture.tid);
                WatchItem::Sample {
                    tid: capture.tid,
                    ts_ns: capture.ts_ns,
                    site: capture.site.map(|site| site as u32),
                    stack: stacks.intern(reader, capture),
                }
            }
            Kept::Finding(finding) => {
                tids.insert(finding.tid);
                WatchItem::Finding(Box::new(finding_output(
                    finding,
                    names,
                    reader,
                    &mut stacks,
                )))
            }
            Kept::Health(health) => {
                WatchItem::Health(Box::new(health_record(health, names, info.sample_hz)))
            }
        });
    }
    let threads: Vec<(u32, String)> = tids
        .into_iter()
        .map(|tid| (tid, names.worker(tid)))
        .collect();
    let composed = compose(&threads, items, info.until_ns);
    let (first, last) = recorder.span().unwrap_or((0, 0));
    let metadata = json!({
        "tracer": concat!("rt-ebpf-trace ", env!("CARGO_PKG_VERSION")),
        "tool": "rt-ebpf-trace watch",
        "written_on": info.reason,
        "target_pid": pid,
        "window_start_ns": first,
        "window_ns": last - first,
        "detail_start_ns": info.until_ns,
        "samples": composed.samples,
        "parks": composed.parks,
        "findings": composed.findings,
        "clipped_spans": composed.clipped,
        "sample_hz": info.sample_hz,
        "kept_bytes": recorder.bytes(),
        "keep_memory_bound": info.keep_memory,
        "dropped_for_memory": recorder.dropped_for_memory,
        "lost_events": info.lost,
        "events": info.events,
        "malformed_events": info.malformed,
    });
    WatchWindow {
        composed,
        stacks: stacks.frames,
        start_ns: if first == 0 {
            crate::clock::monotonic_ns()
        } else {
            first
        },
        metadata,
    }
}

/// Writes the kept window into `output` (published once whole), in the
/// format its name asks for. Returns its size in bytes.
pub fn write_window(
    output: OutputFile,
    types: &TaskTypes,
    recorder: &FlightRecorder,
    names: &mut Names,
    reader: &mut StackReader,
    info: &WindowInfo,
) -> Result<u64> {
    let pid = names.pid();
    let writing = std::time::Instant::now();
    let mut file = TraceFile::create(output)?;
    let WatchWindow {
        composed,
        stacks,
        start_ns,
        metadata,
    } = window(pid, recorder, names, reader, info);
    let trace = TraceInfo {
        pid,
        process_name: info.process.to_owned(),
        start_ns,
        types: types.clone(),
        symbols: Symbols {
            stacks,
            ..Symbols::default()
        },
    };
    let format = file.format();
    let mut writer = format.writer(&mut file, &trace)?;
    for output in composed.outputs.iter().chain(&composed.tail) {
        writer.write(output)?;
    }
    // The same line as a recording's, for tools reading `-v` (the benchmark).
    log::info!("trace metadata: {metadata}");
    writer.finish(&metadata)?;
    drop(writer);
    let bytes = file.finish()?;
    log::info!(
        "wrote the kept window ({} items, {} distinct stacks) in {:?}: {bytes} bytes",
        recorder.items().count(),
        trace.symbols.stacks.len(),
        writing.elapsed()
    );
    Ok(bytes)
}

/// The window's distinct stacks, named once each.
#[derive(Default)]
struct Stacks {
    ids: HashMap<(Vec<u64>, Vec<u64>), StackId>,
    frames: Vec<Vec<SymbolFrame>>,
}

impl Stacks {
    fn intern(&mut self, reader: &mut StackReader, capture: &Capture) -> StackId {
        let key = (capture.kernel.clone(), capture.user.clone());
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        let id = self.frames.len() as StackId;
        self.frames.push(reader.symbol_frames(capture));
        self.ids.insert(key, id);
        id
    }
}

fn finding_output(
    finding: &FindingRecord,
    names: &Names,
    reader: &mut StackReader,
    stacks: &mut Stacks,
) -> FindingOutput {
    FindingOutput {
        kind: finding.kind.to_owned(),
        tid: finding.tid,
        task: names.task(finding.site),
        site: finding.site.map(|site| site as u32),
        start_ns: finding.start_ns,
        duration_ns: finding.duration_ns,
        summary: finding.line.clone(),
        reason: finding.reason.clone(),
        user_stack: finding.user_stack.clone(),
        kernel_stack: finding.kernel_stack.clone(),
        stack: finding
            .capture
            .as_ref()
            .filter(|capture| !capture.user.is_empty() || !capture.kernel.is_empty())
            .map(|capture| stacks.intern(reader, capture)),
    }
}

fn health_record(health: &Health, names: &mut Names, sample_hz: u64) -> HealthRecord {
    HealthRecord {
        start_ns: health.start_ns,
        end_ns: health.end_ns,
        workers: health
            .workers
            .iter()
            .map(|w| WorkerShare {
                tid: w.tid,
                name: names.worker(w.tid),
                busy: w.busy,
                parks: w.parks,
            })
            .collect(),
        imbalance: health.imbalance,
        hogs: health.hogs,
        blocking: health.blocking,
        blocked_ns: health.blocked_ns,
        preempted_ns: health.preempted_ns,
        kernel_samples: health.kernel_samples,
        cpu_by_task: health
            .samples_by_site
            .iter()
            .map(|(site, samples)| TaskCpu {
                task: names.task(*site),
                samples: *samples,
                cpu_ms: *samples as f64 * 1000.0 / sample_hz as f64,
            })
            .collect(),
    }
}

/// The extension of traces written next to `output`, in its format:
/// ".json" for a JSON trace, ".pftrace" otherwise.
pub fn trace_extension(output: &Path) -> &'static str {
    match tracer_timeline::writer::Format::for_path(output).0 {
        tracer_timeline::writer::Format::Json => ".json",
        tracer_timeline::writer::Format::Perfetto => ".pftrace",
    }
}

/// `watch.pftrace` → `watch.usr1-3.pftrace` (`what` "usr1", `n` 3,
/// `extension` ".pftrace"); a `.gz` of the output stays at the end
/// (`w.json.gz` → `w.usr1-3.json.gz`).
pub fn numbered(path: &Path, what: &str, n: u32, extension: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (name, gz) = match name.strip_suffix(".gz") {
        Some(name) => (name.to_owned(), ".gz"),
        None => (name, ""),
    };
    let stem = match name.rfind('.') {
        Some(dot) if dot > 0 => &name[..dot],
        _ => name.as_str(),
    };
    path.with_file_name(format!("{stem}.{what}-{n}{extension}{gz}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usr1_traces_are_numbered_next_to_the_output() {
        assert_eq!(
            numbered(Path::new("/tmp/w.json"), "usr1", 2, ".json"),
            PathBuf::from("/tmp/w.usr1-2.json")
        );
        assert_eq!(
            numbered(Path::new("w.json.gz"), "usr1", 1, ".json"),
            PathBuf::from("w.usr1-1.json.gz")
        );
        assert_eq!(
            numbered(Path::new("d/w.pftrace"), "incident", 1, ".pftrace"),
            PathBuf::from("d/w.incident-1.pftrace")
        );
        assert_eq!(trace_extension(Path::new("w.json.gz")), ".json");
        assert_eq!(trace_extension(Path::new("watch.pftrace")), ".pftrace");
        assert_eq!(trace_extension(Path::new("w.perfetto-trace")), ".pftrace");
    }
}
