//! Escalation: on a trigger (`--on-hog`, `--on-blocking`, SIGUSR1), the
//! full recording probes are attached for `--detail`, and two files are
//! written per incident: the detail window (every poll, park, wake, await
//! point), rendered like a recording (`render`, Perfetto protobuf:
//! `FILE.incident-N.pftrace`), and the kept window up to the detail's start
//! (watch data, findings included: `FILE.incident-N.window.json`), so the
//! incident is seen from before it started. Both are checked
//! ([`OutputFile::check`]) at the trigger, before anything is attached; a
//! trigger whose files can't be written is reported and ignored.
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
    /// The detail window's trace.
    pub path: PathBuf,
    /// The kept window's trace.
    pub window_path: PathBuf,
}

/// An incident's two files, checked at its trigger.
struct Outputs {
    detail: OutputFile,
    window: OutputFile,
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
    outputs: Outputs,
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
    attaching: Option<(Incident, Outputs, std::thread::JoinHandle<Result<Attached>>)>,
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
        let path = super::numbered(&self.output, "incident", number, ".pftrace");
        let window_path = super::numbered(&self.output, "incident", number, ".window.json");
        let outputs = match OutputFile::check(&path).and_then(|detail| {
            Ok(Outputs {
                detail,
                window: OutputFile::check(&window_path)?,
            })
        }) {
            Ok(outputs) => outputs,
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
            probes.set_enabled(true)?;
            let enabled_ns = crate::clock::monotonic_ns();
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
                window_path,
            },
            outputs,
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
        let (mut incident, outputs, handle) = self.attaching.take().expect("checked");
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
        let spill = SpillWriter::create_in(&outputs.detail.scratch_dir())?;
        self.active = Some(Detail {
            incident: incident.clone(),
            until: Instant::now() + self.detail_for,
            probes: attached.probes,
            ring: attached.ring,
            stack_ring: attached.stack_ring,
            recorder: Recorder::new(self.pid, spill),
            outputs,
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

    /// Ends the detail window: recording stops at once, the probes are
    /// removed in the background, and the detail trace is rendered and
    /// published. Returns the incident, the events recorded, and the
    /// output the caller writes the kept window into.
    pub fn finish(
        &mut self,
        end_ns: u64,
        process_name: &str,
    ) -> Result<Option<(Incident, u64, OutputFile)>> {
        let Some(detail) = self.active.take() else {
            return Ok(None);
        };
        let Detail {
            incident,
            mut probes,
            mut ring,
            mut stack_ring,
            mut recorder,
            outputs,
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
        let mut file = TraceFile::create(outputs.detail)?;
        let input = RenderInput {
            plan: &self.plan,
            pid: self.pid,
            process_name: process_name.to_owned(),
            start_ns: incident.start_ns,
            end_ns,
            counters: &counters,
            recording_cpu_ns: 0,
            folded: None,
        };
        render(input, recording, std::slice::from_mut(&mut file))?;
        file.finish()?;
        Ok(Some((incident, events, outputs.window)))
    }

    /// Waits for the probe removals still running (at exit).
    pub fn join(self) {
        for handle in self.detaching {
            let _ = handle.join();
        }
    }
}
