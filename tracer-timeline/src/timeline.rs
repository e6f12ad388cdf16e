//! Pairs start/end events into [`Slice`]s, one thread at a time.
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

use std::collections::HashMap;

use tracer_common::{Event, EventKind};

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

/// Per-thread totals, updated as slices close.
#[derive(Clone, Debug, Default)]
pub struct ThreadStats {
    /// Poll slices closed, nested ones included.
    pub polls: u64,
    /// Outermost park slices closed.
    pub parks: u64,
    /// Time spent in outermost polls (a nested poll's time is already inside
    /// its parent's, so it is not added twice).
    pub busy_ns: u64,
    /// Time spent in outermost parks.
    pub parked_ns: u64,
    pub longest_poll_ns: u64,
    /// Timestamp of the thread's first event.
    pub first_ns: u64,
    /// Latest timestamp seen on the thread: its last event, or the end of
    /// recording if a slice was truncated there.
    pub last_ns: u64,
}

/// The pairing state machine for all threads. Feed it events with
/// [`push`](Self::push), then call [`finish`](Self::finish) once.
#[derive(Default)]
pub struct Timeline {
    /// Threads in the order their first event arrived, so reports list them
    /// in a stable, meaningful order.
    threads: Vec<(u32, ThreadState)>,
    /// tid -> position in `threads`.
    index_by_tid: HashMap<u32, usize>,
    unmatched_ends: u64,
    abandoned: u64,
    unknown_kinds: u64,
}

impl Timeline {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one event; completed slices are appended to `out`.
    ///
    /// Returns true if this is the first event seen from `ev.tid`, so the
    /// caller can look up and record the thread's name while it still runs.
    /// Events of an unknown kind are counted in
    /// [`unknown_kinds`](Self::unknown_kinds) and otherwise ignored (they do
    /// not register a thread).
    pub fn push(&mut self, ev: &Event, out: &mut Vec<Slice>) -> bool {
        let Some(kind) = EventKind::from_u32(ev.kind) else {
            self.unknown_kinds += 1;
            return false;
        };
        let (thread, first_seen) = self.thread_mut(ev.tid, ev.ts_ns);
        thread.stats.last_ns = thread.stats.last_ns.max(ev.ts_ns);

        let mut abandoned = 0;
        let matched = match kind {
            EventKind::PollStart => {
                // A task is never polled inside its own poll: an open poll of
                // the same task means that poll's end event was lost.
                if let Some(stale) = thread.open_polls.iter().position(|p| p.task == ev.task) {
                    abandoned = (thread.open_polls.len() - stale) as u64;
                    thread.open_polls.truncate(stale);
                }
                thread.open_polls.push(OpenPoll {
                    site: ev.site,
                    task: ev.task,
                    task_id: ev.task_id,
                    start_ns: ev.ts_ns,
                });
                true
            }
            EventKind::PollEnd => thread.close_poll(ev.tid, ev.ts_ns, false, out),
            EventKind::ParkStart => {
                // A worker parks only between polls: polls still open here
                // lost their end events.
                abandoned = thread.open_polls.len() as u64;
                thread.open_polls.clear();
                thread.open_park(ev.ts_ns);
                true
            }
            EventKind::ParkEnd => thread.close_park(ev.tid, ev.ts_ns, false, out),
        };
        self.abandoned += abandoned;
        if !matched {
            self.unmatched_ends += 1;
        }
        first_seen
    }

    /// Closes every open slice at `end_ns`, marked `truncated`. Innermost
    /// polls come out first, then the park, per thread in first-seen order.
    pub fn finish(&mut self, end_ns: u64, out: &mut Vec<Slice>) {
        for (tid, thread) in &mut self.threads {
            while thread.close_poll(*tid, end_ns, true, out) {}
            thread.close_park(*tid, end_ns, true, out);
        }
    }

    /// Per-thread statistics, in first-seen order.
    pub fn threads(&self) -> impl Iterator<Item = (u32, &ThreadStats)> {
        self.threads
            .iter()
            .map(|(tid, thread)| (*tid, &thread.stats))
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

    /// The state for `tid`, created on first sight. The bool is true if it
    /// was just created.
    fn thread_mut(&mut self, tid: u32, first_ns: u64) -> (&mut ThreadState, bool) {
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
        (&mut self.threads[index].1, first_seen)
    }
}

/// A poll that has started but not yet ended.
struct OpenPoll {
    site: u32,
    task: u64,
    task_id: u64,
    start_ns: u64,
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
}

impl ThreadState {
    fn open_park(&mut self, start_ns: u64) {
        match &mut self.open_park {
            Some(park) => park.depth += 1,
            None => self.open_park = Some(OpenPark { start_ns, depth: 1 }),
        }
    }

    /// Closes the innermost open poll. Returns false if none was open.
    fn close_poll(&mut self, tid: u32, end_ns: u64, truncated: bool, out: &mut Vec<Slice>) -> bool {
        let Some(poll) = self.open_polls.pop() else {
            return false;
        };
        let slice = Slice {
            tid,
            kind: SliceKind::Poll {
                site: poll.site,
                task: poll.task,
                task_id: poll.task_id,
            },
            start_ns: poll.start_ns,
            // Never end before the start: `finish` may be given an end time
            // taken from another thread's clock reading.
            end_ns: end_ns.max(poll.start_ns),
            truncated,
        };
        let duration = slice.duration_ns();
        let outermost = self.open_polls.is_empty();
        let stats = &mut self.stats;
        stats.polls += 1;
        stats.longest_poll_ns = stats.longest_poll_ns.max(duration);
        if outermost {
            stats.busy_ns += duration;
        }
        stats.last_ns = stats.last_ns.max(slice.end_ns);
        out.push(slice);
        true
    }

    /// Leaves one level of park; emits a slice when the outermost level ends.
    /// Returns false if no park was open.
    fn close_park(&mut self, tid: u32, end_ns: u64, truncated: bool, out: &mut Vec<Slice>) -> bool {
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
        };
        self.stats.parks += 1;
        self.stats.parked_ns += slice.duration_ns();
        self.stats.last_ns = self.stats.last_ns.max(slice.end_ns);
        out.push(slice);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ts_ns: u64, tid: u32, kind: EventKind) -> Event {
        Event {
            ts_ns,
            tid,
            kind: kind as u32,
            ..Event::default()
        }
    }

    fn poll_start(ts_ns: u64, tid: u32, task: u64) -> Event {
        Event {
            site: 7,
            task,
            task_id: task + 1000,
            ..event(ts_ns, tid, EventKind::PollStart)
        }
    }

    fn poll_end(ts_ns: u64, tid: u32) -> Event {
        event(ts_ns, tid, EventKind::PollEnd)
    }

    fn park_start(ts_ns: u64, tid: u32) -> Event {
        event(ts_ns, tid, EventKind::ParkStart)
    }

    fn park_end(ts_ns: u64, tid: u32) -> Event {
        event(ts_ns, tid, EventKind::ParkEnd)
    }

    fn poll(tid: u32, task: u64, start_ns: u64, end_ns: u64) -> Slice {
        Slice {
            tid,
            kind: SliceKind::Poll {
                site: 7,
                task,
                task_id: task + 1000,
            },
            start_ns,
            end_ns,
            truncated: false,
        }
    }

    fn park(tid: u32, start_ns: u64, end_ns: u64) -> Slice {
        Slice {
            tid,
            kind: SliceKind::Park,
            start_ns,
            end_ns,
            truncated: false,
        }
    }

    /// Feeds all events, returning the slices and which pushes reported a new thread.
    fn run(timeline: &mut Timeline, events: &[Event]) -> (Vec<Slice>, Vec<bool>) {
        let mut slices = Vec::new();
        let first_seen = events
            .iter()
            .map(|ev| timeline.push(ev, &mut slices))
            .collect();
        (slices, first_seen)
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
        let (mut slices, _) = run(
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
        slices.clear();
        timeline.finish(1000, &mut slices);
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
        slices.clear();
        timeline.finish(2000, &mut slices);
        assert!(slices.is_empty());
    }

    #[test]
    fn finish_before_a_start_never_yields_negative_durations() {
        let mut timeline = Timeline::new();
        let (_, _) = run(&mut timeline, &[poll_start(500, 1, 0xa0)]);
        let mut slices = Vec::new();
        // The end time came from another thread's slightly earlier clock reading.
        timeline.finish(490, &mut slices);
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
    fn polls_whose_end_was_lost_are_abandoned_not_stretched() {
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
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!((out[0].start_ns, out[0].end_ns), (200, 250));
        assert_eq!(
            (out[1].kind.clone(), out[1].start_ns, out[1].end_ns),
            (SliceKind::Park, 400, 500)
        );
    }
}
