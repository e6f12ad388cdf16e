//! Loading the embedded eBPF object and attaching its programs to the probe
//! sites of one process.

use std::num::NonZeroU32;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        PerfEvent, UProbe,
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use tracer_common::{EventKind, names};
use tracer_probes::{ProbePlan, ProbeSite, SiteKind, TaskArg};

/// The eBPF object built by `cargo xtask build-ebpf` (see build.rs).
pub(crate) static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TRACER_EBPF_OBJECT"));

/// The eBPF programs, one entry and one return program per kind of site.
const POLL_START: &str = "poll_start";
const POLL_END: &str = "poll_end";
const POLL_RETURNED: &str = "poll_returned";
const PARK_START: &str = "park_start";
const PARK_END: &str = "park_end";
const TASK_EVENT_ARG0: &str = "task_event_arg0";
const TASK_EVENT_ARG1: &str = "task_event_arg1";
const TASK_EVENT_ARG1_DEREF: &str = "task_event_arg1_deref";
const TASK_EVENT_RET: &str = "task_event_ret";
const THREAD_EVENT: &str = "thread_event";
const AWAIT_POINT: &str = "await_point";
const SAMPLE: &str = "sample";
const UPROBE_PROGRAMS: [&str; 11] = [
    POLL_START,
    POLL_END,
    POLL_RETURNED,
    PARK_START,
    PARK_END,
    TASK_EVENT_ARG0,
    TASK_EVENT_ARG1,
    TASK_EVENT_ARG1_DEREF,
    TASK_EVENT_RET,
    THREAD_EVENT,
    AWAIT_POINT,
];

/// How the eBPF side is configured for one recording.
pub struct Settings {
    /// Ring buffer size in bytes (a power of two, a multiple of the page size).
    pub ring_bytes: u32,
    /// Polls shorter than this are counted, not recorded (zero: record all).
    pub min_poll: std::time::Duration,
    /// Bytes of user stack each capture copies (at most `STACK_BYTES_MAX`);
    /// 0 when nothing captures stacks, which spares each poll a read.
    pub stack_bytes: u32,
}

/// What the eBPF side counted instead of recording.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Events and stack captures dropped because a ring buffer was full.
    pub lost_events: u64,
    /// Polls shorter than `--min-poll`, counted in the kernel.
    pub short_polls: u64,
    /// CPU samples that hit the target in the kernel (no user stack to show).
    pub kernel_samples: u64,
}

/// Which probes to attach besides the polls (always attached).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSet {
    /// The workers' park functions.
    pub parks: bool,
    /// Spawns, wakes, task ends, unparks and await points.
    pub scheduler_events: bool,
}

pub struct LoadedProbes {
    ebpf: Ebpf,
    /// Every attachment, by program, so they can be detached while the maps
    /// stay readable.
    links: Vec<(&'static str, UProbeLinkId)>,
    sampling: Vec<PerfEventLinkId>,
}

/// Loads the programs and maps, configured for one target process. Nothing is
/// attached yet.
pub fn load(plan: &ProbePlan, target_pid: u32, settings: &Settings) -> Result<LoadedProbes> {
    let min_poll_ns = settings.min_poll.as_nanos() as u64;
    let mut ebpf = EbpfLoader::new()
        .override_global(names::TARGET_TGID, &target_pid, true)
        .override_global(names::TASK_ID_LAYOUT, &plan.task_id_layout, true)
        .override_global(names::MIN_POLL_NS, &min_poll_ns, true)
        .override_global(names::STACK_BYTES, &settings.stack_bytes, true)
        .override_global(
            names::POLL_END_AT_RETURN_SITES,
            &u32::from(poll_end_at_return_sites(plan)),
            true,
        )
        .map_max_entries(names::EVENTS, settings.ring_bytes)
        .load(EBPF_OBJECT)
        .context("the kernel refused to load the eBPF programs")?;
    for name in UPROBE_PROGRAMS {
        let program: &mut UProbe = program(&mut ebpf, name)?;
        program
            .load()
            .with_context(|| format!("the kernel's verifier refused the eBPF program {name}"))?;
    }
    sampler(&mut ebpf)?
        .load()
        .with_context(|| format!("the kernel's verifier refused the eBPF program {SAMPLE}"))?;
    Ok(LoadedProbes {
        ebpf,
        links: Vec::new(),
        sampling: Vec::new(),
    })
}

impl LoadedProbes {
    /// Attaches the probes of every site of the plan that `probed` asks
    /// for, for `pid` only: `binary` is the file the uprobes are placed in.
    pub fn attach(
        &mut self,
        plan: &ProbePlan,
        binary: &Path,
        pid: u32,
        probed: ProbeSet,
    ) -> Result<()> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0"))?);
        let by_uretprobe = !poll_end_at_return_sites(plan);
        let mut probes: Vec<(Probe, &str)> = Vec::new();
        for (index, site) in plan.sites.iter().enumerate() {
            for probe in probes_for(site, index as u64, probed, by_uretprobe) {
                probes.push((probe, &site.symbol));
            }
        }
        if !by_uretprobe {
            for (index, returned) in plan.poll_returns.iter().enumerate() {
                let probe = Probe {
                    program: POLL_RETURNED,
                    offset: returned.file_offset,
                    cookie: index as u64,
                };
                probes.push((probe, &returned.function));
            }
        }
        for (
            Probe {
                program: name,
                offset,
                cookie,
            },
            function,
        ) in probes
        {
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(offset),
                cookie: Some(cookie),
            };
            let link = program(&mut self.ebpf, name)?
                .attach(point, binary, scope)
                .with_context(|| {
                    format!(
                        "could not attach {name} to {function} at file offset {offset:#x} in {}",
                        binary.display()
                    )
                })?;
            log::debug!(
                "attached {name} to {function} at file offset {offset:#x} (cookie {cookie:#x})"
            );
            self.links.push((name, link));
        }
        Ok(())
    }

    /// Samples every CPU `hz` times a second; the program keeps the samples
    /// that hit the target. Per CPU rather than per thread so that threads
    /// the target starts later are sampled too.
    pub fn start_sampling(&mut self, hz: u64) -> Result<()> {
        let cpus =
            aya::util::online_cpus().map_err(|(path, err)| anyhow!("can't read {path}: {err}"))?;
        let sampler = sampler(&mut self.ebpf)?;
        for cpu in cpus {
            let link = sampler
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(hz),
                    false,
                )
                .with_context(|| format!("could not start sampling CPU {cpu}"))?;
            self.sampling.push(link);
        }
        Ok(())
    }

    /// The ring buffer of events. Can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        self.take_ring(names::EVENTS)
    }

    /// The ring buffer of stack captures. Can be taken once.
    pub fn take_stacks(&mut self) -> Result<RingBuf<MapData>> {
        self.take_ring(names::STACKS)
    }

    fn take_ring(&mut self, name: &str) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(name)
            .with_context(|| format!("the {name} map is missing"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Events the eBPF side could not write because a ring buffer was full.
    pub fn lost_events(&self) -> Result<u64> {
        self.per_cpu_total(names::LOST)
    }

    /// Everything the eBPF side counted instead of recording.
    pub fn counters(&self) -> Result<Counters> {
        Ok(Counters {
            lost_events: self.lost_events()?,
            short_polls: self.per_cpu_total(names::SHORT_POLLS)?,
            kernel_samples: self.per_cpu_total(names::KERNEL_SAMPLES)?,
        })
    }

    /// The sum over CPUs of slot 0 of a per-CPU counter map.
    fn per_cpu_total(&self, name: &str) -> Result<u64> {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("the {name} map is missing"))?;
        let counter: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        Ok(counter.get(&0, 0)?.iter().sum())
    }

    /// How many probes are attached.
    pub fn attached(&self) -> usize {
        self.links.len()
    }

    /// Starts forwarding the eBPF side's log messages (aya-log) to `log`.
    pub fn logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        // The object has no log map when its programs log nothing; that's fine.
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// Turns event recording on or off, at once, for every probe.
    pub fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(names::ENABLED)
            .context("the ENABLED map is missing")?;
        let mut flag: Array<&mut MapData, u32> = Array::try_from(map)?;
        flag.set(0, u32::from(enabled), 0)?;
        Ok(())
    }

    /// Detaches the probes on a thread of its own, after recording was
    /// turned off: it takes seconds and the results need not wait for it.
    pub fn detach_in_background(mut self) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            self.detach();
            drop(self);
        })
    }

    /// Detaches every probe; the maps stay readable.
    ///
    /// Removing a uprobe waits for an RCU grace period (~100 ms here), one
    /// after the other when done in turn: 30 probes took 4.5 s. Dropped from
    /// one thread each, the waits overlap.
    pub fn detach(&mut self) {
        let mut uprobe_links = Vec::new();
        for (name, link) in self.links.drain(..) {
            if let Ok(program) = program(&mut self.ebpf, name)
                && let Ok(link) = program.take_link(link)
            {
                uprobe_links.push(link);
            }
        }
        let mut sampling_links = Vec::new();
        if let Ok(sampler) = sampler(&mut self.ebpf) {
            for link in std::mem::take(&mut self.sampling) {
                if let Ok(link) = sampler.take_link(link) {
                    sampling_links.push(link);
                }
            }
        }
        std::thread::scope(|scope| {
            for link in uprobe_links {
                scope.spawn(move || drop(link));
            }
            for link in sampling_links {
                scope.spawn(move || drop(link));
            }
        });
    }
}

/// One uprobe to attach: which program, where in the file, with what cookie.
struct Probe {
    program: &'static str,
    offset: u64,
    cookie: u64,
}

/// The probes a site gets. Polls and parks: an entry and a return probe,
/// both carrying the site index (polls: the entry only when their ends are
/// probed at return sites instead, `poll_uretprobe` false). Scheduler events: one entry probe whose
/// program is chosen by the register holding the task header, and whose
/// cookie carries the event kind (high half) and the site index (low half).
fn probes_for(site: &ProbeSite, index: u64, probed: ProbeSet, poll_uretprobe: bool) -> Vec<Probe> {
    let entry_and_return = |entry, exit| {
        vec![
            Probe {
                program: entry,
                offset: site.probe_offset,
                cookie: index,
            },
            Probe {
                program: exit,
                offset: site.file_offset,
                cookie: index,
            },
        ]
    };
    match site.kind {
        SiteKind::Poll if poll_uretprobe => entry_and_return(POLL_START, POLL_END),
        // The poll's end is probed where it returns to (see `attach`).
        SiteKind::Poll => vec![Probe {
            program: POLL_START,
            offset: site.probe_offset,
            cookie: index,
        }],
        SiteKind::Park if probed.parks => entry_and_return(PARK_START, PARK_END),
        // Placed where [rsp] still holds the caller's address (see
        // tracer-probes' placement).
        SiteKind::AwaitPoint if probed.scheduler_events => vec![Probe {
            program: AWAIT_POINT,
            offset: site.probe_offset,
            cookie: index,
        }],
        SiteKind::Spawn | SiteKind::Wake | SiteKind::TaskEnd | SiteKind::Unpark
            if probed.scheduler_events =>
        {
            let Some(kind) = scheduler_event_kind(site.kind) else {
                return Vec::new();
            };
            let cookie = ((kind as u64) << 32) | index;
            let (program, offset) = match site.task_arg {
                TaskArg::Rdi => (TASK_EVENT_ARG0, site.probe_offset),
                TaskArg::Rsi => (TASK_EVENT_ARG1, site.probe_offset),
                TaskArg::RsiDeref => (TASK_EVENT_ARG1_DEREF, site.probe_offset),
                // A uretprobe: attached at the function's entry.
                TaskArg::ReturnValue => (TASK_EVENT_RET, site.file_offset),
                TaskArg::None => (THREAD_EVENT, site.probe_offset),
            };
            vec![Probe {
                program,
                offset,
                cookie,
            }]
        }
        _ => Vec::new(),
    }
}

/// Poll ends are probed at the instructions `raw::poll` returns to when
/// tracer-probes found them (cheaper than a uretprobe), else by uretprobes.
fn poll_end_at_return_sites(plan: &ProbePlan) -> bool {
    !plan.poll_returns.is_empty()
}

/// The event a scheduler-event site reports (None for the other kinds).
fn scheduler_event_kind(kind: SiteKind) -> Option<EventKind> {
    match kind {
        SiteKind::Spawn => Some(EventKind::Spawn),
        SiteKind::Wake => Some(EventKind::Wake),
        SiteKind::TaskEnd => Some(EventKind::TaskEnd),
        SiteKind::Unpark => Some(EventKind::Unpark),
        SiteKind::Poll | SiteKind::Park | SiteKind::AwaitPoint => None,
    }
}

fn sampler(ebpf: &mut Ebpf) -> Result<&mut PerfEvent> {
    ebpf.program_mut(SAMPLE)
        .with_context(|| format!("the eBPF object has no program {SAMPLE}"))?
        .try_into()
        .with_context(|| format!("the eBPF program {SAMPLE} is not a perf event program"))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe> {
    ebpf.program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?
        .try_into()
        .with_context(|| format!("the eBPF program {name} is not a uprobe"))
}
