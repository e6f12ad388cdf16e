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
//!
//! The modules follow a run: [`tools`] (build, install), [`plan`] (what is
//! measured), [`run`] (one point: workload, load, figures), [`tracer`] (the
//! tracer of a condition and its figures: rt-ebpf-trace's `--summary-json`,
//! never its text for people), [`bpftrace`] (the baseline script, from
//! tracer-probes' plan), [`parse`] (the external tools' text), [`proc`]
//! (CPU and memory from /proc), [`stats`] and [`report`] (the tables).
//! `--formats` is [`formats`].

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Result, bail};

use crate::cmd;
use crate::root;

mod bpftrace;
mod formats;
mod parse;
mod plan;
mod proc;
mod report;
mod run;
mod stats;
mod tools;
mod tracer;

use plan::{Condition, Plan, Workload};
use report::{Machine, RESULTS_END, RESULTS_START, Report};
use tools::ensure_tool;

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
    /// see `bench/formats.rs`); `--runs` is how often the 5 s Perfetto run
    /// is repeated (default 3).
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
    let tools = tools::build(options)?;
    let plan = Plan::new(options, &tools.tracer)?;
    if plan.conditions.contains(&Condition::Bpftrace) {
        ensure_tool("bpftrace")?;
        tools::ensure_tracefs()?;
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
        results.extend(run::measure_workload(&plan, &tools, workload)?);
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
        report::write_section(&path, RESULTS_START, RESULTS_END, &text)?;
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
