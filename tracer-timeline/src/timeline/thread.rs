//! One thread's pairing state: its open polls (a stack, since polls nest),
//! its outermost open park, the last task end it saw, and its totals.
//!
//! Kept apart from [`super::Timeline`] because it is the part that never
//! looks at another thread: everything here is decided from one thread's
//! ordered events (see the parent module's docs for why pairing is per
//! thread), while the timeline does the cross-thread work (tasks, wakes,
//! counters).

use crate::counters::Activity;
use crate::histogram::Histogram;
use crate::output::{Outputs, Slice, SliceKind, TimelineOutput};
use crate::task_types::TaskTypes;

/// Per-thread totals, updated as slices close.
#[derive(Clone, Debug, Default)]
pub struct ThreadStats {
    /// Poll slices closed, nested ones included.
    pub polls: u64,
    /// Of those, polls of `spawn_blocking` tasks.
    pub blocking_polls: u64,
    /// Of those, polls of a `block_on` root future (not a task).
    pub root_polls: u64,
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

    /// The thread polled only a `block_on` root future: the thread that
    /// called a multi-thread runtime's `block_on`, not one of its workers
    /// (a current-thread runtime's thread polls its tasks too).
    pub fn only_polled_a_root(&self) -> bool {
        self.polls > 0 && self.root_polls == self.polls
    }
}

/// How a poll ended, from its end event (or the end of the recording).
#[derive(Clone, Copy, Default)]
pub(crate) struct PollEnding {
    pub end_ns: u64,
    /// Still running when recording ended.
    pub truncated: bool,
    /// The await point its waker was registered at last (0: none).
    pub await_key: u64,
    /// Time its thread spent preempted during it.
    pub preempted_ns: u64,
}

/// A poll that has started but not yet ended.
pub(crate) struct OpenPoll {
    pub(crate) site: u32,
    pub(crate) task: u64,
    pub(crate) task_id: u64,
    pub(crate) start_ns: u64,
    /// The task's end was seen before this poll's start (see `poll_start`).
    pub(crate) after_task_end: bool,
}

/// The outermost park that has started but not yet ended.
pub(crate) struct OpenPark {
    pub(crate) start_ns: u64,
    /// How many probed park functions are on the stack; the slice closes when
    /// this drops back to zero.
    pub(crate) depth: u32,
}

#[derive(Default)]
pub(crate) struct ThreadState {
    pub(crate) stats: ThreadStats,
    pub(crate) open_polls: Vec<OpenPoll>,
    pub(crate) open_park: Option<OpenPark>,
    /// The last task end seen on this thread: (header, timestamp).
    pub(crate) last_task_end: Option<(u64, u64)>,
    /// Its track's name.
    pub(crate) name: String,
}

impl ThreadState {
    pub(crate) fn activity(&self, types: &TaskTypes) -> Activity {
        match self.open_polls.first() {
            None => Activity::Idle,
            Some(outermost) if types.is_blocking(outermost.site) => Activity::Blocking,
            Some(_) => Activity::Worker,
        }
    }

    /// Enters one level of park; true if that opened the park slice.
    pub(crate) fn open_park(&mut self, start_ns: u64) -> bool {
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
    pub(crate) fn close_poll(
        &mut self,
        tid: u32,
        end: PollEnding,
        is_blocking: impl Fn(u32) -> bool,
    ) -> Option<(Slice, bool)> {
        let poll = self.open_polls.pop()?;
        // Never end before the start: `finish` may be given an end time
        // taken from another thread's clock reading.
        let end_ns = end.end_ns.max(poll.start_ns);
        let slice = Slice {
            tid,
            kind: SliceKind::Poll {
                site: poll.site,
                task: poll.task,
                task_id: poll.task_id,
                await_key: end.await_key,
            },
            start_ns: poll.start_ns,
            end_ns,
            truncated: end.truncated,
            end_lost: false,
            // At most the poll: the end probe can itself be preempted
            // between its clock read and its reading of the slot.
            preempted_ns: end.preempted_ns.min(end_ns - poll.start_ns),
        };
        let duration = slice.duration_ns();
        let outermost = self.open_polls.is_empty();
        let stats = &mut self.stats;
        stats.polls += 1;
        if is_blocking(poll.site) {
            stats.blocking_polls += 1;
        }
        if tracer_common::is_root_id(poll.task_id) {
            stats.root_polls += 1;
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
    pub(crate) fn close_park(
        &mut self,
        tid: u32,
        end_ns: u64,
        truncated: bool,
        out: &mut impl Outputs,
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
            preempted_ns: 0,
        };
        self.stats.parks += 1;
        self.stats.parked_ns += slice.duration_ns();
        self.stats.last_ns = self.stats.last_ns.max(slice.end_ns);
        out.push(TimelineOutput::Slice(slice));
        true
    }
}
