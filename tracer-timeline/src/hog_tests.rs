//! Long polls and hogs: which polls the summary keeps as the longest, and
//! which it flags as a `HOG` (a poll's own time, its preemptions not
//! counted, over 10 ms; never blocking-pool work).

use tracer_common::Event;

use crate::output::TimelineOutput;
use crate::scheduler_tests::{SITE_A, SITE_B, SITE_BLOCKING, poll_start, run, summary_of, types};
use crate::test_util::poll_end;
use crate::timeline::Timeline;

#[test]
fn longest_polls_flag_hogs_but_not_blocking_work() {
    let mut timeline = Timeline::with_task_types(types());
    run(
        &mut timeline,
        &[
            poll_start(0, 1, 1, SITE_A),
            poll_end(15_000_000, 1), // 15 ms: a hog
            poll_start(20_000_000, 2, 2, SITE_B),
            poll_end(25_000_000, 2), // 5 ms: long-ish, not a hog
            poll_start(0, 3, 3, SITE_BLOCKING),
            poll_end(90_000_000, 3), // blocking work may block
        ],
        100_000_000,
    );
    let longest: Vec<u64> = timeline.longest_polls().map(|p| p.task_id).collect();
    assert_eq!(longest, vec![1, 2]);
    assert!(timeline.is_blocking_pool_thread(3));
    assert!(!timeline.is_blocking_pool_thread(1));

    let text = summary_of(&timeline, 100_000_000).to_string();
    let hogs: Vec<&str> = text.lines().filter(|l| l.starts_with("HOG")).collect();
    assert_eq!(hogs.len(), 1, "{text}");
    assert!(
        hogs[0].contains("task 1") && hogs[0].contains("ping") && hogs[0].contains("15.0 ms"),
        "{text}"
    );
}

#[test]
fn a_poll_is_a_hog_by_its_time_less_its_preemptions() {
    // A poll end's `other_task_id` is how long its thread was preempted.
    let preempted = |ts_ns: u64, tid: u32, preempted_ns: u64| Event {
        other_task_id: preempted_ns,
        ..poll_end(ts_ns, tid)
    };
    let mut timeline = Timeline::with_task_types(types());
    let mut out = Vec::new();
    for event in [
        poll_start(0, 1, 1, SITE_A),
        preempted(12_000_000, 1, 11_000_000), // 1 ms of its own: no hog
        poll_start(0, 2, 2, SITE_B),
        preempted(30_000_000, 2, 5_000_000), // 25 ms of its own: a hog
    ] {
        timeline.push(&event, &mut out);
    }
    timeline.finish(100_000_000, &mut out);
    let slices: Vec<(u64, u64)> = out
        .iter()
        .filter_map(|o| match o {
            TimelineOutput::Slice(s) => Some((s.duration_ns(), s.preempted_ns)),
            _ => None,
        })
        .collect();
    assert_eq!(
        slices,
        vec![(12_000_000, 11_000_000), (30_000_000, 5_000_000)]
    );
    // Ranked by the time of their own: task 2's poll first.
    let longest: Vec<u64> = timeline.longest_polls().map(|p| p.task_id).collect();
    assert_eq!(longest, vec![2, 1]);
    let text = summary_of(&timeline, 100_000_000).to_string();
    let hogs: Vec<&str> = text.lines().filter(|l| l.starts_with("HOG")).collect();
    assert_eq!(hogs.len(), 1, "{text}");
    assert!(
        hogs[0].contains("task 2")
            && hogs[0].contains("for 25.0 ms in one poll (30.0 ms long, 5.0 ms of it preempted)"),
        "{text}"
    );
    assert!(text.contains("12.0 ms (11.0 ms preempted)"), "{text}");
}
