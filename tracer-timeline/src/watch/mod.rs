//! The watch tier's window as timeline outputs: what `rt-ebpf-trace watch`
//! keeps (parks, off-CPU spans, findings, CPU samples, per-second health)
//! composed into the same [`TimelineOutput`] stream a recording makes, so
//! both writers say it in their format and an incident is one trace: the
//! kept window's outputs first, then the detail recording's, on the same
//! tracks (a worker is one thread track in both parts) and one time base.
//!
//! Why compose here rather than let the watch tier write events itself:
//! Perfetto's slices on a thread track must nest (a BEGIN/END stack per
//! track, written in time order on the track's sequence), and what the
//! window holds overlaps: a BLOCKING finding covers exactly its off-CPU
//! span, a HOG finding covers the preemptions inside it. [`compose`] sorts
//! the window's intervals (outer first at equal starts), clips an interval
//! that would end after the one it is nested in (counted, flagged
//! `clipped`), and interleaves the ends with the begins and instants in
//! time order, which is what both writers need.
//!
//! Parks and samples reuse the recording's outputs
//! ([`SliceKind::Park`], [`Sample`]): a watch sample's stack (kernel frames
//! innermost, then user frames) is a [`StackId`] in the trace's
//! [`Symbols`](crate::symbols::Symbols), so the Perfetto trace has real
//! callstack samples and the kept window gives a flamegraph.

mod records;

use std::collections::VecDeque;

use serde_json::Value;

use crate::output::{Sample, Slice, SliceKind, SliceStart, StackId, ThreadName, TimelineOutput};
use crate::symbols::{SymbolFrame, Symbols};
pub use records::{FindingOutput, HealthRecord, Span, SpanKind, TaskCpu, WatchOutput, WorkerShare};

/// The module name kernel frames carry (as `perf` and Perfetto name it).
pub const KERNEL_MODULE: &str = "[kernel.kallsyms]";
/// What the flight recorder keeps, as the watch tier hands it over.
#[derive(Clone, Debug)]
pub enum WatchItem {
    Park {
        tid: u32,
        start_ns: u64,
        end_ns: u64,
    },
    OffCpu {
        tid: u32,
        start_ns: u64,
        end_ns: u64,
        preempted: bool,
        state: u32,
    },
    Finding(Box<FindingOutput>),
    Sample {
        tid: u32,
        ts_ns: u64,
        site: Option<u32>,
        stack: StackId,
    },
    Health(Box<HealthRecord>),
}

/// The window's outputs, composed.
#[derive(Debug, Default)]
pub struct Composed {
    /// Thread names, then everything before `until` in time order.
    pub outputs: Vec<TimelineOutput>,
    /// From `until` on: findings (as instants) and health records, in time
    /// order, to be interleaved with the detail recording's outputs.
    pub tail: VecDeque<TimelineOutput>,
    pub samples: u64,
    pub parks: u64,
    pub findings: u64,
    /// Spans cut short to nest in the one around them.
    pub clipped: u64,
}

/// An interval to open at `start`, close at `end`.
struct Interval {
    tid: u32,
    start: u64,
    end: u64,
    kind: IntervalKind,
    clipped: bool,
}

enum IntervalKind {
    Park,
    Span(SpanKind),
}

/// Composes `items` into outputs. `threads` are the workers' tracks
/// (tid, name), in order. With `until` (an incident's detail start),
/// parks, off-CPU spans and samples from then on are left out (the detail
/// shows them in full), slices are cut there, and findings and health
/// records from then on go to [`Composed::tail`].
pub fn compose(threads: &[(u32, String)], items: Vec<WatchItem>, until: Option<u64>) -> Composed {
    let until = until.unwrap_or(u64::MAX);
    let mut composed = Composed::default();
    for (index, (tid, name)) in threads.iter().enumerate() {
        composed
            .outputs
            .push(TimelineOutput::ThreadName(ThreadName {
                tid: *tid,
                name: name.clone(),
                sort_index: index as u32 + 1,
            }));
    }
    let mut intervals = Vec::new();
    // Instants, by time: samples and health.
    let mut instants: Vec<(u64, TimelineOutput)> = Vec::new();
    let mut tail: Vec<(u64, TimelineOutput)> = Vec::new();
    for item in items {
        match item {
            WatchItem::Park {
                tid,
                start_ns,
                end_ns,
            } if start_ns < until => {
                composed.parks += 1;
                intervals.push(Interval {
                    tid,
                    start: start_ns,
                    end: end_ns.max(start_ns),
                    kind: IntervalKind::Park,
                    clipped: false,
                });
            }
            WatchItem::OffCpu {
                tid,
                start_ns,
                end_ns,
                preempted,
                state,
            } if start_ns < until => intervals.push(Interval {
                tid,
                start: start_ns,
                end: end_ns.max(start_ns),
                kind: IntervalKind::Span(SpanKind::OffCpu { preempted, state }),
                clipped: false,
            }),
            WatchItem::Sample {
                tid,
                ts_ns,
                site,
                stack,
            } if ts_ns < until => {
                composed.samples += 1;
                let sample = Sample {
                    tid,
                    ts_ns,
                    task_id: 0,
                    site,
                    stack,
                };
                instants.push((ts_ns, TimelineOutput::Sample(sample)));
            }
            WatchItem::Finding(finding) => {
                composed.findings += 1;
                if finding.start_ns < until {
                    intervals.push(Interval {
                        tid: finding.tid,
                        start: finding.start_ns,
                        // At least 1 ns: a slice, not an instant.
                        end: finding.start_ns + finding.duration_ns.max(1),
                        kind: IntervalKind::Span(SpanKind::Finding(finding)),
                        clipped: false,
                    });
                } else {
                    let ts = finding.start_ns;
                    let mark = WatchOutput::FindingMark(finding);
                    tail.push((ts, TimelineOutput::Watch(Box::new(mark))));
                }
            }
            WatchItem::Health(health) => {
                let ts = health.end_ns;
                let output = TimelineOutput::Watch(Box::new(WatchOutput::Health(health)));
                if ts < until {
                    instants.push((ts, output));
                } else {
                    tail.push((ts, output));
                }
            }
            // Detailed items from `until` on: the detail has them in full.
            WatchItem::Park { .. } | WatchItem::OffCpu { .. } | WatchItem::Sample { .. } => {}
        }
    }
    // Outer first at equal starts: the longer one, then a finding before
    // the off-CPU span it is about.
    intervals.sort_by_key(|i| {
        let rank = match &i.kind {
            IntervalKind::Span(SpanKind::Finding(_)) => 0,
            _ => 1,
        };
        (i.start, std::cmp::Reverse(i.end), rank)
    });
    instants.sort_by_key(|(ts, _)| *ts);
    tail.sort_by_key(|(ts, _)| *ts);
    composed.tail = tail.into_iter().map(|(_, output)| output).collect();

    // Per thread, the intervals open (innermost last).
    let mut open: Vec<(u32, Vec<Interval>)> = Vec::new();
    let mut instants = instants.into_iter().peekable();
    let out = &mut composed.outputs;
    for mut interval in intervals {
        while let Some((_, instant)) = instants.next_if(|(ts, _)| *ts < interval.start) {
            close_until(&mut open, instant_ts(&instant), out);
            out.push(instant);
        }
        close_until(&mut open, interval.start, out);
        let stack = match open.iter_mut().find(|(tid, _)| *tid == interval.tid) {
            Some((_, stack)) => stack,
            None => {
                open.push((interval.tid, Vec::new()));
                &mut open.last_mut().expect("pushed").1
            }
        };
        let mut clipped = false;
        if let Some(outer) = stack.last()
            && interval.end > outer.end
        {
            interval.end = outer.end;
            clipped = true;
            composed.clipped += 1;
        }
        if interval.end > until {
            interval.end = until;
            clipped = true;
        }
        interval.clipped = clipped;
        out.push(open_output(&interval));
        stack.push(interval);
    }
    for (ts, instant) in instants {
        close_until(&mut open, ts, out);
        out.push(instant);
    }
    close_until(&mut open, u64::MAX, out);
    composed
}

/// The time of an instant output.
fn instant_ts(output: &TimelineOutput) -> u64 {
    output_ts(output).unwrap_or(0)
}

/// When an output happens (None for thread names).
pub fn output_ts(output: &TimelineOutput) -> Option<u64> {
    Some(match output {
        TimelineOutput::ThreadName(_) => return None,
        TimelineOutput::SliceStart(start) => start.ts_ns,
        TimelineOutput::Slice(slice) => slice.end_ns,
        TimelineOutput::Spawn(spawn) => spawn.ts_ns,
        TimelineOutput::Wake(wake) => wake.ts_ns,
        TimelineOutput::WokenPoll(poll) => poll.ts_ns,
        TimelineOutput::TaskEnd(end) => end.ts_ns,
        TimelineOutput::Unpark(unpark) => unpark.ts_ns,
        TimelineOutput::Counter(counter) => counter.ts_ns,
        TimelineOutput::Sample(sample) => sample.ts_ns,
        TimelineOutput::Watch(watch) => match watch.as_ref() {
            WatchOutput::SpanStart { ts_ns, .. } => *ts_ns,
            WatchOutput::Span(span) => span.end_ns,
            WatchOutput::FindingMark(finding) => finding.start_ns,
            WatchOutput::Health(health) => health.end_ns,
        },
    })
}

fn open_output(interval: &Interval) -> TimelineOutput {
    match &interval.kind {
        IntervalKind::Park => TimelineOutput::SliceStart(SliceStart {
            tid: interval.tid,
            ts_ns: interval.start,
            kind: SliceKind::Park,
            woken_by: None,
        }),
        IntervalKind::Span(kind) => TimelineOutput::Watch(Box::new(WatchOutput::SpanStart {
            tid: interval.tid,
            ts_ns: interval.start,
            kind: kind.clone(),
        })),
    }
}

/// Closes, in time order, every open interval that ends by `ts`.
fn close_until(open: &mut [(u32, Vec<Interval>)], ts: u64, out: &mut Vec<TimelineOutput>) {
    loop {
        // The thread whose innermost open interval ends first.
        let next = open
            .iter()
            .enumerate()
            .filter_map(|(index, (_, stack))| stack.last().map(|i| (i.end, index)))
            .filter(|(end, _)| *end <= ts)
            .min_by_key(|(end, _)| *end);
        let Some((_, index)) = next else {
            return;
        };
        let stack = &mut open[index].1;
        let interval = stack.pop().expect("has a last");
        out.push(close_output(interval));
    }
}

fn close_output(interval: Interval) -> TimelineOutput {
    match interval.kind {
        IntervalKind::Park => TimelineOutput::Slice(Slice {
            tid: interval.tid,
            kind: SliceKind::Park,
            start_ns: interval.start,
            end_ns: interval.end,
            truncated: interval.clipped,
            end_lost: false,
            preempted_ns: 0,
        }),
        IntervalKind::Span(kind) => TimelineOutput::Watch(Box::new(WatchOutput::Span(Span {
            tid: interval.tid,
            start_ns: interval.start,
            end_ns: interval.end,
            kind,
            clipped: interval.clipped,
        }))),
    }
}

/// A watch window composed for a trace: written alone (`watch`'s exit
/// and SIGUSR1 traces), or before a recording in the same trace (an
/// incident: [`adopt_stacks`](Self::adopt_stacks) first, then
/// [`Composed::outputs`], then the recording's outputs with
/// [`Composed::tail`] interleaved by time).
#[derive(Debug, Default)]
pub struct WatchWindow {
    pub composed: Composed,
    /// The samples' and findings' stacks, by the [`StackId`]s they carry.
    pub stacks: Vec<Vec<SymbolFrame>>,
    /// Its first time: the trace's time zero.
    pub start_ns: u64,
    /// The window's figures (reason, keep bound, lost, sample rate…).
    pub metadata: Value,
}

impl WatchWindow {
    /// Moves the window's stacks into a recording's `symbols`.
    pub fn adopt_stacks(&mut self, symbols: &mut Symbols) {
        let stacks = std::mem::take(&mut self.stacks);
        adopt_stacks(
            symbols,
            stacks,
            &mut self.composed.outputs,
            &mut self.composed.tail,
        );
    }
}

/// The window's stacks, to be added to a recording's [`Symbols`] (an
/// incident): its samples' and findings' stack ids are moved past the
/// recording's.
pub fn adopt_stacks(
    symbols: &mut Symbols,
    stacks: Vec<Vec<SymbolFrame>>,
    outputs: &mut [TimelineOutput],
    tail: &mut VecDeque<TimelineOutput>,
) {
    let base = symbols.stacks.len() as StackId;
    symbols.stacks.extend(stacks);
    for output in outputs.iter_mut().chain(tail.iter_mut()) {
        match output {
            TimelineOutput::Sample(sample) => sample.stack += base,
            TimelineOutput::Watch(watch) => match watch.as_mut() {
                WatchOutput::SpanStart {
                    kind: SpanKind::Finding(finding),
                    ..
                }
                | WatchOutput::Span(Span {
                    kind: SpanKind::Finding(finding),
                    ..
                })
                | WatchOutput::FindingMark(finding) => {
                    if let Some(stack) = &mut finding.stack {
                        *stack += base;
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
