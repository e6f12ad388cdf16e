//! One recording session: attach, drain the ring buffers into a spill file
//! until a stop condition, then render the trace from it and finalize.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::signal::unix::{SignalKind, signal};
use tracer_timeline::summary::Summary;

use crate::output_file::OutputFile;

use super::drain::Recorder;
use super::loader;
use super::preflight::{self, KernelPaths};
use super::sink::{RenderInput, render};
use super::spill::SpillWriter;
use super::status::StatusLine;
use super::target::Target;
use super::trace_file::TraceFile;
use super::trace_size::{SizeCheck, SizeWatch};
use crate::clock::{monotonic_ns, process_cpu_ns};

/// How often the ring buffers are drained. At 1M events/s of 56 bytes, the
/// default 16 MiB ring buffer holds ~300 ms: far more than this.
const DRAIN_INTERVAL: Duration = Duration::from_millis(5);

pub enum TargetSpec {
    /// A process that is already running.
    Pid(u32),
    /// A command to launch and trace from its start.
    Command(Vec<OsString>),
}

/// What to record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every poll and park, and the scheduler's events (spawns, wakes, task
    /// ends, unparks).
    Full,
    /// For always-on use: parks and long polls only.
    Light,
    /// Every poll and nothing else (no parks, no scheduler events).
    Polls,
}

impl Mode {
    /// Which probes this mode attaches besides the polls.
    pub fn probe_set(self) -> loader::ProbeSet {
        loader::ProbeSet {
            parks: self != Mode::Polls,
            scheduler_events: self == Mode::Full,
        }
    }
}

pub struct RecordOptions {
    pub target: TargetSpec,
    /// The trace files: one recording, rendered into each (at least one).
    pub output: Vec<PathBuf>,
    pub duration: Option<Duration>,
    pub mode: Mode,
    pub settings: loader::Settings,
    /// CPU samples per second per CPU; None for no sampling.
    pub sample_hz: Option<u64>,
    /// Where to write the samples as folded stacks, if anywhere.
    pub folded: Option<PathBuf>,
    /// Where to write the summary as JSON, if anywhere.
    pub summary_json: Option<PathBuf>,
    /// Stop recording when the trace is estimated to reach this size.
    pub max_size: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Duration,
    Interrupted,
    Terminated,
    TargetExited,
    /// The trace reached `--max-size` (estimated).
    MaxSize,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Duration => "the duration ran out",
            StopReason::Interrupted => "interrupted (Ctrl-C)",
            StopReason::Terminated => "terminated (SIGTERM/SIGHUP)",
            StopReason::TargetExited => "the target exited",
            StopReason::MaxSize => "the trace reached --max-size (estimated from the events)",
        })
    }
}

pub struct Outcome {
    pub summary: Summary,
    pub stop: StopReason,
    /// The exit status of a command we launched, if it exited.
    pub command_status: Option<ExitStatus>,
    /// Polls shorter than `--min-poll`, counted in the kernel, not recorded.
    pub short_polls: u64,
    /// The probes being removed; join before exiting.
    pub detaching: std::thread::JoinHandle<()>,
    /// The outputs after the first (the summary names the first), with
    /// their sizes.
    pub also_written: Vec<(PathBuf, u64)>,
}

/// Records one process into each of `options.output`. On any error after the
/// outputs were opened, no unfinished file is left at an output path.
pub async fn record(options: RecordOptions) -> Result<Outcome> {
    loader::check_object()?;
    preflight::check_privileges()?;
    preflight::check_kernel(&KernelPaths::system())?;

    // Listen for signals before anything is attached, so a Ctrl-C during the
    // set-up still ends with a clean exit rather than a killed tracer.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;

    let mut target = match &options.target {
        TargetSpec::Pid(pid) => Target::existing(*pid)?,
        TargetSpec::Command(command) => Target::launch_held(command)?,
    };
    let plan = tracer_probes::discover(&target.exe)
        .with_context(|| format!("process {} ({})", target.pid, target.name))?;
    for warning in &plan.warnings {
        log::warn!("{warning}");
    }
    // Every output is checked, and can be written, before anything is attached.
    let outputs = check_outputs(&options.output)?;
    let folded = options
        .folded
        .as_deref()
        .map(OutputFile::check)
        .transpose()?;
    let summary_json = options
        .summary_json
        .as_deref()
        .map(OutputFile::check)
        .transpose()?;
    // Next to the trace, on the file system that must hold the trace anyway.
    let spill = SpillWriter::create_in(&outputs[0].scratch_dir())?;
    let mut trace_files = outputs
        .into_iter()
        .map(TraceFile::create)
        .collect::<Result<Vec<_>>>()?;

    let loading = std::time::Instant::now();
    let mut probes = loader::load(&plan, target.pid, &options.settings)?;
    log::info!("loaded the eBPF programs in {:?}", loading.elapsed());
    let start_ns = monotonic_ns();
    let attaching = std::time::Instant::now();
    probes
        .attach(&plan, &target.exe, target.pid, options.mode.probe_set())
        .map_err(|err| target.attach_error(err))?;
    log::info!(
        "attached {} probes in {:?}",
        probes.attached(),
        attaching.elapsed()
    );
    // What the eBPF programs log (aya-log), shown through `log`.
    let mut ebpf_logger = probes.logger();
    probes.set_enabled(true)?;
    let recording_cpu_start = process_cpu_ns();
    if let Some(hz) = options.sample_hz {
        probes.start_sampling(hz)?;
    }
    let mut stack_ring = probes.take_stacks()?;
    let mut ring = probes.take_events()?;
    target.release()?;
    if !target.launched() && !target.is_alive() {
        return Err(anyhow!(
            "process {} exited while the probes were being attached",
            target.pid
        ));
    }

    let mut recorder = Recorder::new(target.pid, spill);
    // The stop then only looks addresses up (see `symbol_prep`).
    recorder.prepare_symbols(&target.exe);
    let mut status = StatusLine::new();
    // --max-size holds for the biggest of the outputs.
    let bytes_per_event = trace_files
        .iter()
        .map(|file| file.format().bytes_per_event())
        .max()
        .unwrap_or(0);
    let mut size = SizeWatch::new(options.max_size, bytes_per_event);
    let mut status_tick = tokio::time::interval(Duration::from_millis(500));
    // The probes don't wake the tracer (that would cost the target an
    // interrupt per event): it drains on this tick. A backlog is drained in
    // bounded batches, one per tick, ticks following each other at once.
    let mut drain_tick = tokio::time::interval(DRAIN_INTERVAL);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sleep = crate::clock::sleep_for_or_forever(options.duration);
    tokio::pin!(sleep);

    let stop = loop {
        tokio::select! {
            _ = drain_tick.tick() => {
                if recorder.drain_batch(&mut ring)? {
                    // More is waiting: come back without waiting a tick.
                    drain_tick.reset_immediately();
                }
                match size.check(recorder.events()) {
                    SizeCheck::Fine => {}
                    SizeCheck::Warn(message) => {
                        status.clear();
                        log::warn!("{message}");
                    }
                    SizeCheck::Stop => break StopReason::MaxSize,
                }
                recorder.drain_stacks(&mut stack_ring);
                if let Some(logger) = &mut ebpf_logger {
                    logger.flush();
                }
            }
            _ = interrupt.recv() => break StopReason::Interrupted,
            _ = terminate.recv() => break StopReason::Terminated,
            _ = hangup.recv() => break StopReason::Terminated,
            _ = &mut sleep => break StopReason::Duration,
            _ = target.exited() => break StopReason::TargetExited,
            _ = status_tick.tick() => status.update(recorder.events(), probes.lost_events().unwrap_or(0)),
        }
    };
    status.clear();

    // Recording stops now; the probes themselves are removed in the
    // background once the rings are drained (that takes seconds).
    probes.set_enabled(false)?;
    let end_ns = monotonic_ns();
    let counters = probes.counters()?;
    // Whatever is still in the ring buffer happened before the end.
    recorder.drain_all(&mut ring)?;
    recorder.drain_stacks(&mut stack_ring);
    let recording_cpu_ns = process_cpu_ns().saturating_sub(recording_cpu_start);
    log::info!(
        "drain: {} events, {recording_cpu_ns} ns of CPU while recording",
        recorder.events()
    );
    // Disabled probes still trap into the kernel on every hit; rendering
    // takes a while, so start removing them now.
    let detaching = probes.detach_in_background();

    let recording = recorder.finish()?;
    let mut folded_file = folded.as_ref().map(OutputFile::temporary).transpose()?;
    let input = RenderInput {
        plan: &plan,
        pid: target.pid,
        process_name: format!("{} (pid {})", target.name, target.pid),
        start_ns,
        end_ns,
        counters: &counters,
        recording_cpu_ns,
        folded: folded_file.as_mut().map(|folded| &mut folded.file),
        window: None,
    };
    let mut summary = render(input, recording, &mut trace_files)?;
    let mut also_written = Vec::new();
    for (index, file) in trace_files.into_iter().enumerate() {
        let path = file.path().to_path_buf();
        let bytes = file.finish()?;
        if index == 0 {
            summary.trace_bytes = bytes;
        } else {
            also_written.push((path, bytes));
        }
    }
    if let (Some(folded), Some(file)) = (&folded, folded_file) {
        folded.publish(file)?;
    }
    if let Some(output) = &summary_json {
        let mut file = output.temporary()?;
        let text = serde_json::to_string_pretty(&summary.to_json())? + "\n";
        file.file
            .write_all(text.as_bytes())
            .with_context(|| format!("writing {}", output.path().display()))?;
        output.publish(file)?;
    }
    target.terminate_launched(Duration::from_secs(5)).await;
    let command_status = target.exit_status();
    Ok(Outcome {
        summary,
        stop,
        command_status,
        short_polls: counters.short_polls,
        detaching,
        also_written,
    })
}

/// Checks every trace output (see [`OutputFile::check`]); the same path
/// twice is an error rather than one render overwriting the other.
fn check_outputs(paths: &[PathBuf]) -> Result<Vec<OutputFile>> {
    if paths.is_empty() {
        bail!("no trace output given");
    }
    let mut seen = Vec::new();
    for path in paths {
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        if seen.contains(&absolute) {
            bail!("{} is given twice as the trace output (-o)", path.display());
        }
        seen.push(absolute);
    }
    paths.iter().map(|path| OutputFile::check(path)).collect()
}
