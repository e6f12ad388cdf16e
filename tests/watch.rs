//! The watch tier (`rt-ebpf-trace watch`) on a real tokio program with
//! faults injected inside a task's poll every 250 ms: blocking calls
//! (`std::thread::sleep`, `std::fs::read` of a FIFO, a contended
//! `std::sync::Mutex`) and a 30 ms CPU hog must be reported with the right
//! task type and a stack naming the blocking function; a healthy run must
//! report nothing; SIGUSR1 must write a valid trace of the kept window.

use test_support::{self as support, trace};

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use support::Profile;
use trace::{Trace, describe, require_root, run_holding_turn, scratch_dir, tracer, tracer_turn};

/// How long each watch lasts: 12 injections.
const WATCH_FOR: &str = "3s";
/// At least this many of the 12 injections must be found.
const MIN_FOUND: usize = 9;
const TASK: &str = "task type fixture_injected_task::";

/// The `watch_faults` fixture running `kind`, killed when dropped.
struct Faults(Child);

impl Faults {
    fn start(kind: &str, profile: Profile) -> Faults {
        let path = support::fixture("watch_faults", profile);
        let mut child = Command::new(&path)
            .args(["60", kind])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start fixture");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read fixture output");
        assert!(line.starts_with("ready"), "watch_faults said {line:?}");
        Faults(child)
    }
}

impl Drop for Faults {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Watches a `kind` fixture for `WATCH_FOR`; returns stdout and the trace.
fn watch(kind: &str, profile: Profile) -> (String, Trace) {
    require_root();
    let _turn = tracer_turn();
    let faults = Faults::start(kind, profile);
    let dir = scratch_dir(&format!("watch-{kind}-{profile:?}"));
    let output = dir.join("watch.json");
    let result = run_holding_turn(
        tracer()
            .args(["watch", "--duration", WATCH_FOR, "--quiet", "--pid"])
            .arg(faults.0.id().to_string())
            .arg("-o")
            .arg(&output),
    );
    assert!(result.status.success(), "{}", describe(&result));
    let stdout = String::from_utf8_lossy(&result.stdout).into_owned();
    (stdout, Trace::load(&output))
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
    for event in in_trace {
        let user = event["args"]["user_stack"]
            .as_array()
            .expect("a user stack");
        assert!(
            user.iter().any(|frame| frame
                .as_str()
                .is_some_and(|f| f.contains("fixture_blocking_call") || f.contains("spin_for"))),
            "{event}"
        );
    }
}

#[test]
fn finds_thread_sleep_inside_a_poll() {
    for profile in Profile::ALL {
        let (stdout, trace) = watch("sleep", profile);
        // Under fat LTO `std::thread::sleep` is inlined into the caller and
        // the release profiles have no debug info to tell.
        let expected: &[&str] = match profile {
            Profile::Release => &["nanosleep", "std::thread", "fixture_blocking_call"],
            _ => &["nanosleep", "fixture_blocking_call"],
        };
        check_findings(&stdout, &trace, "BLOCKING", expected);
        assert!(lines(&stdout, "HOG: ").is_empty(), "{stdout}");
    }
}

#[test]
fn finds_a_blocking_file_read_inside_a_poll() {
    let (stdout, trace) = watch("fs", Profile::Release);
    check_findings(
        &stdout,
        &trace,
        "BLOCKING",
        &["std::fs::read", "fixture_blocking_call"],
    );
}

#[test]
fn finds_a_contended_mutex_inside_a_poll() {
    let (stdout, trace) = watch("mutex", Profile::Release);
    check_findings(
        &stdout,
        &trace,
        "BLOCKING",
        &["futex", "Mutex", "fixture_blocking_call"],
    );
}

#[test]
fn finds_a_hog_and_says_its_length_is_a_lower_bound() {
    let (stdout, trace) = watch("hog", Profile::Release);
    // A 30 ms poll holds five or six of the 199 Hz samples: the finding's
    // span is between one and three sample periods.
    check_findings(&stdout, &trace, "HOG", &["at least", "spin_for"]);
    assert!(lines(&stdout, "BLOCKING: ").is_empty(), "{stdout}");
}

#[test]
fn a_healthy_program_gets_no_findings() {
    let (stdout, trace) = watch("healthy", Profile::Release);
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
    for record in health {
        let workers = record["args"]["workers"].as_array().expect("workers");
        assert_eq!(workers.len(), 2, "{record}");
        for worker in workers {
            let busy = worker["busy"].as_f64().expect("busy");
            assert!((0.0..=1.0).contains(&busy), "{record}");
        }
    }
}

#[test]
fn sigusr1_writes_the_kept_window() {
    require_root();
    let _turn = tracer_turn();
    let faults = Faults::start("sleep", Profile::Release);
    let dir = scratch_dir("watch-usr1");
    let output = dir.join("watch.json");
    let mut watcher = tracer()
        .args(["watch", "--quiet", "--keep", "30s", "--pid"])
        .arg(faults.0.id().to_string())
        .arg("-o")
        .arg(&output)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start watch");
    let mut stdout = BufReader::new(watcher.stdout.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    // Wait until it watches and has found something, then ask for the window.
    while !seen.contains("BLOCKING: ") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "watch ended early:\n{seen}"
        );
        seen.push_str(&line);
    }
    let pid = watcher.id() as i32;
    unsafe { kill(pid, SIGUSR1) };
    while !line.starts_with("SIGUSR1: wrote") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "no SIGUSR1 answer:\n{seen}"
        );
        seen.push_str(&line);
    }
    unsafe { kill(pid, SIGINT) };
    let status = watcher.wait().expect("wait for watch");
    assert!(status.success(), "{seen}");

    let usr1 = dir.join("watch.usr1-1.json");
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
    assert_eq!(names, ["watch.json", "watch.usr1-1.json"]);
}

#[test]
fn a_blocking_finding_escalates_to_full_detail() {
    require_root();
    let _turn = tracer_turn();
    let faults = Faults::start("sleep", Profile::Release);
    let dir = scratch_dir("watch-incident");
    let output = dir.join("watch.json");
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
            .arg(faults.0.id().to_string())
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
    // The detail window, a Perfetto trace like a recording's.
    let incident = Trace::load(&dir.join("watch.incident-1.pftrace"));
    assert!(!dir.join("watch.incident-2.pftrace").exists());
    assert!(!dir.join("watch.incident-2.window.json").exists());
    // The detail window has every poll, named after its task type; the
    // injected task's polls among them.
    let polls = incident.polls();
    assert!(
        polls.len() > 50,
        "{} polls in the detail window",
        polls.len()
    );
    assert!(
        polls
            .iter()
            .any(|poll| poll.name.contains("fixture_injected_task")),
        "no poll of the injected task: {:?}",
        polls.iter().map(|poll| &poll.name).collect::<Vec<_>>()
    );
    // And the kept window before it: the finding that set it off.
    let window = Trace::load(&dir.join("watch.incident-1.window.json"));
    assert_eq!(window.metadata()["written_on"], "incident 1");
    let findings: Vec<&Value> = window
        .events()
        .iter()
        .filter(|e| e["cat"] == "finding")
        .collect();
    assert!(
        !findings.is_empty(),
        "the triggering finding is not in the incident's kept window"
    );
    assert_eq!(incident.metadata()["abandoned_polls"], 0);
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

    let faults = Faults::start("healthy", Profile::Release);
    let bad_dir = tracer()
        .args(["watch", "-o", "/nonexistent-dir/w.json", "--pid"])
        .arg(faults.0.id().to_string())
        .output()
        .expect("run");
    assert!(!bad_dir.status.success());
    let stderr = String::from_utf8_lossy(&bad_dir.stderr);
    assert!(stderr.contains("/nonexistent-dir/w.json"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // The kept window is Chrome JSON: another name is refused up front
    // rather than written in the wrong format.
    let dir = scratch_dir("watch-bad-format");
    let wrong = dir.join("w.pftrace");
    let bad_format = tracer()
        .args(["watch", "-o"])
        .arg(&wrong)
        .arg("--pid")
        .arg(faults.0.id().to_string())
        .output()
        .expect("run");
    assert!(!bad_format.status.success());
    let stderr = String::from_utf8_lossy(&bad_format.stderr);
    assert!(stderr.contains("ending in .json"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!wrong.exists());
}

const SIGINT: i32 = 2;
const SIGUSR1: i32 = 10;

unsafe extern "C" {
    fn kill(pid: i32, signal: i32) -> i32;
}
