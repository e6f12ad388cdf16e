//! Where drained events go: the timeline turns them into slices, wakes,
//! spawns and counters; the renderer streams those into the trace file.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use serde_json::json;
use tracer_common::{EVENT_SIZE, Event, EventKind};
use tracer_probes::ProbePlan;
use tracer_timeline::chrome::ChromeTraceWriter;
use tracer_timeline::output::TimelineOutput;
use tracer_timeline::render::TraceRenderer;
use tracer_timeline::summary::{SchedulerSummary, Summary, WorkerSummary};
use tracer_timeline::task_types::{TaskName, TaskTypes};
use tracer_timeline::timeline::Timeline;

use super::loader::Counters;
use super::stacks::{Capture, StackTable};

pub struct TraceSink<'a> {
    plan: &'a ProbePlan,
    pid: u32,
    start_ns: u64,
    writer: ChromeTraceWriter,
    timeline: Timeline,
    renderer: TraceRenderer,
    outputs: Vec<TimelineOutput>,
    thread_names: HashMap<u32, String>,
    stacks: StackTable,
    /// The task type (probe site) of each live task, learned from its polls:
    /// samples and stacks carry only the task id.
    task_sites: HashMap<u64, u32>,
    pub events: u64,
    malformed: u64,
}

impl<'a> TraceSink<'a> {
    pub fn new(plan: &'a ProbePlan, pid: u32, start_ns: u64, writer: ChromeTraceWriter) -> Self {
        let types = task_types(plan);
        TraceSink {
            plan,
            pid,
            start_ns,
            writer,
            timeline: Timeline::with_task_types(types.clone()),
            renderer: TraceRenderer::new(pid, start_ns, types),
            outputs: Vec::new(),
            thread_names: HashMap::new(),
            stacks: StackTable::new(pid),
            task_sites: HashMap::new(),
            events: 0,
            malformed: 0,
        }
    }

    /// Reads at most `MAX_BATCH` events, so that a busy target can't keep
    /// the loop from noticing Ctrl-C or the deadline. Returns true when the
    /// ring buffer may hold more.
    pub fn drain_batch(&mut self, ring: &mut RingBuf<MapData>) -> Result<bool> {
        const MAX_BATCH: usize = 16 * 1024;
        for _ in 0..MAX_BATCH {
            if !self.drain_one(ring)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Reads everything left in the ring buffer.
    pub fn drain_all(&mut self, ring: &mut RingBuf<MapData>) -> Result<()> {
        while self.drain_one(ring)? {}
        Ok(())
    }

    fn drain_one(&mut self, ring: &mut RingBuf<MapData>) -> Result<bool> {
        let event = {
            let Some(item) = ring.next() else {
                return Ok(false);
            };
            if item.len() < EVENT_SIZE {
                self.malformed += 1;
                return Ok(true);
            }
            // SAFETY: the eBPF side writes whole `Event`s; read_unaligned
            // copes with the ring buffer's 8-byte alignment.
            unsafe { std::ptr::read_unaligned::<Event>(item.as_ptr().cast()) }
        };
        self.events += 1;
        match EventKind::from_u32(event.kind) {
            Some(EventKind::PollStart) if event.task_id != 0 => {
                self.task_sites.insert(event.task_id, event.site);
            }
            Some(EventKind::TaskEnd) => {
                self.task_sites.remove(&event.task_id);
            }
            Some(EventKind::PollEnd) if event.addr != 0 => {
                // Where the polled task now waits (the last await point
                // of this poll); resolved to frames at the end.
                let (waits_at, await_stack) = StackTable::await_keys(event.task_id, event.addr);
                let args = json!({
                    "waits_at": self.writer.deferred(&waits_at),
                    "await_stack": self.writer.deferred(&await_stack),
                });
                self.renderer.annotate_poll(event.tid, event.task_id, args);
            }
            _ => {}
        }
        if self.timeline.push(&event, &mut self.outputs) {
            self.name_thread(event.tid)?;
        }
        self.renderer
            .write_all(&mut self.outputs, &mut self.writer)?;
        Ok(true)
    }

    /// Reads every stack capture waiting in the `STACKS` ring buffer.
    pub fn drain_stacks(&mut self, ring: &mut RingBuf<MapData>) -> Result<()> {
        while let Some(record) = ring.next() {
            let Some(capture) = Capture::parse(&record) else {
                self.malformed += 1;
                continue;
            };
            let header = capture.header;
            let site = self.task_sites.get(&header.task_id).copied();
            let Some(stack) = self.stacks.add(&capture, site) else {
                continue;
            };
            drop(record);
            if header.kind == tracer_common::StackKind::Sample as u32 {
                let args = json!({
                    "task_id": (header.task_id != 0).then_some(header.task_id),
                    "task_type": site.and_then(|site| self.renderer.task_types().full_name(Some(site))),
                    "stack": self.writer.deferred(&StackTable::stack_key(stack)),
                });
                let ts = header.ts_ns.saturating_sub(self.start_ns);
                self.writer
                    .instant(self.pid, header.tid, "sample", "sample", ts, &args)?;
            }
        }
        Ok(())
    }

    /// Names a thread's track from its `comm` plus its index among the
    /// threads seen, since tokio's workers all share one name.
    fn name_thread(&mut self, tid: u32) -> Result<()> {
        let index = self.thread_names.len() as u32;
        let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", self.pid))
            .map(|comm| comm.trim_end().to_string())
            .unwrap_or_else(|_| "thread".to_string());
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
        let trace_bytes = self
            .writer
            .finish_resolving(&metadata, &mut |key| symbolized.resolve(key))?;
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
