//! `cargo xtask bench`: the tracer's overhead on real tokio workloads.
//!
//! Each workload (bench/: an HTTP server, a spawn-heavy loop, a channel
//! ping-pong, a yield loop) runs flat out and at half its untraced maximum,
//! under each condition: untraced, rt-ebpf-trace in each of its modes, and
//! an equivalent hand-written bpftrace script. Conditions are interleaved
//! and repeated, so drift on the machine spreads over all of them. The
//! results are printed and written into BENCHMARKS.md.
//!
//! Every process is a child of ours, so their CPU time is read exactly: the
//! kernel adds a child's utime+stime to our `cutime`+`cstime` when we reap
//! it. The tracers attach by pid to a workload that waits for a go from us,
//! so the attach is not timed and the work is traced from its first poll.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, cargo, step};
use crate::{ebpf, root};

mod formats;

#[derive(clap::Args)]
pub struct Options {
    /// A smoke run of about two minutes: 2 runs per condition and shorter
    /// workloads (not enough runs for the min/median/max to mean much).
    #[arg(long)]
    pub quick: bool,
    /// Runs per condition (default 5, or 2 with --quick).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Use the tracer and workloads as already built.
    #[arg(long)]
    pub no_build: bool,
    /// Print the results without writing them into BENCHMARKS.md.
    #[arg(long)]
    pub no_write: bool,
    /// Only measure the trace formats (size, rendering rate, tracer memory;
    /// see `bench/formats.rs`).
    #[arg(long)]
    pub formats: bool,
    /// Only these workloads (e.g. `--workload http --workload kv`); all by default.
    #[arg(long = "workload")]
    pub workloads: Vec<String>,
    /// Only the conditions whose label contains one of these (e.g.
    /// `--condition untraced --condition watch`); all by default.
    #[arg(long = "condition")]
    pub conditions: Vec<String>,
}

pub fn run(options: &Options) -> Result<()> {
    if !root::is_root() {
        // The harness reads the tracers' /proc entries and CPU times, which
        // sudo in between would hide.
        bail!("the benchmark attaches probes and must run as root: run it as root");
    }
    ensure_tool("wrk")?;
    if options.formats {
        return formats::run(options);
    }
    let tools = build(options)?;
    let plan = Plan::new(options, &tools)?;
    if plan.conditions.contains(&Condition::Bpftrace) {
        ensure_tool("bpftrace")?;
    }
    eprintln!(
        "conditions: {}; {} runs each, interleaved",
        plan.conditions
            .iter()
            .map(Condition::label)
            .collect::<Vec<_>>()
            .join(", "),
        plan.runs
    );
    let started = Instant::now();
    let mut results = Vec::new();
    for workload in Workload::ALL {
        if !options.workloads.is_empty() && !options.workloads.iter().any(|w| w == workload.name())
        {
            continue;
        }
        results.extend(measure_workload(&plan, &tools, workload)?);
    }
    let report = Report {
        command: command_line(options),
        machine: Machine::read(&tools)?,
        runs: plan.runs,
        results,
        elapsed: started.elapsed(),
    };
    let text = report.markdown();
    println!("{text}");
    if !options.no_write {
        let path = cmd::repo_root().join("BENCHMARKS.md");
        write_results(&path, &text)?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

/// The command that reproduces this run, for BENCHMARKS.md.
fn command_line(options: &Options) -> String {
    let mut line = String::from("cargo xtask bench");
    if options.quick {
        line.push_str(" --quick");
    }
    if let Some(runs) = options.runs {
        write!(line, " --runs {runs}").expect("writing to a String");
    }
    for workload in &options.workloads {
        write!(line, " --workload {workload}").expect("writing to a String");
    }
    for condition in &options.conditions {
        write!(line, " --condition {condition}").expect("writing to a String");
    }
    line
}

// ---------------------------------------------------------------------------
// Tools and builds

/// Installs a Debian package named like its program when it is missing.
fn ensure_tool(program: &str) -> Result<()> {
    if cmd::on_path(program) {
        return Ok(());
    }
    if !cmd::on_path("apt-get") {
        bail!("{program} is missing: install it (Debian: apt-get install -y {program})");
    }
    step(&format!(
        "installing {program} (apt-get install -y {program})"
    ));
    cmd::run(Command::new("apt-get").args(["install", "-y", program]))
        .with_context(|| format!("{program} is needed: try `apt-get update` first"))
}

/// The programs a run uses. The tracer is copied first, so that a rebuild
/// of it during a long run doesn't change what is measured halfway.
struct Tools {
    tracer: PathBuf,
    work: PathBuf,
    http_server: PathBuf,
    load: PathBuf,
    kv_server: PathBuf,
    kv_load: PathBuf,
    /// Where traces and generated bpftrace scripts go.
    scratch: PathBuf,
}

fn build(options: &Options) -> Result<Tools> {
    let repo = cmd::repo_root();
    let bench = repo.join("bench");
    if !options.no_build {
        let object = ebpf::target_dir().join("bpfel-unknown-none/release/tracer-ebpf");
        if !object.is_file() {
            ebpf::build(&ebpf::Options {
                debug: false,
                reinstall_bpf_linker: false,
            })?;
        }
        ebpf::build_release_tracer(&repo)?;
        step("building the workloads");
        cmd::run(cargo().args(["build", "--release"]).current_dir(&bench))?;
    }
    let release = bench.join("target/release");
    let scratch = bench.join("target/bench");
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let tracer = scratch.join("rt-ebpf-trace");
    let built = repo.join("target/release/rt-ebpf-trace");
    // Removed first: the old copy may be the one a tracer still runs.
    let _ = fs::remove_file(&tracer);
    fs::copy(&built, &tracer).with_context(|| format!("copying {}", built.display()))?;
    let tools = Tools {
        tracer,
        work: release.join("bench-work"),
        http_server: release.join("bench-http-server"),
        load: release.join("bench-load"),
        kv_server: release.join("bench-kv-server"),
        kv_load: release.join("bench-kv-load"),
        scratch,
    };
    for program in [
        &tools.work,
        &tools.http_server,
        &tools.load,
        &tools.kv_server,
        &tools.kv_load,
    ] {
        if !program.is_file() {
            bail!(
                "{} is not built (run without --no-build)",
                program.display()
            );
        }
    }
    Ok(tools)
}

// ---------------------------------------------------------------------------
// What is measured

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Http,
    /// bench-kv-server: a Redis-like request/response server, many connections.
    Kv,
    Spawn,
    PingPong,
    Yield,
}

impl Workload {
    const ALL: [Workload; 5] = [
        Workload::Http,
        Workload::Kv,
        Workload::Spawn,
        Workload::PingPong,
        Workload::Yield,
    ];

    fn name(self) -> &'static str {
        match self {
            Workload::Http => "http",
            Workload::Kv => "kv",
            Workload::Spawn => "spawn",
            Workload::PingPong => "pingpong",
            Workload::Yield => "yield",
        }
    }

    /// What one op is, for the table.
    fn op(self) -> &'static str {
        match self {
            Workload::Http | Workload::Kv => "request",
            Workload::Spawn => "task",
            Workload::PingPong => "round trip",
            Workload::Yield => "yield",
        }
    }

    /// bench-work's ops per batch, sized so that a batch takes about a
    /// millisecond untraced here: long next to tokio's 1 ms timer, which
    /// paces the fixed-load runs, short next to a run.
    fn batch(self) -> u64 {
        match self {
            Workload::Http | Workload::Kv => 1,
            Workload::Spawn => 3000,
            Workload::PingPong => 5000,
            Workload::Yield => 2000,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    FlatOut,
    /// Half the untraced maximum, as measured flat out in the same run.
    Half,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::FlatOut => "flat out",
            Load::Half => "50%",
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
enum Condition {
    Untraced,
    /// rt-ebpf-trace; `None` when it has no `--mode` option.
    Tracer(Option<String>),
    /// `rt-ebpf-trace watch`, the always-on tier (no per-poll probe).
    Watch,
    Bpftrace,
}

impl Condition {
    fn label(&self) -> String {
        match self {
            Condition::Untraced => "untraced".into(),
            Condition::Tracer(None) => "rt-ebpf-trace".into(),
            Condition::Tracer(Some(mode)) => format!("rt-ebpf-trace --mode {mode}"),
            Condition::Watch => "rt-ebpf-trace watch".into(),
            Condition::Bpftrace => "bpftrace".into(),
        }
    }
}

/// How long and how often, fixed before the first run.
struct Plan {
    runs: usize,
    conditions: Vec<Condition>,
    /// Length of every run. Flat-out runs are timed too, not a fixed amount
    /// of work: tracing slows the micro workloads down many times over, and
    /// fixed work would make the whole benchmark last as long.
    seconds: f64,
}

impl Plan {
    fn new(options: &Options, tools: &Tools) -> Result<Plan> {
        let runs = options.runs.unwrap_or(if options.quick { 2 } else { 5 });
        if runs == 0 {
            bail!("--runs must be at least 1");
        }
        let mut conditions = vec![Condition::Untraced];
        conditions.extend(
            tracer_modes(&tools.tracer)?
                .into_iter()
                .map(Condition::Tracer),
        );
        if has_watch(&tools.tracer)? {
            conditions.push(Condition::Watch);
        }
        conditions.push(Condition::Bpftrace);
        if !options.conditions.is_empty() {
            // Untraced stays: every figure is relative to it.
            conditions.retain(|condition| {
                *condition == Condition::Untraced
                    || options
                        .conditions
                        .iter()
                        .any(|wanted| condition.label().contains(wanted.as_str()))
            });
        }
        let seconds = if options.quick { 1.0 } else { 2.0 };
        Ok(Plan {
            runs,
            conditions,
            seconds,
        })
    }
}

/// Whether the tracer has the `watch` command (its `--help` lists it).
fn has_watch(tracer: &Path) -> Result<bool> {
    let help = cmd::output(Command::new(tracer).arg("--help"))?;
    Ok(help
        .lines()
        .any(|line| line.trim_start().starts_with("watch ")))
}

/// The tracer's modes, from `--help`: `[None]` when it has no `--mode`.
fn tracer_modes(tracer: &Path) -> Result<Vec<Option<String>>> {
    let help = cmd::output(Command::new(tracer).arg("--help"))?;
    Ok(parse_modes(&help))
}

fn parse_modes(help: &str) -> Vec<Option<String>> {
    let Some(at) = help.find("--mode") else {
        return vec![None];
    };
    // The option's paragraph: up to the next line that starts an option.
    let paragraph: String = help[at..]
        .lines()
        .enumerate()
        .take_while(|(i, line)| *i == 0 || !line.trim_start().starts_with('-'))
        .map(|(_, line)| format!("{line}\n"))
        .collect();
    // clap lists values as `[possible values: full, light]`; a hand-written
    // parser names them in backticks instead ("`full` (...) or `light`").
    let listed = paragraph
        .split_once("[possible values: ")
        .and_then(|(_, list)| list.split_once(']'))
        .map(|(list, _)| {
            list.split(',')
                .map(|v| v.trim().to_owned())
                .collect::<Vec<_>>()
        });
    let modes = listed.unwrap_or_else(|| {
        paragraph
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|word| !word.is_empty() && word.chars().all(|c| c.is_ascii_lowercase()))
            .map(str::to_owned)
            .collect()
    });
    if modes.is_empty() {
        // A `--mode` whose values we can't read: run its default.
        return vec![None];
    }
    modes.into_iter().map(Some).collect()
}

/// One run's figures.
#[derive(Clone, Default)]
struct Sample {
    ops: f64,
    seconds: f64,
    p99_ns: f64,
    /// CPU time of the workload process (the server, for HTTP).
    workload_cpu: f64,
    /// The workload's own count of the polls it caused (0 if unknown).
    workload_polls: f64,
    tracer: Option<TracerSample>,
}

impl Sample {
    fn throughput(&self) -> f64 {
        self.ops / self.seconds
    }
}

#[derive(Clone, Default)]
struct TracerSample {
    /// CPU time from the go to the tracer's exit, and that wall time.
    cpu: f64,
    wall: f64,
    events: f64,
    lost: f64,
    /// Polls seen by the tracer (0 if it didn't say).
    polls: f64,
    bytes: f64,
    peak_rss_kib: f64,
    /// Events drained per CPU-second while recording, trace writing after
    /// it excluded (from the tracer's log; None if it didn't say).
    drain_rate: Option<f64>,
}

/// All samples of one workload, load and condition.
struct Measured {
    workload: Workload,
    load: Load,
    condition: Condition,
    /// The offered load of a fixed-load point, in ops a second.
    offered: Option<f64>,
    samples: Vec<Sample>,
}

// ---------------------------------------------------------------------------
// Running

/// Flat out first, then at half the untraced flat-out throughput.
fn measure_workload(plan: &Plan, tools: &Tools, workload: Workload) -> Result<Vec<Measured>> {
    let flat = measure_point(plan, tools, workload, Load::FlatOut, None)?;
    let untraced = flat
        .iter()
        .find(|m| m.condition == Condition::Untraced)
        .expect("untraced is always a condition");
    let max = median(untraced.samples.iter().map(Sample::throughput));
    let half = measure_point(plan, tools, workload, Load::Half, Some(max / 2.0))?;
    Ok(flat.into_iter().chain(half).collect())
}

fn measure_point(
    plan: &Plan,
    tools: &Tools,
    workload: Workload,
    load: Load,
    offered: Option<f64>,
) -> Result<Vec<Measured>> {
    let mut measured: Vec<Measured> = plan
        .conditions
        .iter()
        .map(|condition| Measured {
            workload,
            load,
            condition: condition.clone(),
            offered,
            samples: Vec::new(),
        })
        .collect();
    for run in 0..plan.runs {
        // The order rotates so that no condition always follows another.
        for i in 0..measured.len() {
            let m = &mut measured[(i + run) % plan.conditions.len()];
            step(&format!(
                "{} {} {} (run {}/{})",
                workload.name(),
                load.name(),
                m.condition.label(),
                run + 1,
                plan.runs
            ));
            let sample = run_once(plan, tools, workload, offered, &m.condition)
                .with_context(|| format!("{} {}", workload.name(), m.condition.label()))?;
            m.samples.push(sample);
        }
    }
    Ok(measured)
}

/// Starts the workload, attaches the condition's tracer, runs the load and
/// collects every figure.
fn run_once(
    plan: &Plan,
    tools: &Tools,
    workload: Workload,
    offered: Option<f64>,
    condition: &Condition,
) -> Result<Sample> {
    let mut target = spawn_workload(plan, tools, workload, offered)?;
    let ready_line = target.read_line()?;
    let mut tracer = match condition {
        Condition::Untraced => None,
        _ => Some(Tracer::start(
            tools,
            condition,
            workload,
            target.child.id(),
        )?),
    };
    if let Some(tracer) = &mut tracer {
        tracer.wait_until_attached()?;
    }
    let go = Instant::now();
    let tracer_cpu_at_go = tracer.as_ref().map_or(0.0, |t| process_cpu(t.child.id()));
    let cpu_before = children_cpu()?;
    let mut sample = match workload {
        Workload::Http | Workload::Kv => {
            let address = ready_line
                .strip_prefix("ready ")
                .context("the server did not say where it listens")?
                .to_owned();
            let sample = match workload {
                Workload::Kv => kv_load(plan, tools, &address, offered)?,
                _ => http_load(plan, tools, &address, offered)?,
            };
            // The server serves until killed. The load client was reaped
            // already, so what the kill adds to our CPU times is the server's.
            let cpu_before = children_cpu()?;
            target.child.kill().ok();
            target.child.wait()?;
            Sample {
                workload_cpu: children_cpu()? - cpu_before,
                ..sample
            }
        }
        _ => {
            target.go()?;
            let result = parse_result(&target.read_line()?)?;
            let status = target.child.wait()?;
            if !status.success() {
                bail!("the workload failed ({status})");
            }
            Sample {
                workload_cpu: children_cpu()? - cpu_before,
                ..result
            }
        }
    };
    if let Some(tracer) = tracer {
        sample.tracer = Some(tracer.finish(go, tracer_cpu_at_go)?);
    }
    Ok(sample)
}

/// A workload process and its stdout.
struct Target {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Target {
    fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.is_empty() {
            bail!("the workload exited without a word (see its stderr above)");
        }
        Ok(line.trim_end().to_owned())
    }

    fn go(&mut self) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("the workload's stdin")?;
        stdin.write_all(b"go\n")?;
        Ok(())
    }
}

fn spawn_workload(
    plan: &Plan,
    tools: &Tools,
    workload: Workload,
    offered: Option<f64>,
) -> Result<Target> {
    let mut command = match workload {
        Workload::Http => Command::new(&tools.http_server),
        Workload::Kv => Command::new(&tools.kv_server),
        _ => {
            let mut command = Command::new(&tools.work);
            command
                .arg(workload.name())
                .args(["--batch", &workload.batch().to_string()])
                .args(["--seconds", &plan.seconds.to_string()]);
            if let Some(ops_per_second) = offered {
                let batches_per_second = ops_per_second / workload.batch() as f64;
                command.args(["--rate", &batches_per_second.to_string()]);
            }
            command
        }
    };
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", cmd::display(&command)))?;
    let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
    Ok(Target { child, stdout })
}

/// bench-kv-load, 64 connections, flat out or at `rate`.
fn kv_load(plan: &Plan, tools: &Tools, address: &str, rate: Option<f64>) -> Result<Sample> {
    let mut command = Command::new(&tools.kv_load);
    command.args([
        "--address",
        address,
        "--seconds",
        &plan.seconds.to_string(),
        "--connections",
        "64",
    ]);
    if let Some(rate) = rate {
        command.args(["--rate", &rate.to_string()]);
    }
    let out = cmd::output(&mut command)?;
    let line = out.lines().find(|l| l.starts_with("result ")).unwrap_or("");
    parse_result(line)
}

/// Flat out: wrk, one thread and 32 connections. At a fixed rate: our own
/// paced client (wrk can't hold a rate).
fn http_load(plan: &Plan, tools: &Tools, address: &str, rate: Option<f64>) -> Result<Sample> {
    let seconds = plan.seconds;
    match rate {
        None => {
            let out = cmd::output(Command::new("wrk").args([
                "-t1",
                "-c32",
                &format!("-d{}s", seconds.ceil() as u64),
                "--latency",
                &format!("http://{address}/"),
            ]))?;
            parse_wrk(&out)
        }
        Some(rate) => {
            let out = cmd::output(Command::new(&tools.load).args([
                "--address",
                address,
                "--rate",
                &rate.to_string(),
                "--seconds",
                &seconds.to_string(),
            ]))?;
            let line = out.lines().find(|l| l.starts_with("result ")).unwrap_or("");
            parse_result(line)
        }
    }
}

// ---------------------------------------------------------------------------
// Tracers

/// A running tracer: rt-ebpf-trace or bpftrace, with threads reading its
/// output (so that a full pipe never stalls it) and sampling its memory.
struct Tracer {
    child: Child,
    kind: Condition,
    /// Gets one message once the probes are attached.
    attached: mpsc::Receiver<()>,
    output: thread::JoinHandle<TracerOutput>,
    peak_rss: thread::JoinHandle<f64>,
    trace: PathBuf,
}

/// What the output-reading thread collected.
#[derive(Default)]
struct TracerOutput {
    text: String,
    /// bpftrace: events in its records (see `ProbeKind::events_per_line`)
    /// and the records' bytes.
    events: u64,
    bytes: u64,
}

impl Tracer {
    fn start(tools: &Tools, condition: &Condition, workload: Workload, pid: u32) -> Result<Tracer> {
        // The watch tier's kept window is Chrome JSON (`watch` refuses other names).
        let extension = if *condition == Condition::Watch {
            "json"
        } else {
            "pftrace"
        };
        let trace = tools
            .scratch
            .join(format!("trace-{}.{extension}", workload.name()));
        let mut command = match condition {
            Condition::Tracer(mode) => {
                let mut command = Command::new(&tools.tracer);
                // -v logs "attached N probes", which is our go signal.
                command
                    .args(["-v", "--pid", &pid.to_string(), "-o"])
                    .arg(&trace);
                if let Some(mode) = mode {
                    command.args(["--mode", mode]);
                }
                command
            }
            Condition::Watch => {
                let mut command = Command::new(&tools.tracer);
                // -v logs "attached N park probes…", the go signal.
                command
                    .args(["watch", "-v", "--quiet", "--pid", &pid.to_string(), "-o"])
                    .arg(&trace);
                command
            }
            _ => {
                let binary = workload_binary(tools, workload);
                let script = bpftrace_script(tools, binary)?;
                let mut command = Command::new("bpftrace");
                // The same buffer memory as the tracer's default 16 MiB ring
                // buffer: 2048 pages per CPU.
                let pages = 16 * 1024 * 1024 / 4096 / cpus();
                command
                    .env("BPFTRACE_PERF_RB_PAGES", pages.to_string())
                    .args(["-p", &pid.to_string()])
                    .arg(&script);
                command
            }
        };
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not start `{}`", cmd::display(&command)))?;
        let (attached_tx, attached) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let output = match condition {
            Condition::Tracer(_) | Condition::Watch => {
                let stdout = thread::spawn(move || read_all(stdout));
                thread::spawn(move || {
                    let mut out = watch_lines(stderr, &attached_tx, |l| {
                        l.contains("attached") && l.contains("probes")
                    });
                    out.text.push_str(&stdout.join().unwrap_or_default());
                    out
                })
            }
            _ => {
                let copy = trace.clone();
                let stderr = thread::spawn(move || read_all(stderr));
                thread::spawn(move || {
                    let mut out = copy_bpftrace_output(stdout, &copy, &attached_tx);
                    out.text.push_str(&stderr.join().unwrap_or_default());
                    out
                })
            }
        };
        let tracer_pid = child.id();
        let peak_rss = thread::spawn(move || sample_peak_rss(tracer_pid));
        Ok(Tracer {
            child,
            kind: condition.clone(),
            attached,
            output,
            peak_rss,
            trace,
        })
    }

    fn wait_until_attached(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if self
                .attached
                .recv_timeout(Duration::from_millis(50))
                .is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                let output = self.output_text();
                bail!(
                    "{} exited before attaching ({status}): {output}",
                    self.kind.label()
                );
            }
        }
        self.child.kill().ok();
        bail!("{} did not attach within 2 minutes", self.kind.label())
    }

    fn output_text(&mut self) -> String {
        let output = std::mem::replace(&mut self.output, thread::spawn(TracerOutput::default));
        output.join().map(|o| o.text).unwrap_or_default()
    }

    /// Stops the tracer if it doesn't stop by itself (rt-ebpf-trace stops
    /// when its target exits; bpftrace runs until SIGINT), then reads its
    /// figures.
    fn finish(mut self, go: Instant, cpu_at_go: f64) -> Result<TracerSample> {
        if self.kind == Condition::Bpftrace {
            // SIGINT makes bpftrace print its maps (the poll count) and exit.
            cmd::run(Command::new("kill").args(["-INT", &self.child.id().to_string()]))?;
        }
        let cpu_before = children_cpu()?;
        let status = wait_timeout(&mut self.child, Duration::from_secs(120))?;
        let wall = go.elapsed().as_secs_f64();
        let cpu = children_cpu()? - cpu_before - cpu_at_go;
        let peak_rss_kib = self.peak_rss.join().unwrap_or(0.0);
        let output = self.output.join().unwrap_or_default();
        if !status.success() && self.kind != Condition::Bpftrace {
            bail!("{} failed ({status}): {}", self.kind.label(), output.text);
        }
        let mut sample = match self.kind {
            Condition::Bpftrace => bpftrace_figures(&output),
            _ => tracer_figures(&output.text, &self.trace)?,
        };
        sample.cpu = cpu;
        sample.wall = wall;
        sample.peak_rss_kib = peak_rss_kib;
        let _ = fs::remove_file(&self.trace);
        Ok(sample)
    }
}

fn workload_binary(tools: &Tools, workload: Workload) -> &Path {
    match workload {
        Workload::Http => &tools.http_server,
        Workload::Kv => &tools.kv_server,
        _ => &tools.work,
    }
}

/// Reads a pipe to its end.
fn read_all(mut pipe: impl Read) -> String {
    let mut text = String::new();
    let _ = pipe.read_to_string(&mut text);
    text
}

/// Reads lines to the end, signalling the first one that `is_ready` accepts.
fn watch_lines(
    pipe: impl Read,
    ready: &mpsc::Sender<()>,
    is_ready: impl Fn(&str) -> bool,
) -> TracerOutput {
    let mut out = TracerOutput::default();
    let mut signalled = false;
    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
        if !signalled && is_ready(&line) {
            let _ = ready.send(());
            signalled = true;
        }
        out.text.push_str(&line);
        out.text.push('\n');
    }
    out
}

/// bpftrace's records go to a file, as a trace would; its other lines
/// (the `ready` of BEGIN, maps, "Lost N events") are kept as text.
fn copy_bpftrace_output(pipe: impl Read, path: &Path, ready: &mpsc::Sender<()>) -> TracerOutput {
    let mut out = TracerOutput::default();
    let Ok(file) = fs::File::create(path) else {
        return out;
    };
    let mut file = std::io::BufWriter::new(file);
    let mut reader = BufReader::with_capacity(1 << 16, pipe);
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        if let Some(events) = record_events(&line) {
            out.events += events;
            out.bytes += line.len() as u64;
            let _ = file.write_all(line.as_bytes());
        } else {
            if line.trim_end() == "ready" {
                let _ = ready.send(());
            }
            out.text.push_str(&line);
        }
        line.clear();
    }
    out
}

/// The events in one line of the bpftrace script's output; None if it is
/// no record (the `ready`, the maps printed at exit).
fn record_events(line: &str) -> Option<u64> {
    let word = line.split(' ').next()?;
    ProbeKind::ALL
        .into_iter()
        .find(|kind| kind.word() == word)
        .map(ProbeKind::events_per_line)
}

/// The highest VmHWM seen while the process lives, in KiB. It is sampled,
/// so a peak in the last few milliseconds before the exit may be missed.
fn sample_peak_rss(pid: u32) -> f64 {
    let mut peak = 0.0_f64;
    while let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
        let hwm = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
        match hwm {
            Some(kib) => peak = peak.max(kib),
            None => break, // a zombie: its memory is gone
        }
        thread::sleep(Duration::from_millis(20));
    }
    peak
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            child.kill().ok();
            return Ok(child.wait()?);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// rt-ebpf-trace's figures, from its trace's metadata (as `-v` logs it)
/// and its summary.
fn tracer_figures(summary: &str, trace: &Path) -> Result<TracerSample> {
    let bytes = fs::metadata(trace)
        .with_context(|| format!("the tracer wrote no {}: {summary}", trace.display()))?
        .len();
    let metadata = trace_metadata(summary)
        .with_context(|| format!("no trace metadata in the tracer's log: {summary}"))?;
    let number = |key: &str| json_number(&metadata, key).unwrap_or(0.0);
    Ok(TracerSample {
        events: number("events"),
        lost: number("lost_events"),
        polls: summary_polls(summary).unwrap_or(0.0),
        bytes: bytes as f64,
        drain_rate: drain_rate(summary),
        ..TracerSample::default()
    })
}

/// The trace's metadata object, from the tracer's `-v` line `trace
/// metadata: {...}` (the same in every trace format).
fn trace_metadata(log: &str) -> Option<String> {
    log.lines()
        .find_map(|line| Some(line.split_once("trace metadata: ")?.1.to_owned()))
}

/// The number after `"key":` in a flat JSON object.
fn json_number(json: &str, key: &str) -> Option<f64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json[at..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Events per CPU-second from the tracer's `-v` log line `drain: N events,
/// C ns of CPU while recording` (after a log prefix that varies). None
/// without the line (an older tracer) or without CPU time to divide by.
fn drain_rate(log: &str) -> Option<f64> {
    log.lines().find_map(|line| {
        let (_, drain) = line.split_once("drain: ")?;
        let (events, rest) = drain.split_once(" events, ")?;
        let cpu_ns = rest.trim_end().strip_suffix(" ns of CPU while recording")?;
        let events: f64 = events.trim().parse().ok()?;
        let cpu_ns: f64 = cpu_ns.trim().parse().ok()?;
        (cpu_ns > 0.0).then(|| events / (cpu_ns / 1e9))
    })
}

/// The sum of the summary table's `polls` column. Columns are right
/// aligned, so a row's number ends where the header's `polls` ends; worker
/// names have spaces, so splitting on whitespace would not do.
fn summary_polls(summary: &str) -> Option<f64> {
    let mut lines = summary.lines();
    let header = lines.find(|l| l.trim_start().starts_with("worker") && l.contains("polls"))?;
    let end = header.find("polls")? + "polls".len();
    let mut total = 0.0;
    for row in lines.take_while(|l| l.starts_with("  ")) {
        let cell = row.get(..end)?.rsplit(' ').next()?;
        total += cell.parse::<f64>().ok()?;
    }
    Some(total)
}

/// bpftrace's figures. Its events were counted as its records were read:
/// a poll or park line holds a start and an end, two events as in
/// rt-ebpf-trace's trace, the other lines one.
fn bpftrace_figures(output: &TracerOutput) -> TracerSample {
    let lost = output
        .text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("Lost ")?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .fold(0.0, |sum, lost| sum + lost);
    let polls = output
        .text
        .lines()
        .find_map(|l| l.strip_prefix("@polls: ")?.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    TracerSample {
        events: output.events as f64,
        lost,
        polls,
        bytes: output.bytes as f64,
        ..TracerSample::default()
    }
}

// ---------------------------------------------------------------------------
// The bpftrace script

/// Writes bench/bpftrace/<binary>.bt: probes on every function the tracer's
/// full mode would probe (see `render_script`), printing one line per hit.
fn bpftrace_script(tools: &Tools, binary: &Path) -> Result<PathBuf> {
    let table = cmd::output(
        Command::new(&tools.tracer)
            .arg("probes")
            .arg("--binary")
            .arg(binary),
    )?;
    let sites = parse_probe_table(&table).with_context(|| {
        format!(
            "reading `rt-ebpf-trace probes --binary {}`",
            binary.display()
        )
    })?;
    if !sites.iter().any(|s| s.kind == ProbeKind::Poll) {
        bail!(
            "`rt-ebpf-trace probes` listed no poll functions in {}",
            binary.display()
        );
    }
    let name = binary
        .file_name()
        .expect("a binary has a name")
        .to_string_lossy();
    let dir = cmd::repo_root().join("bench/bpftrace");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.bt"));
    let script = render_script(binary, &sites);
    // Rewritten only when it changes, so reruns don't touch the file.
    if fs::read_to_string(&path).ok().as_deref() != Some(script.as_str()) {
        fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(path)
}

/// A row's KIND in `rt-ebpf-trace probes`: everything full mode probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProbeKind {
    Poll,
    Park,
    Spawn,
    Wake,
    TaskEnd,
    Unpark,
    Await,
}

impl ProbeKind {
    const ALL: [ProbeKind; 7] = [
        ProbeKind::Poll,
        ProbeKind::Park,
        ProbeKind::Spawn,
        ProbeKind::Wake,
        ProbeKind::TaskEnd,
        ProbeKind::Unpark,
        ProbeKind::Await,
    ];

    /// As the KIND column spells it.
    fn column(self) -> &'static str {
        match self {
            ProbeKind::Poll => "poll",
            ProbeKind::Park => "park",
            ProbeKind::Spawn => "spawn",
            ProbeKind::Wake => "wake",
            ProbeKind::TaskEnd => "task end",
            ProbeKind::Unpark => "unpark",
            ProbeKind::Await => "await",
        }
    }

    /// The first word of the script's lines for this kind (one word, so
    /// that the harness can tell lines apart), and its count map's stem.
    fn word(self) -> &'static str {
        match self {
            ProbeKind::TaskEnd => "task_end",
            kind => kind.column(),
        }
    }

    /// Polls and parks are spans: a uprobe and a uretprobe, and a line that
    /// holds a start and an end.
    fn is_span(self) -> bool {
        matches!(self, ProbeKind::Poll | ProbeKind::Park)
    }

    /// Events in one of the script's lines, counted as in rt-ebpf-trace's
    /// trace: a span's start and end are two.
    fn events_per_line(self) -> u64 {
        if self.is_span() { 2 } else { 1 }
    }
}

/// Where a site's task header is, from the TASK column (poll rows name the
/// task type there instead; `raw::poll`'s header is always its first
/// argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TaskArg {
    None,
    Arg0,
    Arg1,
    /// Argument 1 points at the header pointer.
    Arg1Deref,
    Returned,
}

impl TaskArg {
    fn parse(cell: &str) -> TaskArg {
        match cell {
            "header in rdi" => TaskArg::Arg0,
            "header in rsi" => TaskArg::Arg1,
            "header at [rsi]" => TaskArg::Arg1Deref,
            "header returned" => TaskArg::Returned,
            _ => TaskArg::None,
        }
    }

    /// The bpftrace expression for the header at the function's entry.
    fn on_entry(self) -> Option<&'static str> {
        match self {
            TaskArg::Arg0 => Some("arg0"),
            TaskArg::Arg1 => Some("arg1"),
            TaskArg::Arg1Deref => Some("*(uint64 *)arg1"),
            TaskArg::None | TaskArg::Returned => None,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Site {
    kind: ProbeKind,
    /// The function's address (ADDRESS): its entry, where a hand-written
    /// uprobe goes.
    address: String,
    /// PROBE AT says `+ret`: the site is read on return.
    on_return: bool,
    task: TaskArg,
}

/// The rows of `rt-ebpf-trace probes`. Cells are read at their header's
/// column (columns come and go, and cells hold spaces: `task end`, task
/// types, symbols). A kind this doesn't know is an error: the script would
/// no longer probe what full mode probes.
fn parse_probe_table(table: &str) -> Result<Vec<Site>> {
    let mut lines = table.lines();
    let header = lines
        .find(|l| l.starts_with("KIND"))
        .context("no KIND header in the table")?;
    let columns = table_columns(header);
    let cell = |row: &str, name: &str| table_cell(row, &columns, name);
    if cell(header, "ADDRESS").is_none() {
        bail!("no ADDRESS column in {header:?}");
    }
    let mut sites = Vec::new();
    // The rows run up to the warnings and skipped sites.
    for row in lines.take_while(|row| cell(row, "ADDRESS").is_some_and(|a| a.starts_with("0x"))) {
        let kind_cell = cell(row, "KIND").unwrap_or_default();
        if kind_cell == "poll end" {
            // Where rt-ebpf-trace probes a poll's return (the instruction
            // after a vtable call site); by hand, a uretprobe on each poll
            // function does that, and the poll rows have one.
            continue;
        }
        let kind = ProbeKind::ALL
            .into_iter()
            .find(|k| k.column() == kind_cell)
            .with_context(|| {
                format!("a {kind_cell:?} row, which the bpftrace script doesn't know: {row:?}")
            })?;
        sites.push(Site {
            kind,
            address: cell(row, "ADDRESS").unwrap_or_default(),
            // Poll rows say `+ret` only when rt-ebpf-trace uses uretprobes
            // for them; by hand they always need one.
            on_return: kind == ProbeKind::Poll
                || cell(row, "PROBE AT").is_some_and(|p| p.contains("+ret")),
            task: TaskArg::parse(&cell(row, "TASK").unwrap_or_default()),
        });
    }
    Ok(sites)
}

/// A table header's column names and where each starts, in characters
/// (cells are padded by characters). Columns are two or more spaces apart;
/// a name may hold one (`FILE OFFSET`).
fn table_columns(header: &str) -> Vec<(String, usize)> {
    let chars: Vec<char> = header.chars().collect();
    let starts: Vec<usize> = (0..chars.len())
        .filter(|&i| chars[i] != ' ' && (i == 0 || (i >= 2 && chars[i - 2..i] == [' ', ' '])))
        .collect();
    starts
        .iter()
        .enumerate()
        .map(|(n, &start)| {
            let end = starts.get(n + 1).copied().unwrap_or(chars.len());
            (
                chars[start..end]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_owned(),
                start,
            )
        })
        .collect()
}

/// A row's cell under the named column, trimmed; None if the table has no
/// such column or the row stops before it.
fn table_cell(row: &str, columns: &[(String, usize)], name: &str) -> Option<String> {
    let at = columns.iter().position(|(n, _)| n == name)?;
    let start = columns[at].1;
    let end = columns.get(at + 1).map_or(usize::MAX, |c| c.1);
    let cell: String = row.chars().skip(start).take(end - start).collect();
    let cell = cell.trim();
    (!cell.is_empty()).then(|| cell.to_owned())
}

fn render_script(binary: &Path, sites: &[Site]) -> String {
    let binary = binary.display();
    let mut script = format!(
        "// Generated by `cargo xtask bench` from `rt-ebpf-trace probes --binary {binary}`:\n\
         // what one would write by hand to trace the functions rt-ebpf-trace's full\n\
         // mode probes, with bpftrace. Polls and parks are spans (a uprobe and a\n\
         // uretprobe, one line each); spawns, wakes, task ends, unparks and await\n\
         // points are one line per hit, from a uprobe at the function's entry (or a\n\
         // uretprobe where the task is read on return), where a user puts it.\n\
         // rt-ebpf-trace may place its probe on a later, cheaper instruction (its\n\
         // PROBE AT column): tokio's clone_waker and wake_by_ref start with an\n\
         // instruction the kernel must single-step, which rt-ebpf-trace avoids.\n\
         // The poll functions are local, hash-suffixed\n\
         // symbols (one per task type), so every probe is attached by address.\n\
         // Run it with `bpftrace -p PID {{this file}}`. Rewritten by every\n\
         // benchmark run.\n\n\
         BEGIN {{ printf(\"ready\\n\"); }}\n"
    );
    for (index, site) in sites.iter().enumerate() {
        let target = format!("{binary}:{}", site.address);
        let body = match site.kind {
            ProbeKind::Poll => format!(
                "uprobe:{target} {{ @poll_start[tid] = nsecs; @task[tid] = arg0; }}\n\
                 uretprobe:{target} /@poll_start[tid]/ {{\n  \
                 printf(\"poll %d {index} %llx %llu %llu\\n\", tid, @task[tid], @poll_start[tid], nsecs);\n  \
                 delete(@poll_start[tid]); @polls = count();\n}}\n"
            ),
            ProbeKind::Park => format!(
                "uprobe:{target} {{ @park_start[tid] = nsecs; }}\n\
                 uretprobe:{target} /@park_start[tid]/ {{\n  \
                 printf(\"park %d %llu %llu\\n\", tid, @park_start[tid], nsecs);\n  \
                 delete(@park_start[tid]); @parks = count();\n}}\n"
            ),
            _ => instant_probe(&target, site),
        };
        script.push_str(&body);
    }
    script.push_str("END { clear(@poll_start); clear(@park_start); clear(@task); }\n");
    script
}

/// One probe printing a line per hit: `KIND tid [header] nsecs`.
fn instant_probe(target: &str, site: &Site) -> String {
    let word = site.kind.word();
    let (probe, task) = if site.on_return {
        ("uretprobe", Some("retval"))
    } else {
        ("uprobe", site.task.on_entry())
    };
    let print = match task {
        Some(task) => format!("printf(\"{word} %d %llx %llu\\n\", tid, {task}, nsecs);"),
        None => format!("printf(\"{word} %d %llu\\n\", tid, nsecs);"),
    };
    format!("{probe}:{target} {{ {print} @{word}s = count(); }}\n")
}

// ---------------------------------------------------------------------------
// Parsing and /proc

/// A workload's `result key=value ...` line.
fn parse_result(line: &str) -> Result<Sample> {
    let Some(fields) = line.strip_prefix("result ") else {
        bail!("expected a result line, got {line:?}");
    };
    let field = |name: &str| {
        fields
            .split(' ')
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse::<f64>().ok())
            .with_context(|| format!("no {name} in {line:?}"))
    };
    Ok(Sample {
        ops: field("ops")?,
        seconds: field("elapsed_ns")? / 1e9,
        p99_ns: field("p99_ns")?,
        workload_polls: field("polls")?,
        ..Sample::default()
    })
}

/// wrk's request count, duration and p99 latency (it needs `--latency`).
fn parse_wrk(out: &str) -> Result<Sample> {
    // "  123456 requests in 2.00s, 12.34MB read"
    let totals = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .with_context(|| format!("no request count in wrk's output: {out}"))?;
    let mut words = totals.split_whitespace();
    let ops: f64 = words.next().unwrap_or("").parse()?;
    let seconds = words
        .nth(2)
        .map(|d| d.trim_end_matches(','))
        .and_then(parse_wrk_duration)
        .context("wrk's duration")?;
    // "     99%    1.23ms"
    let p99 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| parse_wrk_duration(v.trim()))
        .with_context(|| format!("no p99 in wrk's output: {out}"))?;
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        bail!("wrk saw errors: {out}");
    }
    Ok(Sample {
        ops,
        seconds,
        p99_ns: p99 * 1e9,
        ..Sample::default()
    })
}

/// "1.23ms", "2.00s", "450.00us", "1.50m" in seconds.
fn parse_wrk_duration(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Some(number * scale)
}

/// Clock ticks per second of /proc's CPU times: USER_HZ, 100 on Linux.
const TICKS_PER_SECOND: f64 = 100.0;

/// utime+stime of our reaped children, in seconds (/proc/self/stat fields
/// 16 and 17).
fn children_cpu() -> Result<f64> {
    let stat = fs::read_to_string("/proc/self/stat")?;
    stat_cpu(&stat, 13).context("reading /proc/self/stat")
}

/// utime+stime of a live process, in seconds; 0 if it is gone.
fn process_cpu(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat_cpu(&stat, 11))
        .unwrap_or(0.0)
}

/// The sum of two consecutive CPU time fields of a stat line, `first`
/// counting from after the command name (which may hold spaces).
fn stat_cpu(stat: &str, first: usize) -> Option<f64> {
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let ticks =
        fields.get(first)?.parse::<f64>().ok()? + fields.get(first + 1)?.parse::<f64>().ok()?;
    Some(ticks / TICKS_PER_SECOND)
}

fn cpus() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

// ---------------------------------------------------------------------------
// Figures and the report

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

/// "median (min–max)" of a figure.
fn spread(
    samples: &[Sample],
    figure: impl Fn(&Sample) -> f64,
    format: impl Fn(f64) -> String,
) -> String {
    spread_of(&samples.iter().map(figure).collect::<Vec<_>>(), format)
}

/// "median (min–max)" of some values; "–" when there are none.
fn spread_of(values: &[f64], format: impl Fn(f64) -> String) -> String {
    if values.is_empty() {
        return "–".to_owned();
    }
    let med = median(values.iter().copied());
    let (lo, hi) = min_max(values.iter().copied());
    format!("{} ({}–{})", format(med), format(lo), format(hi))
}

/// One row's derived figures, against the untraced samples of its point.
struct Effect {
    throughput_ratio: f64,
    p99_ratio: f64,
    /// Extra wall time per poll (flat out only: at a fixed load the wall
    /// time is the schedule's).
    added_wall_ns: Option<f64>,
    /// Extra workload CPU time per poll.
    added_cpu_ns: f64,
}

fn effect(traced: &[Sample], untraced: &[Sample], polls_per_op: f64, flat_out: bool) -> Effect {
    let med = |samples: &[Sample], f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f));
    let throughput = |s: &Sample| s.throughput();
    let p99 = |s: &Sample| s.p99_ns;
    let cpu_per_op = |s: &Sample| s.workload_cpu / s.ops;
    let wall_per_op = 1.0 / med(traced, &throughput) - 1.0 / med(untraced, &throughput);
    Effect {
        throughput_ratio: med(traced, &throughput) / med(untraced, &throughput),
        p99_ratio: med(traced, &p99) / med(untraced, &p99),
        added_wall_ns: flat_out.then(|| wall_per_op / polls_per_op * 1e9),
        added_cpu_ns: (med(traced, &cpu_per_op) - med(untraced, &cpu_per_op)) / polls_per_op * 1e9,
    }
}

/// Task polls per op of a workload at a load: the most any condition saw.
/// A tracer that sees every poll (full mode, bpftrace) counts them all, a
/// light mode only some; the workload's own estimate is the fallback.
fn polls_per_op(all: &[Measured], of: &Measured) -> f64 {
    let per_op = |samples: &[Sample], polls: &dyn Fn(&Sample) -> f64| {
        median(samples.iter().map(|s| polls(s) / s.ops))
    };
    all.iter()
        .filter(|m| m.workload == of.workload && m.load == of.load)
        .map(|m| {
            let traced = per_op(&m.samples, &|s| s.tracer.as_ref().map_or(0.0, |t| t.polls));
            traced.max(per_op(&m.samples, &|s| s.workload_polls))
        })
        .filter(|p| p.is_finite())
        .fold(0.0, f64::max)
}

struct Machine {
    date: String,
    cpus: usize,
    cpu_model: String,
    kernel: String,
    tracer_version: String,
    bpftrace_version: String,
}

impl Machine {
    fn read(tools: &Tools) -> Result<Machine> {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, m)| m.trim())
            })
            .unwrap_or("unknown")
            .to_owned();
        Ok(Machine {
            date: cmd::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?
                .trim()
                .to_owned(),
            cpus: cpus(),
            cpu_model,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")?
                .trim()
                .to_owned(),
            tracer_version: cmd::output(Command::new(&tools.tracer).arg("--version"))?
                .trim()
                .to_owned(),
            // Not installed when no run used it.
            bpftrace_version: cmd::output(Command::new("bpftrace").arg("--version"))
                .map(|version| version.trim().to_owned())
                .unwrap_or_else(|_| "no bpftrace".to_owned()),
        })
    }
}

struct Report {
    command: String,
    machine: Machine,
    runs: usize,
    results: Vec<Measured>,
    elapsed: Duration,
}

impl Report {
    fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(out, "{RESULTS_START}");
        let _ = writeln!(out, "## Results\n");
        let _ = writeln!(
            out,
            "`{}` on {}: {} CPUs ({}), Linux {}, {}, {}; {} runs per condition, \
             {:.0} s in all. Medians, with (min–max) where shown.\n",
            self.command,
            m.date,
            m.cpus,
            m.cpu_model,
            m.kernel,
            m.tracer_version,
            m.bpftrace_version,
            self.runs,
            self.elapsed.as_secs_f64()
        );
        self.effect_table(&mut out);
        self.cost_table(&mut out);
        let _ = writeln!(out, "{RESULTS_END}");
        out
    }

    fn untraced(&self, of: &Measured) -> &[Sample] {
        self.results
            .iter()
            .find(|r| {
                r.workload == of.workload && r.load == of.load && r.condition == Condition::Untraced
            })
            .map_or(&[], |r| &r.samples)
    }

    fn effect_table(&self, out: &mut String) {
        let _ = writeln!(out, "### Effect on the workload\n");
        let _ = writeln!(
            out,
            "| workload | load | condition | throughput (ops/s) | vs untraced | p99 latency | vs untraced | added wall ns/poll | added CPU ns/poll | polls/op |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        for r in &self.results {
            let untraced = self.untraced(r);
            let load = match r.offered {
                Some(rate) => format!("{} ({} {}s/s)", r.load.name(), si(rate), r.workload.op()),
                None => r.load.name().to_owned(),
            };
            let mut row = format!(
                "| {} | {load} | {} | {} | ",
                r.workload.name(),
                r.condition.label(),
                spread(&r.samples, Sample::throughput, si),
            );
            if r.condition == Condition::Untraced {
                let _ = write!(
                    row,
                    "1 | {} | 1 | | | |",
                    spread(&r.samples, |s| s.p99_ns, ns)
                );
            } else {
                let polls_per_op = polls_per_op(&self.results, r);
                let e = effect(&r.samples, untraced, polls_per_op, r.load == Load::FlatOut);
                let _ = write!(
                    row,
                    "{:.3} | {} | {:.2} | {} | {:.0} | {:.1} |",
                    e.throughput_ratio,
                    spread(&r.samples, |s| s.p99_ns, ns),
                    e.p99_ratio,
                    e.added_wall_ns
                        .map_or("–".to_owned(), |v| format!("{v:.0}")),
                    e.added_cpu_ns,
                    polls_per_op,
                );
            }
            let _ = writeln!(out, "{row}");
        }
        let _ = writeln!(out);
    }

    fn cost_table(&self, out: &mut String) {
        let _ = writeln!(out, "### Cost of the tracer\n");
        let _ = writeln!(
            out,
            "| workload | load | tracer | CPU % of one core | events/s | events per tracer CPU-s, trace writing included | drain rate (events per CPU-s while recording) | events lost | bytes/event | peak RSS |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        for r in self
            .results
            .iter()
            .filter(|r| r.condition != Condition::Untraced)
        {
            let t: Vec<TracerSample> = r.samples.iter().filter_map(|s| s.tracer.clone()).collect();
            let med = |f: &dyn Fn(&TracerSample) -> f64| median(t.iter().map(f));
            let lost_max = min_max(t.iter().map(|t| t.lost)).1;
            // Only the runs whose tracer logged its drain (none for bpftrace).
            let drain_rates: Vec<f64> = t.iter().filter_map(|t| t.drain_rate).collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1} | {} | {} | {} | {} (max {}) | {:.0} | {:.1} MiB |",
                r.workload.name(),
                r.load.name(),
                r.condition.label(),
                med(&|t| 100.0 * t.cpu / t.wall),
                si(med(&|t| t.events / t.wall)),
                si(med(&|t| t.events / t.cpu.max(1.0 / TICKS_PER_SECOND))),
                spread_of(&drain_rates, si),
                si(med(&|t| t.lost)),
                si(lost_max),
                med(&|t| t.bytes / t.events.max(1.0)),
                med(&|t| t.peak_rss_kib) / 1024.0,
            );
        }
        let _ = writeln!(out);
    }
}

/// 1234567 as "1.23M".
fn si(value: f64) -> String {
    let (scaled, suffix) = match value.abs() {
        v if v >= 1e9 => (value / 1e9, "G"),
        v if v >= 1e6 => (value / 1e6, "M"),
        v if v >= 1e3 => (value / 1e3, "k"),
        _ => (value, ""),
    };
    if scaled.fract() == 0.0 {
        format!("{scaled:.0}{suffix}")
    } else {
        format!("{scaled:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
            + suffix
    }
}

/// A latency in ns as "123 µs" / "1.23 ms".
fn ns(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2} ms", value / 1e6)
    } else {
        format!("{:.0} µs", value / 1e3)
    }
}

const RESULTS_START: &str =
    "<!-- results: written by `cargo xtask bench`; edits here are overwritten -->";
const RESULTS_END: &str = "<!-- end of results -->";

/// Replaces the results section of BENCHMARKS.md, keeping the prose around
/// it; appends one if there is none.
fn write_results(path: &Path, results: &str) -> Result<()> {
    let old = fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n\n".to_owned());
    let new = match (old.find(RESULTS_START), old.find(RESULTS_END)) {
        (Some(start), Some(end)) if start < end => {
            format!(
                "{}{}{}",
                &old[..start],
                results.trim_end(),
                &old[end + RESULTS_END.len()..]
            )
        }
        _ => format!("{}\n{}", old.trim_end(), results),
    };
    fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_come_from_clap_help() {
        let help = "  --mode <MODE>\n          What to trace [default: full] [possible values: full, light]\n";
        assert_eq!(
            parse_modes(help),
            [Some("full".to_owned()), Some("light".to_owned())]
        );
        let help = "      --mode <MODE>\n          What to record: `full` (every poll) or `light` (long polls, \n          default `1ms`)\n\n      --min-poll <D>\n          See `light`\n";
        assert_eq!(
            parse_modes(help),
            [Some("full".to_owned()), Some("light".to_owned())]
        );
        assert_eq!(parse_modes("  -o, --output <OUTPUT>\n"), [None]);
    }

    #[test]
    fn summary_polls_are_summed_by_column() {
        let summary = "recorded 1.0 s\n  worker              tid       polls       parks     busy  longest poll\n  \
                       tokio-runtime-w #0  101        1000          10    50.0%        1.0 ms\n  \
                       tokio-runtime-w #1  102          23           4     1.0%        2.0 µs\nevents: 2074 (0 lost)\n";
        assert_eq!(summary_polls(summary), Some(1023.0));
    }

    /// Rows copied from `rt-ebpf-trace probes` on bench-work, plus a spawn
    /// site read on return and a task end at `[rsi]` from the tests/fixtures
    /// spawner and multi_worker binaries (same column widths).
    const PROBE_TABLE: &str = "\
bench/target/release/bench-work: tokio 1.54.1, 20 sites
KIND      SYMBOL                                                                   ADDRESS  FILE OFFSET  PROBE AT   PROBED INSTRUCTION  COST         TASK
poll      tokio::runtime::task::raw::poll                                          0x4d640  0x4c640      +0x0 +ret  jmp 3BA10h          emulated     yield_loop::{{closure}}::{{closure}}::{{closure}}::{{closure}} (symbols)
park      tokio::runtime::scheduler::multi_thread::worker::Context::park_internal  0x64ab0  0x63ab0      +0x0 +ret  push rbp            emulated     -
spawn     tokio::runtime::task::list::OwnedTasks<S>::bind_inner                    0x432a0  0x422a0      +0x0       push rbp            emulated     header in rsi
spawn     tokio::runtime::scheduler::current_thread::Handle::spawn                 0x2a060  0x29060      +0x0 +ret  push rbp            emulated     header returned
wake      tokio::runtime::task::waker::wake_by_ref                                 0x5bb60  0x5ab60      +0x0       sub rsp,18h         SINGLE-STEP  header in rdi
task end  tokio::runtime::task::state::State::transition_to_complete               0x610d0  0x600d0      +0x0       push rax            emulated     header in rdi
task end  tokio::runtime::task::list::OwnedTasks<S>::remove                        0x483d0  0x473d0      +0x0       push r15            emulated     header at [rsi]
unpark    tokio::runtime::scheduler::multi_thread::park::Unparker::unpark          0x5b550  0x5a550      +0x0       push r14            emulated     -
await     tokio::runtime::task::waker::clone_waker                                 0x5bb30  0x5ab30      +0xd       js short 5BB4Ah     emulated     -
warning: wake probe on tokio::runtime::task::waker::wake_by_ref at 0x5bb60 single-steps `sub rsp,18h` (~20x the cost of an emulated probe): no emulated instruction on its straight-line prefix is safe to probe
not probed: tokio::runtime::task::raw::poll at 0x66e50 (BlockingTask<launch::{{closure}}>): a runtime worker thread's whole life, not a task
";

    fn site(kind: ProbeKind, address: &str, on_return: bool, task: TaskArg) -> Site {
        Site {
            kind,
            address: address.to_owned(),
            on_return,
            task,
        }
    }

    #[test]
    fn probe_rows_are_read_by_header() {
        use {ProbeKind as K, TaskArg as T};
        assert_eq!(
            parse_probe_table(PROBE_TABLE).unwrap(),
            [
                site(K::Poll, "0x4d640", true, T::None),
                site(K::Park, "0x64ab0", true, T::None),
                site(K::Spawn, "0x432a0", false, T::Arg1),
                site(K::Spawn, "0x2a060", true, T::Returned),
                site(K::Wake, "0x5bb60", false, T::Arg0),
                site(K::TaskEnd, "0x610d0", false, T::Arg0),
                site(K::TaskEnd, "0x483d0", false, T::Arg1Deref),
                site(K::Unpark, "0x5b550", false, T::None),
                site(K::Await, "0x5bb30", false, T::None),
            ]
        );
    }

    #[test]
    fn an_unknown_probe_kind_is_an_error() {
        let table = PROBE_TABLE.replace("unpark    tokio", "sleep     tokio");
        let error = format!("{:#}", parse_probe_table(&table).unwrap_err());
        assert!(error.contains("\"sleep\""), "{error}");
    }

    #[test]
    fn the_script_probes_every_kind() {
        let script = render_script(Path::new("/b"), &parse_probe_table(PROBE_TABLE).unwrap());
        for line in [
            "uprobe:/b:0x4d640 { @poll_start[tid] = nsecs; @task[tid] = arg0; }",
            "uretprobe:/b:0x4d640 /@poll_start[tid]/ {",
            "uretprobe:/b:0x64ab0 /@park_start[tid]/ {",
            r#"uprobe:/b:0x432a0 { printf("spawn %d %llx %llu\n", tid, arg1, nsecs); @spawns = count(); }"#,
            r#"uretprobe:/b:0x2a060 { printf("spawn %d %llx %llu\n", tid, retval, nsecs); @spawns = count(); }"#,
            r#"uprobe:/b:0x5bb60 { printf("wake %d %llx %llu\n", tid, arg0, nsecs); @wakes = count(); }"#,
            r#"uprobe:/b:0x610d0 { printf("task_end %d %llx %llu\n", tid, arg0, nsecs); @task_ends = count(); }"#,
            r#"uprobe:/b:0x483d0 { printf("task_end %d %llx %llu\n", tid, *(uint64 *)arg1, nsecs); @task_ends = count(); }"#,
            r#"uprobe:/b:0x5b550 { printf("unpark %d %llu\n", tid, nsecs); @unparks = count(); }"#,
            r#"uprobe:/b:0x5bb30 { printf("await %d %llu\n", tid, nsecs); @awaits = count(); }"#,
        ] {
            assert!(
                script.lines().any(|l| l == line),
                "no {line:?} in:\n{script}"
            );
        }
        // One probe per instant site, two per span site.
        let probes = script.lines().filter(|l| l.contains("probe:/b:")).count();
        assert_eq!(probes, 2 * 2 + 7);
    }

    #[test]
    fn spans_count_two_events_and_instants_one() {
        assert_eq!(record_events("poll 7 0 55d0c0 100 200\n"), Some(2));
        assert_eq!(record_events("park 7 100 200\n"), Some(2));
        assert_eq!(record_events("wake 7 55d0c0 100\n"), Some(1));
        assert_eq!(record_events("task_end 7 55d0c0 100\n"), Some(1));
        assert_eq!(record_events("await 7 100\n"), Some(1));
        assert_eq!(record_events("@wakes: 12\n"), None);
        assert_eq!(record_events("ready\n"), None);
    }

    #[test]
    fn the_drain_line_gives_events_per_cpu_second() {
        let log = "[INFO  rt_ebpf_trace::record::session] attached 20 probes in 1.2ms\n\
                   [INFO  rt_ebpf_trace::record] drain: 3000000 events, 1500000000 ns of CPU while recording\n";
        assert_eq!(drain_rate(log), Some(2e6));
        assert_eq!(
            drain_rate("drain: 500 events, 250000000 ns of CPU while recording"),
            Some(2000.0)
        );
        assert_eq!(
            drain_rate("drain: 5 events, 0 ns of CPU while recording"),
            None
        );
        assert_eq!(drain_rate("attached 20 probes\nrecorded 1.0 s\n"), None);
    }

    #[test]
    fn a_missing_figure_is_a_dash() {
        assert_eq!(spread_of(&[], si), "–");
        assert_eq!(spread_of(&[3e6, 1e6, 2e6], si), "2M (1M–3M)");
    }

    #[test]
    fn wrk_output_is_parsed() {
        let out = "  Latency Distribution\n     50%  200.00us\n     99%    1.50ms\n  \
                   60000 requests in 2.00s, 7.00MB read\nRequests/sec:  30000.00\n";
        let sample = parse_wrk(out).unwrap();
        assert_eq!(sample.ops, 60000.0);
        assert_eq!(sample.seconds, 2.0);
        assert!((sample.p99_ns - 1.5e6).abs() < 1.0);
    }

    #[test]
    fn results_replace_the_old_section_only() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("BENCHMARKS.md");
        fs::write(
            &path,
            format!("prose\n{RESULTS_START}\nold\n{RESULTS_END}\nmore prose\n"),
        )
        .unwrap();
        write_results(&path, &format!("{RESULTS_START}\nnew\n{RESULTS_END}\n")).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!("prose\n{RESULTS_START}\nnew\n{RESULTS_END}\nmore prose\n")
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stat_cpu_skips_the_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime cutime cstime
        let stat = "42 (a b) S 1 1 1 0 -1 0 0 0 0 0 150 50 7 3 20 0";
        assert_eq!(stat_cpu(stat, 11), Some(2.0));
        assert_eq!(stat_cpu(stat, 13), Some(0.1));
    }
}
