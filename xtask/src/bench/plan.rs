//! What is measured: the workloads (bench/), the loads (flat out, then half
//! the untraced maximum), the conditions (untraced, rt-ebpf-trace in each
//! of its modes, its watch tier, an equivalent bpftrace script), fixed in a
//! [`Plan`] before the first run, and the figures one run yields.
//!
//! The tracer's modes come from its `--help`, so that the benchmark of an
//! older tracer (one mode, no `watch`) still runs.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use super::Options;
use crate::cmd;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Workload {
    Http,
    /// bench-kv-server: a Redis-like request/response server, many connections.
    Kv,
    Spawn,
    PingPong,
    Yield,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Http,
        Workload::Kv,
        Workload::Spawn,
        Workload::PingPong,
        Workload::Yield,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Http => "http",
            Workload::Kv => "kv",
            Workload::Spawn => "spawn",
            Workload::PingPong => "pingpong",
            Workload::Yield => "yield",
        }
    }

    /// What one op is, for the table.
    pub fn op(self) -> &'static str {
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
    pub fn batch(self) -> u64 {
        match self {
            Workload::Http | Workload::Kv => 1,
            Workload::Spawn => 3000,
            Workload::PingPong => 5000,
            Workload::Yield => 2000,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Load {
    FlatOut,
    /// Half the untraced maximum, as measured flat out in the same run.
    Half,
}

impl Load {
    pub fn name(self) -> &'static str {
        match self {
            Load::FlatOut => "flat out",
            Load::Half => "50%",
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub(super) enum Condition {
    Untraced,
    /// rt-ebpf-trace; `None` when it has no `--mode` option.
    Tracer(Option<String>),
    /// `rt-ebpf-trace watch`, the always-on tier (no per-poll probe).
    Watch,
    Bpftrace,
}

impl Condition {
    pub fn label(&self) -> String {
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
pub(super) struct Plan {
    pub runs: usize,
    pub conditions: Vec<Condition>,
    /// Length of every run. Flat-out runs are timed too, not a fixed amount
    /// of work: tracing slows the micro workloads down many times over, and
    /// fixed work would make the whole benchmark last as long.
    pub seconds: f64,
}

impl Plan {
    /// The plan for `options` and the tracer at `tracer` (its modes and
    /// whether it has `watch`, from its `--help`).
    pub fn new(options: &Options, tracer: &Path) -> Result<Plan> {
        let runs = options.runs.unwrap_or(if options.quick { 2 } else { 5 });
        if runs == 0 {
            bail!("--runs must be at least 1");
        }
        let mut conditions = vec![Condition::Untraced];
        conditions.extend(tracer_modes(tracer)?.into_iter().map(Condition::Tracer));
        if has_watch(tracer)? {
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
#[derive(Clone, Debug, Default)]
pub(super) struct Sample {
    pub ops: f64,
    pub seconds: f64,
    pub p99_ns: f64,
    /// CPU time of the workload process (the server, for HTTP).
    pub workload_cpu: f64,
    /// The workload's own count of the polls it caused (0 if unknown).
    pub workload_polls: f64,
    pub tracer: Option<TracerSample>,
}

impl Sample {
    pub fn throughput(&self) -> f64 {
        self.ops / self.seconds
    }
}

#[derive(Clone, Debug, Default)]
pub(super) struct TracerSample {
    /// CPU time from the go to the tracer's exit, and that wall time.
    pub cpu: f64,
    pub wall: f64,
    pub events: f64,
    pub lost: f64,
    /// Polls seen by the tracer (0 if it didn't say).
    pub polls: f64,
    pub bytes: f64,
    pub peak_rss_kib: f64,
    /// Events drained per CPU-second while recording, trace writing after
    /// it excluded (from the tracer's log; None if it didn't say).
    pub drain_rate: Option<f64>,
}

/// All samples of one workload, load and condition.
pub(super) struct Measured {
    pub workload: Workload,
    pub load: Load,
    pub condition: Condition,
    /// The offered load of a fixed-load point, in ops a second.
    pub offered: Option<f64>,
    pub samples: Vec<Sample>,
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
}
