//! The tracer of a condition, running beside the workload: rt-ebpf-trace
//! (a recording, or its watch tier) or bpftrace with the generated script.
//! Threads read its output, so that a full pipe never stalls it, and sample
//! its memory; the attach is awaited on its output (`-v`'s "attached N
//! probes", the script's `ready`).
//!
//! Figures come from what each tool writes for programs: a recording's
//! `--summary-json` (events, lost events, polls, trace size, its CPU while
//! recording), the watch tier's trace metadata (its kept window is Chrome
//! JSON, whose `metadata` object has the counts). bpftrace has no such
//! output: its records are counted as they are read, and its exit lines
//! parsed ([`parse::bpftrace_lost`], [`parse::bpftrace_polls`]).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::bpftrace;
use super::parse;
use super::plan::{Condition, TracerSample, Workload};
use super::proc::{children_cpu, cpus, sample_peak_rss, wait_timeout};
use super::tools::Tools;
use crate::cmd;

/// A running tracer: rt-ebpf-trace or bpftrace, with threads reading its
/// output (so that a full pipe never stalls it) and sampling its memory.
pub(super) struct Tracer {
    child: Child,
    kind: Condition,
    /// Gets one message once the probes are attached.
    attached: mpsc::Receiver<()>,
    output: thread::JoinHandle<TracerOutput>,
    peak_rss: thread::JoinHandle<f64>,
    trace: PathBuf,
    /// A recording's `--summary-json`.
    summary: PathBuf,
}

/// What the output-reading thread collected.
#[derive(Default)]
struct TracerOutput {
    text: String,
    /// bpftrace: events in its records (see [`bpftrace::record_events`])
    /// and the records' bytes.
    events: u64,
    bytes: u64,
}

impl Tracer {
    pub fn start(
        tools: &Tools,
        condition: &Condition,
        workload: Workload,
        pid: u32,
    ) -> Result<Tracer> {
        // The watch tier's figures are read from its window's metadata,
        // plain JSON in a Chrome JSON trace (`watch` writes Perfetto by
        // default, JSON for a `.json` name).
        let extension = if *condition == Condition::Watch {
            "json"
        } else {
            "pftrace"
        };
        let trace = tools
            .scratch
            .join(format!("trace-{}.{extension}", workload.name()));
        let summary = tools
            .scratch
            .join(format!("summary-{}.json", workload.name()));
        let script = match condition {
            Condition::Bpftrace => Some(bpftrace::write_script(tools.workload_binary(workload))?),
            _ => None,
        };
        let mut command = match (condition, &script) {
            (Condition::Tracer(mode), _) => {
                let mut command = Command::new(&tools.tracer);
                // -v logs "attached N probes", which is our go signal.
                command
                    .args(["-v", "--pid", &pid.to_string(), "-o"])
                    .arg(&trace)
                    .arg("--summary-json")
                    .arg(&summary);
                if let Some(mode) = mode {
                    command.args(["--mode", mode]);
                }
                command
            }
            (Condition::Watch, _) => {
                let mut command = Command::new(&tools.tracer);
                // -v logs "attached N park probes…", the go signal.
                command
                    .args(["watch", "-v", "--quiet", "--pid", &pid.to_string(), "-o"])
                    .arg(&trace);
                command
            }
            (_, Some(script)) => {
                let mut command = Command::new("bpftrace");
                // The same buffer memory as the tracer's default 16 MiB ring
                // buffer: 2048 pages per CPU.
                let pages = 16 * 1024 * 1024 / 4096 / cpus();
                command
                    .env("BPFTRACE_PERF_RB_PAGES", pages.to_string())
                    .args(["-p", &pid.to_string()])
                    .arg(&script.path);
                command
            }
            (Condition::Untraced | Condition::Bpftrace, _) => {
                bail!("no tracer to start for {}", condition.label())
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
        let output = match script {
            None => {
                let stdout = thread::spawn(move || read_all(stdout));
                thread::spawn(move || {
                    let mut out = watch_lines(stderr, &attached_tx, |l| {
                        l.contains("attached") && l.contains("probes")
                    });
                    out.text.push_str(&stdout.join().unwrap_or_default());
                    out
                })
            }
            Some(script) => {
                let copy = trace.clone();
                let stderr = thread::spawn(move || read_all(stderr));
                thread::spawn(move || {
                    let mut out = copy_bpftrace_output(stdout, &copy, &script, &attached_tx);
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
            summary,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_until_attached(&mut self) -> Result<()> {
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
    pub fn finish(mut self, go: Instant, cpu_at_go: f64) -> Result<TracerSample> {
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
        let figures = match self.kind {
            Condition::Bpftrace => Ok(bpftrace_figures(&output)),
            Condition::Watch => watch_figures(&self.trace),
            _ => recording_figures(&self.summary).map(|(sample, _)| sample),
        };
        let mut sample = figures.with_context(|| format!("the tracer said: {}", output.text))?;
        sample.cpu = cpu;
        sample.wall = wall;
        sample.peak_rss_kib = peak_rss_kib;
        let _ = fs::remove_file(&self.trace);
        let _ = fs::remove_file(&self.summary);
        Ok(sample)
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
fn copy_bpftrace_output(
    pipe: impl Read,
    path: &Path,
    script: &bpftrace::Script,
    ready: &mpsc::Sender<()>,
) -> TracerOutput {
    let mut out = TracerOutput::default();
    let Ok(file) = fs::File::create(path) else {
        return out;
    };
    let mut file = std::io::BufWriter::new(file);
    let mut reader = BufReader::with_capacity(1 << 16, pipe);
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        if let Some(events) = bpftrace::record_events(&line, &script.events_per_line) {
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

/// A JSON file's object, read with serde_json.
fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).with_context(|| format!("no {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// A figure of a JSON object, 0 when it is missing (an older tracer).
fn number(json: &Value, key: &str) -> f64 {
    json[key].as_f64().unwrap_or(0.0)
}

/// What rendering a recording's trace cost, in ms (`--formats`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct RenderCost {
    pub render_ms: f64,
    pub render_cpu_ms: f64,
    pub symbolize_cpu_ms: f64,
    /// Loading the binary's symbols while recording (0 from a tracer that
    /// does not).
    pub symbolize_prepare_cpu_ms: f64,
}

/// A recording's figures, from its `--summary-json`. The drain rate is
/// events per CPU-second while recording, trace writing after it excluded;
/// None without that CPU time (an older tracer).
pub(super) fn recording_figures(summary: &Path) -> Result<(TracerSample, RenderCost)> {
    let json = read_json(summary)?;
    let events = number(&json, "events");
    let cost = &json["tracer_cost"];
    let recording_cpu_ns = number(cost, "recording_cpu_ns");
    let sample = TracerSample {
        events,
        lost: number(&json, "lost_events"),
        polls: number(&json, "polls"),
        bytes: number(&json, "trace_bytes"),
        drain_rate: (recording_cpu_ns > 0.0).then(|| events / (recording_cpu_ns / 1e9)),
        ..TracerSample::default()
    };
    let render = RenderCost {
        render_ms: number(cost, "render_ms"),
        render_cpu_ms: number(cost, "render_cpu_ms"),
        symbolize_cpu_ms: number(cost, "symbolize_cpu_ms"),
        symbolize_prepare_cpu_ms: number(cost, "symbolize_prepare_cpu_ms"),
    };
    Ok((sample, render))
}

/// The watch tier's figures, from its kept window's metadata (a Chrome JSON
/// trace: `{"traceEvents": [...], "metadata": {...}}`). It has no poll
/// probe, so no poll count.
fn watch_figures(trace: &Path) -> Result<TracerSample> {
    let bytes = fs::metadata(trace)
        .with_context(|| format!("the tracer wrote no {}", trace.display()))?
        .len();
    let metadata = &read_json(trace)?["metadata"];
    Ok(TracerSample {
        events: number(metadata, "events"),
        lost: number(metadata, "lost_events"),
        bytes: bytes as f64,
        ..TracerSample::default()
    })
}

/// bpftrace's figures. Its events were counted as its records were read:
/// a poll or park line holds a start and an end, two events as in
/// rt-ebpf-trace's trace, the other lines one.
fn bpftrace_figures(output: &TracerOutput) -> TracerSample {
    TracerSample {
        events: output.events as f64,
        lost: parse::bpftrace_lost(&output.text),
        polls: parse::bpftrace_polls(&output.text).unwrap_or(0.0),
        bytes: output.bytes as f64,
        ..TracerSample::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recordings_figures_come_from_its_summary_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("summary.json");
        fs::write(
            &path,
            r#"{"version": 1, "events": 3000000, "lost_events": 12, "polls": 1400000,
                "trace_bytes": 45000000, "workers": [],
                "tracer_cost": {"recording_cpu_ns": 1500000000, "render_ms": 900,
                                "render_cpu_ms": 800, "symbolize_cpu_ms": 20,
                                "symbolize_prepare_cpu_ms": 150}}"#,
        )
        .unwrap();
        let (sample, render) = recording_figures(&path).unwrap();
        assert_eq!(sample.events, 3e6);
        assert_eq!(sample.lost, 12.0);
        assert_eq!(sample.polls, 1.4e6);
        assert_eq!(sample.bytes, 45e6);
        assert_eq!(sample.drain_rate, Some(2e6));
        assert_eq!(
            render,
            RenderCost {
                render_ms: 900.0,
                render_cpu_ms: 800.0,
                symbolize_cpu_ms: 20.0,
                symbolize_prepare_cpu_ms: 150.0
            }
        );
        // An older tracer without tracer_cost: no drain rate, not a made-up one.
        fs::write(&path, r#"{"events": 10, "lost_events": 0, "polls": 4}"#).unwrap();
        let (sample, _) = recording_figures(&path).unwrap();
        assert_eq!(sample.drain_rate, None);
        fs::write(&path, "events: 10").unwrap();
        assert!(recording_figures(&path).is_err());
    }

    #[test]
    fn the_watch_tiers_figures_come_from_its_trace_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("window.json");
        fs::write(
            &path,
            r#"{"traceEvents":[
{"ph":"M","name":"process_name","pid":1,"args":{"name":"w"}}
],"metadata":{"tool":"rt-ebpf-trace watch","events":5000,"lost_events":3}}
"#,
        )
        .unwrap();
        let sample = watch_figures(&path).unwrap();
        assert_eq!(sample.events, 5000.0);
        assert_eq!(sample.lost, 3.0);
        assert_eq!(sample.bytes, fs::metadata(&path).unwrap().len() as f64);
        assert!(watch_figures(&dir.path().join("none.json")).is_err());
    }
}
