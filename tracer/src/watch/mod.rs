//! The watch tier: `rt-ebpf-trace watch --pid PID`, always on.
//!
//! Why: every recording mode puts a uprobe on every poll, a trap of
//! ~0.6 µs each on the benchmark VM, so its cost grows with the poll rate:
//! flat out, full mode costs an HTTP server 34 % of its throughput and
//! light mode 27 % (BENCHMARKS.md). Nobody leaves that on in production.
//! The watch tier attaches nothing that runs per poll. It learns what the
//! workers do from three things whose rate the program's load does not set:
//!
//! - CPU samples (`--sample-hz`, default 199 per CPU), with the user stack
//!   and, in the kernel, the kernel stack too; the task type is the poll
//!   frame found on the unwound stack ([`stacks`]);
//! - parks (one entry probe per park, which only counts it in the kernel:
//!   ~0.7 µs a park, the tier's main cost flat out): "no park in between"
//!   for hogs;
//! - context switches and wakeups of workers (`sched_switch`,
//!   `sched_wakeup`): the system call a worker sleeps in says whether it
//!   sleeps in its park (epoll, or a futex word learnt as its park condvar
//!   from the stack of its first such sleep) — busy share — or is
//!   blocking every task queued on it.
//!
//! From these, [`detect`] makes findings (BLOCKING, HOG) and per-second
//! health; [`report`] prints them; [`keep`] keeps the last `--keep` in a
//! bounded memory; [`trace`] writes that window on SIGUSR1 and at exit,
//! through the timeline's writers (`tracer_timeline::watch` composes it):
//! native Perfetto by default (`watch.pftrace`: callstack samples with
//! kernel frames, findings with their callstacks, health counters), Chrome
//! JSON for `-o x.json`. An escalation ([`incident`]) writes one trace per
//! incident: the kept window, then the full-detail recording, on the same
//! tracks. Measured costs are in BENCHMARKS.md and NOTES.md.

pub mod detect;
mod escalate;
pub mod incident;
pub mod keep;
pub mod kernel;
mod park_words;
pub mod probes;
pub mod report;
pub mod stacks;
pub mod trace;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{SignalKind, signal};
use tracer_common::names::maps as names;
use tracer_common::watch::{WATCH_EVENT_SIZE, WatchEvent, WatchEventKind, WatchStackKind};

use crate::clock::monotonic_ns;
use crate::output_file::OutputFile;
use crate::record::StopReason;
use crate::record::preflight::{self, KernelPaths};
use crate::record::target::Target;
use detect::{Detector, Finding, Thresholds};
use keep::{FlightRecorder, Kept};
use park_words::ParkWords;
use report::Names;
use stacks::{Capture, StackReader};

/// How often the rings are drained. The stack ring (8 MiB) holds ~500
/// captures: at 99 Hz on a few CPUs that is seconds; the event ring (4 MiB)
/// holds ~130 k parks.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

/// Records are handled in time order across both rings; a record is
/// committed microseconds after its time stamp, so anything older than
/// this has arrived and can be ordered.
const REORDER_WINDOW_NS: u64 = 20_000_000;

const HEALTH_INTERVAL_NS: u64 = 1_000_000_000;

pub struct WatchOptions {
    pub pid: u32,
    pub output: PathBuf,
    pub duration: Option<Duration>,
    pub keep: Duration,
    pub keep_memory: u64,
    pub sample_hz: u64,
    pub blocking: Duration,
    pub hog: Duration,
    pub stack_bytes: u32,
    pub quiet: bool,
    /// Escalation: how long the full probes record after a trigger.
    pub detail: Option<Duration>,
    /// Escalate on a hog at least this long (its lower bound).
    pub on_hog: Option<Duration>,
    /// Escalate on a worker blocked at least this long.
    pub on_blocking: Option<Duration>,
    pub max_incidents: u32,
}

impl WatchOptions {
    /// Escalation is on when any of its options was given.
    fn escalates(&self) -> bool {
        self.detail.is_some() || self.on_hog.is_some() || self.on_blocking.is_some()
    }
}

/// `--detail` when escalation is on but the option was not given.
const DEFAULT_DETAIL: Duration = Duration::from_secs(5);

pub struct WatchOutcome {
    pub stop: StopReason,
    pub blocking: u64,
    pub hogs: u64,
    pub lost: u64,
    pub traces_written: Vec<PathBuf>,
    pub incidents: u32,
    /// Triggers ignored (an incident was running, or none was left).
    pub ignored_triggers: u32,
    pub peak_kept_bytes: usize,
    /// The probes being removed; join before exiting.
    pub detaching: std::thread::JoinHandle<()>,
}

/// One record from either ring, to be handled in time order.
/// A drained record waiting to be ordered. Captures are boxed: they are
/// ~1 in 50 records flat out, and the queue is sorted every drain, so its
/// elements should be small (40 bytes, not 130).
enum Record {
    Capture(Box<Capture>),
    Event(WatchEvent),
}

impl Record {
    fn ts(&self) -> u64 {
        match self {
            Record::Capture(capture) => capture.ts_ns,
            Record::Event(event) => event.ts_ns,
        }
    }
}

struct Watcher {
    options: WatchOptions,
    names: Names,
    /// The task types by probe site, for the traces.
    types: tracer_timeline::task_types::TaskTypes,
    reader: StackReader,
    detector: Detector,
    recorder: FlightRecorder,
    /// Records drained but not yet old enough to order.
    pending: Vec<Record>,
    /// The latest blocking switch's capture per thread, until its off-CPU
    /// span arrives (a thread is in one switch at a time).
    switches: HashMap<u32, Capture>,
    /// The futex words the switch program takes for parks: learnt here.
    park_words: ParkWords,
    next_health_ns: u64,
    blocking: u64,
    hogs: u64,
    malformed: u64,
    /// Records drained from both rings.
    drained: u64,
    escalation: Option<incident::Escalation>,
}

pub async fn watch(options: WatchOptions) -> Result<WatchOutcome> {
    preflight::check_privileges()?;
    preflight::check_kernel(&KernelPaths::system())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;

    // Checked before anything is attached; written at exit.
    let exit_output = OutputFile::check(&options.output)?;
    let target = Target::existing(options.pid)?;
    let plan = tracer_probes::discover(&target.exe)
        .with_context(|| format!("process {} ({})", target.pid, target.name))?;
    // The watch tier probes only the parks: the other probes' warnings
    // concern it only when it escalates to them.
    for warning in &plan.warnings {
        if warning.about == tracer_probes::WarningAbout::Parks || options.escalates() {
            log::warn!("{warning}");
        } else {
            log::debug!("for recordings: {warning}");
        }
    }
    if !plan
        .sites
        .iter()
        .any(|site| site.kind == tracer_probes::SiteKind::Park)
    {
        bail!(
            "process {} ({}): no scheduler park function found, so the watch tier can't tell a \
             busy worker from an idle one; use the recording modes instead",
            target.pid,
            target.name
        );
    }
    let poll_code = tracer_probes::poll_code::poll_code(&target.exe, &plan)?;
    let mut probes = probes::load(&probes::WatchSettings {
        pid: target.pid,
        stack_bytes: options.stack_bytes,
        min_off_cpu_ns: 1_000_000.min(options.blocking.as_nanos() as u64),
    })?;
    let park_code =
        tracer_probes::poll_code::site_code(&target.exe, &plan, tracer_probes::SiteKind::Park)?;
    let reader = StackReader::new(target.pid, &target.exe, &poll_code, &park_code)?;
    let escalation = options.escalates().then(|| {
        incident::Escalation::new(
            plan.clone(),
            target.exe.clone(),
            target.pid,
            options.stack_bytes,
            options.detail.unwrap_or(DEFAULT_DETAIL),
            options.max_incidents,
            options.output.clone(),
        )
    });
    let attaching = std::time::Instant::now();
    probes
        .attach(&plan, &target.exe, target.pid, options.sample_hz)
        .map_err(|err| target.attach_error(err))?;
    log::info!(
        "attached {} park probes, sched_switch and samplers in {:?}",
        probes.parks,
        attaching.elapsed()
    );
    let mut event_ring = probes.take_ring(names::WATCH_EVENTS)?;
    let mut stack_ring = probes.take_ring(names::WATCH_STACKS)?;
    let park_futex = probes.take_park_futex()?;
    // With -v, what each program costs (read back at the end).
    let stats = log::log_enabled!(log::Level::Info)
        .then(probes::collect_stats)
        .flatten();
    probes.set_enabled(true)?;
    println!(
        "watching {} (pid {}): {} Hz samples, parks, blocking switches; keeping the last {} (at most {} MiB)",
        target.name,
        target.pid,
        options.sample_hz,
        humantime::format_duration(options.keep),
        options.keep_memory >> 20
    );

    let start_ns = monotonic_ns();
    let mut watcher = Watcher {
        names: Names::new(target.pid, &plan),
        types: crate::record::sink::task_types(&plan),
        reader,
        detector: Detector::new(
            Thresholds {
                blocking_ns: options.blocking.as_nanos() as u64,
                hog_ns: options.hog.as_nanos() as u64,
                ongoing_hog_ns: options.on_hog.map(|on_hog| on_hog.as_nanos() as u64),
            },
            start_ns,
        ),
        recorder: FlightRecorder::new(options.keep, options.keep_memory),
        pending: Vec::new(),
        switches: HashMap::new(),
        park_words: ParkWords::new(park_futex),
        next_health_ns: start_ns + HEALTH_INTERVAL_NS,
        blocking: 0,
        hogs: 0,
        malformed: 0,
        drained: 0,
        escalation,
        options,
    };
    let process = format!("{} (pid {})", target.name, target.pid);
    let mut traces_written = Vec::new();
    let mut usr1_count = 0u32;

    let mut drain_tick = tokio::time::interval(DRAIN_INTERVAL);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sleep = crate::clock::sleep_for_or_forever(watcher.options.duration);
    tokio::pin!(sleep);
    let stop = loop {
        tokio::select! {
            _ = drain_tick.tick() => {
                watcher.drain(&mut event_ring, &mut stack_ring, monotonic_ns().saturating_sub(REORDER_WINDOW_NS));
                watcher.escalate(&process, false, || probes.lost().unwrap_or(0))?;
            }
            _ = usr1.recv() => {
                if watcher.escalation.is_some() {
                    watcher.start_incident("SIGUSR1".to_string(), monotonic_ns());
                    continue;
                }
                usr1_count += 1;
                let output = &watcher.options.output;
                let path = trace::numbered(output, "usr1", usr1_count, trace::trace_extension(output));
                let lost = probes.lost().unwrap_or(0);
                let written = OutputFile::check(&path)
                    .and_then(|output| watcher.write(output, &process, "SIGUSR1", lost));
                match written {
                    Ok(()) => {
                        println!("SIGUSR1: wrote the last {} to {}", watcher.window(), path.display());
                        traces_written.push(path);
                    }
                    Err(err) => eprintln!("SIGUSR1: could not write {}: {err:#}", path.display()),
                }
            }
            _ = interrupt.recv() => break StopReason::Interrupted,
            _ = terminate.recv() => break StopReason::Terminated,
            _ = hangup.recv() => break StopReason::Terminated,
            _ = &mut sleep => break StopReason::Duration,
            _ = target.exited() => break StopReason::TargetExited,
        }
    };
    probes.set_enabled(false)?;
    if stats.is_some() {
        for (name, runs, average) in probes.program_stats() {
            log::info!("program {name}: {runs} runs, {average:?} each on average");
        }
    }
    drop(stats);
    let lost = probes.lost()?;
    watcher.drain(&mut event_ring, &mut stack_ring, u64::MAX);
    watcher.detector.finish_runs();
    watcher.report_findings();
    // An incident still recording ends here, shorter than asked.
    watcher.escalate(&process, true, || lost)?;
    let watch_detaching = probes.detach_in_background();
    let (incidents, ignored_triggers, escalation) = match watcher.escalation.take() {
        Some(escalation) => (escalation.incidents, escalation.ignored, Some(escalation)),
        None => (0, 0, None),
    };
    let detaching = std::thread::spawn(move || {
        let _ = watch_detaching.join();
        if let Some(escalation) = escalation {
            escalation.join();
        }
    });
    let output = watcher.options.output.clone();
    watcher.write(exit_output, &process, "exit", lost)?;
    println!(
        "wrote the last {} to {}",
        watcher.window(),
        output.display()
    );
    traces_written.push(output);
    if lost > 0 {
        println!("lost: {lost} records (a ring buffer was full)");
    }
    Ok(WatchOutcome {
        stop,
        blocking: watcher.blocking,
        hogs: watcher.hogs,
        lost,
        traces_written,
        incidents,
        ignored_triggers,
        peak_kept_bytes: watcher.recorder.peak_bytes,
        detaching,
    })
}

impl Watcher {
    /// Reads both rings, then handles in time order what is older than
    /// `watermark_ns` (everything at the end: `u64::MAX`).
    fn drain(
        &mut self,
        event_ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
        stack_ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
        watermark_ns: u64,
    ) {
        // Stacks first: a switch's capture is committed before its off-CPU
        // span, so draining the events second never finds a span whose
        // capture is still in the ring.
        while let Some(record) = stack_ring.next() {
            self.drained += 1;
            if let Some(capture) = self.reader.read(&record) {
                self.pending.push(Record::Capture(Box::new(capture)));
            }
        }
        while let Some(record) = event_ring.next() {
            self.drained += 1;
            if record.len() < WATCH_EVENT_SIZE {
                self.malformed += 1;
                continue;
            }
            // SAFETY: the eBPF side writes whole `WatchEvent`s.
            let event: WatchEvent = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
            self.pending.push(Record::Event(event));
        }
        // Captures before events of the same time: a switch's capture and
        // its span share the switch's time stamp. Unstable, in place: the
        // stable sort's scratch allocation and the copy of what is ready were
        // a third of the watcher's CPU flat out (perf, kv at 160 k
        // requests/s: ~35 k records/s).
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_unstable_by_key(|record| (record.ts(), matches!(record, Record::Event(_))));
        let ready = pending.partition_point(|record| record.ts() <= watermark_ns);
        for record in pending.drain(..ready) {
            while record.ts() >= self.next_health_ns && self.next_health_ns <= watermark_ns {
                self.close_interval();
            }
            self.handle(record);
        }
        self.pending = pending;
        let now = watermark_ns.min(monotonic_ns());
        while self.next_health_ns <= now {
            self.close_interval();
        }
        self.report_findings();
    }

    fn handle(&mut self, record: Record) {
        match record {
            Record::Capture(capture) => match capture.kind {
                WatchStackKind::Sample => {
                    self.recorder
                        .push(capture.ts_ns, Kept::Sample(capture.clone()));
                    self.detector.sample(*capture);
                }
                WatchStackKind::Switch => {
                    if capture.in_park {
                        self.park_words.learn(&capture);
                    }
                    self.switches.insert(capture.tid, *capture);
                }
            },
            Record::Event(event) => match WatchEventKind::from_u32(event.kind) {
                Some(WatchEventKind::ParkSleep) => {
                    self.detector
                        .park_sleep(event.tid, event.ts_ns, event.parks);
                }
                Some(WatchEventKind::ParkWake) => {
                    self.detector
                        .park_wake(event.tid, event.ts_ns, event.duration_ns);
                    self.recorder.push(
                        event.ts_ns.saturating_sub(event.duration_ns),
                        Kept::Park {
                            tid: event.tid,
                            end_ns: event.ts_ns,
                        },
                    );
                }
                Some(WatchEventKind::OffCpu) => {
                    let capture = self
                        .switches
                        .remove(&event.tid)
                        .filter(|capture| capture.ts_ns == event.ts_ns);
                    let preempted = event.preempted != 0;
                    if let Some(capture) = capture.as_ref().filter(|capture| capture.in_park) {
                        // A park on a futex word not learnt yet: a park
                        // sleep, not a blocking call.
                        self.detector
                            .park_sleep(event.tid, event.ts_ns, capture.parks);
                        let end_ns = event.ts_ns + event.duration_ns;
                        self.detector
                            .park_wake(event.tid, end_ns, event.duration_ns);
                        self.recorder.push(
                            event.ts_ns,
                            Kept::Park {
                                tid: event.tid,
                                end_ns,
                            },
                        );
                        return;
                    }
                    self.recorder.push(
                        event.ts_ns,
                        Kept::OffCpu {
                            tid: event.tid,
                            duration_ns: event.duration_ns,
                            preempted,
                            state: if preempted { 0 } else { event.site_or_state },
                        },
                    );
                    self.detector.off_cpu(
                        event.tid,
                        event.ts_ns,
                        event.duration_ns,
                        event.site_or_state,
                        preempted,
                        event.parks,
                        capture,
                    );
                }
                None => self.malformed += 1,
            },
        }
    }
}

impl Watcher {
    fn close_interval(&mut self) {
        let health = self.detector.close_interval(self.next_health_ns);
        self.next_health_ns += HEALTH_INTERVAL_NS;
        // Findings of the interval are printed before its health line.
        self.report_findings();
        if !self.options.quiet {
            println!(
                "{}",
                report::health_line(&health, &self.names, self.options.sample_hz)
            );
        }
        self.recorder
            .push(health.end_ns, Kept::Health(Box::new(health)));
    }

    /// Prints the new findings and keeps them for the trace.
    fn report_findings(&mut self) {
        for hog in self.detector.take_ongoing() {
            let what = format!(
                "HOG for at least {} ms so far on tid {}",
                hog.span_ns / 1_000_000,
                hog.tid
            );
            self.start_incident(what, hog.last_ns);
        }
        for finding in self.detector.take_findings() {
            // Escalate first: naming the stacks can take a while (the
            // first symbolization loads the binary's symbols).
            self.check_trigger(&finding);
            let record = match &finding {
                Finding::Blocking(blocking) => {
                    self.blocking += 1;
                    report::describe_blocking(blocking, &mut self.names, &mut self.reader)
                }
                Finding::Hog(hog) => {
                    self.hogs += 1;
                    report::describe_hog(hog, &mut self.names, &mut self.reader)
                }
            };
            println!("{}", record.line);
            self.recorder
                .push(record.start_ns, Kept::Finding(Box::new(record)));
        }
    }

    fn write(&mut self, output: OutputFile, process: &str, reason: &str, lost: u64) -> Result<()> {
        let info = trace::WindowInfo {
            process,
            reason,
            keep_memory: self.options.keep_memory,
            lost,
            sample_hz: self.options.sample_hz,
            events: self.drained,
            malformed: self.malformed + self.reader.malformed,
            until_ns: None,
        };
        trace::write_window(
            output,
            &self.types,
            &self.recorder,
            &mut self.names,
            &mut self.reader,
            &info,
        )?;
        Ok(())
    }

    /// How much time the kept window spans, for people.
    fn window(&self) -> String {
        let (first, last) = self.recorder.span().unwrap_or((0, 0));
        format!("{:.1} s", (last - first) as f64 / 1e9)
    }
}
