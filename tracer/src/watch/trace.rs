//! Writes the flight recorder's window as a trace: the one place the watch
//! tier touches a trace format. The window is Chrome JSON, through
//! `tracer_timeline::chrome::ChromeTraceWriter`: what it holds (findings
//! with their stacks, health records, off-CPU spans, busy counters) has no
//! [`TimelineOutput`](tracer_timeline::output::TimelineOutput) yet, so the
//! Perfetto writer can't say it; an incident's *detail* window is a
//! recording and is written like one (Perfetto by default, see
//! [`incident`](super::incident)). The file goes through
//! [`TraceFile`]/[`OutputFile`]: it appears, 0600, only when whole.
//!
//! One track per worker: parks and off-CPU spans as slices, samples as
//! instants with their stacks, findings as slices in category `finding`
//! with their stacks; on the process's own track an instant `health` per
//! interval whose args are the health record, and a counter of each
//! worker's busy share.

use std::collections::BTreeSet;
use std::io::Write;

use anyhow::{Result, bail};
use serde_json::{Value, json};
use tracer_timeline::chrome::ChromeTraceWriter;
use tracer_timeline::writer::Format;

use super::keep::{FlightRecorder, Kept};
use super::report::Names;
use super::stacks::StackReader;
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
    /// Leave out parks, samples and off-CPU spans from then on (an
    /// incident's detail trace has those in full).
    pub until_ns: Option<u64>,
}

/// Fails unless `output` names a JSON trace (`.json`, `.json.gz`): the
/// window is written in that format only.
pub fn check_format(output: &OutputFile) -> Result<()> {
    if Format::for_path(output.path()).0 != Format::Json {
        bail!(
            "cannot write {}: watch writes its kept window as Chrome JSON; \
             give a name ending in .json (or .json.gz)",
            output.path().display()
        );
    }
    Ok(())
}

/// Writes the kept window into `output` (published once whole). Returns
/// its size in bytes.
pub fn write_window(
    output: OutputFile,
    pid: u32,
    recorder: &FlightRecorder,
    names: &mut Names,
    reader: &mut StackReader,
    info: &WindowInfo,
) -> Result<u64> {
    check_format(&output)?;
    let mut file = TraceFile::create(output)?;
    let mut writer = ChromeTraceWriter::new(&mut file)?;
    writer.process_name(pid, info.process)?;
    let start = recorder.span().map_or(0, |(first, _)| first);
    let counts = write_kept(
        &mut writer,
        pid,
        start,
        info.until_ns,
        recorder,
        names,
        reader,
        info.sample_hz,
    )?;
    let (first, last) = recorder.span().unwrap_or((0, 0));
    let metadata = json!({
        "tool": "rt-ebpf-trace watch",
        "written_on": info.reason,
        "target_pid": pid,
        "window_start_ns": first,
        "window_ns": last - first,
        "detail_start_ns": info.until_ns,
        "samples": counts.samples,
        "parks": counts.parks,
        "findings": counts.findings,
        "sample_hz": info.sample_hz,
        "kept_bytes": recorder.bytes(),
        "keep_memory_bound": info.keep_memory,
        "dropped_for_memory": recorder.dropped_for_memory,
        "lost_events": info.lost,
        "events": info.events,
        "malformed_events": info.malformed,
    });
    // The same line as a recording's, for tools reading `-v` (the benchmark).
    log::info!("trace metadata: {metadata}");
    writer.finish(&metadata)?;
    file.finish()
}

/// What [`write_kept`] wrote.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeptCounts {
    pub samples: u64,
    pub parks: u64,
    pub findings: u64,
}

/// Writes the kept items into `writer`, times relative to `start_ns`.
/// With `until_ns`, parks, samples and off-CPU spans from then on are left
/// out (an incident's detail window shows those in full); findings and
/// health records are all written.
#[allow(clippy::too_many_arguments)]
fn write_kept<W: Write>(
    writer: &mut ChromeTraceWriter<W>,
    pid: u32,
    start_ns: u64,
    until_ns: Option<u64>,
    recorder: &FlightRecorder,
    names: &mut Names,
    reader: &mut StackReader,
    sample_hz: u64,
) -> Result<KeptCounts> {
    let start = start_ns;
    let until = until_ns.unwrap_or(u64::MAX);
    let rel = |ts: u64| ts.saturating_sub(start);
    let tids: BTreeSet<u32> = recorder
        .items()
        .filter_map(|item| match &item.kept {
            Kept::Park { tid, .. } | Kept::OffCpu { tid, .. } => Some(*tid),
            Kept::Sample(capture) => Some(capture.tid),
            Kept::Finding(finding) => Some(finding.tid),
            Kept::Health(_) => None,
        })
        .collect();
    for (index, &tid) in tids.iter().enumerate() {
        let name = names.worker(tid);
        writer.thread_name(pid, tid, &name, index as u32 + 1)?;
    }
    let mut counts = KeptCounts::default();
    for item in recorder.items() {
        let ts = rel(item.ts_ns);
        let detailed = matches!(
            item.kept,
            Kept::Park { .. } | Kept::Sample(_) | Kept::OffCpu { .. }
        );
        if detailed && item.ts_ns >= until {
            continue;
        }
        match &item.kept {
            Kept::Park { tid, end_ns } => {
                counts.parks += 1;
                writer.complete(
                    pid,
                    *tid,
                    "park",
                    "park",
                    ts,
                    end_ns.saturating_sub(item.ts_ns),
                    &json!({}),
                )?;
            }
            Kept::OffCpu {
                tid,
                duration_ns,
                preempted,
            } => {
                let name = if *preempted {
                    "off CPU (preempted)"
                } else {
                    "off CPU (blocked)"
                };
                writer.complete(pid, *tid, name, "off_cpu", ts, *duration_ns, &json!({}))?;
            }
            Kept::Sample(capture) => {
                counts.samples += 1;
                let args = json!({
                    "task": names.task(capture.site),
                    "user_stack": reader.user_frames(capture),
                    "kernel_stack": reader.kernel_frames(capture),
                    "in_kernel": !capture.kernel.is_empty(),
                });
                writer.instant(pid, capture.tid, "sample", "sample", ts, &args)?;
            }
            Kept::Finding(finding) => {
                counts.findings += 1;
                let args = json!({
                    "finding": finding.kind,
                    "task": names.task(finding.site),
                    "duration_ns": finding.duration_ns,
                    "reason": finding.reason,
                    "summary": finding.line,
                    "user_stack": finding.user_stack,
                    "kernel_stack": finding.kernel_stack,
                });
                let name = format!("{} {}", finding.kind, names.task(finding.site));
                writer.complete(
                    pid,
                    finding.tid,
                    &name,
                    "finding",
                    rel(finding.start_ns),
                    finding.duration_ns.max(1),
                    &args,
                )?;
            }
            Kept::Health(health) => {
                let workers: Vec<Value> = health
                    .workers
                    .iter()
                    .map(|w| json!({"tid": w.tid, "busy": w.busy, "parks": w.parks}))
                    .collect();
                let cpu: Vec<Value> = health
                    .samples_by_site
                    .iter()
                    .map(|(site, samples)| {
                        json!({
                            "task": names.task(*site),
                            "samples": samples,
                            "cpu_ms": *samples as f64 * 1000.0 / sample_hz as f64,
                        })
                    })
                    .collect();
                let args = json!({
                    "interval_ns": health.end_ns - health.start_ns,
                    "workers": workers,
                    "imbalance": health.imbalance,
                    "hogs": health.hogs,
                    "blocking": health.blocking,
                    "blocked_ns": health.blocked_ns,
                    "preempted_ns": health.preempted_ns,
                    "kernel_samples": health.kernel_samples,
                    "cpu_by_task": cpu,
                });
                writer.instant(pid, pid, "health", "health", rel(health.end_ns), &args)?;
                for worker in &health.workers {
                    let busy_percent = (worker.busy * 100.0).round() as u64;
                    writer.counter(
                        pid,
                        "busy %",
                        &names.thread(worker.tid),
                        rel(health.end_ns),
                        busy_percent,
                    )?;
                }
            }
        }
    }
    Ok(counts)
}
