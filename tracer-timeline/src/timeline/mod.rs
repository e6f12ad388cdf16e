//! Pairs start/end events into [`Slice`]s, one thread at a time, and tells
//! the scheduler's story around them: spawns, wakes (and who woke whom),
//! scheduling delay, task ends, unparks and counters.
//!
//! The eBPF side only reports "entered" and "returned" for polls and parks.
//! Each thread's events arrive in order (the ring buffer keeps per-CPU order
//! and a thread's events are causally ordered), while different threads may
//! interleave slightly out of timestamp order. So all pairing state is kept
//! per thread and timestamps are never compared across threads.
//!
//! Pairing rules:
//! - An end closes the most recent open start of the same kind on its thread.
//! - Polls nest (e.g. `block_in_place` or `block_on` inside a task), so open
//!   polls form a stack and every level becomes its own slice.
//! - Park functions nest too (one probed park calls another), but the inner
//!   ones carry no extra information, so only the outermost park is a slice.
//! - An end with nothing open (tracing started mid-poll or mid-park) is
//!   counted in [`Timeline::unmatched_ends`] and dropped.
//! - [`Timeline::finish`] closes whatever is still open and marks it
//!   `truncated`.
//!
//! Who woke a task is decided from the waking thread's state at the wake:
//! the task the eBPF side saw running there, else the innermost poll open on
//! that thread, else the driver if the thread is parked (the I/O driver and
//! the timer run inside park), else "a thread". Per-task work is in
//! [`crate::tasks`], counters in [`crate::counters`], one thread's pairing
//! state (open polls and park, its totals) in `thread`.
//!
//! The timeline owns the trace's whole content: besides slices and the
//! scheduler's events it names the threads' tracks (from their `comm`, see
//! [`Timeline::with_thread_comms`]), attributes CPU samples to the task type
//! running ([`Timeline::push_sample`]) and passes each poll's await point
//! along, so writers only translate [`TimelineOutput`]s into a file format.
//!
//! Memory: per thread, per live task, per task type; nothing grows with the
//! number of events, so the caller can stream outputs to disk as they come.

#[cfg(test)]
mod tests;
mod thread;

use std::collections::HashMap;

use crate::thread_index::ThreadIndex;

use tracer_common::{Event, EventKind};

use crate::counters::{CounterSample, RuntimeCounters};
use crate::output::{
    Outputs, Sample, SliceStart, StackId, TaskEnd, ThreadName, TimelineOutput, Unpark, Waker,
};
pub use crate::output::{Slice, SliceKind};
use crate::task_types::TaskTypes;
use crate::tasks::{ClosedPoll, LongPoll, TaskStats, TaskTotals, TaskTracker, TaskTypeStats};
pub use thread::ThreadStats;
use thread::{OpenPoll, PollEnding, ThreadState};

/// The state machine for all threads and tasks. Feed it events with
/// [`push`](Self::push), then call [`finish`](Self::finish) once.
#[derive(Default)]
pub struct Timeline {
    types: TaskTypes,
    /// Threads in the order their first event arrived, so reports list them
    /// in a stable, meaningful order.
    threads: Vec<(u32, ThreadState)>,
    /// tid -> position in `threads`.
    index_by_tid: ThreadIndex,
    tasks: TaskTracker,
    counters: RuntimeCounters,
    unmatched_ends: u64,
    abandoned: u64,
    unknown_kinds: u64,
    /// Each thread's `comm` as read while recording, for track names.
    thread_comms: HashMap<u32, String>,
    /// Scratch space reused across events.
    ended: Vec<TaskEnd>,
    samples: Vec<CounterSample>,
}

impl Timeline {
    /// A timeline that knows no task types: no poll counts as blocking-pool work.
    pub fn new() -> Self {
        Self::default()
    }

    /// A timeline that knows which sites poll `spawn_blocking` work, to tell
    /// blocking-pool threads from workers.
    pub fn with_task_types(types: TaskTypes) -> Self {
        Self {
            types,
            ..Self::default()
        }
    }

    /// Names threads' tracks after these `comm`s (by tid) plus an index,
    /// since tokio's workers all share one name; "thread #n" otherwise.
    pub fn with_thread_comms(mut self, comms: HashMap<u32, String>) -> Self {
        self.thread_comms = comms;
        self
    }

    /// A CPU sample at `ts_ns` on `tid` that hit task `task_id` (0: none),
    /// with the stack `stack`. Feed samples in time order among the events,
    /// so that the task's type is known from the polls before it.
    pub fn push_sample(
        &mut self,
        ts_ns: u64,
        tid: u32,
        task_id: u64,
        stack: StackId,
        out: &mut impl Outputs,
    ) {
        let site = match task_id {
            // tokio < 1.23 keeps no task id: the poll open on the thread.
            0 => self
                .index_by_tid
                .get(tid)
                .and_then(|index| self.threads[index].1.open_polls.last())
                .map(|poll| poll.site),
            id => self.tasks.site_of(id),
        };
        out.push(TimelineOutput::Sample(Sample {
            tid,
            ts_ns,
            task_id,
            site,
            stack,
        }));
    }

    /// The name given to `tid`'s track, once it was seen.
    pub fn thread_name(&self, tid: u32) -> Option<&str> {
        let index = self.index_by_tid.peek(tid)?;
        Some(self.threads[index].1.name.as_str())
    }

    /// Feeds one event; what it completes or reveals is appended to `out`.
    ///
    /// Returns true if this is the first event seen from `ev.tid`, so the
    /// caller can look up and record the thread's name while it still runs.
    /// Events of an unknown kind are counted in
    /// [`unknown_kinds`](Self::unknown_kinds) and otherwise ignored (they do
    /// not register a thread).
    pub fn push(&mut self, ev: &Event, out: &mut impl Outputs) -> bool {
        let Some(kind) = EventKind::from_u32(ev.kind) else {
            self.unknown_kinds += 1;
            return false;
        };
        let (index, first_seen) = self.thread_index(ev.tid, ev.ts_ns);
        if first_seen {
            let comm = self
                .thread_comms
                .get(&ev.tid)
                .map_or("thread", String::as_str);
            let name = format!("{comm} #{index}");
            self.threads[index].1.name = name.clone();
            out.push(TimelineOutput::ThreadName(ThreadName {
                tid: ev.tid,
                name,
                sort_index: index as u32,
            }));
        }
        let stats = &mut self.threads[index].1.stats;
        stats.last_ns = stats.last_ns.max(ev.ts_ns);
        let activity_before = self.threads[index].1.activity(&self.types);

        match kind {
            EventKind::PollStart => self.poll_start(index, ev, out),
            EventKind::PollEnd => {
                // `addr` is the await point the task registered its waker
                // at; `other_task_id` the time preempted during the poll.
                let end = PollEnding {
                    end_ns: ev.ts_ns,
                    truncated: false,
                    await_key: ev.addr,
                    preempted_ns: ev.other_task_id,
                };
                if !self.close_poll(index, end, out) {
                    self.unmatched_ends += 1;
                }
            }
            EventKind::ParkStart => {
                // A worker parks only between polls: polls still open here
                // lost their end events.
                self.abandon_polls_from(index, 0, ev.ts_ns, out);
                if self.threads[index].1.open_park(ev.ts_ns) {
                    out.push(TimelineOutput::SliceStart(SliceStart {
                        tid: ev.tid,
                        ts_ns: ev.ts_ns,
                        kind: SliceKind::Park,
                        woken_by: None,
                    }));
                }
            }
            EventKind::ParkEnd => {
                if !self.threads[index]
                    .1
                    .close_park(ev.tid, ev.ts_ns, false, out)
                {
                    self.unmatched_ends += 1;
                }
            }
            EventKind::Spawn => {
                let spawn = self.tasks.spawn(ev, &mut self.ended);
                self.flush_ended(out);
                out.push(TimelineOutput::Spawn(spawn));
            }
            EventKind::Wake => {
                let (waker, in_poll) = self.who_acts(index, ev);
                let wake = self.tasks.wake(ev, waker, in_poll, &mut self.ended);
                self.flush_ended(out);
                out.push(TimelineOutput::Wake(wake));
            }
            EventKind::TaskEnd => {
                self.threads[index].1.last_task_end = Some((ev.task, ev.ts_ns));
                self.tasks.task_end(ev, &mut self.ended);
                self.flush_ended(out);
            }
            EventKind::Unpark => {
                let (unparker, _) = self.who_acts(index, ev);
                out.push(TimelineOutput::Unpark(Unpark {
                    tid: ev.tid,
                    ts_ns: ev.ts_ns,
                    unparker,
                }));
            }
        }

        let activity_after = self.threads[index].1.activity(&self.types);
        self.counters
            .thread_changed(activity_before, activity_after);
        self.counters.tasks_alive = self.tasks.alive() as u64;
        self.counters.sample(ev.ts_ns, &mut self.samples);
        // Most events change no counter: skip the drain's setup.
        if !self.samples.is_empty() {
            out.extend(self.samples.drain(..).map(TimelineOutput::Counter));
        }
        first_seen
    }

    /// Closes every open slice at `end_ns`, marked `truncated`, and emits the
    /// counters' last values. Innermost polls come out first, then the park,
    /// per thread in first-seen order.
    pub fn finish(&mut self, end_ns: u64, out: &mut impl Outputs) {
        for index in 0..self.threads.len() {
            let before = self.threads[index].1.activity(&self.types);
            let end = PollEnding {
                end_ns,
                truncated: true,
                ..PollEnding::default()
            };
            while self.close_poll(index, end, out) {}
            let tid = self.threads[index].0;
            self.threads[index].1.close_park(tid, end_ns, true, out);
            let after = self.threads[index].1.activity(&self.types);
            self.counters.thread_changed(before, after);
        }
        self.counters.tasks_alive = self.tasks.alive() as u64;
        self.counters.sample(end_ns, &mut self.samples);
        self.counters.finish(&mut self.samples);
        out.extend(self.samples.drain(..).map(TimelineOutput::Counter));

        // Whether a thread only ran `spawn_blocking` work is certain only
        // now: rename those tracks, after the runtime's own threads.
        let mut blocking = 0;
        for (tid, thread) in &mut self.threads {
            if thread.stats.is_blocking_pool() {
                thread.name = format!("blocking #{blocking}");
                out.push(TimelineOutput::ThreadName(ThreadName {
                    tid: *tid,
                    name: thread.name.clone(),
                    sort_index: 1000 + blocking,
                }));
                blocking += 1;
            }
        }
    }

    /// Per-thread statistics, in first-seen order.
    pub fn threads(&self) -> impl Iterator<Item = (u32, &ThreadStats)> {
        self.threads
            .iter()
            .map(|(tid, thread)| (*tid, &thread.stats))
    }

    /// Whether `tid` ran only `spawn_blocking` work (so the caller can name
    /// its track "blocking #n"). Known for sure only once recording ended.
    pub fn is_blocking_pool_thread(&self, tid: u32) -> bool {
        self.index_by_tid
            .peek(tid)
            .is_some_and(|index| self.threads[index].1.stats.is_blocking_pool())
    }

    /// Totals of the tasks alive now (ended tasks were reported in
    /// [`TimelineOutput::TaskEnd`] and are folded into the per-type totals).
    pub fn task_stats(&self) -> impl Iterator<Item = &TaskStats> {
        self.tasks.live_tasks()
    }

    /// Totals per task type, by probe site (`None`: tasks that ended
    /// without ever being polled). In no particular order.
    pub fn task_types(&self) -> impl Iterator<Item = (Option<u32>, &TaskTypeStats)> {
        self.tasks.by_type()
    }

    /// The longest polls of runtime work (not `spawn_blocking`), one per
    /// task, longest first, at most [`crate::tasks::LONGEST_POLLS_KEPT`].
    pub fn longest_polls(&self) -> impl Iterator<Item = &LongPoll> {
        self.tasks.longest_polls()
    }

    /// Spawns, ends and wakes over the whole trace.
    pub fn task_totals(&self) -> &TaskTotals {
        self.tasks.totals()
    }

    /// Tasks seen and not yet ended.
    pub fn tasks_alive(&self) -> usize {
        self.tasks.alive()
    }

    /// Ends that had no open start on their thread (dropped).
    pub fn unmatched_ends(&self) -> u64 {
        self.unmatched_ends
    }

    /// Open polls given up on because events showed their end was lost (the
    /// same task polled again, or the worker parked); they are not written.
    pub fn abandoned(&self) -> u64 {
        self.abandoned
    }

    /// Events whose `kind` is not a known [`EventKind`] (ignored).
    pub fn unknown_kinds(&self) -> u64 {
        self.unknown_kinds
    }

    fn poll_start(&mut self, index: usize, ev: &Event, out: &mut impl Outputs) {
        // A task is never polled inside its own poll: an open poll of the
        // same task means that poll's end event was lost.
        let thread = &self.threads[index].1;
        if let Some(stale) = thread.open_polls.iter().position(|p| p.task == ev.task) {
            self.abandon_polls_from(index, stale, ev.ts_ns, out);
        }
        // With `--min-poll` a poll's start arrives at its end, after the task
        // end that happened inside it: that task is already finished, so the
        // poll is drawn but not counted again.
        let thread = &mut self.threads[index].1;
        let after_task_end = thread
            .last_task_end
            .is_some_and(|(task, end_ns)| task == ev.task && ev.ts_ns <= end_ns);
        thread.open_polls.push(OpenPoll {
            site: ev.site,
            task: ev.task,
            task_id: ev.task_id,
            start_ns: ev.ts_ns,
            after_task_end,
        });
        let woken = if after_task_end {
            None
        } else {
            self.tasks.poll_start(ev, &mut self.ended)
        };
        self.flush_ended(out);
        out.push(TimelineOutput::SliceStart(SliceStart {
            tid: ev.tid,
            ts_ns: ev.ts_ns,
            kind: SliceKind::Poll {
                site: ev.site,
                task: ev.task,
                task_id: ev.task_id,
                await_key: 0,
            },
            woken_by: woken.as_ref().map(|woken| woken.flow),
        }));
        if let Some(woken) = woken {
            self.threads[index]
                .1
                .stats
                .scheduling_delay
                .record(woken.delay_ns);
            out.push(TimelineOutput::WokenPoll(woken));
        }
    }

    /// Closes the innermost open poll of thread `index`. Returns false if
    /// none was open.
    fn close_poll(&mut self, index: usize, end: PollEnding, out: &mut impl Outputs) -> bool {
        let (tid, thread) = &mut self.threads[index];
        let blocking = |site| self.types.is_blocking(site);
        let Some((slice, after_task_end)) = thread.close_poll(*tid, end, blocking) else {
            return false;
        };
        let SliceKind::Poll {
            site,
            task,
            task_id,
            await_key,
        } = slice.kind
        else {
            unreachable!("close_poll only makes poll slices")
        };
        let closed = ClosedPoll {
            tid: slice.tid,
            task,
            site,
            await_point: (task_id, await_key),
            start_ns: slice.start_ns,
            end_ns: slice.end_ns,
            preempted_ns: slice.preempted_ns,
            truncated: end.truncated,
            blocking: self.types.is_blocking(site),
        };
        out.push(TimelineOutput::Slice(slice));
        if !after_task_end {
            self.tasks.poll_end(&closed, &mut self.ended);
        }
        self.flush_ended(out);
        true
    }

    /// Drops the open polls of thread `index` from position `from` up: their
    /// end events were lost, as `now_ns` shows. They are not counted, and
    /// come out as slices marked `end_lost`, innermost first.
    fn abandon_polls_from(
        &mut self,
        index: usize,
        from: usize,
        now_ns: u64,
        out: &mut impl Outputs,
    ) {
        let (tid, thread) = &mut self.threads[index];
        if from >= thread.open_polls.len() {
            return;
        }
        for poll in thread.open_polls.drain(from..).rev() {
            self.abandoned += 1;
            self.tasks.poll_abandoned(poll.task, &mut self.ended);
            out.push(TimelineOutput::Slice(Slice {
                tid: *tid,
                kind: SliceKind::Poll {
                    site: poll.site,
                    task: poll.task,
                    task_id: poll.task_id,
                    await_key: 0,
                },
                start_ns: poll.start_ns,
                end_ns: now_ns.max(poll.start_ns),
                truncated: false,
                end_lost: true,
                preempted_ns: 0,
            }));
        }
        self.flush_ended(out);
    }

    /// Who is acting on thread `index` at `ev`: see the module docs. The
    /// bool is true when the thread is inside a poll slice.
    fn who_acts(&self, index: usize, ev: &Event) -> (Waker, bool) {
        let thread = &self.threads[index].1;
        let innermost = thread.open_polls.last();
        let waker = if ev.other_task_id != 0 {
            Waker::Task {
                task_id: ev.other_task_id,
            }
        } else if let Some(poll) = innermost {
            Waker::Task {
                task_id: poll.task_id,
            }
        } else if thread.open_park.is_some() {
            Waker::Driver
        } else {
            Waker::Thread
        };
        (waker, innermost.is_some())
    }

    fn flush_ended(&mut self, out: &mut impl Outputs) {
        // Called a few times an event; tasks end rarely.
        if self.ended.is_empty() {
            return;
        }
        out.extend(
            self.ended
                .drain(..)
                .map(|end| TimelineOutput::TaskEnd(Box::new(end))),
        );
    }

    /// The position of `tid` in `threads`, created on first sight. The bool
    /// is true if it was just created.
    fn thread_index(&mut self, tid: u32, first_ns: u64) -> (usize, bool) {
        if let Some(index) = self.index_by_tid.get(tid) {
            return (index, false);
        }
        let index = self.threads.len();
        let mut state = ThreadState::default();
        state.stats.first_ns = first_ns;
        self.threads.push((tid, state));
        self.index_by_tid.insert(tid, index);
        (index, true)
    }
}
