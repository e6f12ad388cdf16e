//! The timeline's pairing rules, one thread and several, on hand-made
//! events (the scheduler's story is in `scheduler_tests`).

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
        preempted_ns: 0,
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
        preempted_ns: 0,
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
