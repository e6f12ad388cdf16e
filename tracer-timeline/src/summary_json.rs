//! The summary as JSON (`--summary-json FILE`), for scripts, CI gates and
//! the benchmark: the figures the text report shows, in plain units (ns,
//! counts, per-mille), the findings as [`Finding::to_json`] objects, and what
//! recording and rendering cost the tracer (`tracer_cost`). The
//! text report is for people; this one is for programs, so nothing here is
//! rounded or formatted.

use serde_json::{Value, json};

use crate::findings::Finding;
use crate::histogram::Histogram;
use crate::summary::{Summary, is_runtime_worker};

/// Bumped when a field changes meaning or goes away (new fields don't).
pub const SUMMARY_JSON_VERSION: u64 = 1;

impl Summary {
    /// Everything the summary says, as one JSON object.
    pub fn to_json(&self) -> Value {
        let workers: Vec<Value> = self
            .workers
            .iter()
            .map(|w| {
                let s = &w.stats;
                json!({
                    "tid": w.tid,
                    "name": w.name,
                    "runtime_worker": is_runtime_worker(s),
                    "polls": s.polls,
                    "blocking_polls": s.blocking_polls,
                    "parks": s.parks,
                    "busy_ns": s.busy_ns,
                    "parked_ns": s.parked_ns,
                    "longest_poll_ns": s.longest_poll_ns,
                    "scheduling_delay": delay(&s.scheduling_delay),
                })
            })
            .collect();
        let scheduler = &self.scheduler;
        let totals = &scheduler.totals;
        let task_types: Vec<Value> = scheduler
            .task_types
            .iter()
            .map(|t| {
                let s = &t.stats;
                json!({
                    "name": t.name,
                    "tasks": s.tasks,
                    "ended": s.ended,
                    "polls": s.polls,
                    "busy_ns": s.busy_ns,
                    "longest_poll_ns": s.longest_poll_ns,
                    "times_woken": s.times_woken,
                    "scheduling_delay": delay(&s.scheduling_delay),
                    "spawned_from": t.spawned_from,
                    "waits_on": t.waits_on.iter().map(|(w, polls)| json!({
                        "kind": w.kind.as_str(),
                        "name": w.name,
                        "polls": polls,
                    })).collect::<Vec<Value>>(),
                })
            })
            .collect();
        let longest_polls: Vec<Value> = scheduler
            .longest_polls
            .iter()
            .map(|l| {
                json!({
                    "task_id": l.poll.task_id,
                    "task": l.poll.task,
                    "task_type": l.name,
                    "tid": l.poll.tid,
                    "start_ns": l.poll.start_ns,
                    "duration_ns": l.poll.duration_ns,
                    "preempted_ns": l.poll.preempted_ns,
                    "truncated": l.poll.truncated,
                })
            })
            .collect();
        let findings: Vec<Value> = self.findings().iter().map(Finding::to_json).collect();
        json!({
            "version": SUMMARY_JSON_VERSION,
            "start_ns": self.start_ns,
            "duration_ns": self.duration_ns,
            "events": self.events,
            "lost_events": self.lost_events,
            "unmatched_ends": self.unmatched_ends,
            "abandoned_polls": self.abandoned_polls,
            "trace": self.output.as_ref().map(|p| p.display().to_string()),
            "trace_bytes": self.trace_bytes,
            "polls": self.workers.iter().map(|w| w.stats.polls).sum::<u64>(),
            "workers": workers,
            "tasks": {
                "spawned": totals.spawned,
                "ended": totals.ended,
                "ends_lost": totals.ends_lost,
                "alive_at_end": scheduler.tasks_alive_at_end,
                "wakes_by_task": totals.wakes_by_task,
                "wakes_by_driver": totals.wakes_by_driver,
                "wakes_by_thread": totals.wakes_by_thread,
            },
            "task_types": task_types,
            "longest_polls": longest_polls,
            "findings": findings,
            "tracer_cost": {
                "recording_cpu_ns": self.cost.recording_cpu_ns,
                "render_ms": self.cost.render_ms,
                "render_cpu_ms": self.cost.render_cpu_ms,
                "symbolize_cpu_ms": self.cost.symbolize_cpu_ms,
                "symbolize_prepare_cpu_ms": self.cost.symbolize_prepare_cpu_ms,
            },
        })
    }
}

/// Scheduling delay percentiles in ns (null where there were no polls).
fn delay(histogram: &Histogram) -> Value {
    json!({
        "count": histogram.count(),
        "p50_ns": histogram.percentile(50),
        "p90_ns": histogram.percentile(90),
        "p99_ns": histogram.percentile(99),
        "max_ns": (histogram.count() > 0).then(|| histogram.max()),
    })
}

#[cfg(test)]
mod tests {
    use crate::findings::HOG_POLL_NS;
    use crate::summary::{LongPollSummary, SchedulerSummary, Summary, TracerCost, WorkerSummary};
    use crate::tasks::LongPoll;
    use crate::timeline::ThreadStats;

    fn worker(tid: u32, busy_ns: u64, parked_ns: u64) -> WorkerSummary {
        WorkerSummary {
            tid,
            name: format!("worker {tid}"),
            stats: ThreadStats {
                polls: 10,
                parks: 2,
                busy_ns,
                parked_ns,
                ..ThreadStats::default()
            },
        }
    }

    #[test]
    fn task_types_say_what_they_wait_on() {
        use crate::summary::TaskTypeSummary;
        use crate::symbols::{WaitKind, WaitsOn};
        use crate::tasks::TaskTypeStats;
        let summary = Summary {
            scheduler: SchedulerSummary {
                task_types: vec![TaskTypeSummary {
                    name: "echo_client::{{closure}}".to_owned(),
                    stats: TaskTypeStats {
                        polls: 200,
                        ..TaskTypeStats::default()
                    },
                    spawned_from: Vec::new(),
                    waits_on: vec![
                        (
                            WaitsOn {
                                kind: WaitKind::IoRead,
                                name: "socket read",
                            },
                            150,
                        ),
                        (
                            WaitsOn {
                                kind: WaitKind::Timer,
                                name: "time::Sleep",
                            },
                            50,
                        ),
                    ],
                }],
                ..SchedulerSummary::default()
            },
            ..Summary::default()
        };
        let json = summary.to_json();
        let waits_on = &json["task_types"][0]["waits_on"];
        assert_eq!(waits_on[0]["kind"], "io_read");
        assert_eq!(waits_on[0]["name"], "socket read");
        assert_eq!(waits_on[0]["polls"], 150);
        assert_eq!(waits_on[1]["kind"], "timer");
        let text = summary.to_string();
        assert!(
            text.contains(
                "echo_client::{{closure}}: io_read: socket read 75%, timer: time::Sleep 25%"
            ),
            "{text}"
        );
    }

    #[test]
    fn has_the_figures_and_the_findings() {
        let summary = Summary {
            duration_ns: 1_000_000_000,
            events: 42,
            workers: vec![worker(7, 900_000_000, 0), worker(8, 1_000_000, 990_000_000)],
            scheduler: SchedulerSummary {
                longest_polls: vec![LongPollSummary {
                    name: "my_crate::hog".to_owned(),
                    poll: LongPoll {
                        task: 0x1000,
                        task_id: 3,
                        site: 0,
                        tid: 7,
                        start_ns: 5,
                        duration_ns: HOG_POLL_NS + 1,
                        preempted_ns: 0,
                        truncated: false,
                    },
                }],
                ..SchedulerSummary::default()
            },
            cost: TracerCost {
                recording_cpu_ns: 1_500_000,
                render_ms: 7,
                render_cpu_ms: 6,
                symbolize_cpu_ms: 2,
                symbolize_prepare_cpu_ms: 3,
            },
            ..Summary::default()
        };
        let json = summary.to_json();
        assert_eq!(json["events"], 42);
        assert_eq!(json["tracer_cost"]["recording_cpu_ns"], 1_500_000);
        assert_eq!(json["tracer_cost"]["render_ms"], 7);
        assert_eq!(json["tracer_cost"]["render_cpu_ms"], 6);
        assert_eq!(json["tracer_cost"]["symbolize_cpu_ms"], 2);
        assert_eq!(json["tracer_cost"]["symbolize_prepare_cpu_ms"], 3);
        assert_eq!(json["polls"], 20);
        assert_eq!(json["workers"][0]["busy_ns"], 900_000_000);
        let findings = json["findings"].as_array().unwrap();
        assert_eq!(findings.len(), 2, "{json}");
        assert_eq!(findings[0]["kind"], "IMBALANCE");
        assert_eq!(findings[0]["worker"], "worker 7");
        assert_eq!(findings[0]["busy_share_permille"], 999);
        assert_eq!(findings[1]["kind"], "HOG");
        assert_eq!(findings[1]["task_type"], "my_crate::hog");
        assert_eq!(findings[1]["task_id"], 3);
        assert_eq!(findings[1]["worker"], "worker 7");
        // The text report says the same.
        let text = summary.to_string();
        assert!(
            text.contains("IMBALANCE: worker worker 7 did 99.9%"),
            "{text}"
        );
        assert!(
            text.contains("HOG: task 3 my_crate::hog held worker worker 7"),
            "{text}"
        );
    }
}
