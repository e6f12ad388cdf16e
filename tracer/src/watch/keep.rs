//! The flight recorder: the last `--keep` of what the watch tier saw, in
//! memory, within `--keep-memory` bytes, for a trace on SIGUSR1, on a
//! trigger and at exit.
//!
//! Everything kept is an [`Item`] in one time-ordered queue; each counts its
//! own size plus its heap (a sample's unwound stacks: typically 30–60
//! addresses). The oldest go first when the window is longer than `--keep`
//! *or* the total is over the bound: the bound always holds, and the window
//! is shorter than asked when the target parks or samples faster than the
//! bound allows (counted in `dropped_for_memory`). Parks are the bulk on a
//! busy server: ~64 bytes each, so 64 MiB keeps ~1 M parks.

use std::collections::VecDeque;

use super::detect::{Health, Site};
use super::stacks::Capture;

/// A finding, described for people and for the trace.
#[derive(Clone, Debug)]
pub struct FindingRecord {
    /// "BLOCKING" or "HOG".
    pub kind: &'static str,
    pub tid: u32,
    pub site: Site,
    pub start_ns: u64,
    pub duration_ns: u64,
    /// The line printed on the terminal.
    pub line: String,
    /// Why it went off CPU (blocking: "blocked (state N)").
    pub reason: String,
    pub user_stack: Vec<String>,
    pub kernel_stack: Vec<String>,
    /// The stacks it was named from (a blocking switch's, a hog's last
    /// sample), for the trace's callstack.
    pub capture: Option<Box<Capture>>,
}

#[derive(Clone, Debug)]
pub enum Kept {
    Park {
        tid: u32,
        end_ns: u64,
    },
    Sample(Box<Capture>),
    OffCpu {
        tid: u32,
        duration_ns: u64,
        preempted: bool,
        /// `prev_state` at the switch (0 when preempted).
        state: u32,
    },
    Finding(Box<FindingRecord>),
    Health(Box<Health>),
}

#[derive(Clone, Debug)]
pub struct Item {
    pub ts_ns: u64,
    pub kept: Kept,
}

impl Item {
    fn bytes(&self) -> usize {
        let heap = match &self.kept {
            Kept::Sample(capture) => capture.heap_bytes(),
            Kept::Finding(finding) => {
                std::mem::size_of::<FindingRecord>()
                    + finding.line.capacity()
                    + finding.reason.capacity()
                    + finding
                        .user_stack
                        .iter()
                        .chain(&finding.kernel_stack)
                        .map(|frame| frame.capacity() + std::mem::size_of::<String>())
                        .sum::<usize>()
                    + finding.capture.as_ref().map_or(0, |c| c.heap_bytes())
            }
            Kept::Health(health) => {
                std::mem::size_of::<Health>()
                    + health.workers.capacity() * 24
                    + health.samples_by_site.len() * 48
            }
            Kept::Park { .. } | Kept::OffCpu { .. } => 0,
        };
        std::mem::size_of::<Item>() + heap
    }
}

pub struct FlightRecorder {
    keep_ns: u64,
    max_bytes: usize,
    items: VecDeque<Item>,
    bytes: usize,
    pub peak_bytes: usize,
    /// Items dropped before their time was up, to stay within the bound.
    pub dropped_for_memory: u64,
}

impl FlightRecorder {
    pub fn new(keep: std::time::Duration, max_bytes: u64) -> Self {
        FlightRecorder {
            keep_ns: keep.as_nanos() as u64,
            max_bytes: max_bytes as usize,
            items: VecDeque::new(),
            bytes: 0,
            peak_bytes: 0,
            dropped_for_memory: 0,
        }
    }

    /// Keeps `kept`, which happened at `ts_ns` (items come in about time
    /// order), and lets go of what fell out of the window or the bound.
    pub fn push(&mut self, ts_ns: u64, kept: Kept) {
        let item = Item { ts_ns, kept };
        let bytes = item.bytes();
        self.items.push_back(item);
        self.bytes += bytes;
        let horizon = ts_ns.saturating_sub(self.keep_ns);
        while let Some(front) = self.items.front() {
            let too_old = front.ts_ns < horizon;
            let too_big = self.bytes > self.max_bytes;
            if !too_old && !too_big {
                break;
            }
            if !too_old {
                self.dropped_for_memory += 1;
            }
            let front = self.items.pop_front().expect("checked");
            self.bytes -= front.bytes();
        }
        self.peak_bytes = self.peak_bytes.max(self.bytes);
    }

    pub fn items(&self) -> impl Iterator<Item = &Item> {
        self.items.iter()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The first and last time kept.
    pub fn span(&self) -> Option<(u64, u64)> {
        let first = self.items.iter().map(|item| item.ts_ns).min()?;
        let last = self.items.iter().map(|item| item.ts_ns).max()?;
        Some((first, last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn keeps_only_the_window() {
        let mut recorder = FlightRecorder::new(std::time::Duration::from_secs(10), 1 << 30);
        for second in 0..30 {
            recorder.push(
                second * S,
                Kept::Park {
                    tid: 1,
                    end_ns: second * S + 1,
                },
            );
        }
        assert_eq!(recorder.span(), Some((19 * S, 29 * S)));
        assert_eq!(recorder.dropped_for_memory, 0);
    }

    #[test]
    fn the_memory_bound_holds() {
        let bound = 1 << 20;
        let mut recorder = FlightRecorder::new(std::time::Duration::from_secs(3600), bound);
        for i in 0..200_000 {
            recorder.push(
                i,
                Kept::Park {
                    tid: 1,
                    end_ns: i + 1,
                },
            );
            assert!(recorder.bytes() <= bound as usize);
        }
        assert!(recorder.dropped_for_memory > 0);
        assert!(recorder.peak_bytes <= bound as usize);
        // The newest are the ones kept.
        assert_eq!(recorder.span().unwrap().1, 199_999);
    }
}
