use super::*;
use serde_json::json;

fn finding(tid: u32, start_ns: u64, duration_ns: u64) -> Box<FindingOutput> {
    Box::new(FindingOutput {
        kind: "BLOCKING".to_owned(),
        tid,
        task: "handler".to_owned(),
        site: Some(3),
        start_ns,
        duration_ns,
        summary: "BLOCKING: …".to_owned(),
        reason: "blocked (sleep)".to_owned(),
        user_stack: vec!["app::handler".to_owned()],
        kernel_stack: vec!["do_nanosleep".to_owned()],
        stack: Some(0),
    })
}

fn health(end_ns: u64) -> Box<HealthRecord> {
    Box::new(HealthRecord {
        start_ns: end_ns.saturating_sub(100),
        end_ns,
        workers: vec![WorkerShare {
            tid: 1,
            name: "w (tid 1)".to_owned(),
            busy: 0.25,
            parks: 7,
        }],
        imbalance: 1.0,
        hogs: 0,
        blocking: 1,
        blocked_ns: 3_000_000,
        preempted_ns: 0,
        kernel_samples: 2,
        cpu_by_task: Vec::new(),
    })
}

/// (tid, "+name"/"-name"/"i", ts) for each output, in order.
fn shape(outputs: &[TimelineOutput]) -> Vec<(u32, String, u64)> {
    outputs
        .iter()
        .filter_map(|output| {
            let ts = output_ts(output)?;
            Some(match output {
                TimelineOutput::SliceStart(s) => (s.tid, "+park".to_owned(), ts),
                TimelineOutput::Slice(s) => (s.tid, "-park".to_owned(), ts),
                TimelineOutput::Sample(s) => (s.tid, "sample".to_owned(), ts),
                TimelineOutput::Watch(w) => match w.as_ref() {
                    WatchOutput::SpanStart { tid, kind, .. } => {
                        (*tid, format!("+{}", kind.name_and_category().1), ts)
                    }
                    WatchOutput::Span(span) => (
                        span.tid,
                        format!("-{}", span.kind.name_and_category().1),
                        ts,
                    ),
                    WatchOutput::FindingMark(f) => (f.tid, "mark".to_owned(), ts),
                    WatchOutput::Health(_) => (0, "health".to_owned(), ts),
                },
                other => panic!("unexpected {other:?}"),
            })
        })
        .collect()
}

#[test]
fn a_blocking_finding_encloses_its_off_cpu_span_and_ends_interleave() {
    let items = vec![
        WatchItem::OffCpu {
            tid: 1,
            start_ns: 100,
            end_ns: 200,
            preempted: false,
            state: 1,
        },
        WatchItem::Finding(finding(1, 100, 100)),
        WatchItem::Park {
            tid: 2,
            start_ns: 50,
            end_ns: 150,
        },
        WatchItem::Sample {
            tid: 2,
            ts_ns: 170,
            site: None,
            stack: 0,
        },
        WatchItem::Health(health(300)),
    ];
    let threads = [(1, "w1".to_owned()), (2, "w2".to_owned())];
    let composed = compose(&threads, items, None);
    assert!(matches!(
        &composed.outputs[0],
        TimelineOutput::ThreadName(ThreadName {
            tid: 1,
            sort_index: 1,
            ..
        })
    ));
    let expected: Vec<(u32, String, u64)> = [
        (2, "+park", 50),
        (1, "+finding", 100),
        (1, "+off_cpu", 100),
        (2, "-park", 150),
        (2, "sample", 170),
        (1, "-off_cpu", 200),
        (1, "-finding", 200),
        (0, "health", 300),
    ]
    .into_iter()
    .map(|(tid, what, ts)| (tid, what.to_owned(), ts))
    .collect();
    assert_eq!(shape(&composed.outputs), expected);
    assert_eq!(
        (composed.parks, composed.samples, composed.findings),
        (1, 1, 1)
    );
    assert_eq!(composed.clipped, 0);
    assert!(composed.tail.is_empty());
}

#[test]
fn a_span_that_would_cross_the_one_around_it_is_clipped() {
    let items = vec![
        WatchItem::Finding(finding(1, 100, 50)),
        // Starts inside the finding, ends after it.
        WatchItem::OffCpu {
            tid: 1,
            start_ns: 120,
            end_ns: 400,
            preempted: true,
            state: 0,
        },
    ];
    let composed = compose(&[(1, "w".to_owned())], items, None);
    let shape = shape(&composed.outputs);
    assert_eq!(
        shape
            .iter()
            .map(|(_, what, ts)| (what.as_str(), *ts))
            .collect::<Vec<_>>(),
        [
            ("+finding", 100),
            ("+off_cpu", 120),
            ("-off_cpu", 150),
            ("-finding", 150)
        ]
    );
    assert_eq!(composed.clipped, 1);
    let clipped = composed.outputs.iter().any(|output| {
        matches!(output, TimelineOutput::Watch(w)
            if matches!(w.as_ref(), WatchOutput::Span(Span { clipped: true, .. })))
    });
    assert!(clipped);
}

#[test]
fn an_incident_window_stops_at_the_detail_and_keeps_later_findings_and_health_for_the_tail() {
    let items = vec![
        WatchItem::Park {
            tid: 1,
            start_ns: 900,
            end_ns: 1_500,
        },
        WatchItem::Park {
            tid: 1,
            start_ns: 1_600,
            end_ns: 1_700,
        },
        WatchItem::Sample {
            tid: 1,
            ts_ns: 1_200,
            site: Some(1),
            stack: 4,
        },
        WatchItem::Finding(finding(1, 1_300, 10)),
        WatchItem::Health(health(1_100)),
        WatchItem::Health(health(2_000)),
    ];
    let composed = compose(&[(1, "w".to_owned())], items, Some(1_000));
    assert_eq!(
        shape(&composed.outputs)
            .iter()
            .map(|(_, what, ts)| (what.as_str(), *ts))
            .collect::<Vec<_>>(),
        [("+park", 900), ("-park", 1_000)]
    );
    assert!(composed.outputs.iter().any(|output| matches!(
        output,
        TimelineOutput::Slice(Slice {
            truncated: true,
            ..
        })
    )));
    let tail: Vec<_> = composed.tail.iter().cloned().collect();
    assert_eq!(
        shape(&tail)
            .iter()
            .map(|(_, what, ts)| (what.as_str(), *ts))
            .collect::<Vec<_>>(),
        [("health", 1_100), ("mark", 1_300), ("health", 2_000)]
    );
}

#[test]
fn adopted_stacks_move_past_the_recording_s() {
    let mut symbols = Symbols {
        stacks: vec![Vec::new(); 5],
        ..Symbols::default()
    };
    let mut outputs = vec![TimelineOutput::Sample(Sample {
        tid: 1,
        ts_ns: 1,
        task_id: 0,
        site: None,
        stack: 1,
    })];
    let mut tail: VecDeque<TimelineOutput> = [TimelineOutput::Watch(Box::new(
        WatchOutput::FindingMark(finding(1, 5, 1)),
    ))]
    .into();
    adopt_stacks(&mut symbols, vec![Vec::new(); 2], &mut outputs, &mut tail);
    assert_eq!(symbols.stacks.len(), 7);
    assert!(matches!(
        &outputs[0],
        TimelineOutput::Sample(Sample { stack: 6, .. })
    ));
    match &tail[0] {
        TimelineOutput::Watch(w) => match w.as_ref() {
            WatchOutput::FindingMark(f) => assert_eq!(f.stack, Some(5)),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

#[test]
fn health_counters_are_percent_and_ms() {
    let counters = health(5_000).counters();
    assert_eq!(counters[0], ("busy %", "w (tid 1)".to_owned(), 25));
    assert!(counters.contains(&("busy % all workers", String::new(), 25)));
    assert!(counters.contains(&("blocked ms", String::new(), 3)));
}

/// Both writers take a composed window: JSON gives the finding as a slice
/// with its report and the off-CPU span inside it, health as an instant
/// and counters; Perfetto writes the finding's callstack (field 56).
#[test]
fn both_writers_write_a_composed_window() {
    use crate::task_types::TaskTypes;
    use crate::writer::{Format, TraceInfo};
    let items = vec![
        WatchItem::Finding(finding(1, 1_000, 500)),
        WatchItem::OffCpu {
            tid: 1,
            start_ns: 1_000,
            end_ns: 1_500,
            preempted: false,
            state: 1,
        },
        WatchItem::Sample {
            tid: 1,
            ts_ns: 1_700,
            site: None,
            stack: 0,
        },
        WatchItem::Health(health(2_000)),
    ];
    let composed = compose(&[(1, "w (tid 1)".to_owned())], items, None);
    let frame = |function: &str, module: &str| SymbolFrame {
        address: 0x10,
        function: Some(function.into()),
        module: module.into(),
        ..SymbolFrame::default()
    };
    let info = TraceInfo {
        pid: 7,
        process_name: "app".to_owned(),
        start_ns: 1_000,
        types: TaskTypes::new(vec![None; 4]),
        symbols: Symbols {
            stacks: vec![vec![
                frame("do_nanosleep", KERNEL_MODULE),
                frame("app::handler", "/app"),
            ]],
            ..Symbols::default()
        },
    };
    let write = |format: Format| {
        let mut out = Vec::new();
        let mut writer = format.writer(&mut out, &info).unwrap();
        for output in &composed.outputs {
            writer.write(output).unwrap();
        }
        writer.finish(&json!({"written_on": "exit"})).unwrap();
        drop(writer);
        out
    };
    let json: Value = serde_json::from_slice(&write(Format::Json)).unwrap();
    let events = json["traceEvents"].as_array().unwrap();
    let finding = events.iter().find(|e| e["cat"] == "finding").unwrap();
    assert_eq!(finding["ph"], "X");
    assert_eq!(finding["args"]["kernel_stack"][0], "do_nanosleep");
    assert!(
        events
            .iter()
            .any(|e| e["cat"] == "off_cpu" && e["args"]["state"] == 1)
    );
    let health = events.iter().find(|e| e["cat"] == "health").unwrap();
    assert_eq!(health["args"]["workers"][0]["parks"], 7);
    assert!(
        events
            .iter()
            .any(|e| e["ph"] == "C" && e["name"] == "busy %")
    );
    let proto = write(Format::Perfetto);
    // TrackEvent.callstack_iid (56) is a two-byte tag: 0xc0 0x03.
    assert!(proto.windows(2).any(|w| w == [0xc0, 0x03]));
    assert!(proto.windows(12).any(|w| w == b"do_nanosleep"));
}
