//! Loading the embedded eBPF object and attaching its programs to the probe
//! sites of one process.

use std::num::NonZeroU32;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, PerfEvent, UProbe,
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use tracer_common::names::programs::{
    AWAIT_POINT, BLOCK_ON_END, BLOCK_ON_START, PARK_END, PARK_START, POLL_END, POLL_PREEMPTED,
    POLL_RETURNED, POLL_START, ROOT_PARK_END, ROOT_PARK_START, ROOT_POLL_END, ROOT_POLL_START,
    ROOT_WAKE, SAMPLE, TASK_EVENT_ARG0, TASK_EVENT_ARG1, TASK_EVENT_ARG1_DEREF, TASK_EVENT_RET,
    THREAD_EVENT, UPROBES,
};
use tracer_common::names::{globals, maps};
use tracer_common::{Counter, EventKind};
use tracer_probes::{ProbePlan, ProbeSite, SiteKind, TaskArg};

use super::detach::Detacher;

/// The eBPF object built by `cargo xtask build-ebpf` (see build.rs).
#[cfg(not(ebpf_object_missing))]
pub(crate) static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TRACER_EBPF_OBJECT"));

/// Built without the object (build.rs warned): [`check_object`] refuses.
#[cfg(ebpf_object_missing)]
pub(crate) static EBPF_OBJECT: &[u8] = &[];

/// Fails when this tracer was built without its eBPF object (a check-only
/// or editor build of a fresh clone): it can list probes but not trace.
pub fn check_object() -> Result<()> {
    if EBPF_OBJECT.is_empty() {
        bail!(
            "this rt-ebpf-trace was built without its eBPF programs (the object was \
             missing at build time): run `cargo xtask build-ebpf`, then build the tracer again"
        );
    }
    Ok(())
}

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

/// What the eBPF side counted instead of recording (the `COUNTERS` map,
/// summed over CPUs).
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelCounters {
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

/// The size a ring buffer this mode doesn't use is created with: one page.
pub(crate) const UNUSED_RING_BYTES: u32 = 4096;

/// Loads the programs and maps, configured for one target process. Nothing is
/// attached yet.
pub fn load(plan: &ProbePlan, target_pid: u32, settings: &Settings) -> Result<LoadedProbes> {
    let min_poll_ns = settings.min_poll.as_nanos() as u64;
    let mut ebpf = EbpfLoader::new()
        .override_global(globals::TARGET_TGID, &target_pid, true)
        .override_global(globals::TASK_ID_LAYOUT, &plan.task_id_layout, true)
        .override_global(globals::MIN_POLL_NS, &min_poll_ns, true)
        .override_global(globals::STACK_BYTES, &settings.stack_bytes, true)
        .override_global(
            globals::POLL_END_AT_RETURN_SITES,
            &u32::from(poll_end_at_return_sites(plan)),
            true,
        )
        .map_max_entries(maps::EVENTS, settings.ring_bytes)
        // The watch tier's rings are unused here: one page each, not 4 + 8 MiB.
        .map_max_entries(maps::WATCH_EVENTS, UNUSED_RING_BYTES)
        .map_max_entries(maps::WATCH_STACKS, UNUSED_RING_BYTES)
        .load(EBPF_OBJECT)
        .context("the kernel refused to load the eBPF programs")?;
    for name in UPROBES {
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
    ///
    /// A probe the kernel refuses (e.g. `perf_event_open` error 524 on an
    /// instruction it can neither emulate nor single-step) costs only what
    /// it traces, with a warning: a poll-end probe at a return site is
    /// replaced by uretprobes on every poll function, any other probe's
    /// feature goes missing for that function. Only when no poll probe
    /// attaches at all is there nothing to trace, and that is an error.
    pub fn attach(
        &mut self,
        plan: &ProbePlan,
        binary: &Path,
        pid: u32,
        probed: ProbeSet,
    ) -> Result<()> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0"))?);
        let by_uretprobe = plan.poll_end_uretprobes;
        let root_site = default_root_site(plan);
        let mut probes: Vec<(Probe, &str)> = Vec::new();
        for (index, site) in plan.sites.iter().enumerate() {
            for probe in probes_for(site, index as u64, probed, by_uretprobe, root_site) {
                probes.push((probe, &site.symbol));
            }
        }
        if !plan.poll_returns.is_empty() {
            for (index, returned) in plan.poll_returns.iter().enumerate() {
                let probe = Probe {
                    program: POLL_RETURNED,
                    offset: returned.file_offset,
                    cookie: index as u64,
                };
                probes.push((probe, &returned.function));
            }
        }
        let mut return_site_failed = false;
        let mut polls_attached = 0;
        for (probe, function) in probes {
            match self.attach_one(&probe, function, binary, scope) {
                Ok(()) => polls_attached += usize::from(probe.program == POLL_START),
                Err(err) if probe.program == POLL_RETURNED => {
                    log::warn!("{err:#}: poll ends there are traced by return probes instead");
                    return_site_failed = true;
                }
                Err(err) => log::warn!("{err:#}: {}", what_goes_missing(probe.program)),
            }
        }
        if polls_attached == 0 {
            return Err(anyhow!(
                "the kernel refused every poll probe in {}: nothing can be traced (see the warnings above)",
                binary.display()
            ));
        }
        if let Err(err) = self.attach_preemption() {
            log::warn!(
                "{err:#}: a poll's time includes any time the thread was preempted \
                 (a preempted poll may be reported as a HOG)"
            );
        }
        if return_site_failed && !by_uretprobe {
            for (index, site) in plan.sites.iter().enumerate() {
                if site.kind != SiteKind::Poll {
                    continue;
                }
                let probe = Probe {
                    program: POLL_END,
                    offset: site.file_offset,
                    cookie: index as u64,
                };
                if let Err(err) = self.attach_one(&probe, &site.symbol, binary, scope) {
                    log::warn!("{err:#}: {}", what_goes_missing(POLL_END));
                }
            }
        }
        Ok(())
    }

    /// The `sched_switch` program that measures preemption inside polls
    /// (tracer-ebpf's `preempt`): a BTF tracepoint, no tracefs needed.
    fn attach_preemption(&mut self) -> Result<()> {
        let btf =
            Btf::from_sys_fs().context("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
        let program: &mut BtfTracePoint =
            program_as(&mut self.ebpf, POLL_PREEMPTED, "a BTF tracepoint")?;
        program
            .load("sched_switch", &btf)
            .with_context(|| format!("the kernel refused the eBPF program {POLL_PREEMPTED}"))?;
        program
            .attach()
            .with_context(|| format!("could not attach {POLL_PREEMPTED} to sched_switch"))?;
        Ok(())
    }

    fn attach_one(
        &mut self,
        probe: &Probe,
        function: &str,
        binary: &Path,
        scope: UProbeScope,
    ) -> Result<()> {
        let &Probe {
            program: name,
            offset,
            cookie,
        } = probe;
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
        self.take_ring(maps::EVENTS)
    }

    /// The ring buffer of stack captures. Can be taken once.
    pub fn take_stacks(&mut self) -> Result<RingBuf<MapData>> {
        self.take_ring(maps::STACKS)
    }

    fn take_ring(&mut self, name: &str) -> Result<RingBuf<MapData>> {
        take_map_as(&mut self.ebpf, name)
    }

    /// Events the eBPF side could not write because a ring buffer was full.
    pub fn lost_events(&self) -> Result<u64> {
        self.count(Counter::Lost)
    }

    /// Everything the eBPF side counted instead of recording.
    pub fn counters(&self) -> Result<KernelCounters> {
        Ok(KernelCounters {
            lost_events: self.count(Counter::Lost)?,
            short_polls: self.count(Counter::ShortPolls)?,
            kernel_samples: self.count(Counter::KernelSamples)?,
        })
    }

    /// One counter, summed over CPUs.
    fn count(&self, counter: Counter) -> Result<u64> {
        count(&self.ebpf, counter)
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
            .map_mut(maps::ENABLED)
            .with_context(|| format!("the {} map is missing", maps::ENABLED))?;
        let mut flag: Array<&mut MapData, u32> = Array::try_from(map)?;
        flag.set(0, u32::from(enabled), 0)?;
        Ok(())
    }

    /// Detaches the probes after recording was turned off: it takes seconds
    /// and the results need not wait for it. The kernel's work is done by a
    /// forked child's exit, which a kill of the tracer can't interrupt
    /// (see [`detach`](super::detach)); the handle waits for it.
    pub fn detach_in_background(mut self) -> std::thread::JoinHandle<()> {
        match Detacher::fork_live() {
            Ok(detacher) => {
                // The child holds every probe too: dropping ours is instant.
                self.drop_links();
                drop(self);
                std::thread::spawn(move || detacher.release())
            }
            Err(err) => {
                log::warn!(
                    "could not fork the process that removes the probes ({err:#}); \
                     removing them here, where killing the tracer can leak them"
                );
                std::thread::spawn(move || {
                    self.detach();
                    drop(self);
                })
            }
        }
    }

    /// Drops every link, in turn.
    fn drop_links(&mut self) {
        for (name, link) in self.links.drain(..) {
            if let Ok(program) = program(&mut self.ebpf, name) {
                drop(program.take_link(link));
            }
        }
        if let Ok(sampler) = sampler(&mut self.ebpf) {
            for link in std::mem::take(&mut self.sampling) {
                drop(sampler.take_link(link));
            }
        }
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
fn probes_for(
    site: &ProbeSite,
    index: u64,
    probed: ProbeSet,
    poll_uretprobe: bool,
    root_site: u64,
) -> Vec<Probe> {
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
        // The `block_on` root future's polls: between the loop's entry and
        // return and the parker's parks (tracer-ebpf's `block_on`).
        SiteKind::BlockOn => entry_and_return(BLOCK_ON_START, BLOCK_ON_END),
        SiteKind::RootPark | SiteKind::BlockOnPark => {
            // The cookie also says whether a park here shows the thread is
            // in a `block_on` loop (bit 63) and which loop to assume then
            // (bits 32–62: its site index + 1), for roots whose loop was
            // entered before tracing began.
            let outer = u64::from(site.kind == SiteKind::BlockOnPark) << 63;
            let cookie = outer | ((root_site + 1) << 32) | index;
            vec![
                Probe {
                    program: ROOT_PARK_START,
                    offset: site.probe_offset,
                    cookie,
                },
                Probe {
                    program: ROOT_PARK_END,
                    offset: site.file_offset,
                    cookie,
                },
            ]
        }
        SiteKind::RootPoll => entry_and_return(ROOT_POLL_START, ROOT_POLL_END),
        SiteKind::RootWake if probed.scheduler_events => vec![Probe {
            program: ROOT_WAKE,
            offset: site.probe_offset,
            cookie: index,
        }],
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

/// The `block_on` loop a thread found parking in one is assumed to be in:
/// the one whose root future's type is known (the program's own root),
/// else the first.
fn default_root_site(plan: &ProbePlan) -> u64 {
    let loops = || {
        plan.sites
            .iter()
            .enumerate()
            .filter(|(_, site)| site.kind == SiteKind::BlockOn)
    };
    loops()
        .find(|(_, site)| site.task_type.as_ref().is_some_and(|t| !t.full.is_empty()))
        .or_else(|| loops().next())
        .map_or(0, |(index, _)| index as u64)
}

/// Poll ends are probed only at the instructions `raw::poll` returns to
/// when tracer-probes found them for every scheduler (cheaper than a
/// uretprobe); otherwise uretprobes end them (the return sites too, where
/// found: whichever fires first ends the poll).
fn poll_end_at_return_sites(plan: &ProbePlan) -> bool {
    !plan.poll_end_uretprobes
}

/// What a probe of `program` that could not be attached leaves out.
fn what_goes_missing(program: &str) -> &'static str {
    match program {
        POLL_START => "this task type's polls will be missing",
        POLL_END => "this task type's polls end only when the task is polled again",
        PARK_START | PARK_END => "parks of this scheduler will be missing",
        AWAIT_POINT => "where tasks wait (waits_at) will be missing",
        BLOCK_ON_START | BLOCK_ON_END | ROOT_PARK_START | ROOT_PARK_END | ROOT_POLL_START
        | ROOT_POLL_END => {
            "the block_on root future's polls there will be missing or one long poll"
        }
        ROOT_WAKE => "wakes of the block_on root future will be missing",
        _ => "these scheduler events will be missing",
    }
}

/// The event a scheduler-event site reports (None for the other kinds).
fn scheduler_event_kind(kind: SiteKind) -> Option<EventKind> {
    match kind {
        SiteKind::Spawn => Some(EventKind::Spawn),
        SiteKind::Wake => Some(EventKind::Wake),
        SiteKind::TaskEnd => Some(EventKind::TaskEnd),
        SiteKind::Unpark => Some(EventKind::Unpark),
        SiteKind::Poll
        | SiteKind::Park
        | SiteKind::AwaitPoint
        | SiteKind::BlockOn
        | SiteKind::RootPark
        | SiteKind::BlockOnPark
        | SiteKind::RootWake
        | SiteKind::RootPoll => None,
    }
}

fn sampler(ebpf: &mut Ebpf) -> Result<&mut PerfEvent> {
    program_as(ebpf, SAMPLE, "a perf event program")
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe> {
    program_as(ebpf, name, "a uprobe")
}

/// Map `name`, taken out of the object (once), as its map type `M`
/// (`RingBuf`, `HashMap`…).
pub(crate) fn take_map_as<M>(ebpf: &mut Ebpf, name: &str) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the {name} map is missing"))?;
    Ok(M::try_from(map)?)
}

/// One of the object's counters, summed over the CPUs.
pub(crate) fn count(ebpf: &Ebpf, counter: Counter) -> Result<u64> {
    let name = maps::COUNTERS;
    let map = ebpf
        .map(name)
        .with_context(|| format!("the {name} map is missing"))?;
    let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
    Ok(counters.get(&(counter as u32), 0)?.iter().sum())
}

/// Program `name` of the object as its program type `P` (`UProbe`,
/// `PerfEvent`, `BtfTracePoint`…); `kind` says which in the error.
pub(crate) fn program_as<'a, P>(ebpf: &'a mut Ebpf, name: &str, kind: &str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?
        .try_into()
        .with_context(|| format!("the eBPF program {name} is not {kind}"))
}
