//! The Chrome JSON [`TraceWriter`]: [`TimelineOutput`]s as Chrome trace
//! events, for tools that read JSON (`-o trace.json`). Perfetto's native
//! format ([`crate::perfetto`]) is the default: this one is ~10× larger
//! (310 against 29 bytes an event on the HTTP benchmark, BENCHMARKS.md),
//! slower to write, and has no real CPU samples (Perfetto's JSON
//! importer has no callstacks).
//!
//! - Slices become complete ("X") events named after the task's type, with
//!   `waits_at` and `await_stack` when the poll ended at a known await point,
//!   and `waits_on` ("timer: time::Sleep") when its stack shows the
//!   tokio primitive.
//! - A wake or spawn that makes a task runnable starts a flow arrow ("s")
//!   that ends ("f") at the task's next poll. Perfetto binds "s" to the slice
//!   open on the waking thread: the waker's poll when the wake happens inside
//!   one; otherwise an instant "wake task N" is written first, at the same
//!   time, for the arrow to start from (driver wakes inside a park, wakes
//!   from other threads). Spawns always get an instant. "f" binds to the
//!   enclosing slice ("bp":"e") at the woken poll's start: Perfetto sorts
//!   JSON "X" events before flow events at equal timestamps, so the poll is
//!   open by then.
//! - Task ends, unparks and CPU samples (with their stack as text) are
//!   instants; counters are "C" events.
//! - Polls whose end was lost are not drawn (only counted).
//!
//! Wakes of a task that was already runnable draw nothing: they change
//! nothing in the schedule and are only counted.

use std::io::Write;

use anyhow::Result;
use serde_json::{Value, json};

use crate::chrome::ChromeTraceWriter;
use crate::output::{
    Sample, Slice, SliceKind, Spawn, TaskEnd, TimelineOutput, Unpark, Wake, Waker,
};
use crate::watch::WatchOutput;
use crate::writer::{TraceInfo, TraceWriter};

/// Category and name of every flow arrow: Perfetto matches "s" and "f" by
/// (id, category, name). A spawn schedules a task just as a wake does, so
/// both use the same ones.
const FLOW_NAME: &str = "wake";
const FLOW_CATEGORY: &str = "wake";

pub struct JsonWriter<'a, W: Write> {
    info: &'a TraceInfo,
    writer: ChromeTraceWriter<W>,
}

impl<'a, W: Write> JsonWriter<'a, W> {
    pub fn new(out: W, info: &'a TraceInfo) -> Result<Self> {
        let mut writer = ChromeTraceWriter::new(out)?;
        writer.process_name(info.pid, &info.process_name)?;
        Ok(Self { info, writer })
    }

    /// Entries written so far (see [`ChromeTraceWriter::events_written`]).
    pub fn events_written(&self) -> u64 {
        self.writer.events_written()
    }

    fn write_slice(&mut self, slice: &Slice) -> Result<()> {
        if slice.end_lost {
            return Ok(());
        }
        let (pid, types) = (self.info.pid, &self.info.types);
        let start = self.relative(slice.start_ns);
        let duration = slice.duration_ns();
        match slice.kind {
            SliceKind::Poll {
                site,
                task,
                task_id,
                await_key,
            } => {
                let category = if types.is_blocking(site) {
                    "blocking"
                } else {
                    "poll"
                };
                let mut args = json!({
                    "task_id": nonzero(task_id),
                    "task_type": types.full_name(Some(site)),
                    "header": format!("{task:#x}"),
                    "truncated": slice.truncated,
                });
                if slice.preempted_ns > 0 {
                    args["preempted_ns"] = json!(slice.preempted_ns);
                }
                if let Some((_, point)) = self.info.symbols.await_point(task_id, await_key) {
                    let task_type = types.full_name(Some(site));
                    if let Some(waits_at) = point.waits_at(task_type) {
                        args["waits_at"] = json!(waits_at);
                        args["await_stack"] = json!(point.stack(task_type));
                    }
                    if let Some(waits_on) = point.waits_on {
                        args["waits_on"] = json!(waits_on.label());
                    }
                }
                let name = types.short_name(Some(site));
                self.writer
                    .complete(pid, slice.tid, &name, category, start, duration, &args)
            }
            SliceKind::Park => {
                let args = json!({ "truncated": slice.truncated });
                self.writer
                    .complete(pid, slice.tid, "park", "park", start, duration, &args)
            }
        }
    }

    fn write_spawn(&mut self, spawn: &Spawn) -> Result<()> {
        let call_site = (spawn.call_site != 0).then(|| format!("{:#x}", spawn.call_site));
        let args = json!({
            "task_id": nonzero(spawn.task_id),
            "header": format!("{:#x}", spawn.task),
            // The type is known only from the task's polls, which come later.
            "spawner": spawner_label(spawn.spawner_id),
            "call_site": call_site,
            "spawned_at": self.info.symbols.call_site(spawn.call_site),
        });
        let ts = self.relative(spawn.ts_ns);
        let name = format!("spawn {}", task_label(spawn.task_id, spawn.task));
        let pid = self.info.pid;
        self.writer
            .instant(pid, spawn.tid, &name, "spawn", ts, &args)?;
        self.writer
            .flow_start(pid, spawn.tid, FLOW_NAME, FLOW_CATEGORY, spawn.flow, ts)
    }

    fn write_wake(&mut self, wake: &Wake) -> Result<()> {
        let Some(flow) = wake.flow else {
            return Ok(());
        };
        let ts = self.relative(wake.ts_ns);
        let pid = self.info.pid;
        if !wake.in_poll {
            let args = json!({
                "task_id": nonzero(wake.task_id),
                "task_type": self.info.types.full_name(wake.site),
                "waker": waker_label(wake.waker),
            });
            let name = format!("wake {}", task_label(wake.task_id, wake.task));
            self.writer
                .instant(pid, wake.tid, &name, "wake", ts, &args)?;
        }
        self.writer
            .flow_start(pid, wake.tid, FLOW_NAME, FLOW_CATEGORY, flow, ts)
    }

    fn write_task_end(&mut self, end: &TaskEnd) -> Result<()> {
        let stats = &end.stats;
        let args = json!({
            "task_id": nonzero(stats.task_id),
            "task_type": self.info.types.full_name(stats.site),
            "spawner": spawner_label(stats.spawner_id),
            "polls": stats.polls,
            "busy_ns": stats.busy_ns,
            "longest_poll_ns": stats.longest_poll_ns,
            "times_woken": stats.times_woken,
            "delay_max_ns": stats.delay_max_ns,
            "lifetime_ns": end.ts_ns.saturating_sub(stats.first_seen_ns),
        });
        let name = format!("end {}", task_label(stats.task_id, stats.task));
        let ts = self.relative(end.ts_ns);
        self.writer
            .instant(self.info.pid, end.tid, &name, "task_end", ts, &args)
    }

    fn write_unpark(&mut self, unpark: &Unpark) -> Result<()> {
        let args = json!({ "by": waker_label(unpark.unparker) });
        let ts = self.relative(unpark.ts_ns);
        self.writer
            .instant(self.info.pid, unpark.tid, "unpark", "unpark", ts, &args)
    }

    /// A CPU sample: an instant on its thread's track, with the task it hit
    /// and its stack as text.
    fn write_sample(&mut self, sample: &Sample) -> Result<()> {
        let stack: Vec<String> = self
            .info
            .symbols
            .stack(sample.stack)
            .iter()
            .map(|frame| frame.describe())
            .collect();
        let args = json!({
            "task_id": nonzero(sample.task_id),
            "task_type": self.info.types.full_name(sample.site),
            "stack": stack,
        });
        let ts = self.relative(sample.ts_ns);
        self.writer
            .instant(self.info.pid, sample.tid, "sample", "sample", ts, &args)
    }

    /// The watch tier's outputs: spans as "X" events (categories
    /// `off_cpu`, `finding`) when they close, findings during an
    /// incident's detail as instants, health as an instant on the process
    /// track (`tid` = pid) with the record as its args, and counters.
    fn write_watch(&mut self, output: &WatchOutput) -> Result<()> {
        let pid = self.info.pid;
        match output {
            WatchOutput::SpanStart { .. } => Ok(()),
            WatchOutput::Span(span) => {
                let (name, category) = span.kind.name_and_category();
                let start = self.relative(span.start_ns);
                let duration = span.end_ns.saturating_sub(span.start_ns);
                let args = span.kind.args(span.clipped);
                self.writer
                    .complete(pid, span.tid, &name, category, start, duration, &args)
            }
            WatchOutput::FindingMark(finding) => {
                let ts = self.relative(finding.start_ns);
                let (tid, name) = (finding.tid, finding.name());
                self.writer
                    .instant(pid, tid, &name, "finding", ts, &finding.args())
            }
            WatchOutput::Health(health) => {
                let ts = self.relative(health.end_ns);
                self.writer
                    .instant(pid, pid, "health", "health", ts, &health.args())?;
                for (counter, series, value) in health.counters() {
                    let series = if series.is_empty() { "value" } else { &series };
                    self.writer.counter(pid, counter, series, ts, value)?;
                }
                Ok(())
            }
        }
    }

    fn relative(&self, ts_ns: u64) -> u64 {
        ts_ns.saturating_sub(self.info.start_ns)
    }
}

impl<W: Write> TraceWriter for JsonWriter<'_, W> {
    fn write(&mut self, output: &TimelineOutput) -> Result<()> {
        match output {
            TimelineOutput::ThreadName(thread) => {
                self.writer
                    .thread_name(self.info.pid, thread.tid, &thread.name, thread.sort_index)
            }
            // Slices are whole "X" events, written when they close.
            TimelineOutput::SliceStart(_) => Ok(()),
            TimelineOutput::Slice(slice) => self.write_slice(slice),
            TimelineOutput::Spawn(spawn) => self.write_spawn(spawn),
            TimelineOutput::Wake(wake) => self.write_wake(wake),
            TimelineOutput::WokenPoll(poll) => {
                let ts = self.relative(poll.ts_ns);
                self.writer.flow_end(
                    self.info.pid,
                    poll.tid,
                    FLOW_NAME,
                    FLOW_CATEGORY,
                    poll.flow,
                    ts,
                )
            }
            TimelineOutput::TaskEnd(end) => self.write_task_end(end),
            TimelineOutput::Unpark(unpark) => self.write_unpark(unpark),
            TimelineOutput::Counter(sample) => {
                let (name, series) = sample.counter.name_and_series();
                let ts = self.relative(sample.ts_ns);
                self.writer
                    .counter(self.info.pid, name, series, ts, sample.value)
            }
            TimelineOutput::Sample(sample) => self.write_sample(sample),
            TimelineOutput::Watch(watch) => self.write_watch(watch),
        }
    }

    fn finish(&mut self, metadata: &Value) -> Result<()> {
        self.writer.finish(metadata)
    }
}

/// "task 12", or the header address when the id could not be read.
pub fn task_label(task_id: u64, header: u64) -> String {
    if task_id != 0 {
        format!("task {task_id}")
    } else {
        format!("task@{header:#x}")
    }
}

/// "task 7", "driver" or "thread".
pub fn waker_label(waker: Waker) -> String {
    match waker {
        Waker::Task { task_id: 0 } => "a task".to_owned(),
        Waker::Task { task_id } => format!("task {task_id}"),
        Waker::Driver => "driver".to_owned(),
        Waker::Thread => "thread".to_owned(),
    }
}

fn spawner_label(spawner_id: u64) -> Value {
    if spawner_id == 0 {
        Value::Null
    } else {
        json!(format!("task {spawner_id}"))
    }
}

fn nonzero(id: u64) -> Option<u64> {
    (id != 0).then_some(id)
}
