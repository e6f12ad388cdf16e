//! The compatibility matrix: the compat service (`tests/compat/src`) built
//! against many tokio versions and build profiles (`tests/compat/matrix.rs`),
//! each traced for real, and every feature checked in every cell. A feature
//! is either seen in the trace or listed in `matrix::GAPS` with why; a gap
//! that turns out to work fails as well, so the README's table (written by
//! `cargo xtask test --matrix` from the `result.tsv` each cell leaves) stays
//! true.
//!
//! Which cells run: `RT_COMPAT_CELLS=all`, or a comma-separated list of
//! slug substrings (`1.8-,1.25-current`); by default the fast subset
//! `matrix::fast_cells()`.

#[path = "compat/matrix.rs"]
mod matrix;
use test_support::{self as support, trace};

use std::path::Path;

use matrix::{Cell, Feature};
use serde_json::Value;
use trace::{Trace, describe, require_root, run, scratch_dir, tracer};

/// The fixture's own async fns: `waits_at` must name one of them.
const OWN_FUNCTIONS: &[&str] = &[
    "compat_ticker",
    "compat_notified",
    "compat_producer",
    "compat_consumer",
    "compat_job",
    "compat_requester",
    "compat_spinner",
    "compat_read_frame",
    "compat_handle_connection",
    "compat_echo_server",
    "compat_echo_client",
    "compat_root",
];

/// What each of the fixture's tasks may wait on (`waits_on` kinds): any
/// other kind on its polls is a wrong answer.
const MAY_WAIT_ON: &[(&str, &[&str])] = &[
    ("compat_ticker", &["timer"]),
    ("compat_notified", &["notify", "lock", "semaphore"]),
    ("compat_producer", &["timer", "send", "semaphore"]),
    ("compat_consumer", &["recv"]),
    ("compat_job", &["yield"]),
    ("compat_requester", &["join", "blocking", "timer"]),
    ("compat_spinner", &["timer"]),
    ("compat_read_frame", &["io_read", "io"]),
    ("compat_handle_connection", &["io_read", "io_write", "io"]),
    ("compat_echo_server", &["io_read", "io"]),
    (
        "compat_echo_client",
        &["io_read", "io_write", "io", "timer"],
    ),
    ("compat_root", &["timer"]),
];

/// Kinds every cell's trace must show: the service awaits each of them
/// hundreds of times in 3 s.
const MUST_WAIT_ON: &[&str] = &["timer", "io_read", "notify", "join"];

fn selected_cells() -> Vec<Cell> {
    match std::env::var("RT_COMPAT_CELLS") {
        Ok(list) if list == "all" => matrix::all_cells(),
        Ok(list) if !list.is_empty() => matrix::all_cells()
            .into_iter()
            .filter(|cell| list.split(',').any(|part| cell.slug().contains(part)))
            .collect(),
        _ => matrix::fast_cells(),
    }
}

#[test]
fn every_feature_in_every_cell() {
    require_root();
    let repo = support::repo_root();
    let cells = selected_cells();
    assert!(!cells.is_empty(), "RT_COMPAT_CELLS selects no cell");
    let mut failures = Vec::new();
    for cell in &cells {
        let outcome = check_cell(&repo, cell);
        let mut lines = format!("tokio\t{}\t\n", outcome.tokio);
        for (feature, status, note) in &outcome.features {
            lines.push_str(&format!("{}\t{status}\t{note}\n", feature.name()));
            if *status == "FAIL" {
                failures.push(format!("{}: {}: {note}", cell.slug(), feature.name()));
            }
        }
        std::fs::write(matrix::result_file(&repo, cell), lines).unwrap();
        eprintln!("{}: {}", cell.slug(), summary_line(&outcome));
    }
    assert!(
        failures.is_empty(),
        "failing cells:\n{}",
        failures.join("\n")
    );
}

struct Outcome {
    tokio: String,
    features: Vec<(Feature, &'static str, String)>,
}

fn summary_line(outcome: &Outcome) -> String {
    outcome
        .features
        .iter()
        .map(|(feature, status, _)| format!("{} {status}", feature.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_cell(repo: &Path, cell: &Cell) -> Outcome {
    let binary = matrix::build(repo, cell, Path::new(env!("CARGO")))
        .unwrap_or_else(|e| panic!("building {}: {e}", cell.slug()));
    let (trace, stderr) = record(&binary, cell);
    let tokio = trace.metadata()["tokio_version"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    let seen = Seen::of(&trace);
    let watched = watch(&binary, cell);
    let mut features = Vec::new();
    let mut failed_stderr = None;
    for &feature in matrix::FEATURES {
        let (status, note) = if !feature.applies(cell) {
            ("n/a", String::new())
        } else {
            let found = match feature {
                Feature::Watch => watched.clone(),
                _ => seen.check(feature),
            };
            match (found, matrix::gap(cell, feature)) {
                (Ok(()), None) => ("ok", String::new()),
                (Ok(()), Some(_)) => (
                    "FAIL",
                    "works, but matrix::GAPS lists it as a gap: remove the entry".to_owned(),
                ),
                (Err(_), Some(gap)) => ("gap", gap.why.to_owned()),
                (Err(why), None) => {
                    failed_stderr = Some(stderr.clone());
                    ("FAIL", why)
                }
            }
        };
        features.push((feature, status, note));
    }
    if let Some(stderr) = failed_stderr {
        eprintln!("{}: the tracer's stderr:\n{stderr}", cell.slug());
    }
    Outcome { tokio, features }
}

/// Traces the service for 3 seconds and returns the trace and the tracer's
/// stderr (its warnings).
fn record(binary: &Path, cell: &Cell) -> (Trace, String) {
    let service = start_service(binary, cell);
    let dir = scratch_dir(&format!("compat-{}", cell.slug()));
    let output = dir.join("trace.json");
    let result = run(tracer()
        .arg("--pid")
        .arg(service.pid().to_string())
        .arg("-o")
        .arg(&output)
        .arg("--duration")
        .arg("3s"));
    drop(service);
    assert!(
        result.status.success(),
        "{}: tracer failed\n{}",
        cell.slug(),
        describe(&result)
    );
    let trace = Trace::load(&output);
    let _ = std::fs::remove_dir_all(&dir);
    (trace, String::from_utf8_lossy(&result.stderr).into_owned())
}

/// Starts the service (killed when dropped) and waits until it is up.
fn start_service(binary: &Path, cell: &Cell) -> trace::Fixture {
    trace::Fixture::launch(binary, &[cell.flavour.arg(), "60"])
}

/// Watches the service for 3 seconds (`watch --pid`, no poll probe): `Ok`
/// when its health lines give each worker a busy share and attribute CPU
/// to the spinning task's type. Findings are not checked here (a loaded
/// machine can stretch the spinner's 2 ms into a real HOG by preemption;
/// `tests/watch.rs` checks a healthy program has none).
fn watch(binary: &Path, cell: &Cell) -> Result<(), String> {
    let service = start_service(binary, cell);
    let dir = scratch_dir(&format!("compat-watch-{}", cell.slug()));
    let result = run(tracer()
        .args(["watch", "--duration", "3s", "--pid"])
        .arg(service.pid().to_string())
        .arg("-o")
        .arg(dir.join("watch.json")));
    drop(service);
    let _ = std::fs::remove_dir_all(&dir);
    if !result.status.success() {
        return Err(format!("watch failed: {}", describe(&result)));
    }
    let stdout = String::from_utf8_lossy(&result.stdout);
    let health: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("health: "))
        .collect();
    let workers = |line: &str| {
        let busy = line.split("busy [").nth(1)?.split(']').next()?;
        Some(busy.split_whitespace().count())
    };
    let expected_workers = match cell.flavour {
        matrix::Flavour::Multi => 1..=64,
        matrix::Flavour::Current => 1..=1,
    };
    if !health
        .iter()
        .any(|line| workers(line).is_some_and(|n| expected_workers.contains(&n)))
    {
        return Err(format!(
            "no health line gives {expected_workers:?} workers a busy share: {health:?}"
        ));
    }
    if !health.iter().any(|line| {
        line.split("| cpu:")
            .nth(1)
            .is_some_and(|cpu| cpu.contains("compat_spinner"))
    }) {
        return Err(format!(
            "no health line attributes CPU to compat_spinner: {health:?}"
        ));
    }
    Ok(())
}

/// What one trace holds, reduced to what the features are checked on.
struct Seen<'a> {
    pid: u64,
    abandoned: u64,
    polls: Vec<&'a Value>,
    events: &'a [Value],
}

impl<'a> Seen<'a> {
    fn of(trace: &'a Trace) -> Seen<'a> {
        let events = trace.events().as_slice();
        Seen {
            pid: trace.metadata()["target_pid"].as_u64().unwrap_or(0),
            abandoned: trace.metadata()["abandoned_polls"]
                .as_u64()
                .unwrap_or(u64::MAX),
            polls: events
                .iter()
                .filter(|e| e["ph"] == "X" && e["cat"] == "poll")
                .collect(),
            events,
        }
    }

    fn count(&self, ph: &str, category: &str) -> usize {
        self.events
            .iter()
            .filter(|e| e["ph"] == ph && e["cat"] == category)
            .count()
    }

    fn own_polls(&self) -> Vec<&&'a Value> {
        self.polls
            .iter()
            .filter(|p| p["name"].as_str().is_some_and(|n| n.contains("compat_")))
            .collect()
    }

    /// `Ok` when the trace shows `feature`, else what was seen instead.
    fn check(&self, feature: Feature) -> Result<(), String> {
        let at_least = |what: &str, n: usize, min: usize| {
            if n >= min {
                Ok(())
            } else {
                Err(format!("{n} {what} (expected at least {min})"))
            }
        };
        let share = |what: &str, part: usize, whole: usize| {
            if whole >= 10 && part * 2 >= whole {
                Ok(())
            } else {
                Err(format!(
                    "{part} of {whole} {what} (expected at least half of 10 or more)"
                ))
            }
        };
        let own = self.own_polls();
        match feature {
            Feature::Polls => {
                let types: std::collections::BTreeSet<&str> =
                    own.iter().filter_map(|p| p["name"].as_str()).collect();
                at_least("polls of the service's tasks", own.len(), 50)?;
                // A poll whose end was never seen is abandoned: a missed
                // return site or a refused probe shows here.
                let abandoned = self.abandoned as usize;
                if abandoned * 50 > self.polls.len() {
                    return Err(format!(
                        "{abandoned} polls abandoned of {} (their ends were not seen)",
                        self.polls.len()
                    ));
                }
                at_least("task types of the service", types.len(), 6)
            }
            Feature::Parks => at_least("parks", self.count("X", "park"), 1),
            Feature::TaskIds => share(
                "polls with a task id",
                own.iter().filter(|p| p["args"]["task_id"].is_u64()).count(),
                own.len(),
            ),
            Feature::Spawns => at_least("spawns", self.count("i", "spawn"), 5),
            Feature::Ends => at_least("task ends", self.count("i", "task_end"), 5),
            Feature::Wakes => at_least("wake flows", self.count("f", "wake"), 10),
            Feature::Unparks => at_least("unparks", self.count("i", "unpark"), 1),
            Feature::Blocking => {
                let blocking = self
                    .events
                    .iter()
                    .filter(|e| {
                        e["ph"] == "X"
                            && e["cat"] == "blocking"
                            && e["name"].as_str().is_some_and(|n| n.contains("compat_"))
                    })
                    .count();
                at_least("blocking-pool slices of the service", blocking, 5)
            }
            Feature::WaitsAt => {
                let with: Vec<&str> = own
                    .iter()
                    .filter_map(|p| p["args"]["waits_at"].as_str())
                    .collect();
                let named = with
                    .iter()
                    .filter(|w| OWN_FUNCTIONS.iter().any(|f| w.contains(f)))
                    .count();
                share(
                    "polls' waits_at naming the service's own fn",
                    named,
                    with.len(),
                )
                .map_err(|e| format!("{e}; e.g. {:?}", with.iter().take(3).collect::<Vec<_>>()))
            }
            Feature::FileLine => {
                let with: Vec<&str> = own
                    .iter()
                    .filter_map(|p| p["args"]["waits_at"].as_str())
                    .collect();
                let lined = with.iter().filter(|w| w.contains("main.rs:")).count();
                share("polls' waits_at with main.rs:LINE", lined, with.len())
            }
            Feature::WaitsOn => {
                let mut kinds = std::collections::BTreeSet::new();
                for poll in &own {
                    let (Some(name), Some(waits_on)) =
                        (poll["name"].as_str(), poll["args"]["waits_on"].as_str())
                    else {
                        continue;
                    };
                    let kind = waits_on.split(": ").next().unwrap_or("");
                    kinds.insert(kind.to_owned());
                    let allowed = MAY_WAIT_ON
                        .iter()
                        .find(|(task, _)| name.contains(task))
                        .map_or(&[][..], |(_, kinds)| *kinds);
                    if !allowed.contains(&kind) {
                        return Err(format!(
                            "a poll of {name} says waits_on {waits_on:?} (it waits only on {allowed:?}), at {}",
                            poll["args"]["waits_at"]
                        ));
                    }
                }
                let missing: Vec<&str> = MUST_WAIT_ON
                    .iter()
                    .copied()
                    .filter(|kind| !kinds.contains(*kind))
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!("no poll waits on {missing:?} (seen: {kinds:?})"))
                }
            }
            Feature::Samples => {
                let in_spin: Vec<&Value> = self
                    .events
                    .iter()
                    .filter(|e| e["cat"] == "sample")
                    .filter(|e| {
                        e["args"]["stack"].as_array().is_some_and(|frames| {
                            frames
                                .iter()
                                .any(|f| f.as_str().is_some_and(|f| f.contains("compat_spin")))
                        })
                    })
                    .collect();
                let attributed = in_spin
                    .iter()
                    .filter(|s| {
                        s["args"]["task_type"]
                            .as_str()
                            .is_some_and(|t| t.contains("compat_spinner"))
                    })
                    .count();
                share(
                    "samples in compat_spin attributed to compat_spinner",
                    attributed,
                    in_spin.len(),
                )
            }
            Feature::Watch => Err("seen by a watch run, not in a recording".to_owned()),
            Feature::BlockOnRoot => {
                let root = self
                    .polls
                    .iter()
                    .filter(|p| {
                        p["tid"].as_u64() == Some(self.pid)
                            && p["name"]
                                .as_str()
                                .is_some_and(|n| n.contains("compat_root"))
                    })
                    .count();
                at_least("polls of compat_root on the main thread", root, 5)
            }
        }
    }
}
