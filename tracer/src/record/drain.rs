//! What the drain loop does while the target runs: as little as it can, so
//! that the tracer keeps up with millions of events a second on one core.
//!
//! Events go to the spill file untouched ([`spill`](super::spill)); the
//! trace is rendered from it after recording ([`sink`](super::sink)). Only
//! what can't wait is done now: stack captures are unwound (that needs the
//! live process's memory maps) and each thread's name is read from /proc
//! when it is first seen (the target may be gone by the time of the replay).
//! Whatever needs the event stream's state, such as the type of the task a
//! CPU sample hit, waits for the replay.

use std::collections::HashMap;

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tracer_common::{Event, EventKind, StackKind};

use super::spill::{SpillReader, SpillWriter};
use super::stacks::{Capture, StackId, StackTable};

pub struct Recorder {
    pid: u32,
    spill: SpillWriter,
    stacks: StackTable,
    samples: Vec<Sample>,
    thread_comms: HashMap<u32, String>,
    malformed_stacks: u64,
}

/// A CPU sample with its stack unwound, waiting for the replay to say which
/// type of task it hit. Kept in memory: samples come at most `--sample-hz`
/// times a second per CPU, a thousandth of the event rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub ts_ns: u64,
    pub tid: u32,
    /// The task running on the thread (0 when none).
    pub task_id: u64,
    pub stack: StackId,
}

/// Everything recording leaves for the replay.
pub struct Recording {
    /// The events, in drain order.
    pub events: SpillReader,
    /// In timestamp order.
    pub samples: Vec<Sample>,
    pub stacks: StackTable,
    /// Each thread's `comm`, read when it was first seen ("thread" when it
    /// could not be read).
    pub thread_comms: HashMap<u32, String>,
    /// Ring-buffer records too short or ragged to read, both rings.
    pub malformed: u64,
}

impl Recorder {
    pub fn new(pid: u32, spill: SpillWriter) -> Self {
        Recorder {
            pid,
            spill,
            stacks: StackTable::new(pid),
            samples: Vec::new(),
            thread_comms: HashMap::new(),
            malformed_stacks: 0,
        }
    }

    /// Starts loading the symbols of `exe` on the side (see
    /// [`StackTable::prepare_symbols`]).
    pub fn prepare_symbols(&mut self, exe: &std::path::Path) {
        self.stacks.prepare_symbols(exe);
    }

    /// Events drained so far.
    pub fn events(&self) -> u64 {
        self.spill.events()
    }

    /// Reads at most `MAX_BATCH` records, so that a busy target can't keep
    /// the loop from noticing Ctrl-C or the deadline. Returns true when the
    /// ring buffer may hold more.
    pub fn drain_batch(&mut self, ring: &mut RingBuf<MapData>) -> Result<bool> {
        const MAX_BATCH: usize = 16 * 1024;
        for _ in 0..MAX_BATCH {
            if !self.drain_one(ring)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Reads everything left in the ring buffer.
    pub fn drain_all(&mut self, ring: &mut RingBuf<MapData>) -> Result<()> {
        while self.drain_one(ring)? {}
        Ok(())
    }

    fn drain_one(&mut self, ring: &mut RingBuf<MapData>) -> Result<bool> {
        let Some(record) = ring.next() else {
            return Ok(false);
        };
        if let Some(tid) = self.spill.push(&record)? {
            self.note_thread(tid);
            // A spawn's call site is symbolized with the stacks, after
            // recording (only its address is noted now).
            // SAFETY: `push` accepted it: exactly an `Event`'s size.
            let event: Event = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
            if event.kind == EventKind::Spawn as u32 {
                self.stacks.add_call_site(event.addr);
            }
        }
        Ok(true)
    }

    /// Reads a thread's name the first time one of its events is drained,
    /// while it most likely still runs.
    fn note_thread(&mut self, tid: u32) {
        if self.thread_comms.contains_key(&tid) {
            return;
        }
        let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", self.pid))
            .map(|comm| comm.trim_end().to_string())
            .unwrap_or_else(|_| "thread".to_string());
        self.thread_comms.insert(tid, comm);
    }

    /// Reads every stack capture waiting in the `STACKS` ring buffer and
    /// unwinds it now, while the target's memory maps are there to read.
    pub fn drain_stacks(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(record) = ring.next() {
            let Some(capture) = Capture::parse(&record) else {
                self.malformed_stacks += 1;
                continue;
            };
            let header = capture.header;
            let Some(stack) = self.stacks.add(&capture) else {
                continue;
            };
            if header.kind == StackKind::Sample as u32 {
                self.samples.push(Sample {
                    ts_ns: header.ts_ns,
                    tid: header.tid,
                    task_id: header.task_id,
                    stack,
                });
            }
        }
    }

    /// Ends recording: the spill file is flushed and opened for the replay.
    pub fn finish(mut self) -> Result<Recording> {
        // The stack ring is drained from several CPUs' captures, which
        // interleave; the replay merges samples with events by time.
        self.samples.sort_by_key(|sample| sample.ts_ns);
        let malformed = self.spill.malformed() + self.malformed_stacks;
        Ok(Recording {
            events: self.spill.finish()?,
            samples: self.samples,
            stacks: self.stacks,
            thread_comms: self.thread_comms,
            malformed,
        })
    }
}
