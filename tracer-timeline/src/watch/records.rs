//! The watch tier's outputs as plain data: off-CPU spans, findings and
//! health records, each with the arguments both writers give it (one
//! place decides what a finding or a health record says in a trace).

use serde_json::{Value, json};

use crate::output::StackId;

/// A watch-tier output (boxed in [`TimelineOutput::Watch`]).
#[derive(Clone, Debug, PartialEq)]
pub enum WatchOutput {
    /// A span of a worker's time opened (off CPU, or a finding). Closed by a
    /// later [`Span`](Self::Span) on the same thread, innermost first.
    SpanStart {
        tid: u32,
        ts_ns: u64,
        kind: SpanKind,
    },
    /// A span closed.
    Span(Span),
    /// A finding made while an incident's detail recording ran: an instant
    /// on the worker's track (the detail's polls are the slices there, and
    /// a HOG spans several of them).
    FindingMark(Box<FindingOutput>),
    /// One health interval, at its end: an instant with the record on the
    /// process track, and its [`counters`](HealthRecord::counters).
    Health(Box<HealthRecord>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum SpanKind {
    /// The worker was off CPU while not parked: `preempted` (involuntary)
    /// or blocked, with the thread's `prev_state` at the switch.
    OffCpu {
        preempted: bool,
        state: u32,
    },
    Finding(Box<FindingOutput>),
}

impl SpanKind {
    /// The slice's name and category.
    pub fn name_and_category(&self) -> (String, &'static str) {
        match self {
            SpanKind::OffCpu {
                preempted: true, ..
            } => ("off CPU (preempted)".to_owned(), "off_cpu"),
            SpanKind::OffCpu { .. } => ("off CPU (blocked)".to_owned(), "off_cpu"),
            SpanKind::Finding(finding) => (finding.name(), "finding"),
        }
    }

    /// The slice's arguments (a JSON object).
    pub fn args(&self, clipped: bool) -> Value {
        match self {
            SpanKind::OffCpu { preempted, state } => json!({
                "preempted": preempted,
                "state": state,
                "clipped": clipped,
            }),
            SpanKind::Finding(finding) => {
                let mut args = finding.args();
                args["clipped"] = json!(clipped);
                args
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub tid: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub kind: SpanKind,
    /// Cut short to nest in the span around it, or at an incident's
    /// detail start.
    pub clipped: bool,
}

/// A BLOCKING or HOG finding, as the terminal reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct FindingOutput {
    /// "BLOCKING" or "HOG".
    pub kind: String,
    pub tid: u32,
    /// The task type (short name, as the report says it).
    pub task: String,
    /// Its probe site, when a task was on the stack.
    pub site: Option<u32>,
    pub start_ns: u64,
    pub duration_ns: u64,
    /// The report's line.
    pub summary: String,
    pub reason: String,
    /// Innermost first, as named for the report.
    pub user_stack: Vec<String>,
    pub kernel_stack: Vec<String>,
    /// The whole stack (kernel frames innermost, then user frames) in the
    /// trace's symbols: a callstack where the format has them.
    pub stack: Option<StackId>,
}

impl FindingOutput {
    pub fn name(&self) -> String {
        format!("{} {}", self.kind, self.task)
    }

    pub fn args(&self) -> Value {
        json!({
            "finding": self.kind,
            "task": self.task,
            "duration_ns": self.duration_ns,
            "reason": self.reason,
            "summary": self.summary,
            "user_stack": self.user_stack,
            "kernel_stack": self.kernel_stack,
        })
    }
}

/// One worker's share of a health interval.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerShare {
    pub tid: u32,
    /// As the report names it: "tokio-rt-worker (tid 42)".
    pub name: String,
    /// Fraction of the interval not parked, 0..=1.
    pub busy: f64,
    pub parks: u64,
}

/// CPU of one task type in a health interval.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskCpu {
    pub task: String,
    pub samples: u64,
    pub cpu_ms: f64,
}

/// One health interval (`watch`'s health line, as data).
#[derive(Clone, Debug, PartialEq)]
pub struct HealthRecord {
    pub start_ns: u64,
    pub end_ns: u64,
    pub workers: Vec<WorkerShare>,
    pub imbalance: f64,
    pub hogs: u32,
    pub blocking: u32,
    pub blocked_ns: u64,
    pub preempted_ns: u64,
    pub kernel_samples: u64,
    pub cpu_by_task: Vec<TaskCpu>,
}

impl HealthRecord {
    /// The record as the instant's arguments.
    pub fn args(&self) -> Value {
        let workers: Vec<Value> = self
            .workers
            .iter()
            .map(|w| json!({"tid": w.tid, "worker": w.name, "busy": w.busy, "parks": w.parks}))
            .collect();
        let cpu: Vec<Value> = self
            .cpu_by_task
            .iter()
            .map(|t| json!({"task": t.task, "samples": t.samples, "cpu_ms": t.cpu_ms}))
            .collect();
        json!({
            "interval_ns": self.end_ns.saturating_sub(self.start_ns),
            "workers": workers,
            "imbalance": self.imbalance,
            "hogs": self.hogs,
            "blocking": self.blocking,
            "blocked_ns": self.blocked_ns,
            "preempted_ns": self.preempted_ns,
            "kernel_samples": self.kernel_samples,
            "cpu_by_task": cpu,
        })
    }

    /// Counter values at the interval's end: (counter, series, value); an
    /// empty series for a counter of its own. Each worker's busy share in
    /// percent, the workers' busy shares added up (in percent of one
    /// worker: 150 is one and a half workers busy), and the time blocked
    /// and preempted in ms.
    pub fn counters(&self) -> Vec<(&'static str, String, u64)> {
        let percent = |share: f64| (share * 100.0).round().max(0.0) as u64;
        let mut counters: Vec<(&'static str, String, u64)> = self
            .workers
            .iter()
            .map(|w| ("busy %", w.name.clone(), percent(w.busy)))
            .collect();
        let all: f64 = self.workers.iter().map(|w| w.busy).sum();
        counters.push(("busy % all workers", String::new(), percent(all)));
        counters.push(("blocked ms", String::new(), self.blocked_ns / 1_000_000));
        counters.push(("preempted ms", String::new(), self.preempted_ns / 1_000_000));
        counters
    }
}
