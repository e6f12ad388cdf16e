//! The Perfetto [`TraceWriter`]: the trace in Perfetto's native protobuf
//! format (`.pftrace`), which the UI opens as it is, gzipped or not.
//!
//! Why this format (measured, see BENCHMARKS.md): the Chrome JSON trace of
//! a busy server takes ~300 bytes an event, so a minute of tracing is
//! gigabytes and more than a browser tab loads. Here strings are interned
//! once per sequence, slices need no track or pid (a per-sequence default),
//! and timestamps are deltas on an incremental clock in 10 ns ticks: ~20
//! bytes an event on the HTTP benchmark flat out, against JSON's 310
//! (NOTES.md breaks it down: per request a poll end with its arguments, 27
//! bytes; the driver's wake instant, 15; the poll's begin, 15). Flow ids
//! are varints in the deprecated `flow_ids_old`/`terminating_flow_ids_old`
//! fields, which trace processor still reads, and recycled once their flow
//! ended (`flows`): 1 byte an id instead of 9 in the fixed64 fields. A poll
//! carries no `waits_at` (the JSON trace's name for the await stack's first
//! line), its full type is an interned source location (3 bytes), and a
//! wake instant does not repeat the woken task's id (its flow's end does);
//! `waits_on` (the tokio primitive) is the interned await stack's first
//! line, `waits on: timer: time::Sleep`, not an annotation of its own (~7
//! bytes a poll, 1.5 an event: 21.2 bytes an event with it).
//! It also carries what JSON cannot: CPU samples with interned callstacks
//! (frames with function, file:line, inlined frames and the mapping), which
//! the UI turns into flamegraphs for an area selection.
//!
//! Layout:
//! - sequence 1: the clock snapshot (`CLOCK_MONOTONIC`, what
//!   `bpf_ktime_get_ns` reads, is the trace's clock), the process and
//!   counter tracks, counter values, and the trace's metadata as the debug
//!   annotations of a last "rt-ebpf-trace" instant on the process track;
//! - sequence 2: CPU samples, as `PerfSample` packets (`pid`, `tid`,
//!   `callstack_iid`) with interned frames and callstacks. `PerfSample`
//!   rather than `StreamingProfilePacket` (Chrome's sampler): it carries a
//!   tid per sample, and trace processor turns it into the `perf_sample`
//!   table the UI shows per thread with a flamegraph;
//! - one sequence per thread: its `TrackDescriptor` (renamed by a later one
//!   when the thread turns out to be a blocking-pool thread), then its
//!   slices and instants, on the thread's track through
//!   `TrackEventDefaults.track_uuid`.
//!
//! Every sequence starts with `SEQ_INCREMENTAL_STATE_CLEARED`, its interning
//! tables and a sequence-scoped incremental clock (id 64, as Perfetto's SDK
//! does), so a packet's timestamp is the delta from the previous one. A
//! thread's outputs come in its own event order; where an output would go
//! back in time on its sequence (counters sampled from different threads'
//! events, task ends reported late) it is stamped at the sequence's last
//! time instead and counted (`timestamps_clamped` in the metadata).
//!
//! Slices are written as they open (`SLICE_BEGIN`, with the flow that ends
//! there in `terminating_flow_ids`) and close (`SLICE_END`, carrying the
//! poll's arguments, which trace processor merges into the slice). A wake
//! that makes a task runnable is an instant that starts the flow, at the
//! wake's time: inside the waking poll it is a bare "wake" (~20 bytes), so
//! the arrow leaves the poll where the wake happened; `flow_ids` on the
//! poll's end would be cheaper but make arrows run backwards whenever the
//! woken task starts before the waking poll ends (most wakes between
//! workers). Elsewhere (the driver inside a park, another thread) the
//! instant also says who woke which task. Spawns are instants too.
//!
//! Code: this module frames packets, keeps the sequences and thread tracks
//! and writes counters and samples; `events` encodes the thread tracks'
//! slices and instants, `watch` the watch tier's spans, findings and
//! health, `metadata` the trace's last packets, `samples`
//! the interned callstacks, `sequence` the per-sequence interning and
//! clock, `proto` the field numbers and encoder.

mod events;
mod flows;
mod metadata;
mod proto;
mod samples;
mod sequence;
mod watch;

use std::collections::HashMap;
use std::io::Write;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::output::{Sample, ThreadName, TimelineOutput};
use crate::thread_index::ThreadIndex;
use crate::writer::{TraceInfo, TraceWriter};
use proto::{Encoder, event, packet, perf_sample, track};
use samples::Callstacks;
use sequence::Sequence;

const MAIN_SEQUENCE: u32 = 1;
const SAMPLE_SEQUENCE: u32 = 2;
const PROCESS_UUID: u64 = 1;
/// Counter track uuids are this plus the counter's index.
const COUNTER_UUID_BASE: u64 = 2;
/// Thread track uuids are this plus the tid.
const THREAD_UUID_BASE: u64 = 1 << 32;
/// Packets are handed to the output in chunks of about this size: as large
/// as the tracer's trace-file buffer (a `BufWriter` of 1 MiB,
/// `trace_file.rs`), which then passes each chunk straight to the kernel
/// instead of copying it into its own buffer first. 64 KiB chunks were
/// copied: `memmove` under `end_packet`, ~2 % of rendering, half of it
/// page faults on the buffer's fresh pages (perf, 20 s of the HTTP
/// benchmark).
const PENDING_BYTES: usize = 1 << 20;

pub struct PerfettoWriter<'a, W: Write> {
    out: W,
    info: &'a TraceInfo,
    /// Whole packets not yet handed to `out`, then the one being written
    /// (one `write_all` per 64 KiB rather than per ~20-byte packet, and no
    /// copy of each packet from a buffer of its own); and the packet's new
    /// interned entries.
    packet: Encoder,
    interned: Encoder,
    main: Sequence,
    samples: Sequence,
    /// Each thread's track, by tid: an index into `tracks`, whose entries
    /// are taken out and put back for every output (boxed: moving a
    /// pointer, not a few hundred bytes of interning tables).
    thread_index: ThreadIndex,
    tracks: Vec<Option<Box<ThreadTrack>>>,
    next_sequence: u32,
    counters_described: [bool; 3],
    /// Flows started and not yet ended, and their ids on the wire.
    flows: flows::Flows,
    /// What the sample sequence has interned of the stacks.
    callstacks: Callstacks,
    /// The watch tier's counter tracks, by name.
    watch_counters: HashMap<String, u64>,
    packets: u64,
}

struct ThreadTrack {
    sequence: Sequence,
    /// Callstacks interned on this thread's sequence (a watch finding's).
    callstacks: Option<Box<Callstacks>>,
}

impl<'a, W: Write> PerfettoWriter<'a, W> {
    pub fn new(out: W, info: &'a TraceInfo) -> Result<Self> {
        let mut writer = Self {
            out,
            info,
            packet: Encoder::with_capacity(PENDING_BYTES + 4096),
            interned: Encoder::default(),
            main: Sequence::new(MAIN_SEQUENCE, info.start_ns),
            samples: Sequence::new(SAMPLE_SEQUENCE, info.start_ns),
            thread_index: ThreadIndex::default(),
            tracks: Vec::new(),
            next_sequence: SAMPLE_SEQUENCE + 1,
            counters_described: [false; 3],
            flows: flows::Flows::default(),
            callstacks: Callstacks::default(),
            watch_counters: HashMap::new(),
            packets: 0,
        };
        let mut main = std::mem::take(&mut writer.main);
        writer.start_sequence(&mut main, None, true)?;
        writer.begin_packet(&main, None);
        writer.packet.begin(packet::TRACK_DESCRIPTOR);
        writer.packet.varint(track::UUID, PROCESS_UUID);
        writer
            .packet
            .varint(track::CHILD_ORDERING, track::ORDERING_EXPLICIT);
        writer.packet.begin(track::PROCESS);
        writer.packet.int(track::PROCESS_PID, info.pid as i64);
        writer
            .packet
            .string(track::PROCESS_NAME, &info.process_name);
        writer.packet.end();
        writer.packet.end();
        writer.end_packet()?;
        writer.main = main;
        let mut samples = std::mem::take(&mut writer.samples);
        writer.start_sequence(&mut samples, None, false)?;
        writer.samples = samples;
        Ok(writer)
    }

    /// The sequence's first packets: cleared incremental state, defaults,
    /// fixed interned names, and its incremental clock's starting point.
    fn start_sequence(
        &mut self,
        sequence: &mut Sequence,
        track_uuid: Option<u64>,
        primary_clock: bool,
    ) -> Result<()> {
        self.interned.clear();
        self.packet.begin(proto::trace::PACKET);
        sequence.write_start(
            &mut self.packet,
            &mut self.interned,
            track_uuid,
            primary_clock,
        );
        self.flush_interned();
        self.packet.end();
        self.emit()
    }

    /// Starts a packet on `sequence` at `ts_ns` (None: no timestamp).
    fn begin_packet(&mut self, sequence: &Sequence, delta: Option<u64>) {
        self.interned.clear();
        self.packet.begin(proto::trace::PACKET);
        if let Some(delta) = delta {
            self.packet.varint(packet::TIMESTAMP, delta);
        }
        self.packet
            .varint(packet::TRUSTED_PACKET_SEQUENCE_ID, sequence.id as u64);
    }

    fn flush_interned(&mut self) {
        if !self.interned.buf.is_empty() {
            self.packet.bytes(packet::INTERNED_DATA, &self.interned.buf);
        }
    }

    fn end_packet(&mut self) -> Result<()> {
        self.flush_interned();
        self.packet.end();
        self.emit()
    }

    fn emit(&mut self) -> Result<()> {
        debug_assert!(!self.packet.is_open());
        self.packets += 1;
        if self.packet.buf.len() >= PENDING_BYTES {
            self.flush_pending()?;
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<()> {
        self.out
            .write_all(&self.packet.buf)
            .context("writing the trace")?;
        self.packet.buf.clear();
        Ok(())
    }

    /// The thread's track, its sequence started on first use and described
    /// with `name` (or "thread TID" until the timeline names it).
    fn thread(&mut self, tid: u32, name: Option<&ThreadName>) -> Result<Box<ThreadTrack>> {
        if let Some(index) = self.thread_index.get(tid)
            && let Some(mut thread) = self.tracks[index].take()
        {
            if let Some(name) = name {
                self.describe_thread(&mut thread, tid, &name.name, name.sort_index)?;
            }
            return Ok(thread);
        }
        let mut sequence = Sequence::new(self.next_sequence, self.info.start_ns);
        self.next_sequence += 1;
        self.start_sequence(&mut sequence, Some(THREAD_UUID_BASE + tid as u64), false)?;
        let mut thread = Box::new(ThreadTrack {
            sequence,
            callstacks: None,
        });
        match name {
            Some(name) => self.describe_thread(&mut thread, tid, &name.name, name.sort_index)?,
            None => self.describe_thread(&mut thread, tid, &format!("thread {tid}"), u32::MAX)?,
        }
        Ok(thread)
    }

    fn describe_thread(
        &mut self,
        thread: &mut ThreadTrack,
        tid: u32,
        name: &str,
        sort_index: u32,
    ) -> Result<()> {
        self.begin_packet(&thread.sequence, None);
        let p = &mut self.packet;
        p.begin(packet::TRACK_DESCRIPTOR);
        p.varint(track::UUID, THREAD_UUID_BASE + tid as u64);
        p.varint(track::PARENT_UUID, PROCESS_UUID);
        p.int(
            track::SIBLING_ORDER_RANK,
            sort_index.min(i32::MAX as u32) as i64,
        );
        p.begin(track::THREAD);
        p.int(track::THREAD_PID, self.info.pid as i64);
        p.int(track::THREAD_TID, tid as i64);
        p.string(track::THREAD_NAME, name);
        p.end();
        p.end();
        self.end_packet()
    }

    fn with_thread(
        &mut self,
        tid: u32,
        write: impl FnOnce(&mut Self, &mut ThreadTrack) -> Result<()>,
    ) -> Result<()> {
        let mut thread = self.thread(tid, None)?;
        let result = write(self, &mut thread);
        self.put_back(tid, thread);
        result
    }

    fn thread_name(&mut self, name: &ThreadName) -> Result<()> {
        let thread = self.thread(name.tid, Some(name))?;
        self.put_back(name.tid, thread);
        Ok(())
    }

    /// Puts a thread's track taken by [`thread`](Self::thread) back.
    fn put_back(&mut self, tid: u32, thread: Box<ThreadTrack>) {
        let index = self.thread_index.get(tid).unwrap_or_else(|| {
            self.tracks.push(None);
            let index = self.tracks.len() - 1;
            self.thread_index.insert(tid, index);
            index
        });
        self.tracks[index] = Some(thread);
    }

    fn counter(&mut self, sample: &crate::counters::CounterSample) -> Result<()> {
        let index = sample.counter as usize;
        let uuid = COUNTER_UUID_BASE + index as u64;
        let mut main = std::mem::take(&mut self.main);
        if !self.counters_described[index] {
            self.counters_described[index] = true;
            let (name, series) = sample.counter.name_and_series();
            self.begin_packet(&main, None);
            let p = &mut self.packet;
            p.begin(packet::TRACK_DESCRIPTOR);
            p.varint(track::UUID, uuid);
            p.varint(track::PARENT_UUID, PROCESS_UUID);
            p.string(track::NAME, &format!("{name} {series}"));
            p.begin(track::COUNTER);
            p.varint(track::COUNTER_UNIT, track::UNIT_COUNT);
            p.end();
            p.end();
            self.end_packet()?;
        }
        let delta = main.delta(sample.ts_ns);
        self.begin_packet(&main, Some(delta));
        let p = &mut self.packet;
        p.begin(packet::TRACK_EVENT);
        p.varint(event::TYPE, event::COUNTER);
        p.varint(event::TRACK_UUID, uuid);
        p.int(event::COUNTER_VALUE, sample.value as i64);
        p.end();
        let result = self.end_packet();
        self.main = main;
        result
    }

    fn sample(&mut self, sample: &Sample) -> Result<()> {
        let mut samples = std::mem::take(&mut self.samples);
        let delta = samples.delta(sample.ts_ns);
        self.begin_packet(&samples, Some(delta));
        let task_name = sample
            .site
            .map(|site| (site, self.info.types.short_name(Some(site))));
        let task = task_name
            .as_ref()
            .map(|(site, name)| (*site, name.as_str()));
        let callstack =
            self.callstacks
                .intern(&mut self.interned, &self.info.symbols, sample.stack, task);
        let p = &mut self.packet;
        p.begin(packet::PERF_SAMPLE);
        p.varint(perf_sample::PID, self.info.pid as u64);
        p.varint(perf_sample::TID, sample.tid as u64);
        p.varint(perf_sample::CALLSTACK_IID, callstack);
        p.end();
        let result = self.end_packet();
        self.samples = samples;
        result
    }
}

impl<W: Write> TraceWriter for PerfettoWriter<'_, W> {
    fn write(&mut self, output: &TimelineOutput) -> Result<()> {
        match output {
            TimelineOutput::ThreadName(name) => self.thread_name(name),
            TimelineOutput::SliceStart(start) => self.slice_start(start),
            TimelineOutput::Slice(slice) => self.slice_end(slice),
            TimelineOutput::Spawn(spawn) => self.spawn(spawn),
            TimelineOutput::Wake(wake) => self.wake(wake),
            // The flow ended at the poll's SLICE_BEGIN.
            TimelineOutput::WokenPoll(_) => Ok(()),
            TimelineOutput::TaskEnd(end) => self.task_end(end),
            TimelineOutput::Unpark(unpark) => self.unpark(unpark),
            TimelineOutput::Counter(sample) => self.counter(sample),
            TimelineOutput::Sample(sample) => self.sample(sample),
            TimelineOutput::Watch(watch) => self.watch(watch),
        }
    }

    fn finish(&mut self, metadata: &Value) -> Result<()> {
        self.metadata(metadata)?;
        self.flush_pending()?;
        self.out.flush().context("writing the trace")
    }
}

#[cfg(test)]
mod tests;
