//! Rendering, once recording has stopped, in one pass: the stacks are
//! symbolized first (so the trace refers to named frames from the start, no
//! placeholders and no second pass over the file), then every spilled event
//! goes through the timeline, with the CPU samples merged in by time, and
//! each output straight to the trace writer. The timeline decides what the
//! trace says; the writer (Perfetto protobuf or Chrome JSON, by the file's
//! name) only how.

use std::collections::{HashMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;
use tracer_probes::ProbePlan;
use tracer_timeline::findings::Finding;
use tracer_timeline::output::{Outputs, TimelineOutput};
use tracer_timeline::summary::{SchedulerSummary, Summary, TracerCost, WorkerSummary};
use tracer_timeline::task_types::{TaskName, TaskTypes};
use tracer_timeline::timeline::Timeline;
use tracer_timeline::watch::{WatchWindow, output_ts};
use tracer_timeline::writer::{TraceInfo, TraceWriter};

use super::drain::Recording;
use super::loader::KernelCounters;
use super::stacks::{StackId, write_folded};
use super::trace_file::TraceFile;
use crate::clock::process_cpu_ns;

/// What the trace is of, besides the recording itself.
pub struct RenderInput<'a> {
    pub plan: &'a ProbePlan,
    pub pid: u32,
    /// The process track's name.
    pub process_name: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub counters: &'a KernelCounters,
    /// CPU time (user + system) of the tracer from the probes' enabling to
    /// the end of the final drain.
    pub recording_cpu_ns: u64,
    /// Where to write the samples as folded stacks, if anywhere.
    pub folded: Option<&'a mut std::fs::File>,
    /// A watch window to write first, in the same trace (an incident):
    /// its outputs, then the recording's with the window's tail
    /// interleaved by time; its metadata under `watch`.
    pub window: Option<WatchWindow>,
}

/// Writes the whole trace of `recording` into each of `files` (not
/// finished: the caller publishes them) in one pass: the timeline runs once
/// and each output goes to every file's writer, so two formats of one
/// recording say the same. Returns the summary (naming the first file,
/// without its size).
pub fn render(
    input: RenderInput,
    recording: Recording,
    files: &mut [TraceFile],
) -> Result<Summary> {
    let rendering = Instant::now();
    // CPU time too: the wall time says little on a loaded machine.
    let render_cpu_start = process_cpu_ns();
    let Recording {
        mut events,
        samples,
        stacks,
        thread_comms,
        malformed,
    } = recording;
    let (await_captures, empty_captures) = (stacks.await_captures, stacks.empty_captures);
    let (mut symbols, symbolize_prepare_cpu_ns) = stacks.symbolize();
    let symbolize_cpu_ns = process_cpu_ns().saturating_sub(render_cpu_start);
    let mut window = input.window;
    if let Some(window) = &mut window {
        window.adopt_stacks(&mut symbols);
    }
    let info = TraceInfo {
        pid: input.pid,
        process_name: input.process_name.clone(),
        // One time base for a window before the recording.
        start_ns: window
            .as_ref()
            .map_or(input.start_ns, |w| w.start_ns.min(input.start_ns)),
        types: task_types(input.plan),
        symbols,
    };
    let path = files
        .first()
        .context("no trace file to render into")?
        .path()
        .to_path_buf();
    let mut writers = files
        .iter_mut()
        .map(|file| file.format().writer(file, &info))
        .collect::<Result<Vec<_>>>()?;
    // A watch window first (an incident): its samples are its own, not
    // counted as the recording's.
    let (window_metadata, mut tail) = match window {
        Some(WatchWindow {
            composed, metadata, ..
        }) => {
            for output in &composed.outputs {
                for writer in &mut writers {
                    writer.write(output)?;
                }
            }
            (Some(metadata), composed.tail)
        }
        None => (None, VecDeque::new()),
    };
    let mut timeline =
        Timeline::with_task_types(info.types.clone()).with_thread_comms(thread_comms);
    let mut progress = Progress::new(events.remaining());
    let mut out = Writers {
        writers,
        types: &info.types,
        folded: HashMap::new(),
        samples: 0,
        error: None,
    };
    let mut event_count = 0u64;
    let mut samples = samples.into_iter().peekable();
    while let Some(event) = events.next_event()? {
        // The window's findings and health records made meanwhile.
        while tail
            .front()
            .is_some_and(|output| output_ts(output).is_some_and(|ts| ts < event.ts_ns))
        {
            out.extend(tail.pop_front());
        }
        // A sample sees the tasks polled before it, as it did live.
        while let Some(sample) = samples.next_if(|sample| sample.ts_ns < event.ts_ns) {
            timeline.push_sample(
                sample.ts_ns,
                sample.tid,
                sample.task_id,
                sample.stack,
                &mut out,
            );
        }
        timeline.push(event, &mut out);
        out.check()?;
        event_count += 1;
        progress.update(event_count);
    }
    for sample in samples {
        timeline.push_sample(
            sample.ts_ns,
            sample.tid,
            sample.task_id,
            sample.stack,
            &mut out,
        );
    }
    out.extend(tail);
    timeline.finish(input.end_ns, &mut out);
    out.check()?;
    let Writers {
        writers,
        folded,
        samples: sample_count,
        ..
    } = out;
    progress.finish();

    let counters = input.counters;
    let duration_ns = input.end_ns.saturating_sub(input.start_ns);
    let render_ms = rendering.elapsed().as_millis() as u64;
    let render_cpu_ms = process_cpu_ns().saturating_sub(render_cpu_start) / 1_000_000;
    log::info!("rendered {event_count} events into the trace in {render_ms} ms");
    let workers = timeline
        .threads()
        .map(|(tid, stats)| WorkerSummary {
            tid,
            name: timeline
                .thread_name(tid)
                .map_or_else(|| format!("tid {tid}"), str::to_owned),
            stats: stats.clone(),
        })
        .collect();
    let summary = Summary {
        start_ns: input.start_ns,
        duration_ns,
        workers,
        events: event_count,
        lost_events: counters.lost_events,
        unmatched_ends: timeline.unmatched_ends(),
        abandoned_polls: timeline.abandoned(),
        output: Some(path),
        trace_bytes: 0,
        scheduler: SchedulerSummary::from_timeline(&timeline, &info.types, &info.symbols),
        cost: TracerCost {
            recording_cpu_ns: input.recording_cpu_ns,
            render_ms,
            render_cpu_ms,
            symbolize_cpu_ms: symbolize_cpu_ns / 1_000_000,
            symbolize_prepare_cpu_ms: symbolize_prepare_cpu_ns / 1_000_000,
        },
    };
    // Findings are decided once, by the summary; the trace carries them too.
    let findings: Vec<serde_json::Value> =
        summary.findings().iter().map(Finding::to_json).collect();
    let mut metadata = json!({
        "tracer": concat!("rt-ebpf-trace ", env!("CARGO_PKG_VERSION")),
        "target_pid": input.pid,
        "binary": input.plan.binary.display().to_string(),
        "tokio_version": input.plan.tokio_version,
        "events": event_count,
        "recording_cpu_ns": summary.cost.recording_cpu_ns,
        "render_ms": summary.cost.render_ms,
        "render_cpu_ms": summary.cost.render_cpu_ms,
        "symbolize_cpu_ms": summary.cost.symbolize_cpu_ms,
        "symbolize_prepare_cpu_ms": summary.cost.symbolize_prepare_cpu_ms,
        "lost_events": counters.lost_events,
        "short_polls_not_recorded": counters.short_polls,
        "kernel_samples_not_shown": counters.kernel_samples,
        "malformed_events": malformed,
        "unmatched_ends": timeline.unmatched_ends(),
        "abandoned_polls": timeline.abandoned(),
        "duration_ns": duration_ns,
        "samples": sample_count,
        "await_stacks": await_captures,
        "stack_captures_without_stack": empty_captures,
        "findings": findings,
    });
    if let Some(window) = window_metadata {
        metadata["watch"] = window;
    }
    // The same figures for people reading `-v`, whatever the trace's
    // format (programs read `--summary-json`).
    log::info!("trace metadata: {metadata}");
    for mut writer in writers {
        writer.finish(&metadata)?;
    }
    if let Some(file) = input.folded {
        write_folded(file, &info.symbols, &folded).context("writing the folded stacks")?;
    }

    Ok(summary)
}

/// The trace writers as the timeline's [`Outputs`]: each output goes to
/// every writer as the timeline makes it (no `Vec` in between), and CPU
/// samples are also counted for the folded stacks. `Outputs::push` cannot
/// fail: a writer's error is kept, nothing more is written, and the render
/// loop returns it ([`check`](Self::check)) after the event.
struct Writers<'a> {
    writers: Vec<Box<dyn TraceWriter + 'a>>,
    types: &'a TaskTypes,
    folded: HashMap<(String, StackId), u64>,
    samples: u64,
    error: Option<anyhow::Error>,
}

impl Outputs for Writers<'_> {
    #[inline]
    fn push(&mut self, output: TimelineOutput) {
        if self.error.is_some() {
            return;
        }
        if let TimelineOutput::Sample(sample) = &output {
            self.samples += 1;
            let task = self.types.short_name(sample.site);
            *self.folded.entry((task, sample.stack)).or_default() += 1;
        }
        for writer in &mut self.writers {
            if let Err(err) = writer.write(&output) {
                self.error = Some(err);
                return;
            }
        }
    }
}

impl Writers<'_> {
    /// The first error a writer returned, if any.
    fn check(&mut self) -> Result<()> {
        match self.error.take() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

/// The task type of each probe site, by site index (the cookie the eBPF side
/// reports); unnamed poll sites are called after their address.
pub(crate) fn task_types(plan: &ProbePlan) -> TaskTypes {
    let names = plan
        .sites
        .iter()
        .map(|site| match &site.task_type {
            Some(task_type) => Some(TaskName {
                short: task_type.short.clone(),
                full: task_type.full.clone(),
            }),
            None => Some(TaskName {
                short: format!("task@{:#x}", site.address),
                full: String::new(),
            }),
        })
        .collect();
    TaskTypes::new(names)
}

/// "rendering 45% (1200000 of 2700000 events)" on stderr, on a terminal,
/// once rendering has taken over half a second.
struct Progress {
    total: u64,
    enabled: bool,
    started: Instant,
    shown: bool,
}

impl Progress {
    fn new(total: u64) -> Self {
        Progress {
            total,
            enabled: std::io::stderr().is_terminal(),
            started: Instant::now(),
            shown: false,
        }
    }

    fn update(&mut self, done: u64) {
        if !self.enabled || !done.is_multiple_of(1 << 16) {
            return;
        }
        if self.started.elapsed().as_millis() < 500 {
            return;
        }
        self.shown = true;
        let percent = done * 100 / self.total.max(1);
        eprint!(
            "\r\x1b[2Krendering the trace {percent:3}% ({done} of {} events)",
            self.total
        );
        let _ = std::io::stderr().flush();
    }

    fn finish(&self) {
        if self.shown {
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        }
    }
}
