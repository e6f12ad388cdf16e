//! Loading the embedded eBPF object and attaching its programs to the probe
//! sites of one process.

use std::num::NonZeroU32;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use tracer_common::names;
use tracer_probes::{ProbePlan, SiteKind};

/// The eBPF object built by `cargo xtask build-ebpf` (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TRACER_EBPF_OBJECT"));

/// The eBPF programs, one entry and one return program per kind of site.
const POLL_START: &str = "poll_start";
const POLL_END: &str = "poll_end";
const PARK_START: &str = "park_start";
const PARK_END: &str = "park_end";

/// How the eBPF side is configured for one recording.
pub struct Settings {
    /// Ring buffer size in bytes (a power of two, a multiple of the page size).
    pub ring_bytes: u32,
    /// Polls shorter than this are counted, not recorded (zero: record all).
    pub min_poll: std::time::Duration,
}

pub struct LoadedProbes {
    ebpf: Ebpf,
    /// Every attachment, by program, so they can be detached while the maps
    /// stay readable.
    links: Vec<(&'static str, UProbeLinkId)>,
}

/// Loads the programs and maps, configured for one target process. Nothing is
/// attached yet.
pub fn load(plan: &ProbePlan, target_pid: u32, settings: &Settings) -> Result<LoadedProbes> {
    let min_poll_ns = settings.min_poll.as_nanos() as u64;
    let mut ebpf = EbpfLoader::new()
        .override_global(names::TARGET_TGID, &target_pid, true)
        .override_global(names::TASK_ID_LAYOUT, &plan.task_id_layout, true)
        .override_global(names::MIN_POLL_NS, &min_poll_ns, true)
        .map_max_entries(names::EVENTS, settings.ring_bytes)
        .load(EBPF_OBJECT)
        .context("the kernel refused to load the eBPF programs")?;
    for name in [POLL_START, POLL_END, PARK_START, PARK_END] {
        let program: &mut UProbe = program(&mut ebpf, name)?;
        program
            .load()
            .with_context(|| format!("the kernel's verifier refused the eBPF program {name}"))?;
    }
    Ok(LoadedProbes {
        ebpf,
        links: Vec::new(),
    })
}

impl LoadedProbes {
    /// Attaches an entry and a return probe to every site of the plan, for
    /// `pid` only. `binary` is the file the uprobes are placed in.
    pub fn attach(&mut self, plan: &ProbePlan, binary: &Path, pid: u32) -> Result<usize> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0"))?);
        let mut attached = 0;
        for (index, site) in plan.sites.iter().enumerate() {
            let (entry, exit) = match site.kind {
                SiteKind::Poll => (POLL_START, POLL_END),
                SiteKind::Park => (PARK_START, PARK_END),
            };
            for name in [entry, exit] {
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(site.file_offset),
                    // The cookie tells the program which site fired.
                    cookie: Some(index as u64),
                };
                let link = program(&mut self.ebpf, name)?
                    .attach(point, binary, scope)
                    .with_context(|| {
                        format!(
                            "could not attach {name} to {} at file offset {:#x} in {}",
                            site.symbol,
                            site.file_offset,
                            binary.display()
                        )
                    })?;
                self.links.push((name, link));
                attached += 1;
            }
        }
        Ok(attached)
    }

    /// The ring buffer user space drains. Can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(names::EVENTS)
            .context("the EVENTS map is missing")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Events the eBPF side could not write because the ring buffer was full.
    pub fn lost_events(&self) -> Result<u64> {
        let map = self
            .ebpf
            .map(names::LOST)
            .context("the LOST map is missing")?;
        let lost: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        Ok(lost.get(&0, 0)?.iter().sum())
    }

    /// Polls shorter than `--min-poll`, counted in the kernel and not recorded.
    pub fn short_polls(&self) -> Result<u64> {
        let map = self.ebpf.map(names::SHORT_POLLS).context("the SHORT_POLLS map is missing")?;
        let short: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        Ok(short.get(&0, 0)?.iter().sum())
    }

    /// Starts forwarding the eBPF side's log messages (aya-log) to `log`.
    pub fn logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        // The object has no log map when its programs log nothing; that's fine.
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// Detaches every probe; the maps stay readable.
    pub fn detach(&mut self) {
        for (name, link) in self.links.drain(..) {
            if let Ok(program) = program(&mut self.ebpf, name) {
                // A link that fails to detach is closed when `ebpf` drops.
                let _ = program.detach(link);
            }
        }
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe> {
    ebpf.program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?
        .try_into()
        .with_context(|| format!("the eBPF program {name} is not a uprobe"))
}
