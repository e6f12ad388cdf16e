//! What each `--mode` records, and that tracing leaves the traced program's
//! results alone: real fixtures, real probes (as root).

use test_support::{self as support, trace};

use serde_json::Value;
use support::Profile;
use trace::{Fixture, Trace, describe, require_root, run, scratch_dir, tracer};

/// The `checksum …` line a fixture printed.
fn checksum_line(stdout: &str) -> Option<&str> {
    stdout.lines().find(|line| line.starts_with("checksum "))
}

/// Runs the checksum fixture untraced, then under the tracer in full mode
/// (every probe the tracer has), and compares what it computed. A probe on
/// the wrong byte, or one whose handling clobbered a register, would change
/// the checksum or crash the program.
fn check_tracing_leaves_results_alone(profile: Profile) {
    require_root();
    let fixture = support::fixture("checksum", profile);
    let untraced = run(std::process::Command::new(&fixture).arg("100"));
    assert!(untraced.status.success(), "{}", describe(&untraced));
    let untraced_stdout = String::from_utf8_lossy(&untraced.stdout).into_owned();
    let expected = checksum_line(&untraced_stdout)
        .unwrap_or_else(|| panic!("no checksum line: {untraced_stdout}"))
        .to_owned();

    let dir = scratch_dir(&format!("checksum-{profile:?}"));
    let output = dir.join("trace.pftrace");
    let traced = run(tracer()
        .args(["--mode", "full", "-o"])
        .arg(&output)
        .arg("--")
        .arg(&fixture)
        .arg("100"));
    assert!(traced.status.success(), "{}", describe(&traced));
    let stdout = String::from_utf8_lossy(&traced.stdout);
    assert!(
        stdout.contains("command exited: exit status: 0"),
        "{stdout}"
    );
    assert_eq!(
        checksum_line(&stdout),
        Some(expected.as_str()),
        "traced run computed something else:\n{stdout}"
    );

    // The probes did fire: the comparison above means nothing otherwise.
    let trace = Trace::load(&output);
    // Every poll's end was seen: the places `raw::poll` returns to (both
    // schedulers, the blocking pool) are all probed.
    let metadata = trace.metadata();
    assert_eq!(
        metadata["abandoned_polls"], 0,
        "polls without an end: {metadata}"
    );
    assert_eq!(
        metadata["unmatched_ends"], 0,
        "ends without a start: {metadata}"
    );
    // The program ran to its end, so every poll ended before it exited,
    // including a blocking task's poll that other polls ran inside of.
    let cut: Vec<_> = trace
        .polls()
        .into_iter()
        .chain(trace.slices("blocking"))
        .filter(|poll| poll.args["truncated"] == Value::Bool(true))
        .collect();
    assert!(cut.is_empty(), "polls whose end was not seen: {cut:#?}");
    assert!(trace.polls().len() > 1000, "{} polls", trace.polls().len());
    assert!(!trace.parks().is_empty(), "no parks");
    let wake_flows = trace
        .events()
        .iter()
        .filter(|e| e["ph"] == "s" && e["cat"] == "wake")
        .count();
    assert!(wake_flows > 1000, "{wake_flows} wake → poll flows");
    let waits = trace
        .polls()
        .iter()
        .filter(|poll| poll.args.get("waits_at").is_some())
        .count();
    assert!(waits > 100, "{waits} polls say where they wait");
}

#[test]
fn tracing_leaves_the_programs_results_alone_release() {
    check_tracing_leaves_results_alone(Profile::Release);
}

#[test]
fn tracing_leaves_the_programs_results_alone_fat_lto() {
    check_tracing_leaves_results_alone(Profile::Lto);
}

/// Events of `category` in the trace (instants, flows, slices).
fn events_of(trace: &Trace, category: &str) -> usize {
    trace
        .events()
        .iter()
        .filter(|e| e["cat"] == category)
        .count()
}

/// Traces a running `multi_worker` (a busy task spinning 50 ms per poll on
/// one worker, short polls and parks elsewhere) for 2 s in `mode`.
fn record_multi_worker(mode: &str) -> (Trace, String) {
    require_root();
    // The turn before the fixture: its spinning task must not share the CPU
    // with another test's recording while this one waits for its turn.
    let _turn = trace::tracer_turn();
    let fixture = Fixture::start("multi_worker", Profile::Release, 600.0);
    let dir = scratch_dir(&format!("mode-{mode}"));
    let output = dir.join("trace.pftrace");
    let result = trace::run_holding_turn(
        tracer()
            .args(["--mode", mode, "--duration", "2s", "--pid"])
            .arg(fixture.pid().to_string())
            .arg("-o")
            .arg(&output),
    );
    assert!(result.status.success(), "{}", describe(&result));
    let stdout = String::from_utf8_lossy(&result.stdout).into_owned();
    (Trace::load(&output), stdout)
}

#[test]
fn light_mode_records_long_polls_parks_and_samples_only() {
    let (trace, stdout) = record_multi_worker("light");
    let polls = trace.polls();
    assert!(!polls.is_empty(), "no polls at all:\n{stdout}");
    for poll in &polls {
        // Polls cut at the end of recording may be shorter.
        let truncated = poll.args["truncated"] == Value::Bool(true);
        assert!(
            truncated || poll.dur_ns >= 1e6,
            "a poll shorter than the 1 ms default --min-poll: {poll:?}"
        );
        // The filter reads the task id at the poll's end; it must be there.
        assert!(
            poll.args["task_id"].as_u64().is_some_and(|id| id > 0),
            "long poll without a task id: {poll:?}"
        );
    }
    assert!(
        polls.iter().any(|p| p.name.contains("fixture_busy_task")),
        "the busy task's 50 ms polls are missing"
    );
    assert!(!trace.parks().is_empty(), "no parks:\n{stdout}");
    let short = trace.metadata()["short_polls_not_recorded"]
        .as_u64()
        .unwrap_or(0);
    assert!(short > 0, "no short polls counted:\n{stdout}");
    assert!(events_of(&trace, "sample") > 0, "no CPU samples");
    assert_eq!(events_of(&trace, "wake"), 0, "light mode records no wakes");
}

#[test]
fn polls_mode_records_every_poll_and_nothing_else() {
    let (trace, stdout) = record_multi_worker("polls");
    let polls = trace.polls();
    assert!(polls.len() > 100, "{} polls:\n{stdout}", polls.len());
    assert!(
        polls.iter().any(|p| p.dur_ns < 1e6),
        "short polls are missing"
    );
    assert!(
        polls
            .iter()
            .all(|p| p.args["task_id"].as_u64().is_some_and(|id| id > 0)),
        "a poll without a task id"
    );
    assert!(trace.parks().is_empty(), "polls mode records no parks");
    assert_eq!(
        trace.metadata()["abandoned_polls"],
        0,
        "polls whose end was not seen"
    );
    // Recording only spills events; the trace is rendered afterwards, and
    // both costs are reported.
    let metadata = trace.metadata();
    assert!(
        metadata["recording_cpu_ns"]
            .as_u64()
            .is_some_and(|ns| ns > 0),
        "no recording CPU time in {metadata}"
    );
    assert!(
        metadata["render_ms"].is_number(),
        "no render time in {metadata}"
    );
    for category in ["sample", "wake", "spawn"] {
        assert_eq!(events_of(&trace, category), 0, "{category} events recorded");
    }
}
