//! `cargo xtask bench --formats`: what the trace formats cost, on the HTTP
//! workload flat out (wrk, 32 connections) traced in full mode: bytes per
//! event, the rendering rate after the stop, the tracer's peak memory, for
//! Perfetto protobuf and Chrome JSON side by side, and a 60-second Perfetto
//! run for the memory bound and the file size a minute makes.
//!
//! Bytes per event depend on the workload only; the rate and the memory are
//! timings on a shared machine (see the note the table carries). The 5 s
//! Perfetto row, the one the rendering target is judged on, is run several
//! times (`--runs`, default 3) and shows the median run (the upper of the
//! two middle ones for an even count) with the range: one run's rendering
//! rate varied by ±25 % here from one minute to the next.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::Options;
use super::proc::{sample_peak_rss, wait_timeout};
use super::report::write_section;
use super::tools::{Tools, build};
use super::tracer::recording_figures;
use crate::cmd::{self, step};

const START: &str =
    "<!-- trace formats: written by `cargo xtask bench --formats`; edits here are overwritten -->";
const END: &str = "<!-- end of trace formats -->";

struct Run {
    label: &'static str,
    extension: &'static str,
    seconds: u64,
    /// Runs of it; the table shows the median (by rendering rate).
    repeats: usize,
}

#[derive(Default)]
struct Figures {
    events: f64,
    bytes: f64,
    render_ms: f64,
    render_cpu_ms: f64,
    symbolize_cpu_ms: f64,
    symbolize_prepare_cpu_ms: f64,
    lost: f64,
    peak_rss_kib: f64,
}

pub(super) fn run(options: &Options) -> Result<()> {
    let tools = build(options)?;
    let short = if options.quick { 3 } else { 5 };
    let repeats = options
        .runs
        .unwrap_or(if options.quick { 1 } else { 3 })
        .max(1);
    let mut runs = vec![
        Run {
            label: "Perfetto (.pftrace)",
            extension: "pftrace",
            seconds: short,
            repeats,
        },
        Run {
            label: "Chrome JSON (.json)",
            extension: "json",
            seconds: short,
            repeats: 1,
        },
        Run {
            label: "Perfetto, gzipped (.pftrace.gz)",
            extension: "pftrace.gz",
            seconds: short,
            repeats: 1,
        },
    ];
    if !options.quick {
        runs.push(Run {
            label: "Perfetto (.pftrace), 60 s",
            extension: "pftrace",
            seconds: 60,
            repeats: 1,
        });
    }
    let mut table = String::new();
    let _ = writeln!(table, "{START}");
    let _ = writeln!(
        table,
        "\nTrace formats (`cargo xtask bench --formats{}`): the HTTP workload flat out, full mode. \
         Rendering and memory are timings on a shared 2-core VM.\n",
        if options.quick { " --quick" } else { "" }
    );
    let _ = writeln!(
        table,
        "| format | traced | events | trace size | bytes/event | rendering after the stop (wall) | rendering per CPU-second (of which symbolizing; symbols prepared while recording) | events lost | tracer peak RSS |"
    );
    let _ = writeln!(
        table,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for run in &runs {
        step(&format!(
            "tracing the HTTP workload for {} s into {}",
            run.seconds, run.label
        ));
        let mut all = (0..run.repeats)
            .map(|_| measure(&tools, run))
            .collect::<Result<Vec<_>>>()?;
        all.sort_by(|a, b| a.cpu_rate().total_cmp(&b.cpu_rate()));
        let spread = match (all.first(), all.last()) {
            (Some(low), Some(high)) if all.len() > 1 => format!(
                "; median of {} runs, {:.1}–{:.1} M",
                all.len(),
                low.cpu_rate() / 1e6,
                high.cpu_rate() / 1e6
            ),
            _ => String::new(),
        };
        let f = &all[all.len() / 2];
        let rate = f.events / (f.render_ms.max(1.0) / 1e3);
        let cpu_rate = f.cpu_rate();
        let _ = writeln!(
            table,
            "| {} | {} s | {:.0} | {:.1} MB | {:.1} | {:.1} M events/s ({:.0} ms) | {:.1} M events/s ({:.0} ms CPU, {:.0} ms symbolizing; {:.0} ms prepared while recording{spread}) | {:.0} | {:.0} MiB |",
            run.label,
            run.seconds,
            f.events,
            f.bytes / 1e6,
            f.bytes / f.events.max(1.0),
            rate / 1e6,
            f.render_ms,
            cpu_rate / 1e6,
            f.render_cpu_ms,
            f.symbolize_cpu_ms,
            f.symbolize_prepare_cpu_ms,
            f.lost,
            f.peak_rss_kib / 1024.0
        );
    }
    let _ = writeln!(table, "\n{END}");
    println!("{table}");
    if !options.no_write {
        let path = cmd::repo_root().join("BENCHMARKS.md");
        write_section(&path, START, END, &table)?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

impl Figures {
    /// Events rendered per CPU-second of rendering.
    fn cpu_rate(&self) -> f64 {
        self.events / (self.render_cpu_ms.max(1.0) / 1e3)
    }
}

fn measure(tools: &Tools, run: &Run) -> Result<Figures> {
    let mut server = Command::new(&tools.http_server)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the HTTP workload")?;
    let mut ready = String::new();
    BufReader::new(server.stdout.take().context("stdout")?).read_line(&mut ready)?;
    let address = ready
        .trim()
        .strip_prefix("ready ")
        .context("the HTTP server did not say where it listens")?
        .to_owned();
    let trace = tools.scratch.join(format!("formats.{}", run.extension));
    let summary = tools.scratch.join("formats-summary.json");
    let mut tracer = Command::new(&tools.tracer)
        .args(["-v", "--pid", &server.id().to_string(), "--duration"])
        .arg(format!("{}s", run.seconds))
        .arg("-o")
        .arg(&trace)
        .arg("--summary-json")
        .arg(&summary)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the tracer")?;
    let tracer_pid = tracer.id();
    let peak = thread::spawn(move || sample_peak_rss(tracer_pid));
    let mut stderr = BufReader::new(tracer.stderr.take().context("stderr")?);
    let mut log = String::new();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line)? == 0 {
            bail!("the tracer exited before attaching: {log}");
        }
        log.push_str(&line);
        if line.contains("attached") && line.contains("probes") {
            break;
        }
    }
    let rest = thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        rest
    });
    cmd::output(Command::new("wrk").args([
        "-t1",
        "-c32",
        &format!("-d{}s", run.seconds + 1),
        &format!("http://{address}/"),
    ]))?;
    let status = wait_timeout(&mut tracer, Duration::from_secs(600))?;
    log.push_str(&rest.join().unwrap_or_default());
    server.kill().ok();
    server.wait()?;
    if !status.success() {
        bail!("the tracer failed ({status}): {log}");
    }
    let (recorded, cost) =
        recording_figures(&summary).with_context(|| format!("the tracer said: {log}"))?;
    let figures = Figures {
        events: recorded.events,
        bytes: fs::metadata(&trace)?.len() as f64,
        render_ms: cost.render_ms,
        render_cpu_ms: cost.render_cpu_ms,
        symbolize_cpu_ms: cost.symbolize_cpu_ms,
        symbolize_prepare_cpu_ms: cost.symbolize_prepare_cpu_ms,
        lost: recorded.lost,
        peak_rss_kib: peak.join().unwrap_or(0.0),
    };
    let _ = fs::remove_file(&trace);
    let _ = fs::remove_file(&summary);
    Ok(figures)
}
