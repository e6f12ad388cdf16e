//! The watch tier (`rt-ebpf-trace watch`) on a real tokio program with
//! faults injected inside a task's poll every 250 ms: blocking calls
//! (`std::thread::sleep`, `std::fs::read` of a FIFO, a contended
//! `std::sync::Mutex`) and a 30 ms CPU hog must be reported with the right
//! task type and a stack naming the blocking function; a healthy run must
//! report nothing; SIGUSR1 must write a valid trace of the kept window;
//! an escalation must write one incident trace holding the kept window
//! before the trigger and the full detail after it.
//!
//! The traces are native Perfetto (`watch`'s default), read back through
//! `check_pftrace.py` against Perfetto's schema; one test of each kind
//! writes Chrome JSON (`-o x.json`) instead, which the tests read alike.

use test_support::{self as support, trace};

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Stdio};

use serde_json::Value;
use support::Profile;
use trace::{
    Fixture, Trace, describe, require_root, run_holding_turn, scratch_dir, tracer, tracer_turn,
};

/// How long each watch lasts: 12 injections.
const WATCH_FOR: &str = "3s";
/// At least this many of the 12 injections must be found.
const MIN_FOUND: usize = 9;
const TASK: &str = "task type fixture_injected_task::";

/// The `watch_faults` fixture running `kind`, killed when dropped.
fn faults(kind: &str, profile: Profile) -> Fixture {
    Fixture::launch(&support::fixture("watch_faults", profile), &["60", kind])
}

fn watch(kind: &str, profile: Profile, file: &str) -> (String, Trace) {
    require_root();
    let _turn = tracer_turn();
    let faults = faults(kind, profile);
    let dir = scratch_dir(&format!("watch-{kind}-{profile:?}"));
    let output = dir.join(file);
    let result = run_holding_turn(
        tracer()
            .args(["watch", "--duration", WATCH_FOR, "--quiet", "--pid"])
            .arg(faults.pid().to_string())
            .arg("-o")
            .arg(&output),
    );
    assert!(result.status.success(), "{}", describe(&result));
    let stdout = String::from_utf8_lossy(&result.stdout).into_owned();
    (stdout, Trace::load(&output))
}

/// A `watch` of a running fixture, its output read as it comes.
struct Watching {
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// Everything it printed so far.
    seen: String,
}

impl Watching {
    fn start(args: &[&str], pid: u32, output: &Path) -> Watching {
        let mut child = tracer()
            .arg("watch")
            .args(args)
            .arg("--pid")
            .arg(pid.to_string())
            .arg("-o")
            .arg(output)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start watch");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Watching {
            child,
            stdout,
            seen: String::new(),
        }
    }

    /// Reads lines until `done` holds for all it printed so far; fails if
    /// the watch ends first.
    fn read_until(&mut self, done: impl Fn(&str) -> bool) {
        let mut line = String::new();
        while !done(&self.seen) {
            line.clear();
            assert!(
                self.stdout.read_line(&mut line).unwrap() > 0,
                "watch ended early:\n{}",
                self.seen
            );
            self.seen.push_str(&line);
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { kill(self.child.id() as i32, signal) };
    }

    /// Stops it with SIGINT; it must exit successfully.
    fn stop(mut self) {
        self.signal(SIGINT);
        let status = self.child.wait().expect("wait for watch");
        assert!(status.success(), "{}", self.seen);
    }
}

fn lines<'a>(stdout: &'a str, prefix: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .filter(|line| line.starts_with(prefix))
        .collect()
}

/// Every finding of `kind` names the injected task and `expected` (all of
/// them, in the line), and there are enough of them; the trace has them too.
fn check_findings(stdout: &str, trace: &Trace, kind: &str, expected: &[&str]) {
    let found = lines(stdout, &format!("{kind}: "));
    assert!(
        found.len() >= MIN_FOUND,
        "{} {kind} findings of 12 injections:\n{stdout}",
        found.len()
    );
    for line in &found {
        assert!(line.contains(TASK), "wrong task type: {line}\n{stdout}");
        for word in expected {
            assert!(line.contains(word), "{word:?} missing: {line}");
        }
    }
    let in_trace: Vec<&Value> = trace
        .events()
        .iter()
        .filter(|event| event["cat"] == "finding" && event["args"]["finding"] == kind)
        .collect();
    assert_eq!(in_trace.len(), found.len(), "findings in the trace");
    let names_the_call = |frames: &Value| {
        frames.as_array().is_some_and(|frames| {
            frames.iter().any(|frame| {
                frame
                    .as_str()
                    .is_some_and(|f| f.contains("fixture_blocking_call") || f.contains("spin_for"))
            })
        })
    };
    for event in &in_trace {
        assert!(names_the_call(&event["args"]["user_stack"]), "{event}");
        assert!(
            event["args"]["summary"]
                .as_str()
                .is_some_and(|line| line.starts_with(&format!("{kind}: "))),
            "{event}"
        );
        assert_eq!(event["ph"], "X", "a finding is a slice: {event}");
    }
    if trace.is_perfetto() {
        // The whole stack as the slice's callstack (the Chrome JSON trace
        // has the report's stacks only).
        for event in &in_trace {
            assert!(names_the_call(&event["args"]["callstack"]), "{event}");
        }
    }
    // On the worker's track, named as in the report.
    let workers: Vec<(u64, String)> = trace.thread_names();
    for event in &in_trace {
        let tid = event["tid"].as_u64().unwrap();
        let name = workers
            .iter()
            .find(|(t, _)| *t == tid)
            .map(|(_, name)| name.as_str());
        assert_eq!(
            name.map(|name| name.ends_with(&format!("(tid {tid})"))),
            Some(true),
            "{event}: {workers:?}"
        );
    }
    if kind == "HOG" {
        // The hog's CPU samples, as callstack samples whose root frame
        // names the task type (the blocked fixtures' workers hardly run:
        // their windows may hold no sample at all).
        let samples = trace.samples();
        assert!(
            samples.iter().any(|sample| {
                sample["args"]["task_type"]
                    .as_str()
                    .is_some_and(|task| task.contains("fixture_injected_task"))
                    && sample["args"]["stack"].as_array().is_some_and(|stack| {
                        stack
                            .iter()
                            .any(|f| f.as_str().is_some_and(|f| f.contains("spin_for")))
                    })
            }),
            "no sample of the injected task in spin_for: {samples:?}"
        );
    }
    if kind == "BLOCKING" {
        // A blocking finding covers the worker's off-CPU span (blocked,
        // with its sleep state), nested in it on the same track.
        let off_cpu = trace.slices("off_cpu");
        for event in &in_trace {
            let (tid, start) = (event["tid"].as_u64(), event["ts"].as_f64().unwrap());
            assert!(
                off_cpu.iter().any(|span| Some(span.tid) == tid
                    && (span.start_ns / 1000.0 - start).abs() < 0.02
                    && span.name == "off CPU (blocked)"
                    && span.args["state"].as_u64().is_some_and(|state| state != 0)),
                "no off-CPU span under {event}"
            );
        }
    }
}

#[test]
fn finds_thread_sleep_inside_a_poll() {
    for profile in Profile::ALL {
        let (stdout, trace) = watch("sleep", profile, "watch.pftrace");
        // Under fat LTO `std::thread::sleep` is inlined into the caller and
        // the release profiles have no debug info to tell.
        let expected: &[&str] = match profile {
            Profile::Release => &["nanosleep", "std::thread", "fixture_blocking_call"],
            _ => &["nanosleep", "fixture_blocking_call"],
        };
        check_findings(&stdout, &trace, "BLOCKING", expected);
        assert!(lines(&stdout, "HOG: ").is_empty(), "{stdout}");
        // The switch's kernel frames are in the finding's callstack.
        let finding = trace
            .events()
            .iter()
            .find(|e| e["cat"] == "finding")
            .expect("a finding");
        assert!(
            finding["args"]["callstack"]
                .as_array()
                .is_some_and(|frames| frames
                    .iter()
                    .any(|f| f.as_str().is_some_and(|f| f.contains("nanosleep")))),
            "{finding}"
        );
    }
}

#[test]
fn finds_a_blocking_file_read_inside_a_poll() {
    // The Chrome JSON format (`-o x.json`), read back like the Perfetto one.
    let (stdout, trace) = watch("fs", Profile::Release, "watch.json");
    check_findings(
        &stdout,
        &trace,
        "BLOCKING",
        &["std::fs::read", "fixture_blocking_call"],
    );
}

#[test]
fn finds_a_contended_mutex_inside_a_poll() {
    let (stdout, trace) = watch("mutex", Profile::Release, "watch.pftrace");
    check_findings(
        &stdout,
        &trace,
        "BLOCKING",
        &["futex", "Mutex", "fixture_blocking_call"],
    );
}

#[test]
fn finds_a_hog_and_says_its_length_is_a_lower_bound() {
    let (stdout, trace) = watch("hog", Profile::Release, "watch.pftrace");
    // A 30 ms poll holds five or six of the 199 Hz samples: the finding's
    // span is between one and three sample periods.
    check_findings(&stdout, &trace, "HOG", &["at least", "spin_for"]);
    assert!(lines(&stdout, "BLOCKING: ").is_empty(), "{stdout}");
}

#[test]
fn a_healthy_program_gets_no_findings() {
    let (stdout, trace) = watch("healthy", Profile::Release, "watch.pftrace");
    assert!(lines(&stdout, "BLOCKING: ").is_empty(), "{stdout}");
    assert!(lines(&stdout, "HOG: ").is_empty(), "{stdout}");
    // It was watched all the same: parks (its workers' sleeps in their park,
    // told from blocking by the system call they sleep in) and per-second
    // health records, whose park counts come from the park probe's counter.
    assert!(trace.parks().len() > 100, "{} parks", trace.parks().len());
    let health: Vec<&Value> = trace
        .events()
        .iter()
        .filter(|e| e["cat"] == "health")
        .collect();
    assert!(health.len() >= 2, "{} health records", health.len());
    let counted: u64 = health
        .iter()
        .flat_map(|record| record["args"]["workers"].as_array().expect("workers"))
        .map(|worker| worker["parks"].as_u64().expect("parks"))
        .sum();
    assert!(
        counted > 100,
        "{counted} parks counted in the health records"
    );
    for (n, record) in health.iter().enumerate() {
        let workers = record["args"]["workers"].as_array().expect("workers");
        // A worker is known from its first park, sleep or sample: on a
        // loaded machine the first interval (under a second, from the
        // attach) may end before one of them did any.
        if n == 0 {
            assert!((1..=2).contains(&workers.len()), "{record}");
        } else {
            assert_eq!(workers.len(), 2, "{record}");
        }
        for worker in workers {
            let busy = worker["busy"].as_f64().expect("busy");
            assert!((0.0..=1.0).contains(&busy), "{record}");
        }
    }
    // Each worker's busy share is a counter track too, and the samples
    // the health records counted in the kernel have kernel frames.
    for record in &health {
        for worker in record["args"]["workers"].as_array().unwrap() {
            let name = format!("busy % {}", worker["worker"].as_str().unwrap());
            assert!(
                trace
                    .events()
                    .iter()
                    .any(|e| e["ph"] == "C" && e["name"] == name.as_str()),
                "no counter {name:?}"
            );
        }
    }
    let kernel_samples: u64 = health
        .iter()
        .map(|record| record["args"]["kernel_samples"].as_u64().unwrap())
        .sum();
    let with_kernel_frames = trace
        .samples()
        .iter()
        .filter(|sample| sample["args"]["kernel_frames"].as_u64() > Some(0))
        .count();
    assert!(
        kernel_samples == 0 || with_kernel_frames > 0,
        "{kernel_samples} kernel samples counted, none in the trace with kernel frames"
    );
}

#[test]
fn sigusr1_writes_the_kept_window() {
    require_root();
    let _turn = tracer_turn();
    let faults = faults("sleep", Profile::Release);
    let dir = scratch_dir("watch-usr1");
    let output = dir.join("watch.pftrace");
    let mut watching = Watching::start(&["--quiet", "--keep", "30s"], faults.pid(), &output);
    // Wait until it watches and has found something, then ask for the window.
    watching.read_until(|seen| seen.contains("BLOCKING: "));
    watching.signal(SIGUSR1);
    watching.read_until(|seen| seen.lines().any(|line| line.starts_with("SIGUSR1: wrote")));
    watching.stop();

    let usr1 = dir.join("watch.usr1-1.pftrace");
    let trace = Trace::load(&usr1);
    assert_eq!(trace.metadata()["written_on"], "SIGUSR1");
    assert!(!trace.parks().is_empty(), "no parks in the window");
    assert!(
        trace.events().iter().any(|e| e["cat"] == "finding"),
        "the finding seen before SIGUSR1 is not in the window"
    );
    // And the exit trace too.
    assert_eq!(Trace::load(&output).metadata()["written_on"], "exit");
    // Written like every output (`OutputFile`): 0600, nothing else left.
    for path in [&usr1, &output] {
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["watch.pftrace", "watch.usr1-1.pftrace"]);
}

#[test]
fn a_blocking_finding_escalates_to_one_incident_trace() {
    require_root();
    let _turn = tracer_turn();
    let faults = faults("sleep", Profile::Release);
    let dir = scratch_dir("watch-incident");
    let output = dir.join("watch.pftrace");
    let result = run_holding_turn(
        tracer()
            .args(["watch", "--duration", "4s", "--quiet"])
            .args([
                "--on-blocking",
                "10ms",
                "--detail",
                "1s",
                "--max-incidents",
                "1",
            ])
            .arg("--pid")
            .arg(faults.pid().to_string())
            .arg("-o")
            .arg(&output),
    );
    assert!(result.status.success(), "{}", describe(&result));
    let stdout = String::from_utf8_lossy(&result.stdout).into_owned();
    // One incident only, however many findings came after it.
    assert_eq!(
        lines(&stdout, "incident 1: full probes recording").len(),
        1,
        "{stdout}"
    );
    assert!(lines(&stdout, "incident 2").is_empty(), "{stdout}");
    // One file per incident: no second one, no window file of its own.
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["watch.incident-1.pftrace", "watch.pftrace"]);
    let incident = Trace::load(&dir.join("watch.incident-1.pftrace"));
    // The window before a blocking trigger is short (the first injection
    // comes within 250 ms) and the sleeping fixture's workers hardly run:
    // samples are checked in the SIGUSR1 test.
    let detail_start = check_incident(&incident, "incident 1", false);
    // The finding that set it off, before the detail.
    let findings: Vec<&Value> = incident
        .events()
        .iter()
        .filter(|e| e["cat"] == "finding" && e["ts"].as_f64().unwrap() < detail_start)
        .collect();
    assert!(
        !findings.is_empty(),
        "the triggering finding is not in the incident's kept window"
    );
    assert!(incident.is_perfetto());
}

/// Checks an incident trace holds the kept window before the detail's
/// start (parks, and samples if `samples`) and the full detail after it
/// (polls of the injected task), on the same worker tracks; returns the
/// detail's start (µs from the trace's start).
fn check_incident(incident: &Trace, reason: &str, samples: bool) -> f64 {
    let metadata = incident.metadata();
    // Both parts' metadata: the recording's, and the window's under `watch`.
    assert_eq!(metadata["abandoned_polls"], 0, "{metadata}");
    let watch = &metadata["watch"];
    assert_eq!(watch["written_on"], reason, "{metadata}");
    let detail_start_ns = watch["detail_start_ns"].as_u64().expect("detail_start_ns");
    let window_start_ns = watch["window_start_ns"].as_u64().expect("window_start_ns");
    assert!(window_start_ns < detail_start_ns, "{metadata}");
    // The trace's time zero is the window's start (10 ns ticks).
    let detail_start = (detail_start_ns - window_start_ns) as f64 / 1000.0;
    let before = |ts: f64| ts < detail_start - 0.02;
    let samples_before = incident
        .samples()
        .iter()
        .filter(|s| before(s["ts"].as_f64().unwrap()))
        .count();
    assert!(
        !samples || samples_before > 0,
        "no samples before the detail: {metadata}"
    );
    let parks = incident.parks();
    assert!(
        parks.iter().any(|p| before(p.start_ns / 1000.0)),
        "no parks before the detail"
    );
    // Every poll is the detail's, after its start; the injected task's too.
    let polls = incident.polls();
    assert!(polls.len() > 50, "{} polls in the detail", polls.len());
    assert!(
        polls
            .iter()
            .all(|p| p.start_ns / 1000.0 >= detail_start - 0.02),
        "a poll before the detail's start"
    );
    assert!(
        polls
            .iter()
            .any(|poll| poll.name.contains("fixture_injected_task")),
        "no poll of the injected task"
    );
    // One track per worker: the window's parks and the detail's polls on
    // the same threads.
    let polled: std::collections::BTreeSet<u64> = polls.iter().map(|p| p.tid).collect();
    assert!(
        parks
            .iter()
            .any(|p| before(p.start_ns / 1000.0) && polled.contains(&p.tid)),
        "no worker track has both parts"
    );
    detail_start
}

/// SIGUSR1 is a trigger when escalation is on; here once a health line
/// and a finding were printed, so the incident's kept window has both,
/// in the Chrome JSON format. The fixture hogs (30 ms on the CPU every
/// 250 ms), so the window has samples too.
#[test]
fn sigusr1_escalates_with_the_health_before_it_in_json() {
    require_root();
    let _turn = tracer_turn();
    let faults = faults("hog", Profile::Release);
    let dir = scratch_dir("watch-incident-usr1");
    let output = dir.join("watch.json");
    let mut watching = Watching::start(
        &["--detail", "1s", "--max-incidents", "1"],
        faults.pid(),
        &output,
    );
    watching.read_until(|seen| seen.contains("HOG: ") && seen.contains("health: "));
    watching.signal(SIGUSR1);
    watching.read_until(|seen| seen.contains("incident 1: wrote"));
    watching.stop();

    let incident = Trace::load(&dir.join("watch.incident-1.json"));
    assert!(!incident.is_perfetto());
    let detail_start = check_incident(&incident, "incident 1", true);
    let health_before = incident
        .events()
        .iter()
        .filter(|e| e["cat"] == "health" && e["ts"].as_f64().unwrap() < detail_start)
        .count();
    assert!(health_before > 0, "no health record before the trigger");
    assert!(
        incident
            .events()
            .iter()
            .any(|e| e["cat"] == "finding" && e["ts"].as_f64().unwrap() < detail_start),
        "no finding before the trigger"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    require_root();
    let no_pid = tracer()
        .args(["watch", "--pid", "999999999"])
        .output()
        .expect("run");
    assert!(!no_pid.status.success());
    let stderr = String::from_utf8_lossy(&no_pid.stderr);
    assert!(stderr.contains("no process with pid 999999999"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let faults = faults("healthy", Profile::Release);
    let bad_dir = tracer()
        .args(["watch", "-o", "/nonexistent-dir/w.json", "--pid"])
        .arg(faults.pid().to_string())
        .output()
        .expect("run");
    assert!(!bad_dir.status.success());
    let stderr = String::from_utf8_lossy(&bad_dir.stderr);
    assert!(stderr.contains("/nonexistent-dir/w.json"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

const SIGINT: i32 = 2;
const SIGUSR1: i32 = 10;

unsafe extern "C" {
    fn kill(pid: i32, signal: i32) -> i32;
}
