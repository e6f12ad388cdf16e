//! Loading and attaching the watch tier's eBPF programs (see the eBPF
//! crate's `watch` module): park entry probes (one trap per park, no
//! uretprobe), the `sched_switch` BTF tracepoint and per-CPU sampling. No
//! poll probe: that is the point of the tier.

use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{
        BtfTracePoint, PerfEvent, UProbe,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use tracer_common::Counter;
use tracer_common::names::{globals, maps, programs};
use tracer_probes::{ProbePlan, SiteKind};

use crate::record::detach::Detacher;
use crate::record::loader::{EBPF_OBJECT, UNUSED_RING_BYTES, check_object};
use crate::record::loader::{count, program_as, take_map_as};

const PARK_START: &str = programs::WATCH_PARK_START;
const SAMPLE: &str = programs::WATCH_SAMPLE;
const SWITCH: &str = programs::WATCH_SWITCH;
const WAKEUP: &str = programs::WATCH_WAKEUP;

pub struct WatchProbes {
    ebpf: Ebpf,
    uprobe_links: Vec<(&'static str, UProbeLinkId)>,
    /// Attached park probes.
    pub parks: usize,
}

/// What the watch programs need to know.
pub struct WatchSettings {
    pub pid: u32,
    pub stack_bytes: u32,
    /// Off-CPU spans shorter than this are not sent.
    pub min_off_cpu_ns: u64,
}

pub fn load(settings: &WatchSettings) -> Result<WatchProbes> {
    check_object()?;
    let mut ebpf = EbpfLoader::new()
        .override_global(globals::TARGET_TGID, &settings.pid, true)
        .override_global(globals::STACK_BYTES, &settings.stack_bytes, true)
        .override_global(globals::MIN_OFF_CPU_NS, &settings.min_off_cpu_ns, true)
        .map_max_entries(maps::EVENTS, UNUSED_RING_BYTES)
        // The full tier's rings are unused here: one page each, not 16 + 32 MiB.
        .map_max_entries(maps::STACKS, UNUSED_RING_BYTES)
        .load(EBPF_OBJECT)
        .context("the kernel refused to load the eBPF programs")?;
    uprobe(&mut ebpf, PARK_START)?
        .load()
        .with_context(|| format!("the kernel's verifier refused the eBPF program {PARK_START}"))?;
    perf_event(&mut ebpf)?
        .load()
        .with_context(|| format!("the kernel's verifier refused the eBPF program {SAMPLE}"))?;
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
    tracepoint(&mut ebpf, SWITCH)?
        .load("sched_switch", &btf)
        .with_context(|| format!("the kernel refused the eBPF program {SWITCH}"))?;
    tracepoint(&mut ebpf, WAKEUP)?
        .load("sched_wakeup", &btf)
        .with_context(|| format!("the kernel refused the eBPF program {WAKEUP}"))?;
    Ok(WatchProbes {
        ebpf,
        uprobe_links: Vec::new(),
        parks: 0,
    })
}

impl WatchProbes {
    /// Attaches the park probes (for `pid` only), the context-switch
    /// tracepoint and the samplers.
    pub fn attach(
        &mut self,
        plan: &ProbePlan,
        binary: &Path,
        pid: u32,
        sample_hz: u64,
    ) -> Result<()> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0"))?);
        for (index, site) in plan.sites.iter().enumerate() {
            if site.kind != SiteKind::Park {
                continue;
            }
            let offset = site.probe_offset;
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(offset),
                cookie: Some(index as u64),
            };
            let link = uprobe(&mut self.ebpf, PARK_START)?
                .attach(point, binary, scope)
                .with_context(|| {
                    format!(
                        "could not attach {PARK_START} to {} at file offset {offset:#x}",
                        site.symbol
                    )
                })?;
            self.uprobe_links.push((PARK_START, link));
            self.parks += 1;
        }
        tracepoint(&mut self.ebpf, SWITCH)?
            .attach()
            .context("could not attach to the sched_switch tracepoint")?;
        tracepoint(&mut self.ebpf, WAKEUP)?
            .attach()
            .context("could not attach to the sched_wakeup tracepoint")?;
        let cpus =
            aya::util::online_cpus().map_err(|(path, err)| anyhow!("can't read {path}: {err}"))?;
        let sampler = perf_event(&mut self.ebpf)?;
        for cpu in cpus {
            sampler
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    // A fixed period rather than a frequency the kernel keeps
                    // adjusting: hogs are told by consecutive samples.
                    SamplePolicy::Period(1_000_000_000 / sample_hz),
                    false,
                )
                .with_context(|| format!("could not start sampling CPU {cpu}"))?;
        }
        Ok(())
    }

    /// Turns every watch program on or off at once.
    pub fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(maps::ENABLED)
            .context("the ENABLED map is missing")?;
        let mut flag: Array<&mut MapData, u32> = Array::try_from(map)?;
        flag.set(0, u32::from(enabled), 0)?;
        Ok(())
    }

    /// The futex words user space tells the switch program are park
    /// condvars (learnt from captures whose stack is in a park, see `Capture::in_park`).
    pub fn take_park_futex(&mut self) -> Result<HashMap<MapData, u64, u32>> {
        take_map_as(&mut self.ebpf, maps::PARK_FUTEX)
    }

    pub fn take_ring(&mut self, name: &str) -> Result<RingBuf<MapData>> {
        take_map_as(&mut self.ebpf, name)
    }

    /// Records dropped because a watch ring buffer was full.
    pub fn lost(&self) -> Result<u64> {
        count(&self.ebpf, Counter::WatchLost)
    }

    /// Each program's runs and average run time, when the kernel kept
    /// statistics (see [`collect_stats`]): what a park, a sample and a
    /// context switch cost in the programs themselves, traps excluded.
    pub fn program_stats(&self) -> Vec<(&'static str, u64, Duration)> {
        let mut stats = Vec::new();
        for name in [PARK_START, SAMPLE, SWITCH, WAKEUP] {
            let Some(program) = self.ebpf.program(name) else {
                continue;
            };
            if let Ok(info) = program.info() {
                let runs = info.run_count();
                let average = info
                    .run_time()
                    .checked_div(runs.max(1) as u32)
                    .unwrap_or_default();
                stats.push((name, runs, average));
            }
        }
        stats
    }

    /// Removes everything without making the watcher or the target wait:
    /// each uprobe's removal waits for an RCU grace period (~100 ms here,
    /// NOTES.md). As for recordings (see [`detach`](crate::record::detach)),
    /// a forked child holding every descriptor does the kernel's work in its
    /// exit, where killing the tracer can't interrupt it and leak a
    /// breakpoint in the target; the handle waits for that child.
    pub fn detach_in_background(mut self) -> std::thread::JoinHandle<()> {
        match Detacher::fork_live() {
            Ok(detacher) => {
                // The child holds every probe too: dropping ours is instant.
                drop(self);
                std::thread::spawn(move || detacher.release())
            }
            Err(err) => {
                log::warn!(
                    "could not fork the process that removes the probes ({err:#}); \
                     removing them here, where killing the tracer can leak them"
                );
                std::thread::spawn(move || {
                    let mut links = Vec::new();
                    for (name, id) in self.uprobe_links.drain(..) {
                        if let Ok(program) = uprobe(&mut self.ebpf, name)
                            && let Ok(link) = program.take_link(id)
                        {
                            links.push(link);
                        }
                    }
                    // From one thread each, so that their grace periods overlap.
                    std::thread::scope(|scope| {
                        for link in links {
                            scope.spawn(move || drop(link));
                        }
                    });
                    drop(self);
                })
            }
        }
    }
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe> {
    program_as(ebpf, name, "a uprobe")
}

fn perf_event(ebpf: &mut Ebpf) -> Result<&mut PerfEvent> {
    program_as(ebpf, SAMPLE, "a perf event program")
}

fn tracepoint<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut BtfTracePoint> {
    program_as(ebpf, name, "a BTF tracepoint")
}

/// Turns on the kernel's per-program run-time statistics while the
/// returned descriptor is held (they cost every program run ~50 ns, so
/// only with `-v`).
pub fn collect_stats() -> Option<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).ok()
}
