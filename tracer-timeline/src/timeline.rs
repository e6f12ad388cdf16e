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
//! [`crate::tasks`], counters in [`crate::counters`].
//!
//! The timeline owns the trace's whole content: besides slices and the
//! scheduler's events it names the threads' tracks (from their `comm`, see
//! [`Timeline::with_thread_comms`]), attributes CPU samples to the task type
//! running ([`Timeline::push_sample`]) and passes each poll's await point
//! along, so writers only translate [`TimelineOutput`]s into a file format.
//!
//! Memory: per thread, per live task, per task type; nothing grows with the
//! number of events, so the caller can stream outputs to disk as they come.

use std::collections::HashMap;

use tracer_common::{Event, EventKind};

use crate::counters::{Counter, CounterSample, RateLimitedCounter};
use crate::histogram::Histogram;
use crate::output::{
    Sample, SliceStart, StackId, TaskEnd, ThreadName, TimelineOutput, Unpark, Waker,
};
pub use crate::output::{Slice, SliceKind};
use crate::task_types::TaskTypes;
use crate::tasks::{ClosedPoll, LongPoll, TaskStats, TaskTotals, TaskTracker, TaskTypeStats};

/// Per-thread totals, updated as slices close.
#[derive(Clone, Debug, Default)]
pub struct ThreadStats {
    /// Poll slices closed, nested ones included.
    pub polls: u64,
    /// Of those, polls of `spawn_blocking` tasks.
    pub blocking_polls: u64,
    /// Outermost park slices closed.
    pub parks: u64,
    /// Time spent in outermost polls (a nested poll's time is already inside
    /// its parent's, so it is not added twice).
    pub busy_ns: u64,
    /// Time spent in outermost parks.
    pub parked_ns: u64,
    pub longest_poll_ns: u64,
    /// Scheduling delay of the polls that started on this thread.
    pub scheduling_delay: Histogram,
    /// Timestamp of the thread's first event.
    pub first_ns: u64,
    /// Latest timestamp seen on the thread: its last event, or the end of
    /// recording if a slice was truncated there.
    pub last_ns: u64,
}

impl ThreadStats {
    /// The thread only ran `spawn_blocking` work: a blocking-pool thread,
    /// not a runtime worker.
    pub fn is_blocking_pool(&self) -> bool {
        self.polls > 0 && self.blocking_polls == self.polls && self.parks == 0
    }

    /// The thread polled or parked: part of the runtime (a worker or a
    /// `block_on` thread), not only a thread that woke or spawned tasks.
    pub fn ran_tasks_or_parked(&self) -> bool {
        self.polls > 0 || self.parks > 0
    }
}

/// The state machine for all threads and tasks. Feed it events with
/// [`push`](Self::push), then call [`finish`](Self::finish) once.
#[derive(Default)]
pub struct Timeline {
    types: TaskTypes,
    /// Threads in the order their first event arrived, so reports list them
    /// in a stable, meaningful order.
    threads: Vec<(u32, ThreadState)>,
    /// tid -> position in `threads`.
    index_by_tid: HashMap<u32, usize>,
    tasks: TaskTracker,
    counters: Counters,
    unmatched_ends: u64,
    abandoned: u64,
    unknown_kinds: u64,
    /// Each thread's `comm` as read while recording, for track names.
    thread_comms: HashMap<u32, String>,
    /// The task type (probe site) of each task id seen polled and not ended:
    /// samples carry only the task id.
    task_sites: HashMap<u64, u32>,
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
        out: &mut Vec<TimelineOutput>,
    ) {
        let site = match task_id {
            // tokio < 1.23 keeps no task id: the poll open on the thread.
            0 => self
                .index_by_tid
                .get(&tid)
                .and_then(|&index| self.threads[index].1.open_polls.last())
                .map(|poll| poll.site),
            id => self.task_sites.get(&id).copied(),
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
        let index = *self.index_by_tid.get(&tid)?;
        Some(self.threads[index].1.name.as_str())
    }

    /// Feeds one event; what it completes or reveals is appended to `out`.
    ///
    /// Returns true if this is the first event seen from `ev.tid`, so the
    /// caller can look up and record the thread's name while it still runs.
    /// Events of an unknown kind are counted in
    /// [`unknown_kinds`](Self::unknown_kinds) and otherwise ignored (they do
    /// not register a thread).
    pub fn push(&mut self, ev: &Event, out: &mut Vec<TimelineOutput>) -> bool {
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
            EventKind::PollStart => {
                if ev.task_id != 0 {
                    self.task_sites.insert(ev.task_id, ev.site);
                }
                self.poll_start(index, ev, out)
            }
            EventKind::PollEnd => {
                // `addr` is the await point the task registered its waker at.
                if !self.close_poll(index, ev.ts_ns, false, ev.addr, out) {
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
                self.task_sites.remove(&ev.task_id);
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
        out.extend(self.samples.drain(..).map(TimelineOutput::Counter));
        first_seen
    }

    /// Closes every open slice at `end_ns`, marked `truncated`, and emits the
    /// counters' last values. Innermost polls come out first, then the park,
    /// per thread in first-seen order.
    pub fn finish(&mut self, end_ns: u64, out: &mut Vec<TimelineOutput>) {
        for index in 0..self.threads.len() {
            let before = self.threads[index].1.activity(&self.types);
            while self.close_poll(index, end_ns, true, 0, out) {}
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
            .get(&tid)
            .is_some_and(|&index| self.threads[index].1.stats.is_blocking_pool())
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

    fn poll_start(&mut self, index: usize, ev: &Event, out: &mut Vec<TimelineOutput>) {
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
    fn close_poll(
        &mut self,
        index: usize,
        end_ns: u64,
        truncated: bool,
        await_key: u64,
        out: &mut Vec<TimelineOutput>,
    ) -> bool {
        let (tid, thread) = &mut self.threads[index];
        let blocking = |site| self.types.is_blocking(site);
        let Some((slice, after_task_end)) =
            thread.close_poll(*tid, end_ns, truncated, await_key, blocking)
        else {
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
            truncated,
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
        out: &mut Vec<TimelineOutput>,
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

    fn flush_ended(&mut self, out: &mut Vec<TimelineOutput>) {
        out.extend(self.ended.drain(..).map(TimelineOutput::TaskEnd));
    }

    /// The position of `tid` in `threads`, created on first sight. The bool
    /// is true if it was just created.
    fn thread_index(&mut self, tid: u32, first_ns: u64) -> (usize, bool) {
        let mut first_seen = false;
        let index = *self.index_by_tid.entry(tid).or_insert_with(|| {
            first_seen = true;
            self.threads.len()
        });
        if first_seen {
            let mut state = ThreadState::default();
            state.stats.first_ns = first_ns;
            self.threads.push((tid, state));
        }
        (index, first_seen)
    }
}

/// What a thread is doing, for the busy counters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Activity {
    Idle,
    /// Inside a poll of runtime work.
    Worker,
    /// Inside a poll of `spawn_blocking` work.
    Blocking,
}

/// The counters' current values and their samplers.
struct Counters {
    tasks_alive: u64,
    workers_busy: u64,
    blocking_busy: u64,
    tasks_alive_track: RateLimitedCounter,
    workers_busy_track: RateLimitedCounter,
    blocking_busy_track: RateLimitedCounter,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            tasks_alive: 0,
            workers_busy: 0,
            blocking_busy: 0,
            tasks_alive_track: RateLimitedCounter::new(Counter::TasksAlive),
            workers_busy_track: RateLimitedCounter::new(Counter::WorkersBusy),
            blocking_busy_track: RateLimitedCounter::new(Counter::BlockingBusy),
        }
    }
}

impl Counters {
    fn thread_changed(&mut self, before: Activity, after: Activity) {
        if before == after {
            return;
        }
        match before {
            Activity::Worker => self.workers_busy -= 1,
            Activity::Blocking => self.blocking_busy -= 1,
            Activity::Idle => {}
        }
        match after {
            Activity::Worker => self.workers_busy += 1,
            Activity::Blocking => self.blocking_busy += 1,
            Activity::Idle => {}
        }
    }

    /// Offers the current values at `now_ns` (each sampler decides whether
    /// to emit, see [`crate::counters`]).
    fn sample(&mut self, now_ns: u64, out: &mut Vec<CounterSample>) {
        self.tasks_alive_track.set(now_ns, self.tasks_alive, out);
        self.workers_busy_track.set(now_ns, self.workers_busy, out);
        self.blocking_busy_track
            .set(now_ns, self.blocking_busy, out);
        self.tasks_alive_track.tick(now_ns, out);
        self.workers_busy_track.tick(now_ns, out);
        self.blocking_busy_track.tick(now_ns, out);
    }

    fn finish(&mut self, out: &mut Vec<CounterSample>) {
        self.tasks_alive_track.finish(out);
        self.workers_busy_track.finish(out);
        self.blocking_busy_track.finish(out);
    }
}

/// A poll that has started but not yet ended.
struct OpenPoll {
    site: u32,
    task: u64,
    task_id: u64,
    start_ns: u64,
    /// The task's end was seen before this poll's start (see `poll_start`).
    after_task_end: bool,
}

/// The outermost park that has started but not yet ended.
struct OpenPark {
    start_ns: u64,
    /// How many probed park functions are on the stack; the slice closes when
    /// this drops back to zero.
    depth: u32,
}

#[derive(Default)]
struct ThreadState {
    stats: ThreadStats,
    open_polls: Vec<OpenPoll>,
    open_park: Option<OpenPark>,
    /// The last task end seen on this thread: (header, timestamp).
    last_task_end: Option<(u64, u64)>,
    /// Its track's name.
    name: String,
}

impl ThreadState {
    fn activity(&self, types: &TaskTypes) -> Activity {
        match self.open_polls.first() {
            None => Activity::Idle,
            Some(outermost) if types.is_blocking(outermost.site) => Activity::Blocking,
            Some(_) => Activity::Worker,
        }
    }

    /// Enters one level of park; true if that opened the park slice.
    fn open_park(&mut self, start_ns: u64) -> bool {
        match &mut self.open_park {
            Some(park) => {
                park.depth += 1;
                false
            }
            None => {
                self.open_park = Some(OpenPark { start_ns, depth: 1 });
                true
            }
        }
    }

    /// Closes the innermost open poll, if any, and returns its slice and
    /// whether the poll belongs to a task that had already ended.
    fn close_poll(
        &mut self,
        tid: u32,
        end_ns: u64,
        truncated: bool,
        await_key: u64,
        is_blocking: impl Fn(u32) -> bool,
    ) -> Option<(Slice, bool)> {
        let poll = self.open_polls.pop()?;
        let slice = Slice {
            tid,
            kind: SliceKind::Poll {
                site: poll.site,
                task: poll.task,
                task_id: poll.task_id,
                await_key,
            },
            start_ns: poll.start_ns,
            // Never end before the start: `finish` may be given an end time
            // taken from another thread's clock reading.
            end_ns: end_ns.max(poll.start_ns),
            truncated,
            end_lost: false,
        };
        let duration = slice.duration_ns();
        let outermost = self.open_polls.is_empty();
        let stats = &mut self.stats;
        stats.polls += 1;
        if is_blocking(poll.site) {
            stats.blocking_polls += 1;
        }
        stats.longest_poll_ns = stats.longest_poll_ns.max(duration);
        if outermost {
            stats.busy_ns += duration;
        }
        stats.last_ns = stats.last_ns.max(slice.end_ns);
        Some((slice, poll.after_task_end))
    }

    /// Leaves one level of park; emits a slice when the outermost level ends.
    /// Returns false if no park was open.
    fn close_park(
        &mut self,
        tid: u32,
        end_ns: u64,
        truncated: bool,
        out: &mut Vec<TimelineOutput>,
    ) -> bool {
        let Some(park) = &mut self.open_park else {
            return false;
        };
        // When truncating, all nested levels end together.
        park.depth = if truncated { 0 } else { park.depth - 1 };
        if park.depth > 0 {
            return true;
        }
        let start_ns = park.start_ns;
        self.open_park = None;
        let slice = Slice {
            tid,
            kind: SliceKind::Park,
            start_ns,
            end_ns: end_ns.max(start_ns),
            truncated,
            end_lost: false,
        };
        self.stats.parks += 1;
        self.stats.parked_ns += slice.duration_ns();
        self.stats.last_ns = self.stats.last_ns.max(slice.end_ns);
        out.push(TimelineOutput::Slice(slice));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{event, park_end, park_start, poll_end};

    fn poll_start(ts_ns: u64, tid: u32, task: u64) -> Event {
        Event {
            site: 7,
            task,
            task_id: task + 1000,
            ..event(ts_ns, tid, EventKind::PollStart)
        }
    }

    fn poll(tid: u32, task: u64, start_ns: u64, end_ns: u64) -> Slice {
        Slice {
            tid,
            kind: SliceKind::Poll {
                site: 7,
                task,
                task_id: task + 1000,
                await_key: 0,
            },
            start_ns,
            end_ns,
            truncated: false,
            end_lost: false,
        }
    }

    fn park(tid: u32, start_ns: u64, end_ns: u64) -> Slice {
        Slice {
            tid,
            kind: SliceKind::Park,
            start_ns,
            end_ns,
            truncated: false,
            end_lost: false,
        }
    }

    /// Feeds all events, returning the slices and which pushes reported a new thread.
    fn run(timeline: &mut Timeline, events: &[Event]) -> (Vec<Slice>, Vec<bool>) {
        let mut outputs = Vec::new();
        let first_seen = events
            .iter()
            .map(|ev| timeline.push(ev, &mut outputs))
            .collect();
        (slices_in(outputs), first_seen)
    }

    /// The slices among `outputs`, in order.
    fn slices_in(outputs: Vec<TimelineOutput>) -> Vec<Slice> {
        outputs
            .into_iter()
            .filter_map(|output| match output {
                TimelineOutput::Slice(slice) => Some(slice),
                _ => None,
            })
            .collect()
    }

    /// Runs `finish` and returns the slices it closed.
    fn finish(timeline: &mut Timeline, end_ns: u64) -> Vec<Slice> {
        let mut outputs = Vec::new();
        timeline.finish(end_ns, &mut outputs);
        slices_in(outputs)
    }

    fn stats_of(timeline: &Timeline, tid: u32) -> ThreadStats {
        timeline
            .threads()
            .find(|(t, _)| *t == tid)
            .map(|(_, s)| s.clone())
            .expect("thread was seen")
    }

    #[test]
    fn pairs_polls_and_parks_on_one_thread() {
        let mut timeline = Timeline::new();
        let (slices, first_seen) = run(
            &mut timeline,
            &[
                poll_start(100, 1, 0xa0),
                poll_end(150, 1),
                park_start(160, 1),
                park_end(400, 1),
                poll_start(410, 1, 0xb0),
                poll_end(420, 1),
            ],
        );
        assert_eq!(
            slices,
            vec![
                poll(1, 0xa0, 100, 150),
                park(1, 160, 400),
                poll(1, 0xb0, 410, 420)
            ]
        );
        assert_eq!(first_seen, vec![true, false, false, false, false, false]);
        assert_eq!(timeline.unmatched_ends(), 0);
    }

    #[test]
    fn interleaved_threads_pair_independently() {
        let mut timeline = Timeline::new();
        // Thread 2's events arrive slightly out of timestamp order relative
        // to thread 1, as they can from the ring buffer.
        let (slices, first_seen) = run(
            &mut timeline,
            &[
                poll_start(100, 1, 0xa0),
                poll_start(95, 2, 0xb0),
                park_start(105, 3),
                poll_end(130, 2),
                poll_end(200, 1),
                park_end(300, 3),
            ],
        );
        assert_eq!(
            slices,
            vec![
                poll(2, 0xb0, 95, 130),
                poll(1, 0xa0, 100, 200),
                park(3, 105, 300)
            ]
        );
        assert_eq!(first_seen, vec![true, true, true, false, false, false]);
        let order: Vec<u32> = timeline.threads().map(|(tid, _)| tid).collect();
        assert_eq!(
            order,
            vec![1, 2, 3],
            "threads are listed in first-seen order"
        );
    }

    #[test]
    fn many_threads_each_get_their_own_slices() {
        let mut timeline = Timeline::new();
        let mut events = Vec::new();
        for round in 0..10u64 {
            for tid in 1..=8u32 {
                let t = round * 1000 + u64::from(tid);
                events.push(poll_start(t, tid, u64::from(tid)));
            }
            for tid in 1..=8u32 {
                events.push(poll_end(round * 1000 + 500 + u64::from(tid) * 10, tid));
            }
        }
        let (slices, _) = run(&mut timeline, &events);
        assert_eq!(slices.len(), 80);
        for (tid, stats) in timeline.threads() {
            assert_eq!(stats.polls, 10, "thread {tid}");
            let expected_poll = 500 + u64::from(tid) * 10 - u64::from(tid);
            assert_eq!(stats.busy_ns, 10 * expected_poll, "thread {tid}");
            assert_eq!(stats.longest_poll_ns, expected_poll, "thread {tid}");
        }
    }

    #[test]
    fn nested_parks_keep_only_the_outermost() {
        let mut timeline = Timeline::new();
        let (slices, _) = run(
            &mut timeline,
            &[
                park_start(100, 1),
                park_start(110, 1),
                park_start(120, 1),
                park_end(130, 1),
                park_end(140, 1),
                park_end(500, 1),
            ],
        );
        assert_eq!(slices, vec![park(1, 100, 500)]);
        let stats = stats_of(&timeline, 1);
        assert_eq!((stats.parks, stats.parked_ns), (1, 400));
        assert_eq!(timeline.unmatched_ends(), 0);
    }

    #[test]
    fn nested_polls_become_nested_slices() {
        let mut timeline = Timeline::new();
        // A task calls block_on, which polls another task on the same thread.
        let (slices, _) = run(
            &mut timeline,
            &[
                poll_start(100, 1, 0xa0),
                poll_start(120, 1, 0xb0),
                poll_end(170, 1),
                poll_end(300, 1),
            ],
        );
        assert_eq!(
            slices,
            vec![poll(1, 0xb0, 120, 170), poll(1, 0xa0, 100, 300)]
        );
        let stats = stats_of(&timeline, 1);
        assert_eq!(stats.polls, 2);
        assert_eq!(
            stats.busy_ns, 200,
            "the nested poll's time is inside its parent's and not added twice"
        );
        assert_eq!(stats.longest_poll_ns, 200);
    }

    #[test]
    fn ends_without_start_are_counted_and_dropped() {
        let mut timeline = Timeline::new();
        // Tracing began while thread 1 was mid-poll and thread 2 mid-park.
        let (slices, first_seen) = run(
            &mut timeline,
            &[
                poll_end(100, 1),
                park_end(105, 2),
                poll_start(110, 1, 0xa0),
                poll_end(120, 1),
                poll_end(130, 1),
            ],
        );
        assert_eq!(slices, vec![poll(1, 0xa0, 110, 120)]);
        assert_eq!(timeline.unmatched_ends(), 3);
        assert_eq!(timeline.abandoned(), 0);
        assert_eq!(
            first_seen,
            vec![true, true, false, false, false],
            "an unmatched end still introduces its thread"
        );
    }

    #[test]
    fn unknown_kinds_are_counted_and_ignored() {
        let mut timeline = Timeline::new();
        let garbage = Event {
            ts_ns: 5,
            tid: 9,
            kind: 77,
            ..Event::default()
        };
        let (slices, first_seen) = run(
            &mut timeline,
            &[garbage, poll_start(10, 9, 1), poll_end(20, 9)],
        );
        assert_eq!(slices.len(), 1);
        assert_eq!(timeline.unknown_kinds(), 1);
        assert_eq!(first_seen, vec![false, true, false]);
        assert_eq!(stats_of(&timeline, 9).first_ns, 10);
    }

    #[test]
    fn finish_truncates_open_slices() {
        let mut timeline = Timeline::new();
        let (_, _) = run(
            &mut timeline,
            &[
                park_start(100, 1),
                park_start(110, 1),
                poll_start(200, 2, 0xa0),
                poll_start(250, 2, 0xb0),
                poll_start(300, 3, 0xc0),
                poll_end(350, 3),
            ],
        );
        let slices = finish(&mut timeline, 1000);
        let truncated = |mut slice: Slice| {
            slice.truncated = true;
            slice
        };
        assert_eq!(
            slices,
            vec![
                truncated(park(1, 100, 1000)),
                truncated(poll(2, 0xb0, 250, 1000)),
                truncated(poll(2, 0xa0, 200, 1000))
            ]
        );
        assert_eq!(stats_of(&timeline, 2).busy_ns, 800);
        assert_eq!(stats_of(&timeline, 2).last_ns, 1000);

        // Everything is closed now: finishing again adds nothing.
        assert!(finish(&mut timeline, 2000).is_empty());
    }

    #[test]
    fn finish_before_a_start_never_yields_negative_durations() {
        let mut timeline = Timeline::new();
        let (_, _) = run(&mut timeline, &[poll_start(500, 1, 0xa0)]);
        // The end time came from another thread's slightly earlier clock reading.
        let slices = finish(&mut timeline, 490);
        assert_eq!(slices[0].start_ns, 500);
        assert_eq!(slices[0].end_ns, 500);
        assert_eq!(slices[0].duration_ns(), 0);
    }

    #[test]
    fn stats_add_up() {
        let mut timeline = Timeline::new();
        run(
            &mut timeline,
            &[
                poll_start(1_000, 1, 1),
                poll_end(1_300, 1), // 300
                park_start(1_400, 1),
                park_end(5_400, 1), // parked 4000
                poll_start(5_500, 1, 2),
                poll_end(6_500, 1), // 1000
                poll_start(6_600, 1, 3),
                poll_end(6_650, 1), // 50
                park_start(7_000, 1),
                park_end(7_100, 1), // parked 100
            ],
        );
        let stats = stats_of(&timeline, 1);
        assert_eq!(stats.polls, 3);
        assert_eq!(stats.parks, 2);
        assert_eq!(stats.busy_ns, 1_350);
        assert_eq!(stats.parked_ns, 4_100);
        assert_eq!(stats.longest_poll_ns, 1_000);
        assert_eq!((stats.first_ns, stats.last_ns), (1_000, 7_100));
    }

    #[test]
    fn polls_whose_end_was_lost_are_abandoned_not_counted() {
        let mut timeline = Timeline::new();
        let mut out = Vec::new();
        // Task A's end is lost; A is polled again: the first poll is dropped.
        timeline.push(&poll_start(100, 1, 0xa), &mut out);
        timeline.push(&poll_start(200, 1, 0xa), &mut out);
        timeline.push(&poll_end(250, 1), &mut out);
        // Task B's end is lost; the worker parks: B's poll is dropped.
        timeline.push(&poll_start(300, 1, 0xb), &mut out);
        timeline.push(&park_start(400, 1), &mut out);
        timeline.push(&park_end(500, 1), &mut out);
        assert_eq!(timeline.abandoned(), 2);
        // Every slice that started is closed, the abandoned ones marked
        // `end_lost` and ended where the loss became clear.
        let starts = out
            .iter()
            .filter(|o| matches!(o, TimelineOutput::SliceStart(_)))
            .count();
        let out = slices_in(out);
        assert_eq!(starts, out.len());
        let shape: Vec<_> = out
            .iter()
            .map(|s| (s.start_ns, s.end_ns, s.end_lost))
            .collect();
        assert_eq!(
            shape,
            [
                (100, 200, true),
                (200, 250, false),
                (300, 400, true),
                (400, 500, false)
            ]
        );
        assert_eq!(out[3].kind, SliceKind::Park);
        assert_eq!(
            stats_of(&timeline, 1).polls,
            1,
            "lost polls are not counted"
        );
    }
}
