//! Where recorded events go, once recording has stopped: the timeline turns
//! them into slices, wakes, spawns and counters; the renderer streams those
//! into the trace file. The CPU samples are merged in by time, so that each
//! is attributed to its task's type as the events up to it describe it.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use serde_json::json;
use tracer_common::{Event, EventKind};
use tracer_probes::ProbePlan;
use tracer_timeline::chrome::ChromeTraceWriter;
use tracer_timeline::output::TimelineOutput;
use tracer_timeline::render::TraceRenderer;
use tracer_timeline::summary::{SchedulerSummary, Summary, WorkerSummary};
use tracer_timeline::task_types::{TaskName, TaskTypes};
use tracer_timeline::timeline::Timeline;

use super::drain::{Recording, Sample};
use super::loader::Counters;
use super::stacks::StackTable;

pub struct TraceSink<'a> {
    plan: &'a ProbePlan,
    pid: u32,
    start_ns: u64,
    writer: ChromeTraceWriter,
    timeline: Timeline,
    renderer: TraceRenderer,
    outputs: Vec<TimelineOutput>,
    /// Each thread's `comm`, as read while recording.
    thread_comms: HashMap<u32, String>,
    /// Each thread's track name.
    thread_names: HashMap<u32, String>,
    stacks: StackTable,
    /// The task type (probe site) of each live task, learned from its polls:
    /// samples and stacks carry only the task id.
    task_sites: HashMap<u64, u32>,
    /// The task type (probe site) of the poll open on each thread: how
    /// samples are attributed where tokio keeps no task id (< 1.23).
    thread_polls: HashMap<u32, u32>,
    pub events: u64,
    malformed: u64,
}

/// What recording and rendering cost the tracer, for the trace's metadata.
#[derive(Clone, Copy, Debug)]
pub struct Costs {
    /// CPU time (user + system) of the tracer from the probes' enabling to
    /// the end of the final drain.
    pub recording_cpu_ns: u64,
    /// Wall time of the replay into the trace.
    pub render_ms: u64,
}

impl<'a> TraceSink<'a> {
    /// Renders a recording into `writer`: every event, in the order drained,
    /// with the samples merged in by time. [`finish`](Self::finish) then
    /// closes the trace.
    pub fn replay(
        plan: &'a ProbePlan,
        pid: u32,
        start_ns: u64,
        writer: ChromeTraceWriter,
        recording: Recording,
    ) -> Result<Self> {
        let Recording {
            events,
            samples,
            stacks,
            thread_comms,
            malformed,
        } = recording;
        let types = task_types(plan);
        let mut sink = TraceSink {
            plan,
            pid,
            start_ns,
            writer,
            timeline: Timeline::with_task_types(types.clone()),
            renderer: TraceRenderer::new(pid, start_ns, types),
            outputs: Vec::new(),
            thread_comms,
            thread_names: HashMap::new(),
            stacks,
            task_sites: HashMap::new(),
            thread_polls: HashMap::new(),
            events: 0,
            malformed,
        };
        let mut samples = samples.into_iter().peekable();
        for event in events {
            let event = event?;
            // A sample sees the tasks polled before it, as it did live.
            while let Some(sample) = samples.next_if(|sample| sample.ts_ns < event.ts_ns) {
                sink.sample(&sample)?;
            }
            sink.event(&event)?;
        }
        for sample in samples {
            sink.sample(&sample)?;
        }
        Ok(sink)
    }

    fn event(&mut self, event: &Event) -> Result<()> {
        self.events += 1;
        let kind = EventKind::from_u32(event.kind);
        match kind {
            Some(EventKind::PollStart) => {
                self.thread_polls.insert(event.tid, event.site);
            }
            Some(EventKind::PollEnd | EventKind::ParkStart) => {
                self.thread_polls.remove(&event.tid);
            }
            _ => {}
        }
        match kind {
            Some(EventKind::PollStart) if event.task_id != 0 => {
                self.task_sites.insert(event.task_id, event.site);
            }
            Some(EventKind::TaskEnd) => {
                self.task_sites.remove(&event.task_id);
            }
            Some(EventKind::PollEnd) if event.addr != 0 => {
                // Where the polled task now waits (the last await point
                // of this poll); resolved to frames at the end.
                let (waits_at, await_stack) =
                    StackTable::await_keys(event.task_id, event.addr, event.site);
                let args = json!({
                    "waits_at": self.writer.deferred(&waits_at),
                    "await_stack": self.writer.deferred(&await_stack),
                });
                self.renderer.annotate_poll(event.tid, event.task_id, args);
            }
            _ => {}
        }
        if self.timeline.push(event, &mut self.outputs) {
            self.name_thread(event.tid)?;
        }
        self.renderer
            .write_all(&mut self.outputs, &mut self.writer)?;
        Ok(())
    }

    /// A CPU sample: an instant on its thread's track, with the task it hit.
    fn sample(&mut self, sample: &Sample) -> Result<()> {
        let site = match sample.task_id {
            0 => self.thread_polls.get(&sample.tid).copied(),
            id => self.task_sites.get(&id).copied(),
        };
        self.stacks.count_sample(site, sample.stack);
        let args = json!({
            "task_id": (sample.task_id != 0).then_some(sample.task_id),
            "task_type": site.and_then(|site| self.renderer.task_types().full_name(Some(site))),
            "stack": self.writer.deferred(&StackTable::stack_key(sample.stack)),
        });
        let ts = sample.ts_ns.saturating_sub(self.start_ns);
        self.writer
            .instant(self.pid, sample.tid, "sample", "sample", ts, &args)
    }

    /// Names a thread's track from its `comm` plus its index among the
    /// threads seen, since tokio's workers all share one name.
    fn name_thread(&mut self, tid: u32) -> Result<()> {
        let index = self.thread_names.len() as u32;
        let comm = self.thread_comms.get(&tid).map_or("thread", String::as_str);
        let name = format!("{comm} #{index}");
        self.writer.thread_name(self.pid, tid, &name, index)?;
        self.thread_names.insert(tid, name);
        Ok(())
    }

    /// Closes what is still open at `end_ns`, writes the trace's last
    /// events and metadata, and returns the summary.
    pub fn finish(
        mut self,
        end_ns: u64,
        counters: &Counters,
        costs: Costs,
        output: &Path,
        folded: Option<&Path>,
    ) -> Result<Summary> {
        self.timeline.finish(end_ns, &mut self.outputs);
        self.renderer
            .write_all(&mut self.outputs, &mut self.writer)?;

        // Whether a thread only ran `spawn_blocking` work is certain only now;
        // a later thread_name event renames its track.
        let blocking_threads: Vec<u32> = self
            .timeline
            .threads()
            .map(|(tid, _)| tid)
            .filter(|&tid| self.timeline.is_blocking_pool_thread(tid))
            .collect();
        for (blocking, tid) in blocking_threads.into_iter().enumerate() {
            let name = format!("blocking #{blocking}");
            // After the runtime's own threads.
            let index = 1000 + blocking as u32;
            self.writer.thread_name(self.pid, tid, &name, index)?;
            self.thread_names.insert(tid, name);
        }

        let workers = self
            .timeline
            .threads()
            .map(|(tid, stats)| WorkerSummary {
                tid,
                name: self
                    .thread_names
                    .get(&tid)
                    .cloned()
                    .unwrap_or_else(|| format!("tid {tid}")),
                stats: stats.clone(),
            })
            .collect();
        let duration_ns = end_ns.saturating_sub(self.start_ns);
        let metadata = json!({
            "tracer": concat!("rt-ebpf-trace ", env!("CARGO_PKG_VERSION")),
            "target_pid": self.pid,
            "binary": self.plan.binary.display().to_string(),
            "tokio_version": self.plan.tokio_version,
            "events": self.events,
            "recording_cpu_ns": costs.recording_cpu_ns,
            "render_ms": costs.render_ms,
            "lost_events": counters.lost_events,
            "short_polls_not_recorded": counters.short_polls,
            "kernel_samples_not_shown": counters.kernel_samples,
            "malformed_events": self.malformed,
            "unmatched_ends": self.timeline.unmatched_ends(),
            "abandoned_polls": self.timeline.abandoned(),
            "duration_ns": duration_ns,
            "samples": self.stacks.samples,
            "await_stacks": self.stacks.await_captures,
            "stack_captures_without_stack": self.stacks.empty_captures,
        });
        let scheduler = SchedulerSummary::from_timeline(&self.timeline, self.renderer.task_types());
        let types = self.renderer.task_types().clone();
        let symbolized = self.stacks.symbolize(&|site| types.short_name(site));
        let trace_bytes = self.writer.finish_resolving(&metadata, &mut |key| {
            symbolized.resolve(key, &|site| types.full_name(Some(site)).map(str::to_owned))
        })?;
        if let Some(folded) = folded {
            symbolized.write_folded(folded)?;
        }
        Ok(Summary {
            start_ns: self.start_ns,
            duration_ns,
            workers,
            events: self.events,
            lost_events: counters.lost_events,
            unmatched_ends: self.timeline.unmatched_ends(),
            abandoned_polls: self.timeline.abandoned(),
            output: Some(output.to_path_buf()),
            trace_bytes,
            scheduler,
        })
    }
}

/// The task type of each probe site, by site index (the cookie the eBPF side
/// reports); unnamed poll sites are called after their address.
fn task_types(plan: &ProbePlan) -> TaskTypes {
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
