//! Escalation: on a trigger (`--on-hog`, `--on-blocking`, SIGUSR1), the
//! full recording probes are attached for `--detail`, and one trace is
//! written per incident, `FILE.incident-N.pftrace` (`.json` when `-o` is
//! JSON): the kept window up to the detail's start (watch data: samples,
//! parks, off-CPU spans, findings — the one that set it off included —
//! and health), then the detail window (every poll, park, wake, await
//! point) rendered like a recording (`render`), by one writer from header
//! to trailer, on the same tracks (a worker's thread is one track in both
//! parts) and one time base, so the incident is seen from before it
//! started. Findings and health records made during the detail window are
//! interleaved with it by time. Both parts' metadata are in it (the
//! window's under `watch`). The file is checked ([`OutputFile::check`]) at
//! the trigger, before anything is attached; a trigger whose file can't be
//! written is reported and ignored.
//!
//! Speed: the full probes' eBPF object is loaded ahead of time (30–200 ms
//! here), so a trigger only attaches them (5–25 ms for ~30 probes) and
//! flips `ENABLED`. Removing them waits an RCU grace period per probe
//! (3–4 s for 30 here, NOTES.md): that happens on a background thread, and
//! the next incident's object is loaded on another, so neither the target
//! nor the watcher waits. One incident at a time; at most
//! `--max-incidents` files.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use tracer_probes::ProbePlan;
use tracer_timeline::watch::WatchWindow;

use crate::output_file::OutputFile;
use crate::record::Mode;
use crate::record::drain::Recorder;
use crate::record::loader::{self, LoadedProbes, Settings};
use crate::record::sink::{RenderInput, render};
use crate::record::spill::SpillWriter;
use crate::record::trace_file::TraceFile;

/// Full probes being loaded (or loaded, waiting); or none left to use.
enum Spare {
    Loading(std::thread::JoinHandle<Result<LoadedProbes>>),
    None,
}

/// An incident, as reported.
#[derive(Clone, Debug)]
pub struct Incident {
    pub number: u32,
    /// What set it off, for people.
    pub trigger: String,
    /// When what set it off happened (a finding's start; a signal's arrival).
    pub trigger_ns: u64,
    /// When the full probes were recording.
    pub start_ns: u64,
    /// The incident's trace.
    pub path: PathBuf,
}

/// Full probes attached and recording.
struct Attached {
    probes: LoadedProbes,
    ring: RingBuf<MapData>,
    stack_ring: RingBuf<MapData>,
    enabled_ns: u64,
    took: Duration,
}

/// A detail window being recorded.
pub struct Detail {
    pub incident: Incident,
    until: Instant,
    probes: LoadedProbes,
    ring: RingBuf<MapData>,
    stack_ring: RingBuf<MapData>,
    recorder: Recorder,
    output: OutputFile,
}

pub struct Escalation {
    plan: ProbePlan,
    exe: PathBuf,
    pid: u32,
    stack_bytes: u32,
    detail_for: Duration,
    max_incidents: u32,
    output: PathBuf,
    spare: Spare,
    pub active: Option<Detail>,
    /// An incident whose probes are being attached.
    attaching: Option<(
        Incident,
        OutputFile,
        std::thread::JoinHandle<Result<Attached>>,
    )>,
    pub incidents: u32,
    /// Triggers that came while an incident ran, or after the last one allowed.
    pub ignored: u32,
    /// Probe removals in progress; joined at exit.
    detaching: Vec<std::thread::JoinHandle<()>>,
}

impl Escalation {
    pub fn new(
        plan: ProbePlan,
        exe: PathBuf,
        pid: u32,
        stack_bytes: u32,
        detail_for: Duration,
        max_incidents: u32,
        output: PathBuf,
    ) -> Self {
        let mut escalation = Escalation {
            plan,
            exe,
            pid,
            stack_bytes,
            detail_for,
            max_incidents,
            output,
            spare: Spare::None,
            active: None,
            attaching: None,
            incidents: 0,
            ignored: 0,
            detaching: Vec::new(),
        };
        escalation.load_spare();
        escalation
    }

    /// Starts loading the next incident's probes on a thread of its own.
    fn load_spare(&mut self) {
        if self.incidents >= self.max_incidents {
            self.spare = Spare::None;
            return;
        }
        let plan = self.plan.clone();
        let (pid, stack_bytes) = (self.pid, self.stack_bytes);
        self.spare = Spare::Loading(std::thread::spawn(move || {
            let loading = Instant::now();
            let loaded = loader::load(
                &plan,
                pid,
                &Settings {
                    ring_bytes: tracer_common::DEFAULT_RING_BYTES,
                    min_poll: Duration::ZERO,
                    stack_bytes,
                },
            );
            log::info!(
                "full probes loaded for the next incident in {:?}",
                loading.elapsed()
            );
            loaded
        }));
    }

    /// Starts attaching the full probes, on a thread of its own (attaching
    /// ~30 uprobes took 14–28 ms here, but 5.2 s once on the loaded VM: the
    /// kernel's uprobe registration waits on RCU), if no incident runs or
    /// is being attached, the last one's probes are gone (attaching while
    /// they are being removed waits on the kernel's uprobe locks for
    /// seconds), the next probes are loaded, and an incident is left.
    /// Never waits: a trigger that comes too early is ignored (counted).
    /// Returns the incident's number when it starts.
    pub fn trigger(&mut self, trigger: String, trigger_ns: u64) -> Option<u32> {
        let detaching = self.detaching.iter().any(|handle| !handle.is_finished());
        let busy = self.active.is_some() || self.attaching.is_some();
        if busy || self.incidents >= self.max_incidents || detaching {
            self.ignored += 1;
            return None;
        }
        let loading = match std::mem::replace(&mut self.spare, Spare::None) {
            Spare::Loading(handle) if handle.is_finished() => handle,
            still_loading => {
                self.spare = still_loading;
                self.ignored += 1;
                return None;
            }
        };
        let number = self.incidents + 1;
        let extension = super::trace::trace_extension(&self.output);
        let path = super::trace::numbered(&self.output, "incident", number, extension);
        let output = match OutputFile::check(&path) {
            Ok(output) => output,
            Err(err) => {
                eprintln!("incident {number} not started: {err:#}");
                self.spare = Spare::Loading(loading);
                self.ignored += 1;
                return None;
            }
        };
        self.incidents = number;
        let (plan, exe, pid) = (self.plan.clone(), self.exe.clone(), self.pid);
        let handle = std::thread::spawn(move || -> Result<Attached> {
            let mut probes = loading
                .join()
                .map_err(|_| anyhow::anyhow!("loading the full probes panicked"))??;
            let attaching = Instant::now();
            probes
                .attach(&plan, &exe, pid, Mode::Full.probe_set())
                .context("attaching the full probes for an incident")?;
            // Read before enabling: no detail event is older than the
            // detail's start, where the incident trace's window part ends.
            let enabled_ns = crate::clock::monotonic_ns();
            probes.set_enabled(true)?;
            let stack_ring = probes.take_stacks()?;
            let ring = probes.take_events()?;
            Ok(Attached {
                probes,
                ring,
                stack_ring,
                enabled_ns,
                took: attaching.elapsed(),
            })
        });
        self.attaching = Some((
            Incident {
                number,
                trigger,
                trigger_ns,
                start_ns: 0,
                path,
            },
            output,
            handle,
        ));
        Some(number)
    }

    /// When the full probes of a triggered incident are recording: the
    /// incident (its `start_ns` set) and how long attaching took.
    fn poll_attached(&mut self, wait: bool) -> Result<Option<(Incident, Duration)>> {
        let ready = self
            .attaching
            .as_ref()
            .is_some_and(|(_, _, handle)| wait || handle.is_finished());
        if !ready {
            return Ok(None);
        }
        let (mut incident, output, handle) = self.attaching.take().expect("checked");
        let attached = match handle.join() {
            Ok(Ok(attached)) => attached,
            Ok(Err(err)) => {
                self.load_spare();
                return Err(err);
            }
            Err(_) => {
                self.load_spare();
                anyhow::bail!("attaching the full probes panicked");
            }
        };
        incident.start_ns = attached.enabled_ns;
        let spill = SpillWriter::create_in(&output.scratch_dir())?;
        self.active = Some(Detail {
            incident: incident.clone(),
            until: Instant::now() + self.detail_for,
            probes: attached.probes,
            ring: attached.ring,
            stack_ring: attached.stack_ring,
            recorder: Recorder::new(self.pid, spill),
            output,
        });
        Ok(Some((incident, attached.took)))
    }

    /// Starts the detail window once its probes are attached (the
    /// incident and the attach time, to report), and drains its rings.
    /// `at_exit` waits for an attach in progress. True when its time is up.
    pub fn drain(&mut self, at_exit: bool) -> Result<(Option<(Incident, Duration)>, bool)> {
        let started = self.poll_attached(at_exit)?;
        let Some(detail) = &mut self.active else {
            return Ok((started, false));
        };
        while detail.recorder.drain_batch(&mut detail.ring)? {}
        detail.recorder.drain_stacks(&mut detail.stack_ring);
        Ok((started, at_exit || Instant::now() >= detail.until))
    }

    /// When the running incident's detail recording started, if one runs.
    pub fn detail_start(&self) -> Option<u64> {
        self.active.as_ref().map(|detail| detail.incident.start_ns)
    }

    /// Ends the detail window: recording stops at once, the probes are
    /// removed in the background, and the incident's trace (`window`, then
    /// the detail recording) is rendered and published. Returns the
    /// incident and the events recorded.
    pub fn finish(
        &mut self,
        end_ns: u64,
        process_name: &str,
        window: WatchWindow,
    ) -> Result<Option<(Incident, u64)>> {
        let Some(detail) = self.active.take() else {
            return Ok(None);
        };
        let Detail {
            incident,
            mut probes,
            mut ring,
            mut stack_ring,
            mut recorder,
            output,
            ..
        } = detail;
        probes.set_enabled(false)?;
        let counters = probes.counters()?;
        recorder.drain_all(&mut ring)?;
        recorder.drain_stacks(&mut stack_ring);
        let events = recorder.events();
        let number = incident.number;
        // The same removal as a recording's (a forked child's exit, see
        // `record::detach`); joined on a thread so the watcher never waits.
        let detaching = probes.detach_in_background();
        self.detaching.push(std::thread::spawn(move || {
            let removing = Instant::now();
            let _ = detaching.join();
            log::info!(
                "incident {number}: full probes removed in {:?}",
                removing.elapsed()
            );
        }));
        self.load_spare();
        let recording = recorder.finish()?;
        let mut file = TraceFile::create(output)?;
        let input = RenderInput {
            plan: &self.plan,
            pid: self.pid,
            process_name: process_name.to_owned(),
            start_ns: incident.start_ns,
            end_ns,
            counters: &counters,
            recording_cpu_ns: 0,
            folded: None,
            window: Some(window),
        };
        render(input, recording, std::slice::from_mut(&mut file))?;
        file.finish()?;
        Ok(Some((incident, events)))
    }

    /// Waits for the probe removals still running (at exit).
    pub fn join(self) {
        for handle in self.detaching {
            let _ = handle.join();
        }
    }
}
