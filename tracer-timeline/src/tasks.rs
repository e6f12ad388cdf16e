//! Per-task bookkeeping: which tasks are alive, when each became runnable,
//! and totals per task and per task type.
//!
//! A task is known by its header address while it lives. Its state is created
//! by whatever event mentions it first (a spawn, a poll, a wake) and dropped
//! at its end, so memory is bounded by the tasks alive, not by the events.
//! What must outlive a task is folded into fixed-size aggregates: totals per
//! task type (bounded by the probe sites) and the few longest polls.
//!
//! Scheduling delay: a task becomes runnable at its spawn or at the first
//! wake after it was last polled; the delay is the time from there to its
//! next poll start. A wake that arrives while the task is being polled (it
//! woke itself, or was woken from another thread mid-poll) makes it runnable
//! only from the end of that poll, since tokio cannot run it again sooner.

use std::collections::HashMap;

use crate::FastMap;

use tracer_common::Event;

use crate::histogram::Histogram;
pub use crate::output::TaskStats;
use crate::output::{FlowId, Spawn, TaskEnd, Wake, Waker, WokenPoll};
use crate::type_table::TypeTable;

/// How many of the longest polls (one per task) the summary lists.
pub const LONGEST_POLLS_KEPT: usize = 5;

/// Totals over all tasks of one type (one probe site; `None` for tasks that
/// ended without ever being polled).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskTypeStats {
    /// Tasks of this type seen (counted at their first poll, or at their end
    /// if they were never polled).
    pub tasks: u64,
    pub ended: u64,
    pub polls: u64,
    pub busy_ns: u64,
    pub longest_poll_ns: u64,
    pub times_woken: u64,
    pub scheduling_delay: Histogram,
    /// Spawns by call site (`Spawn::call_site`), of the tasks counted in
    /// `tasks`. Bounded by the program's spawn calls.
    pub spawn_call_sites: HashMap<u64, u64>,
    /// Polls by the await point they ended at ((task id, await key), as
    /// `Symbols::await_point` takes it; key 0 left out): what the tasks
    /// waited on, once symbolized. Bounded like the await stacks: one
    /// entry per task and await point.
    pub await_points: FastMap<(u64, u64), u64>,
}

/// One poll, kept because it is among the longest.
#[derive(Clone, Debug, PartialEq)]
pub struct LongPoll {
    pub task: u64,
    pub task_id: u64,
    pub site: u32,
    /// The thread it held.
    pub tid: u32,
    pub start_ns: u64,
    pub duration_ns: u64,
    /// Of `duration_ns`, the time its thread was preempted (runnable, taken
    /// off CPU by the kernel: not the task's doing).
    pub preempted_ns: u64,
    /// Still running when recording ended: the real poll was longer.
    pub truncated: bool,
}

impl LongPoll {
    /// How long the poll held its worker by its own doing: its duration
    /// less the time it was preempted. What ranks the longest polls and
    /// makes a hog: on a loaded machine a short poll preempted for
    /// milliseconds is not one.
    pub fn held_ns(&self) -> u64 {
        self.duration_ns.saturating_sub(self.preempted_ns)
    }
}

/// Counts over the whole trace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskTotals {
    pub spawned: u64,
    pub ended: u64,
    /// Tasks whose end event never came: their header was reused by a new
    /// task (or their id changed), so they were closed without one.
    pub ends_lost: u64,
    pub wakes_by_task: u64,
    pub wakes_by_driver: u64,
    pub wakes_by_thread: u64,
}

struct LiveTask {
    /// Distinguishes this task from later ones that reuse its header.
    serial: u64,
    stats: TaskStats,
    runnable: Option<Runnable>,
    /// Start of the poll in progress.
    polling_since: Option<u64>,
    /// The end event arrived mid-poll (tokio releases a finished task inside
    /// its last poll): finish the task when that poll closes.
    end_pending: Option<(u32, u64)>,
    /// The (task id, site) this task is entered under in `site_by_id`.
    indexed: Option<(u64, u32)>,
}

/// The task is waiting to be polled since `since_ns`.
struct Runnable {
    since_ns: u64,
    flow: FlowId,
}

/// A poll that just closed, as the tracker needs it.
pub(crate) struct ClosedPoll {
    pub tid: u32,
    pub task: u64,
    pub site: u32,
    /// (task id, await key) of the await point it ended at.
    pub await_point: (u64, u64),
    pub start_ns: u64,
    pub end_ns: u64,
    /// Time its thread spent preempted during it.
    pub preempted_ns: u64,
    pub truncated: bool,
    /// `spawn_blocking` work: not a hog, it runs where blocking is fine.
    pub blocking: bool,
}

#[derive(Default)]
pub(crate) struct TaskTracker {
    live: FastMap<u64, LiveTask>,
    /// How many of `live` are tokio's tasks (not `block_on` root futures):
    /// kept as they come and go, since the tasks-alive counter reads it at
    /// every event (counting the map each time cost O(tasks) per event).
    tokio_alive: usize,
    /// The probe site of each live task, by task id: samples carry only the
    /// id. Written when a task's (id, site) first shows in a poll, not per
    /// poll (an insert per poll was most of `Timeline::push`'s map work).
    site_by_id: FastMap<u64, u32>,
    next_serial: u64,
    next_flow: FlowId,
    by_type: TypeTable,
    /// (task serial, poll), longest first, one entry per task.
    longest_polls: Vec<(u64, LongPoll)>,
    totals: TaskTotals,
}

impl TaskTracker {
    /// The tasks alive now: tokio's, not the `block_on` root futures the
    /// tracer shows as tasks (never spawned, and alive as long as their
    /// `block_on`).
    pub(crate) fn alive(&self) -> usize {
        self.tokio_alive
    }

    pub(crate) fn live_tasks(&self) -> impl Iterator<Item = &TaskStats> {
        self.live.values().map(|task| &task.stats)
    }

    pub(crate) fn by_type(&self) -> impl Iterator<Item = (Option<u32>, &TaskTypeStats)> {
        self.by_type.iter()
    }

    pub(crate) fn longest_polls(&self) -> impl Iterator<Item = &LongPoll> {
        self.longest_polls.iter().map(|(_, poll)| poll)
    }

    pub(crate) fn totals(&self) -> &TaskTotals {
        &self.totals
    }

    /// The probe site of the live task with id `task_id`, once polled.
    pub(crate) fn site_of(&self, task_id: u64) -> Option<u32> {
        self.site_by_id.get(&task_id).copied()
    }

    pub(crate) fn spawn(&mut self, ev: &Event, ended: &mut Vec<TaskEnd>) -> Spawn {
        // A spawn on a live header means the old task's end was lost.
        if let Some(stale) = self.remove(ev.task) {
            self.totals.ends_lost += 1;
            ended.push(self.finalize(stale, ev.tid, ev.ts_ns));
        }
        let flow = self.new_flow();
        let task = self.insert(ev.task, ev.task_id, ev.ts_ns);
        task.stats.spawned_ns = Some(ev.ts_ns);
        task.stats.spawner_id = ev.other_task_id;
        task.stats.spawn_call_site = ev.addr;
        task.runnable = Some(Runnable {
            since_ns: ev.ts_ns,
            flow,
        });
        self.totals.spawned += 1;
        Spawn {
            tid: ev.tid,
            ts_ns: ev.ts_ns,
            task: ev.task,
            task_id: ev.task_id,
            spawner_id: ev.other_task_id,
            call_site: ev.addr,
            flow,
        }
    }

    pub(crate) fn wake(
        &mut self,
        ev: &Event,
        waker: Waker,
        in_poll: bool,
        ended: &mut Vec<TaskEnd>,
    ) -> Wake {
        match waker {
            Waker::Task { .. } => self.totals.wakes_by_task += 1,
            Waker::Driver => self.totals.wakes_by_driver += 1,
            Waker::Thread => self.totals.wakes_by_thread += 1,
        }
        self.ensure_task(ev, ended);
        let task = self.live.get_mut(&ev.task).expect("ensured above");
        task.stats.times_woken += 1;
        let site = task.stats.site;
        // The eBPF side does not read the woken task's id (see
        // `EventKind::Wake`): the live task knows it.
        let task_id = task.stats.task_id;
        // A wake older than the poll in progress was overtaken by that poll
        // in the ring buffer: it is what made this poll happen, not the next.
        let overtaken = task.polling_since.is_some_and(|start| ev.ts_ns < start);
        let mut flow = None;
        if task.runnable.is_none() && !overtaken {
            self.next_flow += 1;
            flow = Some(self.next_flow);
            task.runnable = Some(Runnable {
                since_ns: ev.ts_ns,
                flow: self.next_flow,
            });
        }
        if let Some(site) = site {
            self.by_type.entry(Some(site)).times_woken += 1;
        }
        Wake {
            tid: ev.tid,
            ts_ns: ev.ts_ns,
            task: ev.task,
            task_id,
            site,
            waker,
            in_poll,
            flow,
        }
    }

    /// A poll started. Returns the flow and delay if a traced wake or spawn
    /// made the task runnable.
    pub(crate) fn poll_start(&mut self, ev: &Event, ended: &mut Vec<TaskEnd>) -> Option<WokenPoll> {
        self.ensure_task(ev, ended);
        let task = self.live.get_mut(&ev.task).expect("ensured above");
        let first_poll = task.stats.site.is_none();
        task.stats.site = Some(ev.site);
        if ev.task_id != 0 && task.indexed != Some((ev.task_id, ev.site)) {
            if let Some((old_id, _)) = task.indexed {
                self.site_by_id.remove(&old_id);
            }
            self.site_by_id.insert(ev.task_id, ev.site);
            task.indexed = Some((ev.task_id, ev.site));
        }
        task.polling_since = Some(ev.ts_ns);
        // A wake stamped after this poll's start happened during it (with
        // `--min-poll`, a poll's events arrive only at its end, after what
        // happened inside it): it makes the task runnable after this poll.
        let runnable = match &task.runnable {
            Some(runnable) if runnable.since_ns > ev.ts_ns => None,
            _ => task.runnable.take(),
        };
        let woken = runnable.map(|runnable| {
            let delay_ns = ev.ts_ns.saturating_sub(runnable.since_ns);
            let stats = &mut task.stats;
            stats.delays += 1;
            stats.delay_sum_ns = stats.delay_sum_ns.saturating_add(delay_ns);
            stats.delay_max_ns = stats.delay_max_ns.max(delay_ns);
            WokenPoll {
                tid: ev.tid,
                ts_ns: ev.ts_ns,
                task: ev.task,
                task_id: ev.task_id,
                site: ev.site,
                flow: runnable.flow,
                delay_ns,
            }
        });
        let type_stats = self.by_type.entry(Some(ev.site));
        if first_poll {
            // The task's type is known from now on; its wakes so far could
            // not be attributed to the type until now.
            type_stats.tasks += 1;
            type_stats.times_woken += task.stats.times_woken;
            if task.stats.spawn_call_site != 0 {
                *type_stats
                    .spawn_call_sites
                    .entry(task.stats.spawn_call_site)
                    .or_default() += 1;
            }
        }
        if let Some(woken) = &woken {
            type_stats.scheduling_delay.record(woken.delay_ns);
        }
        woken
    }

    /// A poll closed (ended, or truncated at the end of recording). Finishes
    /// the task if its end arrived during this poll.
    pub(crate) fn poll_end(&mut self, poll: &ClosedPoll, ended: &mut Vec<TaskEnd>) {
        let Some(task) = self.live.get_mut(&poll.task) else {
            return;
        };
        let duration = poll.end_ns.saturating_sub(poll.start_ns);
        let stats = &mut task.stats;
        stats.polls += 1;
        stats.busy_ns += duration;
        stats.longest_poll_ns = stats.longest_poll_ns.max(duration);
        task.polling_since = None;
        if let Some(runnable) = &mut task.runnable {
            runnable.since_ns = runnable.since_ns.max(poll.end_ns);
        }
        let type_stats = self.by_type.entry(Some(poll.site));
        type_stats.polls += 1;
        type_stats.busy_ns += duration;
        type_stats.longest_poll_ns = type_stats.longest_poll_ns.max(duration);
        if poll.await_point.1 != 0 {
            *type_stats.await_points.entry(poll.await_point).or_default() += 1;
        }
        let serial = task.serial;
        let long_poll = LongPoll {
            task: poll.task,
            task_id: task.stats.task_id,
            site: poll.site,
            tid: poll.tid,
            start_ns: poll.start_ns,
            duration_ns: duration,
            preempted_ns: poll.preempted_ns,
            truncated: poll.truncated,
        };
        let end_pending = task.end_pending;
        if !poll.blocking {
            self.offer_long_poll(serial, long_poll);
        }
        if let Some((tid, ts_ns)) = end_pending {
            self.end_now(poll.task, tid, ts_ns, ended);
        }
    }

    /// A poll's end event was lost; it will never close.
    pub(crate) fn poll_abandoned(&mut self, task: u64, ended: &mut Vec<TaskEnd>) {
        let Some(state) = self.live.get_mut(&task) else {
            return;
        };
        state.polling_since = None;
        if let Some((tid, ts_ns)) = state.end_pending {
            self.end_now(task, tid, ts_ns, ended);
        }
    }

    /// The task ended. If it is mid-poll, it is finished when that poll closes.
    pub(crate) fn task_end(&mut self, ev: &Event, ended: &mut Vec<TaskEnd>) {
        self.ensure_task(ev, ended);
        let task = self.live.get_mut(&ev.task).expect("ensured above");
        if task.polling_since.is_some() {
            task.end_pending = Some((ev.tid, ev.ts_ns));
        } else {
            self.end_now(ev.task, ev.tid, ev.ts_ns, ended);
        }
    }

    fn end_now(&mut self, task: u64, tid: u32, ts_ns: u64, ended: &mut Vec<TaskEnd>) {
        if let Some(task) = self.remove(task) {
            ended.push(self.finalize(task, tid, ts_ns));
        }
    }

    /// Makes sure `ev.task` has a live state. A live task with a different
    /// id is one whose end was lost: it is finished first and a fresh state
    /// takes its place.
    fn ensure_task(&mut self, ev: &Event, ended: &mut Vec<TaskEnd>) {
        if let Some(task) = self.live.get_mut(&ev.task) {
            let old_id = task.stats.task_id;
            if ev.task_id == 0 || old_id == ev.task_id {
                return;
            }
            if old_id == 0 {
                task.stats.task_id = ev.task_id;
                // Id 0 counted as tokio's; a root id does not.
                if tracer_common::is_root_id(ev.task_id) {
                    self.tokio_alive -= 1;
                }
                return;
            }
            self.totals.ends_lost += 1;
            self.end_now(ev.task, ev.tid, ev.ts_ns, ended);
        }
        self.insert(ev.task, ev.task_id, ev.ts_ns);
    }

    fn insert(&mut self, header: u64, task_id: u64, ts_ns: u64) -> &mut LiveTask {
        self.next_serial += 1;
        let task = LiveTask {
            serial: self.next_serial,
            stats: TaskStats {
                task: header,
                task_id,
                first_seen_ns: ts_ns,
                ..TaskStats::default()
            },
            runnable: None,
            polling_since: None,
            end_pending: None,
            indexed: None,
        };
        if !tracer_common::is_root_id(task_id) {
            self.tokio_alive += 1;
        }
        if let Some(replaced) = self.live.insert(header, task) {
            self.forget(&replaced);
        }
        self.live.get_mut(&header).expect("inserted above")
    }

    fn remove(&mut self, header: u64) -> Option<LiveTask> {
        let task = self.live.remove(&header)?;
        self.forget(&task);
        Some(task)
    }

    /// Takes a task that left `live` out of the count and the site index.
    fn forget(&mut self, task: &LiveTask) {
        if !tracer_common::is_root_id(task.stats.task_id) {
            self.tokio_alive -= 1;
        }
        if let Some((task_id, _)) = task.indexed {
            self.site_by_id.remove(&task_id);
        }
    }

    fn new_flow(&mut self) -> FlowId {
        self.next_flow += 1;
        self.next_flow
    }

    /// Folds an ended task into the totals and returns its end record.
    fn finalize(&mut self, task: LiveTask, tid: u32, ts_ns: u64) -> TaskEnd {
        let type_stats = self.by_type.entry(task.stats.site);
        if task.stats.site.is_none() {
            // Never polled: its first poll did not count it, so count it here.
            type_stats.tasks += 1;
            type_stats.times_woken += task.stats.times_woken;
        }
        type_stats.ended += 1;
        self.totals.ended += 1;
        TaskEnd {
            tid,
            ts_ns,
            stats: task.stats,
        }
    }

    /// Keeps `poll` if it is among the longest (by [`LongPoll::held_ns`]),
    /// one entry per task.
    fn offer_long_poll(&mut self, serial: u64, poll: LongPoll) {
        let board = &mut self.longest_polls;
        let held = poll.held_ns();
        if let Some(index) = board.iter().position(|(s, _)| *s == serial) {
            if board[index].1.held_ns() >= held {
                return;
            }
            board.remove(index);
        } else if board.len() >= LONGEST_POLLS_KEPT
            && board.last().is_some_and(|(_, last)| last.held_ns() >= held)
        {
            return;
        }
        let at = board.partition_point(|(_, kept)| kept.held_ns() >= held);
        board.insert(at, (serial, poll));
        board.truncate(LONGEST_POLLS_KEPT);
    }
}
