//! What the summary flags, as data: each finding is a typed value with its
//! figures, decided here once and only formatted elsewhere (the summary's
//! text, `--summary-json`, the trace's metadata). A new kind of finding
//! (blocking in a poll, a stuck task, a long scheduling delay) is a new
//! variant and a new rule in [`findings`], nothing else.

use std::fmt;

use serde_json::{Value, json};

use crate::json::task_label;
use crate::summary::{Summary, is_runtime_worker};
use crate::units::{human_duration, permille};

/// A worker doing more than this share of all workers' busy time (in
/// per-mille) is flagged as an imbalance...
pub const IMBALANCE_BUSY_SHARE_PERMILLE: u64 = 700;
/// ...when there are at least this many workers...
pub const IMBALANCE_MIN_WORKERS: usize = 2;
/// ...and it was busy at least this share of the recording (per-mille): a
/// mostly idle runtime is not worth a warning...
pub const IMBALANCE_MIN_BUSY_PERMILLE: u64 = 100;
/// ...and at least this long: over a few dozen milliseconds one preempted
/// poll decides the shares (a 48 ms run of 2,000 short tasks was flagged
/// at 72 % on a loaded machine: 14 ms of busy time).
pub const IMBALANCE_MIN_BUSY_NS: u64 = 100_000_000;
/// A single poll longer than this held its worker hostage: flagged as a hog.
pub const HOG_POLL_NS: u64 = 10_000_000;

/// Something worth a person's attention, with the figures that show it.
#[derive(Clone, Debug, PartialEq)]
pub enum Finding {
    /// One runtime worker did most of the busy time while the others sat
    /// parked.
    Imbalance(Imbalance),
    /// One poll held its worker longer than [`HOG_POLL_NS`].
    Hog(Hog),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Imbalance {
    pub worker: String,
    pub tid: u32,
    /// The worker's share of all runtime workers' busy time.
    pub busy_share_permille: u64,
    /// How much of the recording the other workers spent parked, on average.
    pub others_parked_permille: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hog {
    /// tokio's task id (0 where it could not be read).
    pub task_id: u64,
    /// The task's header address.
    pub task: u64,
    pub task_type: String,
    pub worker: String,
    pub tid: u32,
    pub poll_ns: u64,
    /// Of `poll_ns`, the time the thread was preempted (what is left is
    /// over [`HOG_POLL_NS`]).
    pub preempted_ns: u64,
    /// When the poll started (CLOCK_MONOTONIC ns).
    pub start_ns: u64,
    /// Still running when recording stopped: the real poll was longer.
    pub truncated: bool,
}

impl Finding {
    /// The finding's name as the summary prints it ("HOG").
    pub fn kind(&self) -> &'static str {
        match self {
            Finding::Imbalance(_) => "IMBALANCE",
            Finding::Hog(_) => "HOG",
        }
    }

    /// The finding as a JSON object: `kind` and its figures.
    pub fn to_json(&self) -> Value {
        match self {
            Finding::Imbalance(i) => json!({
                "kind": self.kind(),
                "worker": i.worker,
                "tid": i.tid,
                "busy_share_permille": i.busy_share_permille,
                "others_parked_permille": i.others_parked_permille,
            }),
            Finding::Hog(h) => json!({
                "kind": self.kind(),
                "task_id": h.task_id,
                "task": h.task,
                "task_type": h.task_type,
                "worker": h.worker,
                "tid": h.tid,
                "poll_ns": h.poll_ns,
                "preempted_ns": h.preempted_ns,
                "start_ns": h.start_ns,
                "truncated": h.truncated,
            }),
        }
    }
}

/// The summary's line for the finding.
impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Imbalance(i) => write!(
                f,
                "IMBALANCE: worker {} did {} of the busy time while others were parked {} of the time",
                i.worker,
                format_permille(i.busy_share_permille),
                format_permille(i.others_parked_permille)
            ),
            Finding::Hog(h) => {
                let held = h.poll_ns.saturating_sub(h.preempted_ns);
                write!(
                    f,
                    "HOG: {} {} held worker {} for {} in one poll",
                    task_label(h.task_id, h.task),
                    h.task_type,
                    h.worker,
                    human_duration(held)
                )?;
                if h.preempted_ns > 0 {
                    write!(
                        f,
                        " ({} long, {} of it preempted)",
                        human_duration(h.poll_ns),
                        human_duration(h.preempted_ns)
                    )?;
                }
                Ok(())
            }
        }
    }
}

/// Everything `summary` flags: an imbalance first, then hogs longest first.
pub fn findings(summary: &Summary) -> Vec<Finding> {
    let mut found: Vec<Finding> = imbalance(summary)
        .map(Finding::Imbalance)
        .into_iter()
        .collect();
    found.extend(hogs(summary).map(Finding::Hog));
    found
}

fn imbalance(summary: &Summary) -> Option<Imbalance> {
    let workers: Vec<_> = summary
        .workers
        .iter()
        .filter(|w| is_runtime_worker(&w.stats))
        .collect();
    if workers.len() < IMBALANCE_MIN_WORKERS || summary.duration_ns == 0 {
        return None;
    }
    let all_busy: u64 = workers.iter().map(|w| w.stats.busy_ns).sum();
    let busiest = workers.iter().max_by_key(|w| w.stats.busy_ns)?;
    let busy = u128::from(busiest.stats.busy_ns);
    let share = permille(busy, u128::from(all_busy)) as u64;
    let of_recording = permille(busy, u128::from(summary.duration_ns)) as u64;
    if share <= IMBALANCE_BUSY_SHARE_PERMILLE
        || of_recording < IMBALANCE_MIN_BUSY_PERMILLE
        || busiest.stats.busy_ns < IMBALANCE_MIN_BUSY_NS
    {
        return None;
    }
    let others = workers.len() as u128 - 1;
    let others_parked: u128 = workers
        .iter()
        .filter(|w| w.tid != busiest.tid)
        .map(|w| u128::from(w.stats.parked_ns))
        .sum();
    Some(Imbalance {
        worker: busiest.name.clone(),
        tid: busiest.tid,
        busy_share_permille: share,
        others_parked_permille: permille(others_parked, others * u128::from(summary.duration_ns))
            as u64,
    })
}

/// The longest polls that held their worker over [`HOG_POLL_NS`], their
/// preemptions not counted (the timeline keeps the longest few;
/// blocking-pool work is not among them).
fn hogs(summary: &Summary) -> impl Iterator<Item = Hog> + '_ {
    summary
        .scheduler
        .longest_polls
        .iter()
        .filter(|long| long.poll.held_ns() > HOG_POLL_NS)
        .map(|long| Hog {
            task_id: long.poll.task_id,
            task: long.poll.task,
            task_type: long.name.clone(),
            worker: summary.thread_name(long.poll.tid),
            tid: long.poll.tid,
            poll_ns: long.poll.duration_ns,
            preempted_ns: long.poll.preempted_ns,
            start_ns: long.poll.start_ns,
            truncated: long.poll.truncated,
        })
}

/// 987 → "98.7%".
pub fn format_permille(permille: u64) -> String {
    format!("{}.{}%", permille / 10, permille % 10)
}

#[cfg(test)]
mod tests {
    use crate::summary::{Summary, WorkerSummary};
    use crate::timeline::ThreadStats;

    fn worker_stats(busy_ns: u64, parked_ns: u64) -> ThreadStats {
        ThreadStats {
            polls: 100,
            parks: 10,
            busy_ns,
            parked_ns,
            ..ThreadStats::default()
        }
    }

    fn summary_with(workers: Vec<ThreadStats>) -> Summary {
        Summary {
            duration_ns: 1_000_000_000,
            workers: workers
                .into_iter()
                .enumerate()
                .map(|(i, stats)| WorkerSummary {
                    tid: 100 + i as u32,
                    name: format!("worker #{i}"),
                    stats,
                })
                .collect(),
            ..Summary::default()
        }
    }

    #[test]
    fn imbalance_is_flagged_when_one_worker_does_the_work() {
        let text = summary_with(vec![
            worker_stats(900_000_000, 50_000_000),
            worker_stats(10_000_000, 980_000_000),
            worker_stats(0, 1_000_000_000),
        ])
        .to_string();
        let line = text
            .lines()
            .find(|l| l.starts_with("IMBALANCE"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            line.contains("worker #0") && line.contains("98.9%"),
            "{line}"
        );
        assert!(
            line.contains("99.0%"),
            "others parked (980+1000)/2000: {line}"
        );
    }

    #[test]
    fn balanced_or_idle_runtimes_are_not_flagged() {
        let balanced = summary_with(vec![
            worker_stats(500_000_000, 400_000_000),
            worker_stats(450_000_000, 500_000_000),
        ])
        .to_string();
        assert!(!balanced.contains("IMBALANCE"), "{balanced}");
        // One worker did everything, but that was 1% of the time.
        let idle = summary_with(vec![
            worker_stats(10_000_000, 0),
            worker_stats(0, 990_000_000),
        ])
        .to_string();
        assert!(!idle.contains("IMBALANCE"), "{idle}");
        // Unbalanced shares of a run too short to say: 30 ms of 40.
        let short = Summary {
            duration_ns: 40_000_000,
            ..summary_with(vec![
                worker_stats(30_000_000, 0),
                worker_stats(5_000_000, 30_000_000),
            ])
        }
        .to_string();
        assert!(!short.contains("IMBALANCE"), "{short}");
        // A lone worker cannot be unbalanced; a blocking-pool thread is not a worker.
        let blocking = ThreadStats {
            polls: 3,
            blocking_polls: 3,
            busy_ns: 10_000_000,
            ..ThreadStats::default()
        };
        let lone = summary_with(vec![worker_stats(900_000_000, 0), blocking]).to_string();
        assert!(!lone.contains("IMBALANCE"), "{lone}");
    }

    #[test]
    fn the_thread_polling_a_block_on_root_is_not_a_worker() {
        // A multi-thread runtime's `block_on` thread, busy in its root
        // future (spawning), next to two evenly busy workers: not an
        // imbalance (it was flagged before roots were told apart).
        let root = ThreadStats {
            polls: 2,
            root_polls: 2,
            parks: 1,
            busy_ns: 800_000_000,
            ..ThreadStats::default()
        };
        let runtime = summary_with(vec![
            root,
            worker_stats(150_000_000, 800_000_000),
            worker_stats(150_000_000, 800_000_000),
        ])
        .to_string();
        assert!(!runtime.contains("IMBALANCE"), "{runtime}");
    }
}
