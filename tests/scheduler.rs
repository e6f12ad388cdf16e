//! The scheduler's story, end to end: spawns, wakes (who woke whom), task
//! ends, the blocking pool, and the summary's flags, on real fixture
//! programs launched under the tracer.

use test_support::{self as support, trace};

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use support::Profile;
use trace::{Fixture, Trace, TraceSlice, describe, require_root, scratch_dir, tracer};

/// Launches `fixture args…` under the tracer until it exits; returns the
/// trace and the tracer's stdout.
fn trace_command(name: &str, profile: Profile, args: &[&str]) -> (Trace, String) {
    trace_command_into("trace.pftrace", name, profile, args)
}

/// [`trace_command`] into a trace file of this name (its format follows).
fn trace_command_into(file: &str, name: &str, profile: Profile, args: &[&str]) -> (Trace, String) {
    let scratch = format!("sched-{name}-{profile:?}-{file}");
    trace::launch_under_tracer(file, name, profile, &scratch, args)
}

fn events_with<'a>(trace: &'a Trace, phase: &str, category: &str) -> Vec<&'a Value> {
    trace
        .events()
        .iter()
        .filter(|e| e["ph"] == phase && e["cat"] == category)
        .collect()
}

fn ts_ns(event: &Value) -> f64 {
    event["ts"].as_f64().unwrap() * 1000.0
}

fn task_id(slice: &TraceSlice) -> u64 {
    slice.args["task_id"].as_u64().expect("poll with a task id")
}

/// The ids of the pinger and ponger tasks, from their polls.
fn ids_named(polls: &[TraceSlice], function: &str) -> BTreeSet<u64> {
    polls
        .iter()
        .filter(|p| p.name.contains(function))
        .map(task_id)
        .collect()
}

fn check_ping_pong(profile: Profile) {
    check_ping_pong_into("trace.pftrace", profile);
}

fn check_ping_pong_into(file: &str, profile: Profile) {
    const ROUNDS: usize = 200;
    let (trace, _) = trace_command_into(file, "ping_pong", profile, &[&ROUNDS.to_string()]);
    let polls = trace.polls();
    let pinger = ids_named(&polls, "fixture_pinger");
    let ponger = ids_named(&polls, "fixture_ponger");
    assert_eq!(
        (pinger.len(), ponger.len()),
        (1, 1),
        "pinger {pinger:?}, ponger {ponger:?}"
    );
    let (pinger, ponger) = (*pinger.first().unwrap(), *ponger.first().unwrap());

    let mut polls_by_thread: BTreeMap<u64, Vec<&TraceSlice>> = BTreeMap::new();
    for poll in &polls {
        polls_by_thread.entry(poll.tid).or_default().push(poll);
    }
    // The poll on `tid` that encloses time `ts`, and the one starting at `ts`.
    let enclosing = |tid: u64, ts: f64| {
        polls_by_thread
            .get(&tid)?
            .iter()
            .find(|p| p.start_ns <= ts + 1.0 && ts <= p.end_ns() + 1.0)
            .copied()
    };
    let starting = |tid: u64, ts: f64| {
        polls_by_thread
            .get(&tid)?
            .iter()
            .find(|p| (p.start_ns - ts).abs() < 1.0)
            .copied()
    };

    let ends: BTreeMap<u64, &Value> = events_with(&trace, "f", "wake")
        .into_iter()
        .map(|e| (e["id"].as_u64().unwrap(), e))
        .collect();
    let mut connecting = 0;
    let mut last_start = f64::MIN;
    for start in events_with(&trace, "s", "wake") {
        let id = start["id"].as_u64().unwrap();
        let end = ends
            .get(&id)
            .unwrap_or_else(|| panic!("flow {id} has no end"));
        let (start_ts, end_ts) = (ts_ns(start), ts_ns(end));
        assert!(end_ts >= start_ts, "flow {id} ends before it starts");
        assert!(start_ts >= last_start, "flows out of time order");
        last_start = start_ts;
        // Every flow ends at a poll of the task it woke.
        let woken = starting(end["tid"].as_u64().unwrap(), end_ts)
            .unwrap_or_else(|| panic!("flow {id} does not end at a poll start: {end}"));
        let Some(waker) = enclosing(start["tid"].as_u64().unwrap(), start_ts) else {
            continue;
        };
        let pair = (task_id(waker), task_id(woken));
        if pair == (pinger, ponger) || pair == (ponger, pinger) {
            connecting += 1;
        }
    }
    assert!(
        connecting >= ROUNDS,
        "only {connecting} wake flows connect pinger and ponger ({ROUNDS} rounds)"
    );
    assert_eq!(trace.metadata()["lost_events"], 0);
}

/// `-o x.json` still writes Chrome JSON, whose flows pair up the same way.
#[test]
fn ping_pong_wakes_connect_the_right_tasks_in_json() {
    check_ping_pong_into("trace.json", Profile::Release);
}

/// `-o x.pftrace.gz` writes the protobuf gzipped (Perfetto opens it as is).
#[test]
fn ping_pong_wakes_connect_the_right_tasks_gzipped() {
    check_ping_pong_into("trace.pftrace.gz", Profile::Release);
}

#[test]
fn ping_pong_wakes_connect_the_right_tasks_release() {
    check_ping_pong(Profile::Release);
}

#[test]
fn ping_pong_wakes_connect_the_right_tasks_fat_lto() {
    check_ping_pong(Profile::Lto);
}

#[test]
fn every_spawned_task_has_a_spawn_and_an_end() {
    const TASKS: usize = 100;
    let (trace, stdout) = trace_command("spawner", Profile::Release, &[&TASKS.to_string()]);
    let polls = trace.polls();
    let spawned: BTreeSet<u64> = ids_named(&polls, "fixture_short_task");
    assert_eq!(spawned.len(), TASKS, "distinct short tasks polled");

    let ids_of = |category: &str| -> BTreeSet<u64> {
        events_with(&trace, "i", category)
            .iter()
            .filter_map(|e| e["args"]["task_id"].as_u64())
            .collect()
    };
    let spawns = ids_of("spawn");
    let ends = ids_of("task_end");
    assert_eq!(
        events_with(&trace, "i", "spawn").len(),
        TASKS,
        "spawn events"
    );
    assert!(
        spawned.is_subset(&spawns),
        "tasks polled without a spawn: {:?}",
        spawned.difference(&spawns)
    );
    assert!(
        spawned.is_subset(&ends),
        "tasks without an end: {:?}",
        spawned.difference(&ends)
    );
    assert_eq!(trace.metadata()["lost_events"], 0);
    assert!(
        stdout.contains(&format!("tasks: {TASKS} spawned, {TASKS} ended, 0 alive")),
        "{stdout}"
    );
}

/// A spawn carries its call site: the address the probed spawn function
/// returns to. In `spawner` tokio's spawn path is inlined into `main`'s
/// `.map(|n| tokio::spawn(…))` closure, so with line tables that address is
/// the `tokio::spawn` line of spawner.rs.
#[test]
fn spawns_record_their_call_site() {
    // Enough that the program is still running when the tracer first drains
    // its spawns and reads its maps (a short-lived one may be gone by then).
    const TASKS: usize = 2000;
    let profile = Profile::ReleaseDebug;
    let (trace, _) = trace_command("spawner", profile, &[&TASKS.to_string()]);
    let call_sites: BTreeSet<u64> = events_with(&trace, "i", "spawn")
        .iter()
        .map(|e| {
            let text = e["args"]["call_site"].as_str().unwrap_or("0x0");
            u64::from_str_radix(text.trim_start_matches("0x"), 16).unwrap()
        })
        .collect();
    assert!(!call_sites.is_empty(), "no spawns");
    assert!(!call_sites.contains(&0), "a spawn without a call site");

    let binary = support::fixture("spawner", profile);
    let returns = spawn_call_returns(&binary);
    for &call_site in &call_sites {
        // The fixture is a position-independent executable: the address is
        // one of the file's return addresses, moved by a page-aligned bias.
        let biases: Vec<u64> = returns
            .iter()
            .map(|&ret| call_site.wrapping_sub(ret))
            .filter(|bias| bias % 4096 == 0)
            .collect();
        assert_eq!(
            biases.len(),
            1,
            "{call_site:#x} is not after a call of a spawn function (returns: {returns:x?})"
        );
        let bias = biases[0];
        let size = std::fs::metadata(&binary).unwrap().len();
        // The whole file mapped at the bias (any non-zero inode: a file).
        let maps = tracer_symbolize::ProcessMaps::parse(&format!(
            "{:x}-{:x} r-xp 00000000 00:00 1 {}\n",
            bias,
            bias + size.next_multiple_of(4096),
            binary.display()
        ));
        let frames = tracer_symbolize::Symbolizer::new(&maps)
            .symbolize(call_site, true)
            .to_vec();
        let source = std::fs::read_to_string(binary_source("spawner")).unwrap();
        let spawn_line = source
            .lines()
            .position(|line| line.contains("tokio::spawn("))
            .expect("spawner.rs calls tokio::spawn") as u32
            + 1;
        assert!(
            frames.iter().any(|frame| {
                frame
                    .file
                    .as_deref()
                    .is_some_and(|f| f.ends_with("spawner.rs"))
                    && frame.line == Some(spawn_line)
                    && frame
                        .function
                        .as_deref()
                        .is_some_and(|f| f.contains("spawner::main"))
            }),
            "call site {call_site:#x} is not spawner.rs:{spawn_line}: {frames:#?}"
        );
    }

    // The trace says it in words: every spawn instant's `spawned_at` is
    // the closure in main at the tokio::spawn line.
    let source = std::fs::read_to_string(binary_source("spawner")).unwrap();
    let spawn_line = source
        .lines()
        .position(|line| line.contains("tokio::spawn("))
        .unwrap()
        + 1;
    let spawns = events_with(&trace, "i", "spawn");
    assert_eq!(spawns.len(), TASKS, "one spawn instant per task");
    for spawn in spawns {
        let at = spawn["args"]["spawned_at"].as_str().unwrap_or_default();
        assert!(
            at.starts_with("spawner::main") && at.ends_with(&format!("(spawner.rs:{spawn_line})")),
            "{spawn}"
        );
    }
}

/// The fixture's source file of binary `name`.
fn binary_source(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/src/bin")
        .join(format!("{name}.rs"))
}

/// The return addresses (file addresses) of every direct call of a function
/// the tracer probes for spawns, in the whole binary.
fn spawn_call_returns(binary: &std::path::Path) -> BTreeSet<u64> {
    use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
    let plan = tracer_probes::discover(binary).expect("probe plan");
    let spawn_functions: BTreeSet<u64> = plan
        .sites
        .iter()
        .filter(|site| site.kind == tracer_probes::SiteKind::Spawn)
        .map(|site| site.address)
        .collect();
    assert!(!spawn_functions.is_empty(), "no spawn site in {binary:?}");
    let data = std::fs::read(binary).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let mut returns = BTreeSet::new();
    for symbol in file.symbols() {
        if symbol.kind() != SymbolKind::Text || symbol.size() == 0 {
            continue;
        }
        let Some(section) = symbol
            .section_index()
            .and_then(|i| file.section_by_index(i).ok())
        else {
            continue;
        };
        let Ok(Some(code)) = section.data_range(symbol.address(), symbol.size()) else {
            continue;
        };
        for instruction in tracer_probes::disasm::instructions(code, symbol.address()) {
            if instruction.is_call_near()
                && spawn_functions.contains(&instruction.near_branch_target())
            {
                returns.insert(instruction.next_ip());
            }
        }
    }
    returns
}

#[test]
fn spawn_blocking_work_shows_on_blocking_pool_tracks() {
    const JOBS: usize = 8;
    let (trace, _) = trace_command("blocking", Profile::Release, &[&JOBS.to_string()]);
    let blocking = trace.slices("blocking");
    assert_eq!(blocking.len(), JOBS, "blocking slices");
    let names = trace.thread_names();
    for slice in &blocking {
        assert!(slice.name.contains("BlockingTask"), "{slice:?}");
        // Each spawn_blocking closure sleeps 5 ms.
        assert!(slice.dur_ns >= 4.5e6, "{slice:?}");
        let track = names
            .iter()
            .rev()
            .find(|(tid, _)| *tid == slice.tid)
            .map(|(_, n)| n.as_str());
        assert!(
            track.is_some_and(|n| n.starts_with("blocking #")),
            "slice on track {track:?}"
        );
    }
}

#[test]
fn a_task_hogging_its_worker_is_flagged() {
    // multi_worker's busy task spins 50 ms per poll on one worker while the
    // other workers run short polls and park.
    require_root();
    // The turn before the fixture: its spinning task must not steal the CPU
    // of another test's recording while this one waits (a preempted short
    // poll there reads as a HOG).
    let _turn = trace::tracer_turn();
    let fixture = Fixture::start("multi_worker", Profile::Release, 600.0);
    let (trace, summary, stdout) = record_for_2s(&fixture, "imbalance");
    assert!(stdout.contains("IMBALANCE: worker"), "{stdout}");
    assert!(
        stdout.contains("HOG: task") && stdout.contains("fixture_busy_task"),
        "{stdout}"
    );

    // The same findings, as data: in --summary-json...
    let workers = summary["workers"].as_array().expect("workers");
    let polls: u64 = workers.iter().map(|w| w["polls"].as_u64().unwrap()).sum();
    assert!(polls > 100, "{summary}");
    assert_eq!(summary["polls"].as_u64(), Some(polls), "{summary}");
    assert!(
        workers
            .iter()
            .filter(|w| w["runtime_worker"] == true)
            .count()
            >= 2,
        "{summary}"
    );
    let findings = summary["findings"].as_array().expect("findings");
    let hog = findings
        .iter()
        .find(|f| f["kind"] == "HOG")
        .unwrap_or_else(|| panic!("no HOG finding: {summary}"));
    assert!(
        hog["task_type"]
            .as_str()
            .is_some_and(|t| t.contains("fixture_busy_task")),
        "{hog}"
    );
    // The busy task spins 50 ms a poll.
    assert!(hog["poll_ns"].as_u64().unwrap() >= 40_000_000, "{hog}");
    assert!(hog["task_id"].as_u64().unwrap() > 0, "{hog}");
    let imbalance = findings
        .iter()
        .find(|f| f["kind"] == "IMBALANCE")
        .unwrap_or_else(|| panic!("no IMBALANCE finding: {summary}"));
    assert!(
        imbalance["busy_share_permille"].as_u64().unwrap() > 700,
        "{imbalance}"
    );
    assert_eq!(imbalance["worker"], hog["worker"], "{summary}");
    assert!(stdout.contains(hog["worker"].as_str().unwrap()), "{stdout}");

    // ...and in the trace's metadata (a JSON string in a Perfetto trace).
    let in_trace = match &trace.metadata()["findings"] {
        Value::String(text) => serde_json::from_str(text).expect("findings are JSON"),
        other => other.clone(),
    };
    assert_eq!(&in_trace, &summary["findings"], "{}", trace.metadata());

    // What tracing cost the tracer, as the trace's metadata says it too.
    let cost = &summary["tracer_cost"];
    assert!(cost["recording_cpu_ns"].as_u64().unwrap() > 0, "{summary}");
    for key in [
        "recording_cpu_ns",
        "render_ms",
        "render_cpu_ms",
        "symbolize_cpu_ms",
        "symbolize_prepare_cpu_ms",
    ] {
        assert_eq!(cost[key], trace.metadata()[key], "{key}: {summary}");
    }
}

#[test]
fn a_balanced_runtime_is_not_flagged() {
    let (_, stdout) = trace_command("spawner", Profile::Lto, &["2000"]);
    assert!(!stdout.contains("IMBALANCE"), "{stdout}");
    assert!(!stdout.contains("HOG:"), "{stdout}");
}

/// Records the running `fixture` for 2 s (the caller holds the turn): its
/// trace, `--summary-json` and the tracer's stdout.
fn record_for_2s(fixture: &Fixture, scratch: &str) -> (Trace, Value, String) {
    let dir = scratch_dir(scratch);
    let output = dir.join("trace.pftrace");
    let summary_json = dir.join("summary.json");
    let result = trace::run_holding_turn(
        tracer()
            .args([
                "--pid",
                &fixture.pid().to_string(),
                "--duration",
                "2s",
                "-o",
            ])
            .arg(&output)
            .arg("--summary-json")
            .arg(&summary_json),
    );
    assert!(result.status.success(), "{}", describe(&result));
    let text = std::fs::read_to_string(&summary_json).expect("--summary-json was written");
    let summary: Value = serde_json::from_str(&text).expect("--summary-json is JSON");
    let stdout = String::from_utf8_lossy(&result.stdout).into_owned();
    (Trace::load(&output), summary, stdout)
}

/// The first CPU this process may run on (a cpuset need not hold CPU 0).
fn first_allowed_cpu() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list");
    let first = list.trim().split([',', '-']).next().unwrap_or("0");
    first.parse().expect("a CPU number")
}

/// Spinning processes pinned to one CPU, killed on drop.
struct Contention(Vec<std::process::Child>);

impl Contention {
    fn on_cpu(cpu: u32, spinners: usize) -> Contention {
        let spin = |_| {
            std::process::Command::new("taskset")
                .args(["-c", &cpu.to_string(), "sh", "-c", "while :; do :; done"])
                .spawn()
                .expect("taskset starts a spinner")
        };
        Contention((0..spinners).map(spin).collect())
    }
}

impl Drop for Contention {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn preempted_time_is_measured_and_is_not_a_hog() {
    // multi_worker pinned to one CPU with three spinners there: every thread
    // gets a quarter of the CPU, so the busy task's 50 ms (wall) spins are
    // preempted again and again, and so is any short poll the scheduler
    // takes CPU 0 from (~10 ms a time, a HOG before preemption was counted).
    require_root();
    let _turn = trace::tracer_turn();
    let fixture = Fixture::start("multi_worker", Profile::Release, 600.0);
    let cpu = first_allowed_cpu();
    let pinned = std::process::Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &cpu.to_string(),
            &fixture.pid().to_string(),
        ])
        .output()
        .expect("taskset");
    assert!(pinned.status.success(), "{pinned:?}");
    let _contention = Contention::on_cpu(cpu, 3);
    let (trace, summary, _) = record_for_2s(&fixture, "preempted");
    let preempted: Vec<(f64, u64)> = trace
        .polls()
        .iter()
        .filter_map(|p| Some((p.dur_ns, p.args["preempted_ns"].as_u64()?)))
        .collect();
    let busy = trace
        .polls()
        .into_iter()
        .filter(|p| p.name.contains("fixture_busy_task"))
        .filter(|p| p.args["preempted_ns"].as_u64().is_some_and(|ns| ns > 0))
        .count();
    assert!(busy > 0, "no busy-task poll was preempted: {preempted:?}");
    for (duration, preempted_ns) in &preempted {
        assert!(
            *preempted_ns as f64 <= duration + 1.0,
            "preempted {preempted_ns} ns in a {duration} ns poll"
        );
    }
    // Only the busy task holds its worker by its own doing (the rule
    // itself is tracer-timeline's hog_tests): a short poll preempted for
    // 10 ms, if the run had one, is not a HOG.
    for hog in summary["findings"].as_array().expect("findings") {
        if hog["kind"] != "HOG" {
            continue;
        }
        assert!(
            hog["task_type"]
                .as_str()
                .is_some_and(|t| t.contains("fixture_busy_task")),
            "a short poll's preemption flagged as a HOG: {hog}"
        );
    }
}
