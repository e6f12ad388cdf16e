//! What the [`Timeline`](crate::timeline::Timeline) produces: closed slices
//! and the scheduler's story around them. Plain data; rendering is
//! [`render`](crate::render)'s job.

use crate::counters::CounterSample;
use crate::tasks::TaskStats;

/// Identifies one wake-to-poll flow arrow. Unique within a trace.
pub type FlowId = u64;

/// One thing the timeline learned from an event.
#[derive(Clone, Debug, PartialEq)]
pub enum TimelineOutput {
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
    /// A task ended; its final totals.
    TaskEnd(TaskEnd),
    /// A parked worker was unparked from this thread.
    Unpark(Unpark),
    /// A counter changed (rate-limited, see [`crate::counters`]).
    Counter(CounterSample),
}

/// What a slice of a thread's time was spent on.
#[derive(Clone, Debug, PartialEq)]
pub enum SliceKind {
    /// Polling one task. `site` is the probe site index (which
    /// `raw::poll<T, S>` instance), `task` the task header address and
    /// `task_id` the tokio task id, or 0 when it could not be read.
    Poll { site: u32, task: u64, task_id: u64 },
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
