//! Scenario tests across the timeline, the renderer and the summary:
//! synthetic event sequences with known wakes, delays and hogs.

use std::collections::HashMap;

use serde_json::Value;
use tracer_common::{Event, EventKind};

use crate::counters::{COUNTER_MIN_INTERVAL_NS, Counter};
use crate::output::{TimelineOutput, Wake, Waker, WokenPoll};
use crate::summary::{SchedulerSummary, Summary, WorkerSummary};
use crate::task_types::{TaskName, TaskTypes};
use crate::test_util::{event, park_end, park_start, poll_end};
use crate::timeline::Timeline;
use crate::writer::{Format, TraceInfo};

pub(crate) const SITE_A: u32 = 0;
pub(crate) const SITE_B: u32 = 1;
pub(crate) const SITE_BLOCKING: u32 = 2;

pub(crate) fn types() -> TaskTypes {
    let name = |full: &str| {
        Some(TaskName {
            short: full.rsplit("::").next().unwrap().to_owned(),
            full: full.to_owned(),
        })
    };
    TaskTypes::new(vec![
        name("app::ping"),
        name("app::pong"),
        name("tokio::runtime::blocking::task::BlockingTask<app::load>"),
    ])
}

/// Task ids are small numbers; headers are derived from them.
pub(crate) fn header(task_id: u64) -> u64 {
    0x7f00_0000 + task_id * 0x100
}

pub(crate) fn poll_start(ts_ns: u64, tid: u32, task_id: u64, site: u32) -> Event {
    Event {
        site,
        task: header(task_id),
        task_id,
        ..event(ts_ns, tid, EventKind::PollStart)
    }
}

/// `task_id` is woken on `tid`; `by` is the task the eBPF side saw running (0: none).
pub(crate) fn wake(ts_ns: u64, tid: u32, task_id: u64, by: u64) -> Event {
    Event {
        task: header(task_id),
        task_id,
        other_task_id: by,
        ..event(ts_ns, tid, EventKind::Wake)
    }
}

pub(crate) fn spawn(ts_ns: u64, tid: u32, task_id: u64, by: u64) -> Event {
    Event {
        task: header(task_id),
        task_id,
        other_task_id: by,
        addr: 0x5555_0000 + task_id,
        ..event(ts_ns, tid, EventKind::Spawn)
    }
}

pub(crate) fn task_end(ts_ns: u64, tid: u32, task_id: u64) -> Event {
    Event {
        task: header(task_id),
        task_id,
        ..event(ts_ns, tid, EventKind::TaskEnd)
    }
}

pub(crate) fn run(timeline: &mut Timeline, events: &[Event], end_ns: u64) -> Vec<TimelineOutput> {
    let mut out = Vec::new();
    for ev in events {
        timeline.push(ev, &mut out);
    }
    timeline.finish(end_ns, &mut out);
    out
}

fn wakes(outputs: &[TimelineOutput]) -> Vec<&Wake> {
    outputs
        .iter()
        .filter_map(|o| match o {
            TimelineOutput::Wake(wake) => Some(wake),
            _ => None,
        })
        .collect()
}

fn woken_polls(outputs: &[TimelineOutput]) -> Vec<&WokenPoll> {
    outputs
        .iter()
        .filter_map(|o| match o {
            TimelineOutput::WokenPoll(poll) => Some(poll),
            _ => None,
        })
        .collect()
}

/// Task 1 (ping, on thread 1) and task 2 (pong, on thread 2) wake each
/// other from inside their polls, `rounds` times each way.
fn ping_pong(rounds: u64) -> Vec<Event> {
    let mut events = Vec::new();
    for round in 0..rounds {
        let t = 10_000 + round * 3_000;
        events.push(poll_start(t, 1, 1, SITE_A));
        events.push(wake(t + 100, 1, 2, 1)); // ping wakes pong
        events.push(poll_end(t + 200, 1));
        events.push(poll_start(t + 500, 2, 2, SITE_B));
        events.push(wake(t + 600, 2, 1, 2)); // pong wakes ping
        events.push(poll_end(t + 700, 2));
    }
    events
}

#[test]
fn ping_pong_flows_connect_each_wake_to_the_woken_tasks_next_poll() {
    const ROUNDS: u64 = 5;
    let mut timeline = Timeline::with_task_types(types());
    let outputs = run(&mut timeline, &ping_pong(ROUNDS), 100_000);

    let wakes = wakes(&outputs);
    let polls = woken_polls(&outputs);
    assert_eq!(wakes.len() as u64, 2 * ROUNDS);
    // The last wake (pong wakes ping) has no following poll in the trace.
    assert_eq!(polls.len() as u64, 2 * ROUNDS - 1);

    let poll_by_flow: HashMap<u64, &WokenPoll> = polls.iter().map(|p| (p.flow, *p)).collect();
    let mut last_ts = 0;
    for wake in &wakes {
        let flow = wake.flow.expect("each wake made its task runnable");
        assert!(wake.in_poll);
        let waker_id = if wake.task_id == 2 { 1 } else { 2 };
        assert_eq!(wake.waker, Waker::Task { task_id: waker_id });
        assert!(wake.ts_ns >= last_ts, "flows come in time order");
        last_ts = wake.ts_ns;
        let Some(poll) = poll_by_flow.get(&flow) else {
            assert_eq!(
                (wake.task_id, wake.ts_ns),
                (1, 10_000 + (ROUNDS - 1) * 3_000 + 600)
            );
            continue;
        };
        assert_eq!(
            poll.task_id, wake.task_id,
            "the flow ends at a poll of the woken task"
        );
        let (tid, start) = if wake.task_id == 2 {
            (2, wake.ts_ns + 400) // pong's poll 400 ns after ping's wake
        } else {
            (1, wake.ts_ns + 2_400) // ping's next round
        };
        assert_eq!((poll.tid, poll.ts_ns), (tid, start));
        assert_eq!(poll.delay_ns, start - wake.ts_ns);
    }
    let distinct: std::collections::HashSet<u64> = wakes.iter().filter_map(|w| w.flow).collect();
    assert_eq!(distinct.len(), wakes.len(), "flow ids are unique");
}

#[test]
fn wakes_name_the_driver_a_thread_or_the_running_task() {
    let mut timeline = Timeline::with_task_types(types());
    let outputs = run(
        &mut timeline,
        &[
            park_start(100, 3),
            wake(150, 3, 7, 0), // the I/O driver, inside park
            park_end(200, 3),
            wake(300, 4, 8, 0), // a thread outside the runtime
            poll_start(400, 5, 9, SITE_A),
            wake(450, 5, 10, 0), // in a poll, id not read by the probe
            poll_end(500, 5),
            wake(600, 3, 11, 0), // a worker between polls
        ],
        1_000,
    );
    let wakers: Vec<(Waker, bool)> = wakes(&outputs)
        .iter()
        .map(|w| (w.waker, w.in_poll))
        .collect();
    assert_eq!(
        wakers,
        vec![
            (Waker::Driver, false),
            (Waker::Thread, false),
            (Waker::Task { task_id: 9 }, true),
            (Waker::Thread, false),
        ]
    );
    let totals = timeline.task_totals();
    assert_eq!(
        (
            totals.wakes_by_driver,
            totals.wakes_by_thread,
            totals.wakes_by_task
        ),
        (1, 2, 1)
    );
}

#[test]
fn scheduling_delay_runs_from_spawn_or_first_wake_to_the_next_poll() {
    let mut timeline = Timeline::with_task_types(types());
    let outputs = run(
        &mut timeline,
        &[
            spawn(100, 1, 5, 0),
            poll_start(350, 2, 5, SITE_A), // 250 after the spawn
            poll_end(400, 2),
            wake(1_000, 1, 5, 0),
            wake(1_100, 1, 5, 0), // already runnable: no new flow, no reset
            poll_start(1_600, 2, 5, SITE_A), // 600 after the first wake
            wake(2_050, 2, 5, 5), // wakes itself mid-poll...
            poll_end(2_200, 2),   // ...so it is runnable from here
            poll_start(2_500, 1, 5, SITE_A), // 300 after that poll's end
            poll_end(2_600, 1),
            poll_start(3_000, 1, 5, SITE_A), // no wake before: no delay
            poll_end(3_100, 1),
        ],
        5_000,
    );
    let delays: Vec<u64> = woken_polls(&outputs).iter().map(|p| p.delay_ns).collect();
    assert_eq!(delays, vec![250, 600, 300]);
    assert_eq!(
        wakes(&outputs)
            .iter()
            .map(|w| w.flow.is_some())
            .collect::<Vec<_>>(),
        vec![true, false, true]
    );

    let task = timeline.task_stats().next().expect("task 5 is alive");
    assert_eq!((task.polls, task.times_woken, task.delays), (4, 3, 3));
    assert_eq!((task.delay_sum_ns, task.delay_max_ns), (1_150, 600));
    assert_eq!(task.busy_ns, 50 + 600 + 100 + 100);
    assert_eq!(task.spawned_ns, Some(100));

    let (_, type_stats) = timeline
        .task_types()
        .find(|(site, _)| *site == Some(SITE_A))
        .unwrap();
    assert_eq!(type_stats.scheduling_delay.count(), 3);
    assert_eq!(type_stats.scheduling_delay.max(), 600);
    assert_eq!((type_stats.tasks, type_stats.times_woken), (1, 3));

    let per_thread: HashMap<u32, u64> = timeline
        .threads()
        .map(|(tid, stats)| (tid, stats.scheduling_delay.count()))
        .collect();
    assert_eq!((per_thread[&1], per_thread[&2]), (1, 2));
}

#[test]
fn spawned_tasks_that_end_leave_no_state_and_the_alive_counter_at_zero() {
    const TASKS: u64 = 50;
    let mut events = Vec::new();
    for id in 1..=TASKS {
        let t = id * 1_000_000; // 1 ms apart, so counters are not held back
        events.push(spawn(t, 1, id, 0));
        events.push(poll_start(t + 1_000, 2, id, SITE_A));
        if id % 2 == 0 {
            // tokio releases a finished task inside its last poll
            events.push(task_end(t + 1_500, 2, id));
            events.push(poll_end(t + 2_000, 2));
        } else {
            events.push(poll_end(t + 2_000, 2));
            events.push(task_end(t + 3_000, 2, id));
        }
    }
    let mut timeline = Timeline::with_task_types(types());
    let outputs = run(&mut timeline, &events, (TASKS + 1) * 1_000_000);

    assert_eq!(timeline.tasks_alive(), 0);
    assert_eq!(timeline.task_stats().count(), 0, "no per-task state left");
    let totals = timeline.task_totals();
    assert_eq!(
        (totals.spawned, totals.ended, totals.ends_lost),
        (TASKS, TASKS, 0)
    );

    let ends: Vec<_> = outputs
        .iter()
        .filter_map(|o| match o {
            TimelineOutput::TaskEnd(end) => Some(end),
            _ => None,
        })
        .collect();
    assert_eq!(ends.len() as u64, TASKS);
    assert!(
        ends.iter()
            .all(|end| end.stats.polls == 1 && end.stats.busy_ns == 1_000),
        "an end during the last poll waits for that poll: {ends:?}"
    );

    let alive: Vec<u64> = outputs
        .iter()
        .filter_map(|o| match o {
            TimelineOutput::Counter(s) if s.counter == Counter::TasksAlive => Some(s.value),
            _ => None,
        })
        .collect();
    assert_eq!(alive.iter().max(), Some(&1));
    assert_eq!(alive.last(), Some(&0), "{alive:?}");
}

#[test]
fn counters_are_rate_limited_and_end_on_the_last_value() {
    // Two workers alternate 10 ns polls for 20 ms of trace time (4M events).
    const DURATION_NS: u64 = 20_000_000;
    let mut timeline = Timeline::with_task_types(types());
    let mut out = Vec::new();
    let mut counter_samples = 0u64;
    let mut last_busy = None;
    let mut events = 0u64;
    let mut t = 0;
    while t < DURATION_NS {
        for ev in [
            poll_start(t, 1, 1, SITE_A),
            poll_start(t + 5, 2, 2, SITE_B),
            poll_end(t + 10, 1),
            poll_end(t + 15, 2),
        ] {
            timeline.push(&ev, &mut out);
            events += 1;
        }
        for o in out.drain(..) {
            if let TimelineOutput::Counter(sample) = o {
                counter_samples += 1;
                if sample.counter == Counter::WorkersBusy {
                    last_busy = Some(sample.value);
                }
            }
        }
        t += 20;
    }
    timeline.finish(DURATION_NS, &mut out);
    for o in out.drain(..) {
        if let TimelineOutput::Counter(sample) = o {
            counter_samples += 1;
            if sample.counter == Counter::WorkersBusy {
                last_busy = Some(sample.value);
            }
        }
    }
    assert!(
        events > 10 * counter_samples,
        "{events} events, {counter_samples} samples"
    );
    let windows = DURATION_NS / COUNTER_MIN_INTERVAL_NS;
    assert!(
        counter_samples <= 3 * (windows + 2),
        "{counter_samples} samples for {windows} windows"
    );
    assert_eq!(last_busy, Some(0), "the final value is always emitted");
}

pub(crate) fn summary_of(timeline: &Timeline, duration_ns: u64) -> Summary {
    Summary {
        duration_ns,
        workers: timeline
            .threads()
            .map(|(tid, stats)| WorkerSummary {
                tid,
                name: format!("worker {tid}"),
                stats: stats.clone(),
            })
            .collect(),
        scheduler: SchedulerSummary::from_timeline(timeline, &types(), &Default::default()),
        ..Summary::default()
    }
}

#[test]
fn summary_shows_delay_percentiles_per_type_and_worker() {
    let mut timeline = Timeline::with_task_types(types());
    let mut events = ping_pong(20);
    events.insert(0, spawn(5_000, 1, 3, 0));
    events.push(poll_start(9_000_000, 2, 3, SITE_B));
    events.push(poll_end(9_000_100, 2));
    run(&mut timeline, &events, 10_000_000);
    let text = summary_of(&timeline, 10_000_000).to_string();
    let row = |by: &str, name: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(by) && l.contains(name))
            .unwrap_or_else(|| panic!("no {by} {name} row in\n{text}"))
            .to_owned()
    };
    // ping (task 1): 19 delays of 2.4 µs. pong: 20 of 400 ns plus task 3's 9.0 ms.
    let ping = row("type", "ping");
    assert!(
        ping.contains(" 19 ") && ping.contains("2.4 µs") && !ping.contains("ms"),
        "{ping}"
    );
    let pong = row("type", "pong");
    assert!(
        pong.contains(" 21 ") && pong.contains("400 ns") && pong.contains("9.0 ms"),
        "{pong}"
    );
    let worker = row("worker", "worker 2");
    assert!(worker.contains(" 21 "), "{worker}");
    assert!(text.contains("1 spawned, 0 ended"), "{text}");
}

#[test]
fn chrome_flows_pair_up_and_bind_to_slices() {
    let info = TraceInfo {
        pid: 42,
        process_name: "test".into(),
        start_ns: 1_000,
        types: types(),
        symbols: crate::symbols::Symbols {
            call_sites: [(0x5555_0009, "app::main (main.rs:7)".to_owned())].into(),
            ..Default::default()
        },
    };
    let mut bytes = Vec::new();
    let mut writer = Format::Json.writer(&mut bytes, &info).unwrap();
    let mut timeline = Timeline::with_task_types(types());
    let mut events = ping_pong(4);
    // A driver wake (inside a park) and a spawn, whose flows need instants.
    events.extend([
        park_start(20_000, 3),
        wake(20_100, 3, 2, 0),
        park_end(20_200, 3),
        spawn(20_300, 4, 9, 0),
        poll_start(20_400, 2, 2, SITE_B),
        poll_end(20_500, 2),
        poll_start(20_600, 1, 9, SITE_A),
        poll_end(20_700, 1),
    ]);
    let mut out = Vec::new();
    for ev in &events {
        timeline.push(ev, &mut out);
    }
    timeline.finish(30_000, &mut out);
    for output in &out {
        writer.write(output).unwrap();
    }
    writer.finish(&serde_json::json!({})).unwrap();
    drop(writer);
    // The summary names where each type was spawned from: task 9 (site A).
    let summary = SchedulerSummary::from_timeline(&timeline, &types(), &info.symbols);
    let spawned: Vec<_> = summary
        .task_types
        .iter()
        .map(|t| (t.name.as_str(), t.spawned_from.clone()))
        .filter(|(_, from)| !from.is_empty())
        .collect();
    assert_eq!(
        spawned,
        vec![(
            types().short_name(Some(SITE_A)).as_str(),
            vec!["app::main (main.rs:7)".to_owned()]
        )]
    );

    let trace: Value = serde_json::from_str(std::str::from_utf8(&bytes).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let ts = |e: &Value| (e["ts"].as_f64().unwrap() * 1000.0).round() as u64;
    let phase = |e: &Value| e["ph"].as_str().unwrap().to_owned();
    let of_phase = |p: &'static str| events.iter().filter(move |e| phase(e) == p);

    let starts: HashMap<u64, &Value> = of_phase("s")
        .map(|e| (e["id"].as_u64().unwrap(), e))
        .collect();
    let ends: HashMap<u64, &Value> = of_phase("f")
        .map(|e| (e["id"].as_u64().unwrap(), e))
        .collect();
    // 8 ping-pong wakes (the last has no poll after it), the driver wake, the spawn.
    assert_eq!((starts.len(), ends.len()), (10, 9));
    for (id, end) in &ends {
        let start = starts
            .get(id)
            .unwrap_or_else(|| panic!("flow {id} ends but never starts"));
        for e in [start, end] {
            assert_eq!(
                (e["cat"].as_str(), e["name"].as_str()),
                (Some("wake"), Some("wake"))
            );
        }
        assert_eq!(end["bp"], "e");
        assert!(ts(start) <= ts(end));
        // The end sits at the start of a poll slice on its thread.
        assert!(
            of_phase("X").any(|x| x["tid"] == end["tid"] && ts(x) == ts(end) && x["cat"] == "poll"),
            "flow {id} ends at no poll start: {end}"
        );
    }
    for (id, start) in &starts {
        // The start has a slice to bind to: a poll around it, or an instant at it.
        let in_poll = of_phase("X").any(|x| {
            let dur = (x["dur"].as_f64().unwrap() * 1000.0).round() as u64;
            x["tid"] == start["tid"]
                && ts(x) <= ts(start)
                && ts(start) <= ts(x) + dur
                && x["cat"] == "poll"
        });
        let anchored = of_phase("i").any(|i| i["tid"] == start["tid"] && ts(i) == ts(start));
        assert!(in_poll || anchored, "flow {id} starts in no slice: {start}");
    }
    let driver_wake = of_phase("i")
        .find(|i| i["name"] == "wake task 2")
        .expect("driver wake instant");
    assert_eq!(driver_wake["args"]["waker"], "driver");
    assert_eq!(
        ts(driver_wake),
        20_100 - 1_000,
        "times are relative to the start"
    );
    let spawn = of_phase("i")
        .find(|i| i["name"] == "spawn task 9")
        .expect("spawn instant");
    assert_eq!(spawn["args"]["call_site"], "0x55550009");
    assert_eq!(spawn["args"]["spawned_at"], "app::main (main.rs:7)");
    assert!(
        of_phase("M").any(|m| m["name"] == "thread_name" && m["args"]["name"] == "thread #0"),
        "threads are named"
    );
    assert!(of_phase("C").any(|c| c["name"] == "tasks" && c["args"]["alive"].is_u64()));
}

#[test]
fn polls_reported_at_their_end_still_pair_with_wakes_and_ends() {
    // With `--min-poll`, a long poll's start and end arrive together when it
    // ends, after the wake and task end that happened inside it.
    let mut timeline = Timeline::with_task_types(types());
    let outputs = run(
        &mut timeline,
        &[
            spawn(100, 1, 4, 0),
            poll_start(200, 2, 4, SITE_A),
            poll_end(300, 2),
            wake(1_500, 2, 4, 4), // task 4 wakes itself during its next poll...
            poll_start(1_000, 2, 4, SITE_A),
            poll_end(2_000, 2),              // ...which is reported here
            poll_start(2_500, 1, 4, SITE_A), // short enough to be reported as usual
            poll_end(2_600, 1),
            task_end(3_900, 2, 4), // task 4 finishes inside its last poll...
            poll_start(3_500, 2, 4, SITE_A),
            poll_end(4_000, 2), // ...reported after the end
        ],
        5_000,
    );
    let delays: Vec<u64> = woken_polls(&outputs).iter().map(|p| p.delay_ns).collect();
    // Spawn to first poll; the mid-poll wake counts from that poll's end (2000 to 2500).
    assert_eq!(delays, vec![100, 500]);
    assert_eq!(
        timeline.tasks_alive(),
        0,
        "the late poll does not bring the task back"
    );
    assert_eq!(timeline.task_totals().ended, 1);
    let slices = outputs
        .iter()
        .filter(|o| matches!(o, TimelineOutput::Slice(_)))
        .count();
    assert_eq!(slices, 4, "every poll is still drawn");
}
