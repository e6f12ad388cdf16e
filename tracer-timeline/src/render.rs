//! Turns [`TimelineOutput`]s into Chrome trace events.
//!
//! - Slices become complete ("X") events named after the task's type.
//! - A wake or spawn that makes a task runnable starts a flow arrow ("s")
//!   that ends ("f") at the task's next poll. Perfetto binds "s" to the slice
//!   open on the waking thread: the waker's poll when the wake happens inside
//!   one; otherwise an instant "wake task N" is written first, at the same
//!   time, for the arrow to start from (driver wakes inside a park, wakes
//!   from other threads). Spawns always get an instant. "f" binds to the
//!   enclosing slice ("bp":"e") at the woken poll's start: Perfetto sorts
//!   JSON "X" events before flow events at equal timestamps, so the poll is
//!   open by then.
//! - Task ends and unparks are instants; counters are "C" events.
//!
//! Wakes of a task that was already runnable draw nothing: they change
//! nothing in the schedule and are only counted.

use anyhow::Result;
use serde_json::{Value, json};

use crate::chrome::ChromeTraceWriter;
use crate::output::{Slice, SliceKind, Spawn, TaskEnd, TimelineOutput, Unpark, Wake, Waker};
use crate::task_types::TaskTypes;

/// Category and name of every flow arrow: Perfetto matches "s" and "f" by
/// (id, category, name). A spawn schedules a task just as a wake does, so
/// both use the same ones.
const FLOW_NAME: &str = "wake";
const FLOW_CATEGORY: &str = "wake";

/// Turns call-site addresses into text (e.g. `src/main.rs:42`).
pub type CallSiteNamer = Box<dyn FnMut(u64) -> Option<String>>;

pub struct TraceRenderer {
    pid: u32,
    /// Trace time zero: every timestamp is written relative to it.
    start_ns: u64,
    types: TaskTypes,
    call_site_namer: Option<CallSiteNamer>,
    /// Extra args for the poll now running on a thread, by tid: (task id,
    /// args object), merged into that poll's slice when it is written.
    poll_annotations: std::collections::HashMap<u32, (u64, Value)>,
}

impl TraceRenderer {
    pub fn new(pid: u32, start_ns: u64, types: TaskTypes) -> Self {
        Self {
            pid,
            start_ns,
            types,
            call_site_namer: None,
            poll_annotations: Default::default(),
        }
    }

    /// Adds `args` (a JSON object) to the slice of the poll of `task_id`
    /// running on `tid`, written when it ends. A later annotation of the same
    /// poll replaces an earlier one: the last await point of a poll is where
    /// the task waits.
    pub fn annotate_poll(&mut self, tid: u32, task_id: u64, args: Value) {
        self.poll_annotations.insert(tid, (task_id, args));
    }

    /// Names spawn call sites in the spawn instants' args (shown as hex
    /// addresses otherwise).
    pub fn with_call_site_namer(mut self, namer: CallSiteNamer) -> Self {
        self.call_site_namer = Some(namer);
        self
    }

    pub fn task_types(&self) -> &TaskTypes {
        &self.types
    }

    /// Writes everything in `outputs` and empties it.
    pub fn write_all(
        &mut self,
        outputs: &mut Vec<TimelineOutput>,
        writer: &mut ChromeTraceWriter,
    ) -> Result<()> {
        for output in outputs.drain(..) {
            self.write(&output, writer)?;
        }
        Ok(())
    }

    pub fn write(&mut self, output: &TimelineOutput, writer: &mut ChromeTraceWriter) -> Result<()> {
        match output {
            TimelineOutput::Slice(slice) => self.write_slice(slice, writer),
            TimelineOutput::Spawn(spawn) => self.write_spawn(spawn, writer),
            TimelineOutput::Wake(wake) => self.write_wake(wake, writer),
            TimelineOutput::WokenPoll(poll) => writer.flow_end(
                self.pid,
                poll.tid,
                FLOW_NAME,
                FLOW_CATEGORY,
                poll.flow,
                self.relative(poll.ts_ns),
            ),
            TimelineOutput::TaskEnd(end) => self.write_task_end(end, writer),
            TimelineOutput::Unpark(unpark) => self.write_unpark(unpark, writer),
            TimelineOutput::Counter(sample) => {
                let (name, series) = sample.counter.name_and_series();
                writer.counter(
                    self.pid,
                    name,
                    series,
                    self.relative(sample.ts_ns),
                    sample.value,
                )
            }
        }
    }

    fn write_slice(&mut self, slice: &Slice, writer: &mut ChromeTraceWriter) -> Result<()> {
        let start = self.relative(slice.start_ns);
        let duration = slice.duration_ns();
        match slice.kind {
            SliceKind::Poll {
                site,
                task,
                task_id,
            } => {
                let category = if self.types.is_blocking(site) {
                    "blocking"
                } else {
                    "poll"
                };
                let mut args = json!({
                    "task_id": nonzero(task_id),
                    "task_type": self.types.full_name(Some(site)),
                    "header": format!("{task:#x}"),
                    "truncated": slice.truncated,
                });
                if let Some((annotated_task, Value::Object(extra))) =
                    self.poll_annotations.remove(&slice.tid)
                    && annotated_task == task_id
                {
                    args.as_object_mut()
                        .expect("args is an object")
                        .extend(extra);
                }
                let name = self.types.short_name(Some(site));
                writer.complete(self.pid, slice.tid, &name, category, start, duration, &args)
            }
            SliceKind::Park => {
                let args = json!({ "truncated": slice.truncated });
                writer.complete(self.pid, slice.tid, "park", "park", start, duration, &args)
            }
        }
    }

    fn write_spawn(&mut self, spawn: &Spawn, writer: &mut ChromeTraceWriter) -> Result<()> {
        let call_site = (spawn.call_site != 0).then(|| {
            self.call_site_namer
                .as_mut()
                .and_then(|namer| namer(spawn.call_site))
                .unwrap_or_else(|| format!("{:#x}", spawn.call_site))
        });
        let args = json!({
            "task_id": nonzero(spawn.task_id),
            "header": format!("{:#x}", spawn.task),
            // The type is known only from the task's polls, which come later.
            "spawner": spawner_label(spawn.spawner_id),
            "call_site": call_site,
        });
        let ts = self.relative(spawn.ts_ns);
        let name = format!("spawn {}", task_label(spawn.task_id, spawn.task));
        writer.instant(self.pid, spawn.tid, &name, "spawn", ts, &args)?;
        writer.flow_start(
            self.pid,
            spawn.tid,
            FLOW_NAME,
            FLOW_CATEGORY,
            spawn.flow,
            ts,
        )
    }

    fn write_wake(&self, wake: &Wake, writer: &mut ChromeTraceWriter) -> Result<()> {
        let Some(flow) = wake.flow else {
            return Ok(());
        };
        let ts = self.relative(wake.ts_ns);
        if !wake.in_poll {
            let args = json!({
                "task_id": nonzero(wake.task_id),
                "task_type": self.types.full_name(wake.site),
                "waker": waker_label(wake.waker),
            });
            let name = format!("wake {}", task_label(wake.task_id, wake.task));
            writer.instant(self.pid, wake.tid, &name, "wake", ts, &args)?;
        }
        writer.flow_start(self.pid, wake.tid, FLOW_NAME, FLOW_CATEGORY, flow, ts)
    }

    fn write_task_end(&self, end: &TaskEnd, writer: &mut ChromeTraceWriter) -> Result<()> {
        let stats = &end.stats;
        let args = json!({
            "task_id": nonzero(stats.task_id),
            "task_type": self.types.full_name(stats.site),
            "spawner": spawner_label(stats.spawner_id),
            "polls": stats.polls,
            "busy_ns": stats.busy_ns,
            "longest_poll_ns": stats.longest_poll_ns,
            "times_woken": stats.times_woken,
            "delay_max_ns": stats.delay_max_ns,
            "lifetime_ns": end.ts_ns.saturating_sub(stats.first_seen_ns),
        });
        let name = format!("end {}", task_label(stats.task_id, stats.task));
        writer.instant(
            self.pid,
            end.tid,
            &name,
            "task_end",
            self.relative(end.ts_ns),
            &args,
        )
    }

    fn write_unpark(&self, unpark: &Unpark, writer: &mut ChromeTraceWriter) -> Result<()> {
        let args = json!({ "by": waker_label(unpark.unparker) });
        writer.instant(
            self.pid,
            unpark.tid,
            "unpark",
            "unpark",
            self.relative(unpark.ts_ns),
            &args,
        )
    }

    fn relative(&self, ts_ns: u64) -> u64 {
        ts_ns.saturating_sub(self.start_ns)
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
