//! The `block_on` root future: its polls on the thread that called
//! `block_on`, as a task of its own named after its type, with where it
//! waits and (multi-thread) the wakes that make it run — on a real fixture
//! whose root future loops on a timer and a `Notify` (`block_on_root`),
//! under both schedulers.

use test_support::{self as support, trace};

use serde_json::Value;
use support::Profile;
use trace::{Trace, TraceSlice, describe, require_root, run, scratch_dir, tracer};

/// The root future's type, as the fixture names it.
const ROOT_TYPE: &str = "block_on_root::fixture_root::{{closure}}";

/// Ids the tracer gives root futures start at 2^52 (tracer-common's
/// `ROOT_ID_BASE`), above any tokio task id.
const ROOT_ID_BASE: u64 = 1 << 52;

/// Launches the fixture with `flavour` for `seconds` under the tracer (a
/// JSON trace, to read flows back); returns the trace and the tracer's
/// stdout.
fn trace_root(flavour: &str, profile: Profile, seconds: &str) -> (Trace, String) {
    let scratch = format!("block-on-{flavour}-{profile:?}");
    trace::launch_under_tracer(
        "trace.json",
        "block_on_root",
        profile,
        &scratch,
        &[flavour, seconds],
    )
}

fn pid(trace: &Trace) -> u64 {
    trace.metadata()["target_pid"].as_u64().expect("target_pid")
}

/// The root future's polls: named "block_on root …", with its type.
fn root_polls(trace: &Trace) -> Vec<TraceSlice> {
    trace
        .polls()
        .into_iter()
        .filter(|poll| poll.args["task_type"] == ROOT_TYPE)
        .collect()
}

/// Checks what both schedulers show: the root's polls are on the main
/// thread (the one that called `block_on`), many (the fixture's loop runs
/// every ~7 ms), one task with an id of its own, each poll apart from the
/// thread's parks and task polls, and with where the root waits.
fn check_root_polls(trace: &Trace) -> Vec<TraceSlice> {
    let main_thread = pid(trace);
    let roots = root_polls(trace);
    assert!(
        roots.len() >= 20,
        "{} root polls in a 1 s run of a loop that waits ~7 ms",
        roots.len()
    );
    for poll in &roots {
        assert_eq!(poll.tid, main_thread, "a root poll off the block_on thread");
        assert!(
            poll.name.starts_with("block_on root") && poll.name.contains("fixture_root"),
            "{}",
            poll.name
        );
    }
    let ids: std::collections::BTreeSet<u64> = roots
        .iter()
        .map(|poll| poll.args["task_id"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(ids.len(), 1, "one block_on call, one root id: {ids:?}");
    let id = *ids.first().unwrap();
    assert!(
        id >= ROOT_ID_BASE,
        "root id {id} could clash with tokio's ids"
    );
    assert!(
        !trace
            .polls()
            .iter()
            .any(|poll| poll.args["task_id"] == id && poll.args["task_type"] != ROOT_TYPE),
        "the root id was given to another poll"
    );
    // Nothing else runs on the thread while the root is polled.
    let others: Vec<TraceSlice> = trace
        .parks()
        .into_iter()
        .chain(trace.polls())
        .filter(|slice| slice.tid == main_thread && slice.args["task_id"] != id)
        .collect();
    for root in &roots {
        let overlapping = others
            .iter()
            .find(|other| other.start_ns < root.end_ns() && root.start_ns < other.end_ns());
        assert!(
            overlapping.is_none(),
            "root poll at {} ns overlaps {overlapping:?}",
            root.start_ns
        );
    }
    // Where it waits: its await points (the root's waker clones).
    let waiting = roots
        .iter()
        .filter(|poll| {
            poll.args["waits_at"]
                .as_str()
                .is_some_and(|at| at.contains("fixture_root"))
        })
        .count();
    assert!(
        waiting * 10 >= roots.len() * 9,
        "{waiting} of {} root polls say where the root waits",
        roots.len()
    );
    roots
}

/// Wake arrows that end on the main thread: each is a wake of the root.
/// At least one wake arrow into the root's thread for every two root polls:
/// its waker is the thread parker's, and the notifier's wakes reach it.
fn check_root_wakes(trace: &Trace, root_polls: usize) {
    let tid = pid(trace);
    let flows = trace
        .events()
        .iter()
        .filter(|event: &&Value| event["ph"] == "f" && event["tid"] == tid)
        .count();
    assert!(
        flows * 2 >= root_polls,
        "{flows} wake arrows into {root_polls} root polls"
    );
}

#[test]
fn multi_thread_block_on_root_is_polled_on_its_thread() {
    let (trace, stdout) = trace_root("multi", Profile::Release, "1");
    let roots = check_root_polls(&trace);
    check_root_wakes(&trace, roots.len());
    assert!(stdout.contains("block_on root fixture_root"), "{stdout}");
}

#[test]
fn current_thread_block_on_root_is_polled_between_its_tasks() {
    let (trace, _) = trace_root("current", Profile::Release, "1");
    check_root_polls(&trace);
    // The spawned task runs on the same thread, outside the root's polls
    // (checked above): both are there.
    assert!(
        trace
            .polls()
            .iter()
            .any(|poll| poll.name.contains("fixture_notifier") && poll.tid == pid(&trace)),
        "no fixture_notifier polls on the current-thread runtime's thread"
    );
}

#[test]
fn a_running_programs_root_is_joined_at_its_next_park() {
    // `--pid`: the loop was entered before tracing began; its own park
    // method shows the thread is in one.
    require_root();
    let fixture = trace::Fixture::start("block_on_root", Profile::Release, 600.0);
    let dir = scratch_dir("block-on-pid");
    let output = dir.join("trace.json");
    let result = run(tracer()
        .arg("--pid")
        .arg(fixture.pid().to_string())
        .arg("-o")
        .arg(&output)
        .arg("--duration")
        .arg("1s"));
    assert!(result.status.success(), "{}", describe(&result));
    let trace = Trace::load(&output);
    let roots = check_root_polls(&trace);
    check_root_wakes(&trace, roots.len());
}

#[test]
fn fat_lto_says_the_root_is_missing() {
    // The loop and its park method are inlined into `main` there: `probes`
    // must say so rather than promise root polls (the matrix lists the gap).
    let result = run(tracer()
        .args(["probes", "--binary"])
        .arg(support::fixture("block_on_root", Profile::Lto)));
    assert!(result.status.success(), "{}", describe(&result));
    let stdout = String::from_utf8_lossy(&result.stdout);
    let verdict = stdout
        .lines()
        .find(|line| line.trim_start().starts_with("block_on root"))
        .unwrap_or_else(|| panic!("no block_on root verdict:\n{stdout}"));
    assert!(verdict.contains("MISSING"), "{verdict}");
}
