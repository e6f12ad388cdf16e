//! Running the tracer and reading back the trace it wrote (the tracer
//! package's integration tests).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fixtures::{self as support, Profile};

/// The tracer binary under test.
pub fn tracer() -> Command {
    let mut command = Command::new(tracer_binary());
    command.env("RUST_LOG", "warn");
    command
}

/// Cargo builds a package's binaries before its integration tests, into the
/// directory above the tests' own (`target/<profile>/deps/<test>-<hash>`).
fn tracer_binary() -> PathBuf {
    let test = std::env::current_exe().expect("the test's own path");
    let binary = test
        .ancestors()
        .nth(2)
        .expect("a test binary is in target/<profile>/deps")
        .join("rt-ebpf-trace");
    assert!(
        binary.exists(),
        "{} is missing: run the tracer's tests with cargo (`cargo xtask test`)",
        binary.display()
    );
    binary
}

/// Integration tests attach real probes: they need root. Say so plainly
/// instead of failing later with an obscure error.
pub fn require_root() {
    let euid = unsafe { libc_geteuid() };
    assert_eq!(
        euid, 0,
        "the integration tests attach uprobes and must run as root: use `cargo xtask test`"
    );
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A fixture process, killed when dropped.
pub struct Fixture {
    pub child: Child,
    pub path: PathBuf,
}

impl Fixture {
    /// Starts a fixture that runs for `seconds` and waits until its runtime is up.
    pub fn start(name: &str, profile: Profile, seconds: f64) -> Fixture {
        Fixture::launch(&support::fixture(name, profile), &[&seconds.to_string()])
    }

    /// Starts `path` with `args` and waits for its `ready` line (every
    /// traced program the tests start says it once its runtime is up).
    pub fn launch(path: &Path, args: &[&str]) -> Fixture {
        let mut child = Command::new(path)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("start {}: {err}", path.display()));
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the program's output");
        assert!(
            line.starts_with("ready"),
            "{} said {line:?}",
            path.display()
        );
        Fixture {
            child,
            path: path.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh directory of its own (a new name in `$TMPDIR`, made by
/// `tempfile`) for one test's output files. It is kept after the test, so
/// that a failed test's trace can be looked at.
pub fn scratch_dir(test: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(&format!("rt-ebpf-trace-test-{test}-"))
        .tempdir()
        .expect("a scratch directory in $TMPDIR")
        .keep()
}

/// Held while a tracer runs: one tracer at a time across all tests.
///
/// Two tracers attached to processes of the *same binary* at once interfere
/// in the kernel (Linux 6.18): the second one loses a few percent of its
/// entry events (see NOTES.md). The tests trace the same fixture binaries
/// in parallel threads, so they take turns; this also keeps the 2-core CI
/// machine from being oversubscribed by busy fixtures.
pub struct TracerTurn {
    /// Locked while the turn lasts; closing it unlocks.
    _lock: std::fs::File,
}

pub fn tracer_turn() -> TracerTurn {
    let path = std::env::temp_dir().join("rt-ebpf-trace-tests.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .expect("open lock file");
    file.lock().expect("lock");
    TracerTurn { _lock: file }
}

/// Runs the tracer to completion, with a generous time limit.
pub fn run(command: &mut Command) -> Output {
    let _turn = tracer_turn();
    run_holding_turn(command)
}

/// [`run`] for a test that already holds its [`tracer_turn`] (a target
/// whose lifetime must not tick away while waiting for the turn).
pub fn run_holding_turn(command: &mut Command) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tracer");
    wait_with_limit(child, Duration::from_secs(120))
}

pub fn wait_with_limit(mut child: Child, limit: Duration) -> Output {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "tracer did not finish within {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What [`record_running`] got: the trace, the scratch directory (for
/// other output files) and the tracer's output (its summary on stdout).
pub struct Recorded {
    pub trace: Trace,
    pub dir: PathBuf,
    pub output: Output,
}

/// Starts fixture `name`, records it with `--pid` into a native Perfetto
/// trace for `duration` (`"2s"`) with `extra` arguments (`{dir}` in one is
/// the scratch directory, for other output files), checks the tracer
/// succeeded and left no partial file, and reads the trace back (checked
/// against Perfetto's schema by [`Trace::load`]).
pub fn record_running(
    name: &str,
    profile: Profile,
    scratch: &str,
    duration: &str,
    extra: &[&str],
) -> Recorded {
    require_root();
    let fixture = Fixture::start(name, profile, 600.0);
    let dir = scratch_dir(scratch);
    let trace_path = dir.join("trace.pftrace");
    let output = run(tracer()
        .arg("--pid")
        .arg(fixture.pid().to_string())
        .arg("-o")
        .arg(&trace_path)
        .arg("--duration")
        .arg(duration)
        .args(
            extra
                .iter()
                .map(|arg| arg.replace("{dir}", dir.to_str().unwrap())),
        ));
    assert!(
        output.status.success(),
        "tracer failed\n{}",
        describe(&output)
    );
    assert!(
        !dir.join("trace.pftrace.partial").exists(),
        "partial file left behind"
    );
    Recorded {
        trace: Trace::load(&trace_path),
        dir,
        output,
    }
}

/// Launches fixture `name` with `args` under the tracer (`-o DIR/file --
/// fixture args…`, the trace's format following `file`'s name) until it
/// exits; checks both succeeded and returns the trace and the tracer's
/// stdout.
pub fn launch_under_tracer(
    file: &str,
    name: &str,
    profile: Profile,
    scratch: &str,
    args: &[&str],
) -> (Trace, String) {
    require_root();
    let dir = scratch_dir(scratch);
    let trace_path = dir.join(file);
    let output = run(tracer()
        .arg("-o")
        .arg(&trace_path)
        .arg("--")
        .arg(support::fixture(name, profile))
        .args(args));
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        stdout.contains("command exited: exit status: 0"),
        "{stdout}"
    );
    (Trace::load(&trace_path), stdout)
}

pub fn describe(output: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A slice ("X" event) of the trace.
#[derive(Debug, Clone)]
pub struct TraceSlice {
    pub tid: u64,
    pub name: String,
    pub category: String,
    /// Start and duration in ns.
    pub start_ns: f64,
    pub dur_ns: f64,
    pub args: Value,
}

impl TraceSlice {
    pub fn end_ns(&self) -> f64 {
        self.start_ns + self.dur_ns
    }
}

/// A trace file, read back: a Chrome JSON trace as it is, a Perfetto
/// protobuf trace through `check_pftrace.py`, which decodes it against
/// Perfetto's own schema, checks the invariants the UI relies on (interned
/// ids defined before use, balanced slices, flows with both ends, ordered
/// timestamps, thread and process descriptors) and prints it in the JSON
/// trace's shape, so the tests assert on either format alike.
pub struct Trace {
    pub json: Value,
    /// Read from a Perfetto protobuf trace (not a Chrome JSON one).
    perfetto: bool,
}

impl Trace {
    /// Reads the whole file: a truncated or otherwise invalid trace fails
    /// here.
    pub fn load(path: &Path) -> Trace {
        let name = path.to_string_lossy();
        let perfetto = !name.ends_with(".json");
        let json = if !perfetto {
            let text = std::fs::read_to_string(path)
                .unwrap_or_else(|err| panic!("read trace {}: {err}", path.display()));
            serde_json::from_str(&text)
                .unwrap_or_else(|err| panic!("trace {} is not valid JSON: {err}", path.display()))
        } else {
            check_pftrace(path)
        };
        assert!(json["traceEvents"].is_array(), "no traceEvents array");
        assert!(
            json["metadata"].is_object(),
            "no metadata: the trace was not finalized"
        );
        Trace { json, perfetto }
    }

    /// Whether the file was a Perfetto protobuf trace.
    pub fn is_perfetto(&self) -> bool {
        self.perfetto
    }

    /// CPU samples ("i" events of category "sample").
    pub fn samples(&self) -> Vec<&Value> {
        self.events()
            .iter()
            .filter(|e| e["ph"] == "i" && e["cat"] == "sample")
            .collect()
    }

    /// Flow arrows: starts ("s" events; each has its end, checked on load
    /// for Perfetto traces).
    pub fn flows(&self) -> usize {
        self.events().iter().filter(|e| e["ph"] == "s").count()
    }

    pub fn events(&self) -> &Vec<Value> {
        self.json["traceEvents"].as_array().unwrap()
    }

    pub fn slices(&self, category: &str) -> Vec<TraceSlice> {
        self.events()
            .iter()
            .filter(|e| e["ph"] == "X" && e["cat"] == category)
            .map(|e| TraceSlice {
                tid: e["tid"].as_u64().unwrap(),
                name: e["name"].as_str().unwrap().to_string(),
                category: category.to_string(),
                start_ns: e["ts"].as_f64().unwrap() * 1000.0,
                dur_ns: e["dur"].as_f64().unwrap() * 1000.0,
                args: e["args"].clone(),
            })
            .collect()
    }

    pub fn polls(&self) -> Vec<TraceSlice> {
        self.slices("poll")
    }

    pub fn parks(&self) -> Vec<TraceSlice> {
        self.slices("park")
    }

    /// Thread names by tid, from the metadata events.
    pub fn thread_names(&self) -> Vec<(u64, String)> {
        self.events()
            .iter()
            .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
            .map(|e| {
                (
                    e["tid"].as_u64().unwrap(),
                    e["args"]["name"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    pub fn metadata(&self) -> &Value {
        &self.json["metadata"]
    }
}

/// Runs the checker on a Perfetto trace; panics with what it found wrong.
fn check_pftrace(path: &Path) -> Value {
    let script = support::repo_root().join("tests/support/check_pftrace.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(path)
        .output()
        .expect("run python3 (the Perfetto trace checker needs it)");
    assert!(
        output.status.success(),
        "{} is not a valid Perfetto trace:\n{}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the checker prints JSON")
}
