//! `rt-ebpf-trace dump` against tokio's own task dump.
//!
//! `tests/dump-fixture` is built with `--cfg tokio_unstable --cfg
//! tokio_taskdump`, parks its tasks in known places, writes
//! `Handle::dump()` to a file and then waits without waking anything; the
//! external dump of the same process must name the same tasks (by task id),
//! the same leaf futures per task, and — which tokio's own dump of a release
//! build cannot show, its async fns being inlined — every `.await` of the
//! fixture's source on the way, with its line.

use test_support::{self as support, trace};

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use serde_json::Value;
use trace::{describe, require_root, run_holding_turn, scratch_dir, tracer};

/// Idle tasks the fixture spawns on top of its named ones: one group.
const IDLE_TASKS: usize = 20;

fn fixture_dir() -> PathBuf {
    support::repo_root().join("tests/dump-fixture")
}

/// Builds the fixture in cargo profile `profile` (`release`: `debug =
/// true`; `lines`: line tables only) with tokio's task dump compiled in.
fn build(profile: &str) -> PathBuf {
    static BUILDING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let target = fixture_dir().join("target");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--profile", profile, "--manifest-path"])
        .arg(fixture_dir().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env("RUSTFLAGS", "--cfg tokio_unstable --cfg tokio_taskdump")
        .status()
        .expect("run cargo");
    assert!(
        status.success(),
        "building the dump fixture ({profile}) failed"
    );
    target.join(profile).join("dump-fixture")
}

/// A running fixture and tokio's dump of it, by task id.
struct Running {
    child: Child,
    tokio_dump: BTreeMap<u64, String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(binary: &Path, test: &str, idle: usize) -> Running {
    let dump_file = scratch_dir(test).join("tokio-dump.txt");
    let mut child = Command::new(binary)
        .arg(&dump_file)
        .arg(idle.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the dump fixture");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready"), "fixture said {line:?}");
    let text = std::fs::read_to_string(&dump_file).unwrap();
    let mut tokio_dump = BTreeMap::new();
    for block in text.split("task ").filter(|b| !b.trim().is_empty()) {
        let (id, trace) = block.split_once('\n').unwrap();
        tokio_dump.insert(id.trim().parse().unwrap(), trace.to_string());
    }
    Running { child, tokio_dump }
}

fn dump_json(pid: u32) -> Value {
    // `output()` reads stdout while the dump runs: a 10,000-task JSON
    // document is bigger than a pipe holds.
    let output = tracer()
        .args(["dump", "--json", "--pid", &pid.to_string()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The kinds of tokio future a trace or a chain ends in.
fn leaf_kinds(text: &str) -> BTreeSet<&'static str> {
    let kinds = [
        ("Notified", "notify"),
        ("Mutex", "mutex"),
        ("Receiver", "channel"),
        ("chan::Rx", "channel"),
        ("Sleep", "sleep"),
        ("JoinHandle", "join"),
    ];
    kinds
        .iter()
        .filter(|(needle, _)| text.contains(needle))
        .map(|(_, kind)| *kind)
        .collect()
}

/// Our chain's leaves, flattened over branches.
fn leaves(chain: &Value, out: &mut String) {
    for frame in chain.as_array().unwrap() {
        if let Some(name) = frame["leaf"].as_str() {
            out.push_str(name);
            out.push('\n');
        }
        if let Some(branches) = frame["branches"].as_array() {
            branches.iter().for_each(|branch| leaves(branch, out));
        }
    }
}

/// `(function, line of its last .await)` for each `async fn` of the fixture.
fn await_lines() -> BTreeMap<String, u64> {
    let source = std::fs::read_to_string(fixture_dir().join("src/main.rs")).unwrap();
    let mut lines = BTreeMap::new();
    let mut current: Option<String> = None;
    for (index, line) in source.lines().enumerate() {
        if let Some(rest) = line.strip_prefix("async fn ") {
            current = Some(rest.split('(').next().unwrap().to_string());
        } else if line == "}" {
            current = None;
        } else if let Some(name) = &current
            && line.contains(".await")
        {
            // The last one: where each fixture task stays.
            lines.insert(name.clone(), index as u64 + 1);
        }
    }
    lines
}

#[test]
fn full_debug_info_names_the_same_tasks_and_await_points_as_tokio() {
    require_root();
    let fixture = start(&build("release"), "dump-full", IDLE_TASKS);
    let dump = dump_json(fixture.child.id());
    assert_eq!(dump["debug_info"], "types", "{dump:#}");
    let ours: BTreeMap<u64, &Value> = dump["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_u64().expect("task ids (tokio ≥ 1.21)"), t))
        .collect();
    let theirs: BTreeSet<u64> = fixture.tokio_dump.keys().copied().collect();
    assert_eq!(
        ours.keys().copied().collect::<BTreeSet<_>>(),
        theirs,
        "task sets differ\nours: {dump:#}\ntokio's: {:#?}",
        fixture.tokio_dump
    );
    assert_eq!(theirs.len(), 10 + IDLE_TASKS);

    let expected_lines = await_lines();
    let mut names = BTreeMap::<String, usize>::new();
    for (id, trace) in &fixture.tokio_dump {
        let task = ours[id];
        let name = task["name"].as_str().unwrap();
        *names.entry(name.to_string()).or_default() += 1;
        // The same leaf futures as tokio's own dump.
        let mut our_leaves = String::new();
        leaves(&task["chain"], &mut our_leaves);
        assert_eq!(
            leaf_kinds(&our_leaves),
            leaf_kinds(trace),
            "task {id} ({name}): leaves differ\nours: {:#}\ntokio's: {trace}",
            task["chain"]
        );
        // Every fixture function tokio's trace shows is in our chain.
        let chain_text = task["chain"].to_string();
        for function in trace
            .split_whitespace()
            .filter(|word| word.starts_with("dump_fixture::"))
        {
            let function = function.trim_end_matches("::{{closure}}");
            assert!(
                chain_text.contains(function),
                "task {id}: {function} missing: {chain_text}"
            );
        }
        // The await chain through the fixture's own async fns, with lines.
        assert_eq!(task["state"], "idle", "task {id}: {task:#}");
        assert_eq!(task["raced"], false);
        let mut frames = task["chain"].as_array().unwrap().iter();
        let short = name.strip_prefix("dump_fixture::").unwrap();
        let functions: Vec<String> = match short {
            "nest1" => (1..=5).map(|level| format!("nest{level}")).collect(),
            // Through the `dyn Future`'s vtable to the concrete async fn.
            "boxed" => vec!["boxed".into(), "boxed_inner".into()],
            _ => vec![short.to_string()],
        };
        for function in functions {
            let frame = &frames.next().expect("an await frame")["await"];
            assert_eq!(
                frame["function"],
                format!("dump_fixture::{function}"),
                "task {id}"
            );
            if function != "selector" {
                // select!'s await is in tokio's macro, not the fixture.
                assert_eq!(
                    frame["line"], expected_lines[&function],
                    "task {id}: {function}"
                );
                assert!(frame["file"].as_str().unwrap().ends_with("src/main.rs"));
            }
        }
    }
    // The joiner's JoinHandle leads to the second lock waiter.
    let joiner = ours
        .values()
        .find(|t| t["name"] == "dump_fixture::joiner")
        .unwrap();
    let joined = joiner["chain"][1]["joins_task"]
        .as_u64()
        .expect("the joined task's id");
    assert_eq!(
        ours[&joined]["name"], "dump_fixture::lock_waiter",
        "{joiner:#}"
    );

    let expected_names = [
        ("channel_waiter", 1),
        ("holder", 1),
        ("idle", IDLE_TASKS),
        ("joiner", 1),
        ("lock_waiter", 2),
        ("nest1", 1),
        ("boxed", 1),
        ("timed", 1),
        ("selector", 1),
        ("sleeper", 1),
    ];
    let expected_names: BTreeMap<String, usize> = expected_names
        .iter()
        .map(|(n, c)| (format!("dump_fixture::{n}"), *c))
        .collect();
    assert_eq!(names, expected_names);

    // The terminal text groups identical chains.
    let output =
        run_holding_turn(tracer().args(["dump", "--pid", &fixture.child.id().to_string()]));
    assert!(output.status.success(), "{}", describe(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains(&format!("\n{IDLE_TASKS} tasks, idle: dump_fixture::idle\n")),
        "{text}"
    );
    assert!(text.contains("→ tokio::sync::mutex::Mutex::lock"), "{text}");
}

#[test]
fn line_tables_only_lists_the_tasks_and_says_what_is_missing() {
    require_root();
    // Three runs: each heap holds the 200 freed cells in other places, and
    // without type info only the header and list checks tell them apart.
    for run in 0..3 {
        check_line_tables_run(run);
    }
}

fn check_line_tables_run(run: usize) {
    let fixture = start(&build("lines"), &format!("dump-lines-{run}"), 3);
    let dump = dump_json(fixture.child.id());
    assert_eq!(dump["debug_info"], "no-types", "{dump:#}");
    assert!(
        dump["notes"].to_string().contains("debug = true"),
        "{dump:#}"
    );
    let tasks = dump["tasks"].as_array().unwrap();
    let ids: BTreeSet<u64> = tasks.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert_eq!(
        ids,
        fixture.tokio_dump.keys().copied().collect(),
        "{dump:#}"
    );
    for task in tasks {
        assert!(task["chain"].as_array().unwrap().is_empty());
        assert!(task["chain_note"].is_string());
        // Line tables name the function only: `{async_fn#0}`, no path.
        assert!(
            task["future_type"]
                .as_str()
                .unwrap()
                .contains("dump_fixture"),
            "{task:#}"
        );
    }
}

#[test]
fn ten_thousand_tasks_are_all_found_and_read() {
    require_root();
    let fixture = start(&build("release"), "dump-10k", 10_000);
    let dump = dump_json(fixture.child.id());
    let tasks = dump["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), fixture.tokio_dump.len());
    assert_eq!(tasks.len(), 10 + 10_000);
    let idle_at_notified = tasks
        .iter()
        .filter(|t| {
            t["name"] == "dump_fixture::idle"
                && t["chain"][1]["leaf"] == "tokio::sync::notify::Notified"
        })
        .count();
    assert_eq!(idle_at_notified, 10_000);
    assert_eq!(dump["stats"]["raced"], 0);
    // The speed, for the record (not asserted: timings are benchmarks' job).
    eprintln!(
        "dumped {} tasks: scan and read {:.0} ms over {} bytes, setup {:.0} ms",
        tasks.len(),
        dump["stats"]["read_ms"].as_f64().unwrap(),
        dump["stats"]["scanned_bytes"],
        dump["stats"]["setup_ms"].as_f64().unwrap()
    );
}

/// Runs `dump` expecting a clear error; returns stderr.
fn dump_fails(command: &mut Command) -> String {
    let output = run_holding_turn(command);
    assert!(
        !output.status.success(),
        "expected failure\n{}",
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        stderr.starts_with("error: "),
        "no clear error:\n{}",
        describe(&output)
    );
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    stderr
}

#[test]
fn bad_targets_get_clear_errors() {
    require_root();
    // pid_max is at most 4194304: this pid can't exist.
    let stderr = dump_fails(tracer().args(["dump", "--pid", "4194304"]));
    assert!(stderr.contains("no process with pid 4194304"), "{stderr}");

    // A program with a symbol table and no tokio (`sleep` is stripped).
    let dir = scratch_dir("dump-not-tokio");
    std::fs::write(
        dir.join("main.c"),
        "#include <unistd.h>\nint main(void) { sleep(30); return 0; }\n",
    )
    .unwrap();
    let status = Command::new("cc")
        .arg(dir.join("main.c"))
        .arg("-o")
        .arg(dir.join("not-tokio"))
        .status()
        .expect("a C compiler");
    assert!(status.success());
    let mut sleeper = Command::new(dir.join("not-tokio")).spawn().unwrap();
    let stderr = dump_fails(tracer().args(["dump", "--pid", &sleeper.id().to_string()]));
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(
        stderr.contains("does not look like a tokio program"),
        "{stderr}"
    );

    let stripped = scratch_dir("dump-stripped").join("dump-fixture");
    let status = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(build("lines"))
        .status()
        .unwrap();
    assert!(status.success());
    let fixture = start(&stripped, "dump-stripped-run", 1);
    let stderr = dump_fails(tracer().args(["dump", "--pid", &fixture.child.id().to_string()]));
    assert!(stderr.contains("stripped"), "{stderr}");
    drop(fixture);

    // Not allowed to read a root process's memory.
    let fixture = start(&build("lines"), "dump-no-permission", 1);
    let mut command = tracer();
    command
        .args(["dump", "--pid", &fixture.child.id().to_string()])
        .uid(65534)
        .gid(65534);
    let stderr = dump_fails(&mut command);
    assert!(stderr.contains("no permission"), "{stderr}");

    // Exited but not reaped: nothing left to read.
    let mut fixture = start(&build("lines"), "dump-zombie", 1);
    unsafe { kill(fixture.child.id() as i32, 9) };
    std::thread::sleep(std::time::Duration::from_millis(200));
    let stderr = dump_fails(tracer().args(["dump", "--pid", &fixture.child.id().to_string()]));
    assert!(stderr.contains("has exited"), "{stderr}");
    let _ = fixture.child.wait();
}

#[test]
fn a_target_that_exits_during_the_dump_gives_a_dump_or_a_clear_error() {
    require_root();
    // Many tasks make the dump long enough to be caught in the middle.
    let fixture = start(&build("release"), "dump-exit", 20_000);
    let pid = fixture.child.id();
    let dumper = tracer()
        .args(["dump", "--json", "--pid", &pid.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    drop(fixture);
    let output = dumper.wait_with_output().unwrap();
    eprintln!(
        "the dump {}",
        if output.status.success() {
            "finished first"
        } else {
            "was interrupted"
        }
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{}", describe(&output));
    if output.status.success() {
        // Finished first: a whole dump.
        let dump: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(dump["tasks"].as_array().unwrap().len() >= 20_000);
    } else {
        assert!(stderr.contains("exited"), "{}", describe(&output));
        assert!(output.stdout.is_empty(), "half a dump was printed");
    }
}

unsafe extern "C" {
    fn kill(pid: i32, signal: i32) -> i32;
}

#[test]
fn dump_at_end_follows_the_summary_of_a_recording() {
    require_root();
    let fixture = start(&build("release"), "dump-at-end", IDLE_TASKS);
    let dir = scratch_dir("dump-at-end-trace");
    let output = dir.join("trace.json");
    let result = trace::run(
        tracer()
            .args(["--pid", &fixture.child.id().to_string(), "--duration", "1s"])
            .args(["--dump-at-end", "-o"])
            .arg(&output),
    );
    assert!(result.status.success(), "{}", describe(&result));
    let stdout = String::from_utf8_lossy(&result.stdout);
    let (summary, at_end) = stdout
        .split_once("\ntasks at the end: ")
        .unwrap_or_else(|| panic!("no dump after the summary:\n{stdout}"));
    assert!(
        summary.contains("stopped: the duration ran out"),
        "{stdout}"
    );
    // Nothing was polled while recording: the tasks wait, and say where.
    assert!(
        at_end.contains(&format!("\n{IDLE_TASKS} tasks, idle: dump_fixture::idle\n")),
        "{at_end}"
    );
    let nest5 = await_lines()["nest5"];
    assert!(
        at_end.contains(&format!("→ dump_fixture::nest5 (src/main.rs:{nest5})")),
        "{at_end}"
    );
    let trace: Value = serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    assert!(trace.is_object() || trace.is_array());

    // A launched command is stopped when recording ends: nothing to dump.
    let stderr = dump_fails(
        tracer()
            .args(["--dump-at-end", "-o"])
            .arg(dir.join("t.json"))
            .arg("--")
            .arg("true"),
    );
    assert!(stderr.contains("--dump-at-end needs --pid"), "{stderr}");
}
