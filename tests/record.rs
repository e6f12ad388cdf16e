//! End to end: real tokio fixture processes, real uprobes (as root), and
//! assertions on the trace file the tracer writes.

use test_support::{self as support, trace};

use std::collections::{BTreeMap, BTreeSet};

use support::Profile;
use trace::{Fixture, Trace, TraceSlice, describe, require_root, run, scratch_dir, tracer};

/// Records `fixture` for `seconds` and returns the parsed trace and the
/// tracer's stdout.
fn record_fixture(name: &str, profile: Profile, seconds: &str) -> (Trace, String) {
    let recorded =
        trace::record_running(name, profile, &format!("{name}-{profile:?}"), seconds, &[]);
    (
        recorded.trace,
        String::from_utf8_lossy(&recorded.output.stdout).into_owned(),
    )
}

/// Parks never overlap a poll on the same thread: a worker is either running
/// a task or parked.
fn assert_parks_do_not_overlap_polls(polls: &[TraceSlice], parks: &[TraceSlice]) {
    let mut polls_by_thread: BTreeMap<u64, Vec<&TraceSlice>> = BTreeMap::new();
    for poll in polls {
        polls_by_thread.entry(poll.tid).or_default().push(poll);
    }
    for park in parks {
        for poll in polls_by_thread.get(&park.tid).into_iter().flatten() {
            let overlap = poll.start_ns < park.end_ns() && park.start_ns < poll.end_ns();
            assert!(
                !overlap,
                "park {park:?} overlaps poll {poll:?} on thread {}",
                park.tid
            );
        }
    }
}

fn check_multi_worker(profile: Profile) {
    let (trace, stdout) = record_fixture("multi_worker", profile, "3s");
    let polls = trace.polls();
    let parks = trace.parks();

    let workers: BTreeSet<u64> = polls.iter().map(|p| p.tid).collect();
    assert!(
        workers.len() >= 2,
        "polls on only {} worker(s)",
        workers.len()
    );

    let names: BTreeSet<&str> = polls.iter().map(|p| p.name.as_str()).collect();
    for function in ["fixture_busy_task", "fixture_sleeper", "fixture_yielder"] {
        assert!(
            names.iter().any(|n| n.contains(function)),
            "no poll named after {function}: {names:?}"
        );
    }

    let busy: Vec<&TraceSlice> = polls
        .iter()
        .filter(|p| p.name.contains("fixture_busy_task"))
        .collect();
    // Polls cut by the start or end of the recording are shorter; the rest
    // each spin for 50 ms.
    let whole: Vec<&&TraceSlice> = busy
        .iter()
        .filter(|p| p.args["truncated"] != true)
        .collect();
    assert!(
        whole.len() >= 10,
        "only {} whole polls of the busy task in 3 s",
        whole.len()
    );
    let short = whole.iter().filter(|p| p.dur_ns < 45e6).count();
    // The first poll seen may have started before the probes were attached.
    assert!(
        short <= 1,
        "{short} busy-task polls shorter than 45 ms: {whole:?}"
    );

    // Each poll carries the task's identity.
    for poll in &polls {
        assert!(
            poll.args["task_id"].as_u64().is_some_and(|id| id > 0),
            "poll without task id: {poll:?}"
        );
        assert!(
            poll.args["task_type"].as_str().is_some(),
            "poll without task type: {poll:?}"
        );
    }
    // One task, one id: the busy task is a single task.
    let busy_ids: BTreeSet<u64> = busy
        .iter()
        .filter_map(|p| p.args["task_id"].as_u64())
        .collect();
    assert_eq!(busy_ids.len(), 1, "busy task ids: {busy_ids:?}");

    assert!(!parks.is_empty(), "no park slices");
    assert_parks_do_not_overlap_polls(&polls, &parks);

    // Worker tracks are named from the thread's comm plus an index.
    let thread_names = trace.thread_names();
    for tid in &workers {
        let (_, name) = thread_names
            .iter()
            .find(|(t, _)| t == tid)
            .expect("worker track without a name");
        // tokio names its workers "tokio-runtime-worker" (older) or
        // "tokio-rt-worker"; the kernel keeps 15 bytes of it.
        assert!(
            name.starts_with("tokio-r") && name.contains(" #"),
            "worker named {name:?}"
        );
    }

    assert_eq!(trace.metadata()["lost_events"], 0);
    assert!(
        stdout.contains("ui.perfetto.dev"),
        "summary does not say how to open the trace:\n{stdout}"
    );
}

#[test]
fn multi_worker_release() {
    check_multi_worker(Profile::Release);
}

#[test]
fn multi_worker_fat_lto() {
    check_multi_worker(Profile::Lto);
}

fn check_current_thread(profile: Profile) {
    let (trace, _) = record_fixture("current_thread", profile, "2s");
    let polls = trace.polls();
    let parks = trace.parks();
    let threads: BTreeSet<u64> = polls.iter().map(|p| p.tid).collect();
    assert_eq!(
        threads.len(),
        1,
        "a current-thread runtime polls on one thread: {threads:?}"
    );
    for function in ["fixture_ticker", "fixture_short_spinner"] {
        assert!(
            polls.iter().any(|p| p.name.contains(function)),
            "no poll named after {function}"
        );
    }
    let spinner: Vec<&TraceSlice> = polls
        .iter()
        .filter(|p| p.name.contains("fixture_short_spinner") && p.args["truncated"] != true)
        .collect();
    assert!(spinner.iter().filter(|p| p.dur_ns >= 1.8e6).count() >= spinner.len() / 2);
    assert!(
        !parks.is_empty(),
        "no park slices on the current-thread runtime"
    );
    assert_parks_do_not_overlap_polls(&polls, &parks);
}

#[test]
fn current_thread_release() {
    check_current_thread(Profile::Release);
}

#[test]
fn current_thread_fat_lto() {
    check_current_thread(Profile::Lto);
}

#[test]
fn launched_command_is_traced_from_its_first_poll() {
    require_root();
    let fixture = support::fixture("multi_worker", Profile::Release);
    let dir = scratch_dir("launch");
    let output = dir.join("trace.pftrace");
    let result = run(tracer()
        .arg("-o")
        .arg(&output)
        .arg("--")
        .arg(&fixture)
        .arg("1.5"));
    assert!(result.status.success(), "{}", describe(&result));
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains("target exited"), "{stdout}");
    assert!(
        stdout.contains("command exited: exit status: 0"),
        "{stdout}"
    );
    let trace = Trace::load(&output);
    let polls = trace.polls();
    // Tracing from the start: every task the fixture spawns (1 busy, 4
    // sleepers, 2 yielders; tokio numbers them consecutively, after the ids
    // its worker threads took) is seen, and the busy task's very first poll
    // is whole.
    // The `block_on` root future's id (from 2^52 up) is the tracer's, not
    // tokio's: tokio's are checked here.
    let ids: BTreeSet<u64> = polls
        .iter()
        .filter_map(|p| p.args["task_id"].as_u64())
        .filter(|&id| id < 1 << 52)
        .collect();
    assert_eq!(ids.len(), 7, "tasks seen: {ids:?}");
    let (first, last) = (*ids.first().unwrap(), *ids.last().unwrap());
    assert_eq!(last - first, 6, "task ids not consecutive: {ids:?}");
    let first_busy = polls
        .iter()
        .filter(|p| p.name.contains("fixture_busy_task"))
        .min_by(|a, b| a.start_ns.total_cmp(&b.start_ns));
    assert!(
        first_busy.is_some_and(|p| p.dur_ns >= 45e6),
        "first busy poll: {first_busy:?}"
    );
}

#[test]
fn launched_command_exit_code_is_reported() {
    require_root();
    let dir = scratch_dir("launch-exit");
    let output = dir.join("trace.pftrace");
    // Not a tokio program: refused before it runs, with nothing written.
    let result = run(tracer()
        .arg("-o")
        .arg(&output)
        .arg("--")
        .arg("/bin/sh")
        .arg("-c")
        .arg("exit 3"));
    assert!(!result.status.success());
    assert!(
        String::from_utf8_lossy(&result.stderr).contains("tokio"),
        "{}",
        describe(&result)
    );
    assert!(!output.exists());
}

#[test]
fn ctrl_c_ends_with_a_complete_trace() {
    require_root();
    let _turn = trace::tracer_turn();
    let fixture = Fixture::start("multi_worker", Profile::Lto, 600.0);
    let dir = scratch_dir("sigint");
    let output = dir.join("trace.pftrace");
    let child = tracer()
        .arg("--pid")
        .arg(fixture.pid().to_string())
        .arg("-o")
        .arg(&output)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    unsafe { kill(child.id() as i32, 2) };
    let result = trace::wait_with_limit(child, std::time::Duration::from_secs(30));
    assert!(result.status.success(), "{}", describe(&result));
    assert!(String::from_utf8_lossy(&result.stdout).contains("interrupted"));
    let trace = Trace::load(&output);
    assert!(!trace.polls().is_empty());
}

#[test]
fn target_exit_ends_with_a_complete_trace() {
    require_root();
    let _turn = trace::tracer_turn();
    // Long enough that the probes are in before it exits on a loaded
    // machine (2 s was not, once: the tracer then rightly refused).
    let fixture = Fixture::start("current_thread", Profile::Release, 4.0);
    let dir = scratch_dir("target-exit");
    let output = dir.join("trace.pftrace");
    let result = trace::run_holding_turn(
        tracer()
            .arg("--pid")
            .arg(fixture.pid().to_string())
            .arg("-o")
            .arg(&output),
    );
    assert!(result.status.success(), "{}", describe(&result));
    assert!(String::from_utf8_lossy(&result.stdout).contains("target exited"));
    let trace = Trace::load(&output);
    assert!(!trace.polls().is_empty());
}

/// The binary's symbols are loaded while recording (a thread started at
/// attach, see tracer/src/record/symbol_prep.rs), from the file the process
/// has mapped. This binary is deleted before the tracer starts and the
/// process exits before the stop: its file is then reachable by no path and
/// no /proc entry, so `file:line` in the trace can only come from what was
/// loaded while recording.
#[test]
fn symbols_of_a_target_that_exits_come_from_the_binary_loaded_while_recording() {
    require_root();
    let _turn = trace::tracer_turn();
    let dir = scratch_dir("exit-deleted");
    let binary = dir.join("current_thread");
    std::fs::copy(
        support::fixture("current_thread", Profile::ReleaseDebug),
        &binary,
    )
    .unwrap();
    let mut child = std::process::Command::new(&binary)
        .arg("2")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert!(ready.starts_with("ready"), "fixture said {ready:?}");
    let fixture = Fixture {
        child,
        path: binary.clone(),
    };
    std::fs::remove_file(&binary).unwrap();
    let output = dir.join("trace.pftrace");
    let summary = dir.join("summary.json");
    let result = trace::run_holding_turn(
        tracer()
            .arg("--pid")
            .arg(fixture.pid().to_string())
            .arg("-o")
            .arg(&output)
            .arg("--summary-json")
            .arg(&summary),
    );
    assert!(result.status.success(), "{}", describe(&result));
    assert!(String::from_utf8_lossy(&result.stdout).contains("target exited"));
    let trace = Trace::load(&output);
    let waits_at: Vec<String> = trace
        .polls()
        .iter()
        .filter_map(|poll| poll.args["waits_at"].as_str().map(str::to_owned))
        .collect();
    assert!(
        waits_at
            .iter()
            .any(|at| at.contains("fixture_ticker") && at.contains("current_thread.rs:")),
        "no waits_at in fixture_ticker with its source line: {:?}",
        &waits_at[..waits_at.len().min(10)]
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    let prepare_ms = &summary["tracer_cost"]["symbolize_prepare_cpu_ms"];
    assert!(prepare_ms.is_u64(), "{summary}");
    assert_eq!(
        trace.metadata()["symbolize_prepare_cpu_ms"],
        *prepare_ms,
        "the trace and the summary disagree"
    );
}

unsafe extern "C" {
    fn kill(pid: i32, signal: i32) -> i32;
}
