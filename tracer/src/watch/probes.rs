//! Loading and attaching the watch tier's eBPF programs (see the eBPF
//! crate's `watch` module): park probes, the `sched_switch` BTF tracepoint
//! and per-CPU sampling. No poll probe: that is the point of the tier.

use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, PerfEvent, UProbe,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use tracer_common::{names, watch::names as watch_names};
use tracer_probes::{ProbePlan, SiteKind};

use crate::record::loader::EBPF_OBJECT;

const PARK_START: &str = "watch_park_start";
const PARK_END: &str = "watch_park_end";
const SAMPLE: &str = "watch_sample";
const SWITCH: &str = "watch_switch";

/// The rings the full tier uses are created with the object but unused
/// here: one page each instead of their 16 + 32 MiB.
const UNUSED_RING_BYTES: u32 = 4096;

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
    let mut ebpf = EbpfLoader::new()
        .override_global(names::TARGET_TGID, &settings.pid, true)
        .override_global(names::STACK_BYTES, &settings.stack_bytes, true)
        .override_global(watch_names::MIN_OFF_CPU_NS, &settings.min_off_cpu_ns, true)
        .map_max_entries(names::EVENTS, UNUSED_RING_BYTES)
        .map_max_entries(names::STACKS, UNUSED_RING_BYTES)
        .load(EBPF_OBJECT)
        .context("the kernel refused to load the eBPF programs")?;
    for name in [PARK_START, PARK_END] {
        uprobe(&mut ebpf, name)?
            .load()
            .with_context(|| format!("the kernel's verifier refused the eBPF program {name}"))?;
    }
    perf_event(&mut ebpf)?
        .load()
        .with_context(|| format!("the kernel's verifier refused the eBPF program {SAMPLE}"))?;
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
    switch(&mut ebpf)?
        .load("sched_switch", &btf)
        .with_context(|| format!("the kernel refused the eBPF program {SWITCH}"))?;
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
            for (name, offset) in [
                (PARK_START, site.probe_offset),
                (PARK_END, site.file_offset),
            ] {
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(offset),
                    cookie: Some(index as u64),
                };
                let link = uprobe(&mut self.ebpf, name)?
                    .attach(point, binary, scope)
                    .with_context(|| {
                        format!(
                            "could not attach {name} to {} at file offset {offset:#x}",
                            site.symbol
                        )
                    })?;
                self.uprobe_links.push((name, link));
            }
            self.parks += 1;
        }
        switch(&mut self.ebpf)?
            .attach()
            .context("could not attach to the sched_switch tracepoint")?;
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
            .map_mut(names::ENABLED)
            .context("the ENABLED map is missing")?;
        let mut flag: Array<&mut MapData, u32> = Array::try_from(map)?;
        flag.set(0, u32::from(enabled), 0)?;
        Ok(())
    }

    pub fn take_ring(&mut self, name: &str) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(name)
            .with_context(|| format!("the {name} map is missing"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Records dropped because a watch ring buffer was full.
    pub fn lost(&self) -> Result<u64> {
        let map = self
            .ebpf
            .map(watch_names::WATCH_LOST)
            .context("the WATCH_LOST map is missing")?;
        let counter: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        Ok(counter.get(&0, 0)?.iter().sum())
    }

    /// Each program's runs and average run time, when the kernel kept
    /// statistics (see [`collect_stats`]): what a park, a sample and a
    /// context switch cost in the programs themselves, traps excluded.
    pub fn program_stats(&self) -> Vec<(&'static str, u64, Duration)> {
        let mut stats = Vec::new();
        for name in [PARK_START, PARK_END, SAMPLE, SWITCH] {
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

    /// Removes everything on a thread of its own: each uprobe's removal
    /// waits for an RCU grace period (~100 ms here, NOTES.md), so neither the
    /// watcher nor the target may wait for it. The park links are dropped
    /// from one thread each so that their grace periods overlap.
    pub fn detach_in_background(mut self) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut links = Vec::new();
            for (name, id) in self.uprobe_links.drain(..) {
                if let Ok(program) = uprobe(&mut self.ebpf, name)
                    && let Ok(link) = program.take_link(id)
                {
                    links.push(link);
                }
            }
            std::thread::scope(|scope| {
                for link in links {
                    scope.spawn(move || drop(link));
                }
            });
            drop(self);
        })
    }
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe> {
    ebpf.program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?
        .try_into()
        .with_context(|| format!("the eBPF program {name} is not a uprobe"))
}

fn perf_event(ebpf: &mut Ebpf) -> Result<&mut PerfEvent> {
    ebpf.program_mut(SAMPLE)
        .with_context(|| format!("the eBPF object has no program {SAMPLE}"))?
        .try_into()
        .with_context(|| format!("the eBPF program {SAMPLE} is not a perf event program"))
}

fn switch(ebpf: &mut Ebpf) -> Result<&mut BtfTracePoint> {
    ebpf.program_mut(SWITCH)
        .with_context(|| format!("the eBPF object has no program {SWITCH}"))?
        .try_into()
        .with_context(|| format!("the eBPF program {SWITCH} is not a BTF tracepoint"))
}

/// Turns on the kernel's per-program run-time statistics while the
/// returned descriptor is held (they cost every program run ~50 ns, so
/// only with `-v`).
pub fn collect_stats() -> Option<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).ok()
}
