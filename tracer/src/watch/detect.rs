//! Findings and per-interval health from parks, off-CPU spans and samples.
//!
//! - **Blocking**: a worker that went to sleep (a voluntary switch, not a
//!   preemption) while not parked, for at least `--blocking`. Its stacks at
//!   the switch say where, and the task poll on the user stack says which
//!   task type (none: it blocked in the scheduler between polls).
//! - **Hog**: consecutive samples of one worker in the same task type with
//!   no park of that worker in between (the kernel's park count, carried by
//!   every sample, did not change), spanning at least `--hog`. Without
//!   a probe per poll this can't tell one long poll from several polls of
//!   the same type back to back (a worker polls at most 61 tasks between
//!   parks), and the poll began before the first sample and ended after the
//!   last: the span is a lower bound on how long the worker was held, and
//!   is reported as such. A preemption that starts after the run's last
//!   sample, with still no park, extends it to the thread's return: the
//!   worker was held (not parked) all along; how much of the span was
//!   preempted is reported with the finding, since on an overloaded
//!   machine that part is the machine's doing, not the task's.
//! - **Health**, every interval: each worker's busy share (time not asleep
//!   in its park: a park that returns without sleeping counts as busy, it
//!   is a few µs),
//!   imbalance (busiest over the mean), findings, time blocked and
//!   preempted, CPU per task type (samples / rate).
//!
//! Everything here is data; the text is made in `report`.

use std::collections::{BTreeMap, HashMap};

use super::stacks::Capture;

/// Which task type: the poll site, or none (scheduler code, or no task).
pub type Site = Option<usize>;

#[derive(Clone, Debug)]
pub struct Blocking {
    pub tid: u32,
    pub site: Site,
    /// When it went off CPU.
    pub ts_ns: u64,
    pub duration_ns: u64,
    /// The thread's state at the switch (`prev_state`: 1 interruptible, 2
    /// uninterruptible sleep, …).
    pub state: u32,
    /// The stacks at the switch, when their capture arrived.
    pub capture: Option<Capture>,
}

#[derive(Clone, Debug)]
pub struct Hog {
    pub tid: u32,
    pub site: usize,
    pub first_ns: u64,
    pub last_ns: u64,
    pub samples: u32,
    /// Of the span, how long the thread was preempted.
    pub preempted_ns: u64,
    /// Announced while it ran (it crossed `ongoing_hog_ns`).
    pub announced: bool,
    /// The last sample's stacks.
    pub capture: Capture,
}

impl Hog {
    /// At least this long (the span between the first sample and the last
    /// sample or the end of a preemption after it).
    pub fn lower_bound_ns(&self) -> u64 {
        self.last_ns - self.first_ns
    }
}

#[derive(Clone, Debug)]
pub enum Finding {
    Blocking(Blocking),
    Hog(Hog),
}

/// One worker's share of an interval.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerHealth {
    pub tid: u32,
    /// Fraction of the interval not parked, 0..=1.
    pub busy: f64,
    pub parks: u64,
}

/// One interval, as written to the trace and the terminal.
#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    pub start_ns: u64,
    pub end_ns: u64,
    pub workers: Vec<WorkerHealth>,
    /// Busiest worker's busy share over the mean (1.0: even), 0 with no work.
    pub imbalance: f64,
    pub hogs: u32,
    pub blocking: u32,
    pub blocked_ns: u64,
    pub preempted_ns: u64,
    /// Samples per task type (None: in no task) in the interval.
    pub samples_by_site: BTreeMap<Option<usize>, u64>,
    /// Samples taken while the thread was in the kernel.
    pub kernel_samples: u64,
}

#[derive(Default)]
struct Worker {
    parked_since: Option<u64>,
    parked_ns: u64,
    /// The kernel's park count, latest seen and at the interval's start.
    parks_seen: Option<u32>,
    parks_at_interval: Option<u32>,
    run: Option<Run>,
}

impl Worker {
    fn saw_parks(&mut self, parks: u32) {
        self.parks_seen = Some(parks);
        self.parks_at_interval.get_or_insert(parks);
    }
}

/// Consecutive samples of one task type on one worker.
struct Run {
    site: usize,
    first_ns: u64,
    last_ns: u64,
    samples: u32,
    /// The worker's park count at the first sample.
    parks: u32,
    preempted_ns: u64,
    last: Capture,
    /// Already announced as an ongoing hog (see [`Detector::take_ongoing`]).
    announced: bool,
}

pub struct Thresholds {
    pub blocking_ns: u64,
    pub hog_ns: u64,
    /// Announce a hog run as soon as it spans this long (`--on-hog`), so
    /// that escalation starts while it still runs: a poll that never
    /// returns never ends its run.
    pub ongoing_hog_ns: Option<u64>,
}

/// A hog run that crossed `ongoing_hog_ns` and still runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OngoingHog {
    pub tid: u32,
    pub site: usize,
    pub span_ns: u64,
    pub last_ns: u64,
}

pub struct Detector {
    thresholds: Thresholds,
    workers: HashMap<u32, Worker>,
    interval_start: u64,
    hogs: u32,
    blocking: u32,
    blocked_ns: u64,
    preempted_ns: u64,
    samples_by_site: BTreeMap<Option<usize>, u64>,
    kernel_samples: u64,
    /// Findings not yet taken by the caller.
    found: Vec<Finding>,
    ongoing: Vec<OngoingHog>,
}

impl Detector {
    pub fn new(thresholds: Thresholds, start_ns: u64) -> Self {
        Detector {
            thresholds,
            workers: HashMap::new(),
            interval_start: start_ns,
            hogs: 0,
            blocking: 0,
            blocked_ns: 0,
            preempted_ns: 0,
            samples_by_site: BTreeMap::new(),
            kernel_samples: 0,
            found: Vec::new(),
            ongoing: Vec::new(),
        }
    }

    /// A worker went to sleep in its park: that ends any hog run.
    pub fn park_sleep(&mut self, tid: u32, ts_ns: u64, parks: u32) {
        let worker = self.workers.entry(tid).or_default();
        worker.parked_since = Some(ts_ns);
        worker.saw_parks(parks);
        if let Some(run) = worker.run.take() {
            self.end_run(tid, run);
        }
    }

    /// It woke at `ts_ns` after `duration_ns` asleep.
    pub fn park_wake(&mut self, tid: u32, ts_ns: u64, duration_ns: u64) {
        let start = self.interval_start;
        let worker = self.workers.entry(tid).or_default();
        // Earlier intervals counted their part already.
        let since = ts_ns.saturating_sub(duration_ns).max(start);
        worker.parked_ns += ts_ns.saturating_sub(since);
        worker.parked_since = None;
    }

    /// A worker came back on CPU after `duration_ns` off it, not parked.
    #[allow(clippy::too_many_arguments)]
    pub fn off_cpu(
        &mut self,
        tid: u32,
        ts_ns: u64,
        duration_ns: u64,
        state: u32,
        preempted: bool,
        parks: u32,
        capture: Option<Capture>,
    ) {
        if preempted {
            self.preempted_ns += duration_ns;
            // Still in the run if nothing parked since its first sample.
            if let Some(run) = self
                .workers
                .get_mut(&tid)
                .and_then(|worker| worker.run.as_mut())
                && ts_ns >= run.last_ns
                && parks == run.parks
            {
                run.last_ns = ts_ns + duration_ns;
                run.preempted_ns += duration_ns;
            }
            return;
        }
        self.blocked_ns += duration_ns;
        if duration_ns < self.thresholds.blocking_ns {
            return;
        }
        self.blocking += 1;
        let site = capture.as_ref().and_then(|capture| capture.site);
        self.found.push(Finding::Blocking(Blocking {
            tid,
            site,
            ts_ns,
            duration_ns,
            state,
            capture,
        }));
    }

    pub fn sample(&mut self, capture: Capture) {
        use tracer_common::watch::{WATCH_IN_KERNEL, WATCH_PARKED, WATCH_WORKER};
        let parked = capture.flags & WATCH_PARKED != 0;
        if capture.flags & WATCH_IN_KERNEL != 0 {
            self.kernel_samples += 1;
        }
        *self
            .samples_by_site
            .entry(if parked { None } else { capture.site })
            .or_default() += 1;
        if capture.flags & WATCH_WORKER == 0 {
            return;
        }
        let tid = capture.tid;
        let worker = self.workers.entry(tid).or_default();
        worker.saw_parks(capture.parks);
        let parks = capture.parks;
        let continues = match (&worker.run, capture.site) {
            (Some(run), Some(site)) => !parked && run.site == site && run.parks == parks,
            _ => false,
        };
        if continues {
            let run = worker.run.as_mut().expect("matched above");
            run.last_ns = run.last_ns.max(capture.ts_ns);
            run.samples += 1;
            // The finding shows the last sample that ran inside the task's
            // own callees: one that landed in the poll function's own code
            // has nothing below the poll frame to say where the time went.
            if capture.task_depth > 0 || run.last.task_depth == 0 {
                run.last = capture;
            }
            let span_ns = run.last_ns - run.first_ns;
            if !run.announced
                && self
                    .thresholds
                    .ongoing_hog_ns
                    .is_some_and(|at| span_ns >= at)
            {
                run.announced = true;
                self.ongoing.push(OngoingHog {
                    tid,
                    site: run.site,
                    span_ns,
                    last_ns: run.last_ns,
                });
            }
            return;
        }
        let ended = worker.run.take();
        if let (Some(site), false) = (capture.site, parked) {
            worker.run = Some(Run {
                site,
                first_ns: capture.ts_ns,
                last_ns: capture.ts_ns,
                samples: 1,
                parks,
                preempted_ns: 0,
                last: capture,
                announced: false,
            });
        }
        if let Some(run) = ended {
            self.end_run(tid, run);
        }
    }

    fn end_run(&mut self, tid: u32, run: Run) {
        // Two samples at least: one sample and a preemption is the
        // machine's doing (measured: on a loaded VM it is common).
        if run.samples < 2 || run.last_ns - run.first_ns < self.thresholds.hog_ns {
            return;
        }
        self.hogs += 1;
        self.found.push(Finding::Hog(Hog {
            tid,
            site: run.site,
            first_ns: run.first_ns,
            last_ns: run.last_ns,
            samples: run.samples,
            preempted_ns: run.preempted_ns,
            announced: run.announced,
            capture: run.last,
        }));
    }

    /// Hog runs that crossed `ongoing_hog_ns` since the last call.
    pub fn take_ongoing(&mut self) -> Vec<OngoingHog> {
        std::mem::take(&mut self.ongoing)
    }

    /// Findings made since the last call.
    pub fn take_findings(&mut self) -> Vec<Finding> {
        std::mem::take(&mut self.found)
    }

    /// Ends the interval at `end_ns` and starts the next one there.
    pub fn close_interval(&mut self, end_ns: u64) -> Health {
        let start = self.interval_start;
        let length = end_ns.saturating_sub(start).max(1);
        let mut workers: Vec<WorkerHealth> = self
            .workers
            .iter_mut()
            .map(|(&tid, worker)| {
                let mut parked = std::mem::take(&mut worker.parked_ns);
                if let Some(since) = worker.parked_since {
                    parked += end_ns.saturating_sub(since.max(start));
                }
                let busy = 1.0 - (parked.min(length) as f64 / length as f64);
                let parks = match (worker.parks_seen, worker.parks_at_interval) {
                    (Some(now), Some(then)) => u64::from(now.wrapping_sub(then)),
                    _ => 0,
                };
                worker.parks_at_interval = worker.parks_seen;
                WorkerHealth { tid, busy, parks }
            })
            .collect();
        workers.sort_by_key(|worker| worker.tid);
        let mean = workers.iter().map(|w| w.busy).sum::<f64>() / workers.len().max(1) as f64;
        let max = workers.iter().map(|w| w.busy).fold(0.0, f64::max);
        let health = Health {
            start_ns: start,
            end_ns,
            imbalance: if mean > 0.0 { max / mean } else { 0.0 },
            workers,
            hogs: std::mem::take(&mut self.hogs),
            blocking: std::mem::take(&mut self.blocking),
            blocked_ns: std::mem::take(&mut self.blocked_ns),
            preempted_ns: std::mem::take(&mut self.preempted_ns),
            samples_by_site: std::mem::take(&mut self.samples_by_site),
            kernel_samples: std::mem::take(&mut self.kernel_samples),
        };
        self.interval_start = end_ns;
        health
    }

    /// Ends every hog run still open (at the end of watching).
    pub fn finish_runs(&mut self) {
        let runs: Vec<(u32, Run)> = self
            .workers
            .iter_mut()
            .filter_map(|(&tid, worker)| worker.run.take().map(|run| (tid, run)))
            .collect();
        for (tid, run) in runs {
            self.end_run(tid, run);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::watch::{WATCH_WORKER, WatchStackKind};

    const MS: u64 = 1_000_000;

    fn sample(tid: u32, ts_ns: u64, site: Option<usize>) -> Capture {
        sample_after(tid, ts_ns, site, 0)
    }

    /// A sample taken after the worker entered its park `parks` times.
    fn sample_after(tid: u32, ts_ns: u64, site: Option<usize>, parks: u32) -> Capture {
        Capture {
            ts_ns,
            tid,
            kind: WatchStackKind::Sample,
            flags: WATCH_WORKER,
            user: vec![1, 2, 3],
            kernel: Vec::new(),
            site,
            task_depth: 2,
            in_park: false,
            parks,
            syscall: u64::MAX,
            arg0: 0,
        }
    }

    fn detector() -> Detector {
        Detector::new(
            Thresholds {
                blocking_ns: 5 * MS,
                hog_ns: 20 * MS,
                ongoing_hog_ns: Some(25 * MS),
            },
            0,
        )
    }

    #[test]
    fn consecutive_samples_without_a_park_are_a_hog_with_a_lower_bound() {
        let mut d = detector();
        for i in 0..4 {
            d.sample(sample(7, 100 * MS + i * 10 * MS, Some(3)));
        }
        // Announced while still running, once.
        let ongoing = d.take_ongoing();
        assert_eq!(ongoing.len(), 1, "{ongoing:?}");
        assert_eq!(
            (ongoing[0].tid, ongoing[0].site, ongoing[0].span_ns),
            (7, 3, 30 * MS)
        );
        d.sample(sample(7, 150 * MS, Some(4)));
        let found = d.take_findings();
        assert_eq!(found.len(), 1, "{found:?}");
        let Finding::Hog(hog) = &found[0] else {
            panic!("{found:?}")
        };
        assert_eq!((hog.tid, hog.site, hog.samples), (7, 3, 4));
        assert_eq!(hog.lower_bound_ns(), 30 * MS);
    }

    #[test]
    fn a_hog_shows_its_last_sample_inside_the_tasks_callees() {
        let mut d = detector();
        for i in 0..4 {
            let mut capture = sample(7, 100 * MS + i * 10 * MS, Some(3));
            capture.user = vec![10 + i];
            // The last sample landed in the poll function's own code.
            capture.task_depth = if i == 3 { 0 } else { 1 };
            d.sample(capture);
        }
        d.sample(sample(7, 150 * MS, Some(4)));
        let found = d.take_findings();
        let [Finding::Hog(hog)] = &found[..] else {
            panic!("{found:?}")
        };
        assert_eq!(hog.samples, 4);
        assert_eq!(hog.capture.user, vec![12], "{hog:?}");
    }

    #[test]
    fn a_park_in_between_breaks_a_run() {
        let mut d = detector();
        d.sample(sample(7, 100 * MS, Some(3)));
        d.sample(sample(7, 110 * MS, Some(3)));
        // A park that did not sleep: only its count says it happened.
        d.sample(sample_after(7, 120 * MS, Some(3), 1));
        d.sample(sample_after(7, 130 * MS, Some(3), 1));
        // One that slept.
        d.park_sleep(7, 131 * MS, 2);
        d.park_wake(7, 132 * MS, MS);
        d.sample(sample_after(7, 140 * MS, Some(3), 2));
        d.sample(sample_after(7, 150 * MS, Some(3), 2));
        d.finish_runs();
        assert!(d.take_findings().is_empty());
    }

    #[test]
    fn a_preemption_after_a_park_does_not_extend_the_run() {
        let mut d = detector();
        d.sample(sample(7, 100 * MS, Some(3)));
        d.sample(sample(7, 105 * MS, Some(3)));
        // Preempted after parking once (in the park, or in a later poll).
        d.off_cpu(7, 106 * MS, 24 * MS, 0, true, 1, None);
        d.park_sleep(7, 130 * MS, 2);
        assert!(d.take_findings().is_empty());
    }

    #[test]
    fn a_preemption_after_the_last_sample_extends_the_run() {
        let mut d = detector();
        d.sample(sample(7, 100 * MS, Some(3)));
        d.sample(sample(7, 105 * MS, Some(3)));
        d.off_cpu(7, 106 * MS, 24 * MS, 0, true, 0, None);
        d.park_sleep(7, 130 * MS, 1);
        let found = d.take_findings();
        let [Finding::Hog(hog)] = found.as_slice() else {
            panic!("{found:?}")
        };
        assert_eq!((hog.lower_bound_ns(), hog.preempted_ns), (30 * MS, 24 * MS));
    }

    #[test]
    fn one_sample_and_a_preemption_is_no_hog() {
        let mut d = detector();
        d.sample(sample(7, 100 * MS, Some(3)));
        d.off_cpu(7, 101 * MS, 30 * MS, 0, true, 0, None);
        d.park_sleep(7, 131 * MS, 1);
        assert!(d.take_findings().is_empty());
    }

    #[test]
    fn only_long_voluntary_sleeps_are_blocking() {
        let mut d = detector();
        d.off_cpu(7, 0, 50 * MS, 0, true, 0, None);
        d.off_cpu(7, 0, 2 * MS, 1, false, 0, None);
        d.off_cpu(7, 0, 12 * MS, 1, false, 0, Some(sample(7, 0, Some(5))));
        let found = d.take_findings();
        assert_eq!(found.len(), 1);
        let Finding::Blocking(blocking) = &found[0] else {
            panic!()
        };
        assert_eq!((blocking.site, blocking.duration_ns), (Some(5), 12 * MS));
        let health = d.close_interval(1000 * MS);
        assert_eq!(
            (health.blocking, health.blocked_ns, health.preempted_ns),
            (1, 14 * MS, 50 * MS)
        );
    }

    #[test]
    fn busy_share_counts_time_not_parked() {
        let mut d = detector();
        d.park_sleep(1, 0, 10);
        d.park_wake(1, 250 * MS, 250 * MS);
        d.park_sleep(1, 500 * MS, 13);
        // Still asleep at the end: 250 + 500 ms parked of 1000.
        let health = d.close_interval(1000 * MS);
        assert_eq!(health.workers.len(), 1);
        assert!((health.workers[0].busy - 0.25).abs() < 1e-9, "{health:?}");
        // Counted from the first count seen (10): three parks since.
        assert_eq!(health.workers[0].parks, 3);
        // The next interval: asleep until 1600 ms, of which 600 ms here.
        d.park_wake(1, 1600 * MS, 1100 * MS);
        let health = d.close_interval(2000 * MS);
        assert!((health.workers[0].busy - 0.4).abs() < 1e-9, "{health:?}");
        assert_eq!(health.workers[0].parks, 0);
    }
}
