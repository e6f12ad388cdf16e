//! One recording session: attach, drain the ring buffer into the trace file
//! until a stop condition, then finalize.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aya::maps::{MapData, RingBuf};
use serde_json::json;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tracer_common::{EVENT_SIZE, Event};
use tracer_probes::{ProbePlan, ProbeSite};
use tracer_timeline::chrome::ChromeTraceWriter;
use tracer_timeline::summary::{Summary, WorkerSummary};
use tracer_timeline::timeline::{Slice, SliceKind, Timeline};

use super::loader;
use super::preflight::{self, KernelPaths};
use super::status::StatusLine;
use super::target::Target;

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
}

pub struct RecordOptions {
    pub target: TargetSpec,
    pub output: PathBuf,
    pub duration: Option<Duration>,
    pub mode: Mode,
    pub settings: loader::Settings,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Duration,
    Interrupted,
    Terminated,
    TargetExited,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Duration => "the duration ran out",
            StopReason::Interrupted => "interrupted (Ctrl-C)",
            StopReason::Terminated => "terminated (SIGTERM/SIGHUP)",
            StopReason::TargetExited => "the target exited",
        })
    }
}

pub struct Outcome {
    pub summary: Summary,
    pub stop: StopReason,
    /// The exit status of a command we launched, if it exited.
    pub command_status: Option<ExitStatus>,
}

/// Records one process into `options.output`. On any error after the output
/// was opened, no file is left at the output path.
pub async fn record(options: RecordOptions) -> Result<Outcome> {
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
    let mut writer = ChromeTraceWriter::create(&options.output)?;

    let loading = std::time::Instant::now();
    let mut probes = loader::load(&plan, target.pid, &options.settings)?;
    log::info!("loaded the eBPF programs in {:?}", loading.elapsed());
    let start_ns = monotonic_ns();
    let attaching = std::time::Instant::now();
    if let Err(err) = probes.attach(&plan, &target.exe, target.pid) {
        if !target.is_alive() {
            return Err(anyhow!(
                "process {} exited while the probes were being attached",
                target.pid
            ));
        }
        return Err(err);
    }
    log::info!(
        "attached {} probes in {:?}",
        plan.sites.len() * 2,
        attaching.elapsed()
    );
    let _logger = probes.logger();
    // SAFETY: the ring buffer owns its map fd and keeps it open until it is
    // dropped, which happens after the AsyncFd (it is the AsyncFd's inner value).
    let mut ring = unsafe {
        AsyncFd::register_with_interest(probes.take_events()?, tokio::io::Interest::READABLE)?
    };
    target.release()?;
    if !target.launched() && !target.is_alive() {
        return Err(anyhow!(
            "process {} exited while the probes were being attached",
            target.pid
        ));
    }

    writer.process_name(target.pid, &format!("{} (pid {})", target.name, target.pid))?;
    let mut sink = TraceSink::new(&plan, target.pid, start_ns, writer);
    let mut status = StatusLine::new();
    let mut status_tick = tokio::time::interval(Duration::from_millis(500));
    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    let sleep = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep);

    let stop = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                if !sink.drain_batch(guard.get_inner_mut())? {
                    guard.clear_ready();
                }
            }
            _ = interrupt.recv() => break StopReason::Interrupted,
            _ = terminate.recv() => break StopReason::Terminated,
            _ = hangup.recv() => break StopReason::Terminated,
            _ = &mut sleep => break StopReason::Duration,
            _ = target.exited() => break StopReason::TargetExited,
            _ = status_tick.tick() => status.update(sink.events, probes.lost_events().unwrap_or(0)),
        }
    };
    let end_ns = monotonic_ns();
    status.clear();

    // Whatever is still in the ring buffer happened before the stop.
    probes.detach();
    let lost = probes.lost_events()?;
    let short_polls = probes.short_polls()?;
    sink.drain_all(ring.get_mut())?;
    let summary = sink.finish(end_ns, lost, &options.output, &plan)?;
    if short_polls > 0 {
        println!(
            "{short_polls} polls shorter than --min-poll {} were counted in the kernel and not recorded",
            humantime::format_duration(options.settings.min_poll)
        );
    }
    target.terminate_launched(Duration::from_secs(5)).await;
    let command_status = target.exit_status();
    Ok(Outcome {
        summary,
        stop,
        command_status,
    })
}

/// Where events go: the timeline pairs them into slices, the writer streams
/// the slices to disk.
struct TraceSink<'a> {
    sites: &'a [ProbeSite],
    pid: u32,
    start_ns: u64,
    writer: ChromeTraceWriter,
    timeline: Timeline,
    slices: Vec<Slice>,
    thread_names: HashMap<u32, String>,
    events: u64,
    malformed: u64,
}

impl<'a> TraceSink<'a> {
    fn new(plan: &'a ProbePlan, pid: u32, start_ns: u64, writer: ChromeTraceWriter) -> Self {
        TraceSink {
            sites: &plan.sites,
            pid,
            start_ns,
            writer,
            timeline: Timeline::new(),
            slices: Vec::new(),
            thread_names: HashMap::new(),
            events: 0,
            malformed: 0,
        }
    }

    /// Reads at most `MAX_BATCH` events, so that a busy target can't keep
    /// the loop from noticing Ctrl-C or the deadline. Returns true when the
    /// ring buffer may hold more.
    fn drain_batch(&mut self, ring: &mut RingBuf<MapData>) -> Result<bool> {
        const MAX_BATCH: usize = 16 * 1024;
        for _ in 0..MAX_BATCH {
            if !self.drain_one(ring)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Reads everything left in the ring buffer.
    fn drain_all(&mut self, ring: &mut RingBuf<MapData>) -> Result<()> {
        while self.drain_one(ring)? {}
        Ok(())
    }

    fn drain_one(&mut self, ring: &mut RingBuf<MapData>) -> Result<bool> {
        {
            let Some(item) = ring.next() else {
                return Ok(false);
            };
            if item.len() < EVENT_SIZE {
                self.malformed += 1;
                return Ok(true);
            }
            // SAFETY: the eBPF side writes whole `Event`s; read_unaligned
            // copes with the ring buffer's 8-byte alignment.
            let event: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            self.events += 1;
            if self.timeline.push(&event, &mut self.slices) {
                self.name_thread(event.tid)?;
            }
        }
        self.write_slices()?;
        Ok(true)
    }

    /// Names a worker's track from its `comm`, plus its index among the
    /// threads seen, since tokio's workers all share one name.
    fn name_thread(&mut self, tid: u32) -> Result<()> {
        let index = self.thread_names.len() as u32;
        let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", self.pid))
            .map(|comm| comm.trim_end().to_string())
            .unwrap_or_else(|_| "thread".to_string());
        let name = format!("{comm} #{index}");
        self.writer.thread_name(self.pid, tid, &name, index)?;
        self.thread_names.insert(tid, name);
        Ok(())
    }

    fn write_slices(&mut self) -> Result<()> {
        for slice in self.slices.drain(..) {
            let start = slice.start_ns.saturating_sub(self.start_ns);
            let duration = slice.end_ns.saturating_sub(slice.start_ns);
            match slice.kind {
                SliceKind::Poll {
                    site,
                    task,
                    task_id,
                } => {
                    let site = self.sites.get(site as usize);
                    let name = match site.and_then(|s| s.task_type.as_ref()) {
                        Some(task_type) => task_type.short.clone(),
                        None => format!("task@{:#x}", site.map_or(0, |s| s.address)),
                    };
                    let args = json!({
                        "task_id": (task_id != 0).then_some(task_id),
                        "task_type": site.and_then(|s| s.task_type.as_ref()).map(|t| t.full.as_str()),
                        "header": format!("{task:#x}"),
                        "truncated": slice.truncated,
                    });
                    self.writer
                        .complete(self.pid, slice.tid, &name, "poll", start, duration, &args)?;
                }
                SliceKind::Park => {
                    let args = json!({ "truncated": slice.truncated });
                    self.writer
                        .complete(self.pid, slice.tid, "park", "park", start, duration, &args)?;
                }
            }
        }
        Ok(())
    }

    fn finish(
        mut self,
        end_ns: u64,
        lost: u64,
        output: &std::path::Path,
        plan: &ProbePlan,
    ) -> Result<Summary> {
        self.timeline.finish(end_ns, &mut self.slices);
        self.write_slices()?;
        let workers = self
            .timeline
            .threads()
            .map(|(tid, stats)| WorkerSummary {
                tid,
                name: self
                    .thread_names
                    .get(&tid)
                    .cloned()
                    .unwrap_or_else(|| format!("tid {tid}")),
                stats: stats.clone(),
            })
            .collect();
        let metadata = json!({
            "tracer": concat!("rt-ebpf-trace ", env!("CARGO_PKG_VERSION")),
            "target_pid": self.pid,
            "binary": plan.binary.display().to_string(),
            "tokio_version": plan.tokio_version,
            "events": self.events,
            "lost_events": lost,
            "malformed_events": self.malformed,
            "unmatched_ends": self.timeline.unmatched_ends(),
            "abandoned_polls": self.timeline.abandoned(),
            "duration_ns": end_ns.saturating_sub(self.start_ns),
        });
        let trace_bytes = self.writer.finish(&metadata)?;
        Ok(Summary {
            duration_ns: end_ns.saturating_sub(self.start_ns),
            workers,
            events: self.events,
            lost_events: lost,
            unmatched_ends: self.timeline.unmatched_ends(),
            abandoned_polls: self.timeline.abandoned(),
            output: Some(output.to_path_buf()),
            trace_bytes,
        })
    }
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
