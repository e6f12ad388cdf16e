//! The task tracker's bookkeeping as the timeline uses it: the tasks-alive
//! count and the sample's task type, kept as tasks come and go rather than
//! recounted or re-inserted per event (see `tasks.rs`).

use crate::output::TimelineOutput;
use crate::scheduler_tests::{SITE_A, SITE_B, header, poll_start, spawn, task_end, types, wake};
use crate::test_util::poll_end;
use crate::timeline::Timeline;

#[test]
fn the_alive_count_follows_tasks_whose_id_or_header_changes() {
    // The count is kept as tasks come and go (not recounted per event):
    // after every event it must equal the live tokio tasks, root futures
    // (`block_on`) left out, through a wake that creates a task before its
    // id is known, a root future whose id only its poll tells, a header
    // reused by a new task (the old one's end lost) and ends.
    let root = tracer_common::ROOT_ID_BASE + 1;
    let mut woken_unknown = wake(100, 1, 9, 0);
    woken_unknown.task_id = 0;
    let mut root_poll = poll_start(200, 1, 9, SITE_A);
    root_poll.task_id = root;
    let mut reused = spawn(900, 1, 11, 0);
    reused.task = header(3);
    let events = [
        woken_unknown,
        root_poll,
        poll_end(250, 1),
        spawn(300, 1, 3, 0),
        spawn(400, 1, 4, 0),
        poll_start(500, 2, 4, SITE_B),
        poll_end(600, 2),
        wake(700, 2, 5, 0),
        task_end(800, 2, 4),
        reused,
        task_end(1_000, 1, 5),
    ];
    let mut timeline = Timeline::with_task_types(types());
    let mut out = Vec::new();
    let mut counts = Vec::new();
    for ev in &events {
        timeline.push(ev, &mut out);
        let expected = timeline
            .task_stats()
            .filter(|task| !tracer_common::is_root_id(task.task_id))
            .count();
        assert_eq!(timeline.tasks_alive(), expected, "after {ev:?}");
        counts.push(expected);
    }
    assert_eq!(counts, [1, 0, 0, 1, 2, 2, 2, 3, 2, 2, 1]);
}

#[test]
fn a_sample_names_the_type_of_a_live_polled_task_by_its_id() {
    // Samples carry only the task id; the site comes from the task's
    // polls, for as long as the task lives.
    let site_of_sample = |timeline: &mut Timeline, ts_ns: u64, task_id: u64| {
        let mut out = Vec::new();
        timeline.push_sample(ts_ns, 2, task_id, 0, &mut out);
        match out.as_slice() {
            [TimelineOutput::Sample(sample)] => sample.site,
            other => panic!("one sample expected: {other:?}"),
        }
    };
    let mut timeline = Timeline::with_task_types(types());
    let mut out = Vec::new();
    timeline.push(&spawn(100, 1, 3, 0), &mut out);
    assert_eq!(
        site_of_sample(&mut timeline, 150, 3),
        None,
        "not polled yet"
    );
    timeline.push(&poll_start(200, 2, 3, SITE_B), &mut out);
    assert_eq!(site_of_sample(&mut timeline, 250, 3), Some(SITE_B));
    // It ends inside its last poll: still its type until that poll ends.
    timeline.push(&task_end(260, 2, 3), &mut out);
    assert_eq!(site_of_sample(&mut timeline, 270, 3), Some(SITE_B));
    timeline.push(&poll_end(300, 2), &mut out);
    assert_eq!(site_of_sample(&mut timeline, 350, 3), None, "ended");
    // A header reused by a new task (the old end lost) forgets the old id.
    timeline.push(&poll_start(400, 2, 4, SITE_A), &mut out);
    timeline.push(&poll_end(450, 2), &mut out);
    let mut reused = poll_start(500, 2, 5, SITE_B);
    reused.task = header(4);
    timeline.push(&reused, &mut out);
    assert_eq!(site_of_sample(&mut timeline, 550, 4), None, "replaced");
    assert_eq!(site_of_sample(&mut timeline, 560, 5), Some(SITE_B));
}
