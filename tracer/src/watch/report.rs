//! Text for people: finding lines and the per-second health line. The data
//! they are made from is in `detect`; the trace gets the same data.

use std::collections::HashMap;

use tracer_probes::ProbePlan;

use super::detect::{Blocking, Health, Hog, Site};
use super::keep::FindingRecord;
use super::stacks::{StackReader, where_line};

/// User frames shown on a finding's line (the trace has them all).
const LINE_USER_FRAMES: usize = 5;

/// Task and thread names.
pub struct Names {
    pid: u32,
    task_types: Vec<String>,
    threads: HashMap<u32, String>,
}

impl Names {
    pub fn new(pid: u32, plan: &ProbePlan) -> Self {
        let task_types = plan
            .sites
            .iter()
            .map(|site| match &site.task_type {
                Some(task_type) => task_type.short.clone(),
                None => format!("task@{:#x}", site.address),
            })
            .collect();
        Names {
            pid,
            task_types,
            threads: HashMap::new(),
        }
    }

    /// The watched process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn task(&self, site: Site) -> String {
        match site {
            Some(site) => self
                .task_types
                .get(site)
                .cloned()
                .unwrap_or_else(|| format!("site {site}")),
            None => "(no task: scheduler)".to_string(),
        }
    }

    /// `comm` of a thread, read the first time it is asked for.
    pub fn thread(&mut self, tid: u32) -> String {
        let pid = self.pid;
        self.threads
            .entry(tid)
            .or_insert_with(|| {
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                    .map(|comm| comm.trim_end().to_string())
                    .unwrap_or_else(|_| "thread".to_string())
            })
            .clone()
    }

    pub fn worker(&mut self, tid: u32) -> String {
        format!("{} (tid {tid})", self.thread(tid))
    }
}

fn ms(ns: u64) -> String {
    let ms = ns as f64 / 1e6;
    if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// `prev_state` as people say it.
fn sleep_state(state: u32) -> &'static str {
    // Modifier bits (TASK_FREEZABLE, …) ride above the sleep kind.
    match state & 3 {
        1 => "interruptible sleep",
        2 => "uninterruptible sleep (D)",
        _ => "sleep",
    }
}

pub fn describe_blocking(
    blocking: &Blocking,
    names: &mut Names,
    reader: &mut StackReader,
) -> FindingRecord {
    let (user_stack, kernel_stack) = match &blocking.capture {
        Some(capture) => (reader.user_frames(capture), reader.kernel_frames(capture)),
        None => (Vec::new(), Vec::new()),
    };
    let place = where_line(&kernel_stack, &user_stack, LINE_USER_FRAMES);
    let line = format!(
        "BLOCKING: task type {} blocked worker {} for {} in {place}",
        names.task(blocking.site),
        names.worker(blocking.tid),
        ms(blocking.duration_ns),
    );
    FindingRecord {
        kind: "BLOCKING",
        tid: blocking.tid,
        site: blocking.site,
        start_ns: blocking.ts_ns,
        duration_ns: blocking.duration_ns,
        line,
        reason: format!("blocked ({})", sleep_state(blocking.state)),
        user_stack,
        kernel_stack,
        capture: blocking.capture.clone().map(Box::new),
    }
}

pub fn describe_hog(hog: &Hog, names: &mut Names, reader: &mut StackReader) -> FindingRecord {
    let user_stack = reader.user_frames(&hog.capture);
    let kernel_stack = reader.kernel_frames(&hog.capture);
    let place = where_line(&kernel_stack, &user_stack, LINE_USER_FRAMES);
    let line = format!(
        "HOG: task type {} held worker {} for at least {} ({} samples{}, no park in between) in {place}",
        names.task(Some(hog.site)),
        names.worker(hog.tid),
        ms(hog.lower_bound_ns()),
        hog.samples,
        if hog.preempted_ns > 0 {
            format!("; {} of it preempted", ms(hog.preempted_ns))
        } else {
            String::new()
        },
    );
    FindingRecord {
        kind: "HOG",
        tid: hog.tid,
        site: Some(hog.site),
        start_ns: hog.first_ns,
        duration_ns: hog.lower_bound_ns(),
        line,
        reason: "on CPU across consecutive samples (a lower bound)".to_string(),
        user_stack,
        kernel_stack,
        capture: Some(Box::new(hog.capture.clone())),
    }
}

/// The per-interval line.
pub fn health_line(health: &Health, names: &Names, sample_hz: u64) -> String {
    let busy: Vec<String> = health
        .workers
        .iter()
        .map(|worker| format!("{:.0}%", worker.busy * 100.0))
        .collect();
    let mut by_cpu: Vec<(&Option<usize>, &u64)> = health.samples_by_site.iter().collect();
    by_cpu.sort_by(|a, b| b.1.cmp(a.1));
    let cpu: Vec<String> = by_cpu
        .iter()
        .take(3)
        .map(|(site, samples)| {
            let cpu_ms = **samples as f64 * 1000.0 / sample_hz as f64;
            let name = match site {
                Some(_) => names.task(**site),
                None => "no task".to_string(),
            };
            format!("{name} {cpu_ms:.0}ms")
        })
        .collect();
    format!(
        "health: busy [{}] imbalance {:.1}x | hogs {} | blocking {} ({} blocked, {} preempted) | cpu: {}",
        busy.join(" "),
        health.imbalance,
        health.hogs,
        health.blocking,
        ms(health.blocked_ns),
        ms(health.preempted_ns),
        if cpu.is_empty() {
            "idle".to_string()
        } else {
            cpu.join(", ")
        },
    )
}
