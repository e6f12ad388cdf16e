//! What the [`Timeline`](crate::timeline::Timeline) produces: everything a
//! trace shows, as plain data: slices, the scheduler's story around them,
//! CPU samples and thread names. Writing it down in a file format is a
//! [`TraceWriter`](crate::writer::TraceWriter)'s job; this module depends on
//! nothing but the counters' names.

use crate::counters::CounterSample;

/// Where the [`Timeline`](crate::timeline::Timeline) puts its outputs, in
/// order: a `Vec` to look at later (tests, the watch tier), or the trace
/// writers themselves when rendering, so an output goes from where it is
/// made to the writer without a round trip through a `Vec`.
///
/// Why: pushing each output (72 bytes) to a `Vec`, then draining it to the
/// writers, moved every output twice more and dropped it from the `Vec`;
/// those moves and the drain were ~7 % of rendering's CPU (perf, 20 s of the
/// HTTP benchmark; NOTES.md, "Rendering rate, third round").
pub trait Outputs {
    fn push(&mut self, output: TimelineOutput);

    fn extend(&mut self, outputs: impl IntoIterator<Item = TimelineOutput>) {
        for output in outputs {
            self.push(output);
        }
    }
}

impl Outputs for Vec<TimelineOutput> {
    #[inline]
    fn push(&mut self, output: TimelineOutput) {
        Vec::push(self, output);
    }

    fn extend(&mut self, outputs: impl IntoIterator<Item = TimelineOutput>) {
        Extend::extend(self, outputs);
    }
}

/// Identifies one wake-to-poll flow arrow. Unique within a trace.
pub type FlowId = u64;

/// One thing the timeline learned from an event.
#[derive(Clone, Debug, PartialEq)]
pub enum TimelineOutput {
    /// The thread's first output, or its final name (a blocking-pool thread
    /// is known for sure only at the end): name its track.
    ThreadName(ThreadName),
    /// A poll or park slice opened. Every opened slice is closed by a later
    /// [`Slice`](Self::Slice) on the same thread, innermost first.
    SliceStart(SliceStart),
    /// A poll or park slice closed.
    Slice(Slice),
    /// A task was spawned. It is runnable from here: the flow `flow` ends at
    /// its first poll.
    Spawn(Spawn),
    /// A task was woken.
    Wake(Wake),
    /// A poll started whose task was made runnable by a traced wake or spawn:
    /// the flow ends here, and `delay_ns` is the scheduling delay.
    WokenPoll(WokenPoll),
    /// A task ended; its final totals. Boxed: inline, its totals made
    /// every output 136 bytes instead of 56, moved twice per output on the
    /// render path (memmove was ~7 % of rendering).
    TaskEnd(Box<TaskEnd>),
    /// A parked worker was unparked from this thread.
    Unpark(Unpark),
    /// A counter changed (rate-limited, see [`crate::counters`]).
    Counter(CounterSample),
    /// A CPU sample, with the task it hit.
    Sample(Sample),
    /// What the watch tier keeps (off-CPU spans, findings, health; see
    /// [`crate::watch`]). Boxed: outputs stay 56 bytes.
    Watch(Box<crate::watch::WatchOutput>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ThreadName {
    pub tid: u32,
    pub name: String,
    /// Position among the process's tracks.
    pub sort_index: u32,
}

/// A slice opening. Known at the start: what the slice is and which flow, if
/// any, ends here; the rest comes with its [`Slice`].
#[derive(Clone, Debug, PartialEq)]
pub struct SliceStart {
    pub tid: u32,
    pub ts_ns: u64,
    /// `await_key` is always 0 here (known only at the poll's end).
    pub kind: SliceKind,
    /// The wake (or spawn) flow this poll ends, as in [`WokenPoll`].
    pub woken_by: Option<FlowId>,
}

/// An interned stack, as numbered by the recorder (see
/// [`Symbols`](crate::symbols::Symbols)).
pub type StackId = u32;

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub tid: u32,
    pub ts_ns: u64,
    /// The task running on the thread, 0 when none.
    pub task_id: u64,
    /// Its type (probe site), when the task was polled before.
    pub site: Option<u32>,
    pub stack: StackId,
}

/// What a slice of a thread's time was spent on.
#[derive(Clone, Debug, PartialEq)]
pub enum SliceKind {
    /// Polling one task. `site` is the probe site index (which
    /// `raw::poll<T, S>` instance), `task` the task header address and
    /// `task_id` the tokio task id, or 0 when it could not be read.
    /// `await_key` names the await point the task waits at after this poll
    /// (see [`Symbols::await_point`](crate::symbols::Symbols::await_point)),
    /// 0 when none was seen.
    Poll {
        site: u32,
        task: u64,
        task_id: u64,
        await_key: u64,
    },
    /// The worker was parked (idle, waiting for work or I/O).
    Park,
}

/// A closed interval of one thread's time. Times are raw `CLOCK_MONOTONIC` ns.
#[derive(Clone, Debug, PartialEq)]
pub struct Slice {
    pub tid: u32,
    pub kind: SliceKind,
    pub start_ns: u64,
    pub end_ns: u64,
    /// The slice was still open when recording ended; `end_ns` is the end of
    /// the recording, not the real end.
    pub truncated: bool,
    /// The slice's end event was lost (the task was polled again, or the
    /// thread parked, first): `end_ns` is when that became clear. Such polls
    /// are not counted; a writer that had to open the slice closes it here.
    pub end_lost: bool,
    /// A poll's time its thread spent preempted (runnable, but taken off
    /// CPU by the kernel), included in its duration; 0 for parks, and where
    /// the kernel's `sched_switch` could not be traced.
    pub preempted_ns: u64,
}

impl Slice {
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

/// Who woke a task (or unparked a worker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waker {
    /// The task running on the waking thread; `task_id` 0 if its id is unknown.
    Task { task_id: u64 },
    /// No task was running and the thread was parked: the I/O driver or the
    /// timer, which run inside park.
    Driver,
    /// No task was running and the thread was not parked: a thread outside
    /// the runtime, or a worker between polls.
    Thread,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Spawn {
    /// The thread `spawn` was called on.
    pub tid: u32,
    pub ts_ns: u64,
    /// The new task's header address and id (0 if unread).
    pub task: u64,
    pub task_id: u64,
    /// The spawning task's id; 0 when not spawned from a task.
    pub spawner_id: u64,
    /// Where `spawn` was called, as an address in the target; 0 if unknown.
    pub call_site: u64,
    pub flow: FlowId,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Wake {
    /// The waking thread.
    pub tid: u32,
    pub ts_ns: u64,
    /// The woken task.
    pub task: u64,
    pub task_id: u64,
    /// The woken task's probe site, if it was polled before.
    pub site: Option<u32>,
    pub waker: Waker,
    /// The waking thread was inside a poll slice, so a flow can start from
    /// that slice; otherwise the renderer needs an instant to anchor it.
    pub in_poll: bool,
    /// Set when this wake made the task runnable: the flow to its next poll.
    /// `None` for a wake of a task that was already runnable (it changes
    /// nothing: tokio schedules a notified task once).
    pub flow: Option<FlowId>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WokenPoll {
    /// The polling thread.
    pub tid: u32,
    /// The poll's start.
    pub ts_ns: u64,
    pub task: u64,
    pub task_id: u64,
    pub site: u32,
    pub flow: FlowId,
    /// From the wake (or spawn) that made the task runnable to this poll.
    pub delay_ns: u64,
}

/// One task's totals over its life in the trace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskStats {
    /// Header address and tokio id (0 if unread).
    pub task: u64,
    pub task_id: u64,
    /// The probe site of its polls; `None` until its first poll.
    pub site: Option<u32>,
    /// When the spawn was seen; `None` when it happened before tracing.
    pub spawned_ns: Option<u64>,
    /// The spawning task's id; 0 when not spawned from a task or not seen.
    pub spawner_id: u64,
    /// Where it was spawned (`Spawn::call_site`); 0 if unknown.
    pub spawn_call_site: u64,
    /// The first event that mentioned the task: its life in the trace starts here.
    pub first_seen_ns: u64,
    pub polls: u64,
    /// Time inside its polls (a poll nested in another task's poll counts for both).
    pub busy_ns: u64,
    pub longest_poll_ns: u64,
    pub times_woken: u64,
    /// Polls whose scheduling delay was measured, and the delays' sum and max.
    pub delays: u64,
    pub delay_sum_ns: u64,
    pub delay_max_ns: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TaskEnd {
    /// The thread the end was seen on.
    pub tid: u32,
    pub ts_ns: u64,
    pub stats: TaskStats,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Unpark {
    /// The unparking thread.
    pub tid: u32,
    pub ts_ns: u64,
    pub unparker: Waker,
}
