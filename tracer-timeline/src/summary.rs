//! The short report printed when recording ends.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use crate::findings::{Finding, findings, format_permille};
use crate::histogram::Histogram;
use crate::json::task_label;
use crate::symbols::{Symbols, WaitsOn};
use crate::table::Table;
use crate::task_types::TaskTypes;
use crate::tasks::{LongPoll, TaskTotals, TaskTypeStats};
use crate::timeline::{ThreadStats, Timeline};
use crate::units::{human_bytes, human_duration, permille};

/// One traced thread, as shown in the summary table.
pub struct WorkerSummary {
    pub tid: u32,
    pub name: String,
    pub stats: ThreadStats,
}

/// Everything the end-of-run report shows. Its `Display` is the report.
#[derive(Default)]
pub struct Summary {
    /// When recording started (CLOCK_MONOTONIC ns): times in the summary are
    /// shown relative to it, as in the trace.
    pub start_ns: u64,
    /// How long recording ran; the denominator of the busy percentages.
    pub duration_ns: u64,
    pub workers: Vec<WorkerSummary>,
    /// Events read from the ring buffer.
    pub events: u64,
    /// Events the kernel dropped because the ring buffer was full.
    pub lost_events: u64,
    /// Ends without a start (tracing began mid-poll or mid-park).
    pub unmatched_ends: u64,
    /// Polls left out because their end event never came (see
    /// `Timeline::abandoned`).
    pub abandoned_polls: u64,
    /// The trace file, if one was written.
    pub output: Option<PathBuf>,
    pub trace_bytes: u64,
    /// Tasks, wakes and scheduling delay.
    pub scheduler: SchedulerSummary,
    /// What recording and rendering cost the tracer itself.
    pub cost: TracerCost,
}

/// The tracer's own CPU and time (0 where not measured): for scripts that
/// watch what tracing costs, and the benchmark's drain rate and rendering
/// figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracerCost {
    /// CPU time (user + system, all threads) from the probes' enabling to
    /// the end of the final drain.
    pub recording_cpu_ns: u64,
    /// Wall time of rendering the trace after the stop.
    pub render_ms: u64,
    /// CPU time of that rendering, symbolizing included.
    pub render_cpu_ms: u64,
    /// CPU time of symbolizing the stacks, the first part of rendering.
    pub symbolize_cpu_ms: u64,
    /// CPU time of loading the binary's symbols while recording (part of
    /// `recording_cpu_ns`), which spares the stop that fixed cost.
    pub symbolize_prepare_cpu_ms: u64,
}

/// The scheduler's part of the report, with task types already named.
#[derive(Default)]
pub struct SchedulerSummary {
    pub totals: TaskTotals,
    pub tasks_alive_at_end: u64,
    /// Busiest type first.
    pub task_types: Vec<TaskTypeSummary>,
    /// Longest first (see `Timeline::longest_polls`).
    pub longest_polls: Vec<LongPollSummary>,
}

pub struct TaskTypeSummary {
    pub name: String,
    pub stats: TaskTypeStats,
    /// Where tasks of this type were spawned ("file:line" or a function),
    /// most spawns first; empty where spawns were not traced or not
    /// symbolized.
    pub spawned_from: Vec<String>,
    /// What its polls ended waiting on, with how many polls, most first;
    /// empty where no await stack showed a tokio primitive.
    pub waits_on: Vec<(WaitsOn, u64)>,
}

pub struct LongPollSummary {
    /// The task's type name.
    pub name: String,
    pub poll: LongPoll,
}

impl SchedulerSummary {
    /// Collects what the report needs from a finished timeline.
    /// `symbols` name the spawn call sites.
    pub fn from_timeline(timeline: &Timeline, types: &TaskTypes, symbols: &Symbols) -> Self {
        let mut task_types: Vec<TaskTypeSummary> = timeline
            .task_types()
            .map(|(site, stats)| TaskTypeSummary {
                name: types.short_name(site),
                stats: stats.clone(),
                spawned_from: spawned_from(&stats.spawn_call_sites, symbols),
                waits_on: crate::waits_summary::waits_on(&stats.await_points, symbols),
            })
            .collect();
        task_types.sort_by(|a, b| {
            b.stats
                .busy_ns
                .cmp(&a.stats.busy_ns)
                .then_with(|| a.name.cmp(&b.name))
        });
        let longest_polls = timeline
            .longest_polls()
            .map(|poll| LongPollSummary {
                name: types.short_name(Some(poll.site)),
                poll: poll.clone(),
            })
            .collect();
        Self {
            totals: timeline.task_totals().clone(),
            tasks_alive_at_end: timeline.tasks_alive() as u64,
            task_types,
            longest_polls,
        }
    }
}

/// The places tasks were spawned from, most spawns first (call sites on
/// the same line are one place).
fn spawned_from(call_sites: &HashMap<u64, u64>, symbols: &Symbols) -> Vec<String> {
    let mut places: HashMap<&str, u64> = HashMap::new();
    for (&address, &count) in call_sites {
        if let Some(place) = symbols.call_site(address) {
            *places.entry(place).or_default() += count;
        }
    }
    let mut places: Vec<(&str, u64)> = places.into_iter().collect();
    places.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    places
        .into_iter()
        .map(|(place, _)| place.to_owned())
        .collect()
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "recorded {}", human_duration(self.duration_ns))?;
        let findings = self.findings();
        self.fmt_worker_table(f)?;
        for finding in findings
            .iter()
            .filter(|f| matches!(f, Finding::Imbalance(_)))
        {
            writeln!(f, "{finding}")?;
        }
        self.fmt_tasks(f)?;
        self.fmt_longest_polls(f)?;
        for finding in findings.iter().filter(|f| matches!(f, Finding::Hog(_))) {
            writeln!(f, "{finding}")?;
        }
        self.fmt_scheduling_delay(f)?;
        self.fmt_event_counts(f)?;
        match &self.output {
            Some(path) => {
                // How to open it is the command's last line.
                writeln!(
                    f,
                    "trace: {} ({})",
                    path.display(),
                    human_bytes(self.trace_bytes)
                )
            }
            None => writeln!(f, "trace: none written"),
        }
    }
}

impl Summary {
    /// What the summary flags (see [`crate::findings`]).
    pub fn findings(&self) -> Vec<Finding> {
        findings(self)
    }

    fn fmt_worker_table(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.workers.is_empty() {
            return writeln!(f, "no worker activity seen");
        }
        // Shares are among runtime workers; blocking-pool threads are meant
        // to block and would only blur the picture.
        let workers = || self.workers.iter().filter(|w| is_runtime_worker(&w.stats));
        let all_polls: u64 = workers().map(|w| w.stats.polls).sum();
        let all_busy: u64 = workers().map(|w| w.stats.busy_ns).sum();
        let mut table = Table::new(&[
            "worker",
            "tid",
            "polls",
            "parks",
            "busy",
            "longest poll",
            "poll share",
            "busy share",
        ]);
        for worker in &self.workers {
            let stats = &worker.stats;
            let (poll_share, busy_share) = if is_runtime_worker(stats) {
                (
                    busy_percent(stats.polls, all_polls),
                    busy_percent(stats.busy_ns, all_busy),
                )
            } else {
                ("-".to_owned(), "-".to_owned())
            };
            table.row(vec![
                worker.name.clone(),
                worker.tid.to_string(),
                stats.polls.to_string(),
                stats.parks.to_string(),
                busy_percent(stats.busy_ns, self.duration_ns),
                human_duration(stats.longest_poll_ns),
                poll_share,
                busy_share,
            ]);
        }
        table.write(f, 2)
    }

    fn fmt_tasks(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheduler = &self.scheduler;
        let totals = &scheduler.totals;
        let wakes = totals.wakes_by_task + totals.wakes_by_driver + totals.wakes_by_thread;
        if totals.spawned == 0 && totals.ended == 0 && wakes == 0 && scheduler.task_types.is_empty()
        {
            return Ok(());
        }
        writeln!(
            f,
            "tasks: {} spawned, {} ended, {} alive at the end; {} wakes ({} by tasks, {} by the driver, {} by other threads)",
            totals.spawned,
            totals.ended,
            scheduler.tasks_alive_at_end,
            wakes,
            totals.wakes_by_task,
            totals.wakes_by_driver,
            totals.wakes_by_thread
        )?;
        if scheduler.task_types.is_empty() {
            return Ok(());
        }
        let mut table = Table::new(&[
            "task type",
            "tasks",
            "polls",
            "busy",
            "longest poll",
            "woken",
        ]);
        for task_type in &scheduler.task_types {
            let stats = &task_type.stats;
            table.row(vec![
                task_type.name.clone(),
                stats.tasks.to_string(),
                stats.polls.to_string(),
                human_duration(stats.busy_ns),
                human_duration(stats.longest_poll_ns),
                stats.times_woken.to_string(),
            ]);
        }
        table.write(f, 2)?;
        let spawned: Vec<&TaskTypeSummary> = scheduler
            .task_types
            .iter()
            .filter(|t| !t.spawned_from.is_empty())
            .collect();
        if !spawned.is_empty() {
            writeln!(f, "spawned from:")?;
        }
        for task_type in spawned {
            writeln!(
                f,
                "  {}: {}",
                task_type.name,
                task_type.spawned_from.join(", ")
            )?;
        }
        crate::waits_summary::fmt_waits_on(f, &scheduler.task_types)?;
        Ok(())
    }

    fn fmt_longest_polls(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let polls = &self.scheduler.longest_polls;
        if polls.is_empty() {
            return Ok(());
        }
        writeln!(f, "longest polls:")?;
        let mut table = Table::new(&["task", "type", "poll", "worker", "at"]);
        for long in polls {
            let poll = &long.poll;
            let mut duration = human_duration(poll.duration_ns);
            if poll.preempted_ns > 0 {
                duration.push_str(&format!(
                    " ({} preempted)",
                    human_duration(poll.preempted_ns)
                ));
            }
            if poll.truncated {
                duration.push_str(" (still running)");
            }
            table.row(vec![
                task_label(poll.task_id, poll.task),
                long.name.clone(),
                duration,
                self.thread_name(poll.tid),
                format!(
                    "+{}",
                    human_duration(poll.start_ns.saturating_sub(self.start_ns))
                ),
            ]);
        }
        table.write(f, 2)
    }

    fn fmt_scheduling_delay(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let by_type = self
            .scheduler
            .task_types
            .iter()
            .map(|t| (t.name.clone(), &t.stats.scheduling_delay));
        let by_worker = self
            .workers
            .iter()
            .map(|w| (w.name.clone(), &w.stats.scheduling_delay));
        let rows: Vec<(&str, String, &Histogram)> = by_type
            .map(|(name, h)| ("type", name, h))
            .chain(by_worker.map(|(name, h)| ("worker", name, h)))
            .filter(|(_, _, h)| h.count() > 0)
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        writeln!(f, "scheduling delay (wake or spawn to poll):")?;
        let mut table = Table::new(&["by", "", "polls", "p50", "p90", "p99", "max"]);
        for (by, name, histogram) in rows {
            let percentile = |p| human_duration(histogram.percentile(p).unwrap_or(0));
            table.row(vec![
                by.to_owned(),
                name,
                histogram.count().to_string(),
                percentile(50),
                percentile(90),
                percentile(99),
                human_duration(histogram.max()),
            ]);
        }
        table.write(f, 2)
    }

    /// The thread's name, or "tid N".
    pub(crate) fn thread_name(&self, tid: u32) -> String {
        self.workers
            .iter()
            .find(|w| w.tid == tid)
            .map_or_else(|| format!("tid {tid}"), |w| w.name.clone())
    }

    fn fmt_event_counts(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "events: {} ({} lost)", self.events, self.lost_events)?;
        if self.lost_events > 0 {
            writeln!(
                f,
                "WARNING: {} events were lost because the ring buffer was full, so the trace has gaps; \
                 raise --ring-buffer-size",
                self.lost_events
            )?;
        }
        if self.unmatched_ends > 0 {
            writeln!(
                f,
                "note: {} end events had no matching start (tracing began mid-poll or mid-park) and were dropped",
                self.unmatched_ends
            )?;
        }
        if self.abandoned_polls > 0 {
            writeln!(
                f,
                "note: {} polls were left out because their end event never arrived",
                self.abandoned_polls
            )?;
        }
        Ok(())
    }
}

/// A thread of the runtime proper: it polled or parked, and not only
/// `spawn_blocking` work or a `block_on` root future.
pub(crate) fn is_runtime_worker(stats: &ThreadStats) -> bool {
    stats.ran_tasks_or_parked() && !stats.is_blocking_pool() && !stats.only_polled_a_root()
}

/// `part` as a share of `whole`, e.g. "45.2%"; "-" when `whole` is 0.
fn busy_percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".to_owned();
    }
    format_permille(permille(u128::from(part), u128::from(whole)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(tid: u32, name: &str, busy_ns: u64, longest_poll_ns: u64) -> WorkerSummary {
        WorkerSummary {
            tid,
            name: name.to_owned(),
            stats: ThreadStats {
                polls: 1200 + u64::from(tid),
                parks: 30,
                busy_ns,
                longest_poll_ns,
                ..ThreadStats::default()
            },
        }
    }

    fn summary(lost_events: u64) -> Summary {
        Summary {
            start_ns: 0,
            duration_ns: 2_000_000_000,
            workers: vec![
                worker(101, "tokio-runtime-worker", 500_000_000, 12_345_678),
                worker(102, "my-pool-7", 1_998_000_000, 850),
            ],
            events: 123_456,
            lost_events,
            unmatched_ends: 0,
            abandoned_polls: 0,
            output: Some(PathBuf::from("/tmp/out/trace.json")),
            trace_bytes: 4_567_890,
            scheduler: SchedulerSummary::default(),
            cost: TracerCost::default(),
        }
    }

    /// The table row that mentions `needle`.
    fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
        text.lines()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
    }

    #[test]
    fn lists_every_worker_with_busy_share_and_longest_poll() {
        let text = summary(0).to_string();
        assert!(text.contains("recorded 2.00 s"), "{text}");
        let first = line_with(&text, "tokio-runtime-worker");
        assert!(
            first.contains("101")
                && first.contains("1301")
                && first.contains("25.0%")
                && first.contains("12.3 ms"),
            "{first}"
        );
        let second = line_with(&text, "my-pool-7");
        assert!(
            second.contains("102")
                && second.contains("1302")
                && second.contains("99.9%")
                && second.contains("850 ns"),
            "{second}"
        );
    }

    #[test]
    fn table_columns_line_up() {
        let text = summary(0).to_string();
        let header = line_with(&text, "longest poll");
        let rows = [
            line_with(&text, "tokio-runtime-worker"),
            line_with(&text, "my-pool-7"),
        ];
        for row in rows {
            assert_eq!(
                row.chars().count(),
                header.chars().count(),
                "\n{header}\n{row}"
            );
        }
    }

    #[test]
    fn says_plainly_when_nothing_was_lost() {
        let text = summary(0).to_string();
        assert!(text.contains("123456 (0 lost)"), "{text}");
        assert!(!text.contains("WARNING"), "{text}");
    }

    #[test]
    fn warns_when_events_were_lost() {
        let text = summary(77).to_string();
        let warning = line_with(&text, "WARNING");
        assert!(
            warning.contains("77") && warning.contains("--ring-buffer-size"),
            "{warning}"
        );
    }

    #[test]
    fn points_to_the_trace() {
        let text = summary(0).to_string();
        assert!(text.contains("/tmp/out/trace.json (4.6 MB)"), "{text}");

        let text = Summary {
            output: None,
            ..summary(0)
        }
        .to_string();
        assert!(text.contains("trace: none written"), "{text}");
    }

    #[test]
    fn mentions_unmatched_ends_only_when_there_are_some() {
        assert!(!summary(0).to_string().contains("no matching start"));
        let text = Summary {
            unmatched_ends: 4,
            abandoned_polls: 0,
            ..summary(0)
        }
        .to_string();
        assert!(
            line_with(&text, "no matching start").contains('4'),
            "{text}"
        );
    }

    #[test]
    fn empty_recording_does_not_divide_by_zero() {
        let text = Summary {
            duration_ns: 0,
            ..summary(0)
        }
        .to_string();
        assert!(line_with(&text, "my-pool-7").contains(" - "), "{text}");
    }
}
