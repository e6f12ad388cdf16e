//! The writer's output, decoded with a minimal protobuf reader. The full
//! check against Perfetto's own schema runs on every trace the integration
//! tests write (`tests/support/check_pftrace.py`).

use std::collections::{BTreeMap, HashMap};

use tracer_common::{Event, EventKind};

use crate::output::TimelineOutput;
use crate::symbols::{AwaitPoint, SymbolFrame, Symbols, WaitKind, WaitsOn};
use crate::task_types::{TaskName, TaskTypes};
use crate::test_util::{event, park_end, park_start, poll_end};
use crate::timeline::Timeline;
use crate::writer::{Format, TraceInfo};

#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
}

fn varint(data: &[u8], at: &mut usize) -> u64 {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = data[*at];
        *at += 1;
        value |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            break;
        }
    }
    value
}

fn fields(data: &[u8]) -> Vec<(u32, Field<'_>)> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < data.len() {
        let key = varint(data, &mut at);
        let field = (key >> 3) as u32;
        let value = match key & 7 {
            0 => Field::Varint(varint(data, &mut at)),
            1 => {
                at += 8;
                Field::Fixed64
            }
            2 => {
                let len = varint(data, &mut at) as usize;
                at += len;
                Field::Bytes(&data[at - len..at])
            }
            other => panic!("unexpected wire type {other}"),
        };
        out.push((field, value));
    }
    out
}

fn get<'a>(fields: &[(u32, Field<'a>)], number: u32) -> Option<Field<'a>> {
    fields.iter().find(|(n, _)| *n == number).map(|(_, f)| *f)
}

fn poll_start(ts_ns: u64, tid: u32, task: u64, site: u32) -> Event {
    Event {
        task,
        task_id: task,
        site,
        ..event(ts_ns, tid, EventKind::PollStart)
    }
}

fn info() -> TraceInfo {
    let name = |short: &str| {
        Some(TaskName {
            short: short.into(),
            full: format!("app::{short}"),
        })
    };
    let frame = |function: &str, line| SymbolFrame {
        address: 0x1000 + line as u64,
        function: Some(function.into()),
        file: Some("/src/main.rs".into()),
        line: Some(line),
        inlined: false,
        module: "/bin/app".into(),
        symbol_offset: None,
    };
    let mut await_points = crate::FastMap::default();
    await_points.insert((1, 77), 0);
    let await_chains = vec![AwaitPoint {
        chain: vec!["inner (main.rs:3)".into(), "outer (main.rs:9)".into()],
        inlined_into_harness: false,
        harness_at: None,
        waits_on: Some(WaitsOn {
            kind: WaitKind::Timer,
            name: "time::Sleep",
        }),
    }];
    TraceInfo {
        pid: 42,
        process_name: "app (pid 42)".into(),
        start_ns: 1_000,
        types: TaskTypes::new(vec![name("ping"), name("pong")]),
        symbols: Symbols {
            stacks: vec![vec![frame("inner", 3), frame("outer", 9)]],
            await_points,
            await_chains,
            call_sites: Default::default(),
        },
    }
}

/// Two tasks waking each other on two threads, a park, a sample.
fn record(format: Format, info: &TraceInfo) -> Vec<u8> {
    let wake = |ts, tid, task| Event {
        task,
        task_id: task,
        ..event(ts, tid, EventKind::Wake)
    };
    let end_at = |ts, tid, key| Event {
        addr: key,
        ..poll_end(ts, tid)
    };
    let events = [
        poll_start(2_000, 1, 1, 0),
        wake(2_100, 1, 2),
        end_at(2_200, 1, 77),
        poll_start(2_300, 2, 2, 1),
        wake(2_400, 2, 1),
        poll_end(2_500, 2),
        park_start(2_600, 2),
        poll_start(2_700, 1, 1, 0),
        // Wakes pong, which is not polled again before the end.
        wake(2_750, 1, 2),
        poll_end(2_800, 1),
        park_end(2_900, 2),
    ];
    let mut timeline = Timeline::with_task_types(info.types.clone());
    let mut out: Vec<TimelineOutput> = Vec::new();
    for ev in &events {
        timeline.push(ev, &mut out);
    }
    timeline.push_sample(2_750, 1, 1, 0, &mut out);
    timeline.finish(3_000, &mut out);
    let mut bytes = Vec::new();
    let mut writer = format.writer(&mut bytes, info).unwrap();
    for output in &out {
        writer.write(output).unwrap();
    }
    writer
        .finish(&serde_json::json!({"lost_events": 0, "tokio_version": "1.54.1"}))
        .unwrap();
    drop(writer);
    bytes
}

#[test]
fn slices_balance_and_flows_have_both_ends() {
    let info = info();
    let bytes = record(Format::Perfetto, &info);
    let mut begins: BTreeMap<u64, i64> = BTreeMap::new();
    let (mut flows_out, mut flows_in) = (Vec::new(), Vec::new());
    let mut samples = 0;
    let mut first_on_sequence: HashMap<u64, bool> = HashMap::new();
    let mut strings = Vec::new();
    for (number, packet) in fields(&bytes) {
        assert_eq!(number, 1, "a Trace holds only packets");
        let Field::Bytes(packet) = packet else {
            panic!("packet is not a message")
        };
        let packet = fields(packet);
        let Some(Field::Varint(sequence)) = get(&packet, 10) else {
            panic!("packet without a sequence id: {packet:?}")
        };
        let first = first_on_sequence.insert(sequence, true).is_none();
        let cleared = matches!(get(&packet, 13), Some(Field::Varint(1)));
        assert_eq!(
            first, cleared,
            "sequence {sequence} starts with cleared state"
        );
        if let Some(Field::Bytes(interned)) = get(&packet, 12) {
            for (table, entry) in fields(interned) {
                // A source location's text is its function name (3): a
                // poll's full task type.
                let text_field = if table == 4 { 3 } else { 2 };
                if let Field::Bytes(entry) = entry
                    && let Some(Field::Bytes(text)) = get(&fields(entry), text_field)
                {
                    strings.push(String::from_utf8_lossy(text).into_owned());
                }
            }
        }
        if get(&packet, 66).is_some() {
            samples += 1;
        }
        let Some(Field::Bytes(track_event)) = get(&packet, 11) else {
            continue;
        };
        let track_event = fields(track_event);
        match get(&track_event, 9) {
            Some(Field::Varint(1)) => *begins.entry(sequence).or_default() += 1,
            Some(Field::Varint(2)) => *begins.entry(sequence).or_default() -= 1,
            _ => {}
        }
        for (number, value) in &track_event {
            match (number, value) {
                (36, Field::Varint(id)) => flows_out.push(*id),
                (42, Field::Varint(id)) => flows_in.push(*id),
                _ => {}
            }
        }
    }
    assert!(begins.values().all(|&open| open == 0), "{begins:?}");
    assert_eq!(begins.len(), 2, "two thread sequences with slices");
    flows_out.sort();
    flows_in.sort();
    // ping wakes pong (pong polled next), pong wakes ping (polled next),
    // ping wakes pong again: that flow ends at the end of the trace.
    assert_eq!(flows_out.len(), 3);
    assert_eq!(flows_out, flows_in);
    assert_eq!(samples, 1);
    for expected in [
        "ping",
        "pong",
        "app::ping",
        // The await stack, led by what the task waits on; where it waits is
        // the first frame, not a string (and an annotation) of its own.
        "waits on: timer: time::Sleep\ninner (main.rs:3)\nouter (main.rs:9)",
        "inner",
        "bin/app",
        "1.54.1",
    ] {
        assert!(
            strings.iter().any(|s| s == expected),
            "{expected} not interned: {strings:?}"
        );
    }
    assert!(
        !strings
            .iter()
            .any(|s| s == "inner (main.rs:3)" || s == "waits_at" || s == "waits_on")
    );
    assert_eq!(
        strings.iter().filter(|s| *s == "app::ping").count(),
        1,
        "interned once per sequence: {strings:?}"
    );
}

#[test]
fn flows_match_the_json_trace() {
    let info = info();
    let json: serde_json::Value = serde_json::from_slice(&record(Format::Json, &info)).unwrap();
    let events = json["traceEvents"].as_array().unwrap();
    let starts = events.iter().filter(|e| e["ph"] == "s").count();
    let ends = events.iter().filter(|e| e["ph"] == "f").count();
    // JSON leaves the last wake's flow without an end (nothing to bind it to).
    assert_eq!((starts, ends), (3, 2));
    let poll = events
        .iter()
        .find(|e| e["ph"] == "X" && e["args"]["waits_at"].is_string())
        .expect("the poll that ended at an await point");
    assert_eq!(poll["args"]["waits_at"], "inner (main.rs:3)");
    assert_eq!(poll["args"]["waits_on"], "timer: time::Sleep");
    let sample = events.iter().find(|e| e["name"] == "sample").unwrap();
    assert_eq!(sample["args"]["task_type"], "app::ping");
    assert_eq!(sample["args"]["stack"][1], "outer (main.rs:9)");
}

/// Bytes per event of a long ping-pong between two workers (polls, wakes,
/// parks): what interning and delta timestamps buy. A worst case: every
/// poll wakes the other task (a flow: two varint ids) and is followed by
/// a park.
fn bytes_per_event(format: Format, info: &TraceInfo) -> f64 {
    let mut events = Vec::new();
    let mut ts = 10_000;
    for round in 0..5_000u64 {
        let (tid, task, other, site) = if round % 2 == 0 {
            (1, 1, 2, 0)
        } else {
            (2, 2, 1, 1)
        };
        let mut next = |ev: Event| {
            ts += 250 + (round * 7919) % 500;
            Event { ts_ns: ts, ..ev }
        };
        events.push(next(poll_start(0, tid, task, site)));
        events.push(next(Event {
            task: other,
            task_id: other,
            ..event(0, tid, EventKind::Wake)
        }));
        events.push(next(Event {
            addr: 77,
            ..poll_end(0, tid)
        }));
        events.push(next(park_start(0, tid)));
        events.push(next(park_end(0, tid)));
    }
    let mut timeline = Timeline::with_task_types(info.types.clone());
    let mut bytes = Vec::new();
    let mut writer = format.writer(&mut bytes, info).unwrap();
    let mut out = Vec::new();
    for ev in &events {
        timeline.push(ev, &mut out);
        for output in out.drain(..) {
            writer.write(&output).unwrap();
        }
    }
    timeline.finish(ts + 1, &mut out);
    for output in out.drain(..) {
        writer.write(&output).unwrap();
    }
    writer.finish(&serde_json::json!({})).unwrap();
    drop(writer);
    bytes.len() as f64 / events.len() as f64
}

#[test]
fn an_event_takes_a_few_bytes() {
    let info = info();
    let proto = bytes_per_event(Format::Perfetto, &info);
    let json = bytes_per_event(Format::Json, &info);
    assert!(proto < 18.0, "{proto:.1} bytes an event");
    assert!(proto * 4.0 < json, "{proto:.1} vs {json:.1} bytes an event");
}

/// This thread's CPU time (ns), from the scheduler's own accounting.
fn thread_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    stat.split_whitespace().next().unwrap().parse().unwrap()
}

/// What one core renders, on a synthetic recording shaped like the HTTP
/// benchmark flat out: two workers, 32 connection tasks, each request a
/// park in which the I/O driver wakes a task, then its poll ending at an
/// await point. Timeline and writer only (no spill read, no symbolizing).
/// CPU time, not wall time: the machine is shared. Run it with
/// `cargo test --release -p tracer-timeline -- --ignored --nocapture render_rate`.
#[test]
#[ignore = "a measurement: run by hand in release mode"]
fn render_rate() {
    let mut info = info();
    const TASKS: u64 = 32;
    for task in 1..=TASKS {
        info.symbols.await_points.insert((task, 77), 0);
    }
    let mut events = Vec::new();
    let mut ts = 10_000;
    for request in 0..400_000u64 {
        let tid = 1 + (request % 2) as u32;
        let task = 1 + (request * 7) % TASKS;
        let mut next = |ev: Event| {
            ts += 300 + (request * 7919) % 700;
            Event { ts_ns: ts, ..ev }
        };
        events.push(next(park_start(0, tid)));
        events.push(next(Event {
            task,
            task_id: task,
            ..event(0, tid, EventKind::Wake)
        }));
        events.push(next(park_end(0, tid)));
        events.push(next(poll_start(0, tid, task, (task % 2) as u32)));
        events.push(next(Event {
            addr: 77,
            ..poll_end(0, tid)
        }));
    }
    for format in [Format::Perfetto, Format::Json] {
        let mut bytes = 0u64;
        let started = thread_cpu_ns();
        {
            let mut out = std::io::BufWriter::new(Counting(&mut bytes));
            let mut timeline = Timeline::with_task_types(info.types.clone());
            // Straight to the writer, as the tracer's render loop does.
            let mut writer = Direct(format.writer(&mut out, &info).unwrap());
            for ev in &events {
                timeline.push(ev, &mut writer);
            }
            timeline.finish(ts + 1, &mut writer);
            writer.0.finish(&serde_json::json!({})).unwrap();
        }
        let cpu_ns = thread_cpu_ns() - started;
        let n = events.len() as f64;
        println!(
            "{format:?}: {} events in {:.0} ms of CPU: {:.2} M events/s, {:.0} ns an event, {:.1} bytes an event",
            events.len(),
            cpu_ns as f64 / 1e6,
            n / (cpu_ns as f64 / 1e9) / 1e6,
            cpu_ns as f64 / n,
            bytes as f64 / n
        );
        assert!(bytes > 0);
    }
}

/// Outputs written as they come (the render loop's `Writers`, one writer).
struct Direct<'a>(Box<dyn crate::writer::TraceWriter + 'a>);

impl crate::output::Outputs for Direct<'_> {
    fn push(&mut self, output: TimelineOutput) {
        self.0.write(&output).unwrap();
    }
}

/// Counts the bytes written, keeps none.
struct Counting<'a>(&'a mut u64);

impl std::io::Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        *self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
