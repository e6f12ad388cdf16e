//! The report: the markdown tables of BENCHMARKS.md's "Results" section
//! (the effect on each workload, the cost of each tracer), written between
//! markers so that the prose around them stays.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use super::plan::{Condition, Load, Measured, Sample, TracerSample};
use super::proc::{TICKS_PER_SECOND, cpus};
use super::stats::{effect, median, min_max, polls_per_op};
use super::tools::Tools;
use crate::cmd;

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

pub(super) struct Machine {
    date: String,
    cpus: usize,
    cpu_model: String,
    kernel: String,
    tracer_version: String,
    bpftrace_version: String,
}

impl Machine {
    pub fn read(tools: &Tools) -> Result<Machine> {
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

pub(super) struct Report {
    pub command: String,
    pub machine: Machine,
    pub runs: usize,
    pub results: Vec<Measured>,
    pub elapsed: Duration,
}

impl Report {
    pub fn markdown(&self) -> String {
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
                    "{:.3} | {} | {:.2} | {} | {} | {} |",
                    e.throughput_ratio,
                    spread(&r.samples, |s| s.p99_ns, ns),
                    e.p99_ratio,
                    e.added_wall_ns
                        .map_or("–".to_owned(), |v| format!("{v:.0}")),
                    e.added_cpu_ns.map_or("–".to_owned(), |v| format!("{v:.0}")),
                    if polls_per_op > 0.0 {
                        format!("{polls_per_op:.1}")
                    } else {
                        "–".to_owned()
                    },
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

pub(super) const RESULTS_START: &str =
    "<!-- results: written by `cargo xtask bench`; edits here are overwritten -->";
pub(super) const RESULTS_END: &str = "<!-- end of results -->";

/// Replaces the section of BENCHMARKS.md between `start` and `end` (the
/// markers are part of `section`), keeping the prose around it; appends it
/// if there is none.
pub(super) fn write_section(path: &Path, start: &str, end: &str, section: &str) -> Result<()> {
    let old = fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n\n".to_owned());
    let new = match (old.find(start), old.find(end)) {
        (Some(at), Some(until)) if at < until => {
            format!(
                "{}{}{}",
                &old[..at],
                section.trim_end(),
                &old[until + end.len()..]
            )
        }
        _ => format!("{}\n\n{}", old.trim_end(), section),
    };
    fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_figure_is_a_dash() {
        assert_eq!(spread_of(&[], si), "–");
        assert_eq!(spread_of(&[3e6, 1e6, 2e6], si), "2M (1M–3M)");
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
        write_section(
            &path,
            RESULTS_START,
            RESULTS_END,
            &format!("{RESULTS_START}\nnew\n{RESULTS_END}\n"),
        )
        .unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!("prose\n{RESULTS_START}\nnew\n{RESULTS_END}\nmore prose\n")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
