//! The watch tier's outputs ([`crate::watch`]) in the Perfetto trace.
//!
//! - Off-CPU spans and findings are slices on the worker's thread track
//!   (parks and samples are the recording's outputs). A finding carries
//!   its report as debug annotations (`summary`, `finding`, `task`,
//!   `reason`, `duration_ns`, `user_stack` and `kernel_stack` as arrays)
//!   and its whole stack as the event's `callstack_iid`, interned on the
//!   thread's sequence (trace processor's `ParseCallstack` turns it into
//!   the slice's callsite, which the UI shows as a flamegraph of the
//!   slice).
//! - A health record is an instant "health" on the process track whose
//!   annotations are the record (nested: `workers[]`, `cpu_by_task[]`),
//!   and counter tracks on the process: each worker's busy %, the workers'
//!   busy % added up, the ms blocked and preempted per interval.
//!
//! Nested values are `dict_entries`/`array_values`, which trace processor
//! flattens into `args` keys (`debug.workers[0].busy`).

use std::io::Write;

use anyhow::Result;
use serde_json::Value;

use super::proto::{Encoder, annotation, event, packet, track};
use super::samples::Callstacks;
use super::sequence::{Category, Sequence};
use super::{PROCESS_UUID, PerfettoWriter};
use crate::watch::{FindingOutput, HealthRecord, Span, SpanKind, WatchOutput};

/// Watch counter track uuids are this plus their index.
pub(super) const WATCH_COUNTER_UUID_BASE: u64 = 1 << 31;

impl<W: Write> PerfettoWriter<'_, W> {
    pub(super) fn watch(&mut self, output: &WatchOutput) -> Result<()> {
        match output {
            WatchOutput::SpanStart { tid, ts_ns, kind } => self.span_start(*tid, *ts_ns, kind),
            WatchOutput::Span(span) => self.span_end(span),
            WatchOutput::FindingMark(finding) => self.finding_mark(finding),
            WatchOutput::Health(health) => self.health(health),
        }
    }

    fn span_start(&mut self, tid: u32, ts_ns: u64, kind: &SpanKind) -> Result<()> {
        self.with_thread(tid, |w, thread| {
            let delta = thread.sequence.delta(ts_ns);
            w.begin_packet(&thread.sequence, Some(delta));
            let (name, _) = kind.name_and_category();
            let name = thread.sequence.event_name(&mut w.interned, &name);
            w.packet.begin(packet::TRACK_EVENT);
            w.packet.varint(event::TYPE, event::SLICE_BEGIN);
            w.packet.varint(event::NAME_IID, name);
            match kind {
                SpanKind::OffCpu { .. } => {
                    w.packet
                        .varint(event::CATEGORY_IIDS, Category::OffCpu.iid());
                    json_notes(w, &mut thread.sequence, &kind.args(false));
                }
                SpanKind::Finding(finding) => {
                    w.packet
                        .varint(event::CATEGORY_IIDS, Category::Finding.iid());
                    w.finding_notes(&mut thread.sequence, &mut thread.callstacks, finding);
                }
            }
            w.packet.end();
            w.end_packet()
        })
    }

    fn span_end(&mut self, span: &Span) -> Result<()> {
        self.with_thread(span.tid, |w, thread| {
            let delta = thread.sequence.delta(span.end_ns);
            w.begin_packet(&thread.sequence, Some(delta));
            w.packet.begin(packet::TRACK_EVENT);
            w.packet.varint(event::TYPE, event::SLICE_END);
            if span.clipped {
                let iid = thread.sequence.annotation_name(&mut w.interned, "clipped");
                w.packet.begin(event::DEBUG_ANNOTATIONS);
                w.packet.varint(annotation::NAME_IID, iid);
                w.packet.bool(annotation::BOOL_VALUE, true);
                w.packet.end();
            }
            w.packet.end();
            w.end_packet()
        })
    }

    fn finding_mark(&mut self, finding: &FindingOutput) -> Result<()> {
        self.with_thread(finding.tid, |w, thread| {
            let delta = thread.sequence.delta(finding.start_ns);
            w.begin_packet(&thread.sequence, Some(delta));
            let name = thread.sequence.event_name(&mut w.interned, &finding.name());
            w.packet.begin(packet::TRACK_EVENT);
            w.packet.varint(event::TYPE, event::INSTANT);
            w.packet.varint(event::NAME_IID, name);
            w.packet
                .varint(event::CATEGORY_IIDS, Category::Finding.iid());
            w.finding_notes(&mut thread.sequence, &mut thread.callstacks, finding);
            w.packet.end();
            w.end_packet()
        })
    }

    /// A finding's annotations and callstack, into the open track event.
    fn finding_notes(
        &mut self,
        sequence: &mut Sequence,
        callstacks: &mut Option<Box<Callstacks>>,
        finding: &FindingOutput,
    ) {
        json_notes(self, sequence, &finding.args());
        if let Some(stack) = finding.stack {
            let callstacks = callstacks.get_or_insert_with(Box::default);
            let site = finding.site.map(|site| (site, finding.task.as_str()));
            let iid = callstacks.intern(&mut self.interned, &self.info.symbols, stack, site);
            self.packet.varint(event::CALLSTACK_IID, iid);
        }
    }

    fn health(&mut self, health: &HealthRecord) -> Result<()> {
        let mut main = std::mem::take(&mut self.main);
        let result = self.health_on(&mut main, health);
        self.main = main;
        result
    }

    fn health_on(&mut self, main: &mut Sequence, health: &HealthRecord) -> Result<()> {
        let delta = main.delta(health.end_ns);
        self.begin_packet(main, Some(delta));
        let name = main.event_name(&mut self.interned, "health");
        self.packet.begin(packet::TRACK_EVENT);
        self.packet.varint(event::TYPE, event::INSTANT);
        self.packet.varint(event::TRACK_UUID, PROCESS_UUID);
        self.packet.varint(event::NAME_IID, name);
        self.packet
            .varint(event::CATEGORY_IIDS, Category::Health.iid());
        json_notes(self, main, &health.args());
        self.packet.end();
        self.end_packet()?;
        for (counter, series, value) in health.counters() {
            let track_name = match series.as_str() {
                "" => counter.to_owned(),
                series => format!("{counter} {series}"),
            };
            let uuid = match self.watch_counters.get(&track_name) {
                Some(&uuid) => uuid,
                None => {
                    let uuid = WATCH_COUNTER_UUID_BASE + self.watch_counters.len() as u64;
                    self.begin_packet(main, None);
                    let p = &mut self.packet;
                    p.begin(packet::TRACK_DESCRIPTOR);
                    p.varint(track::UUID, uuid);
                    p.varint(track::PARENT_UUID, PROCESS_UUID);
                    p.string(track::NAME, &track_name);
                    p.begin(track::COUNTER);
                    p.varint(track::COUNTER_UNIT, track::UNIT_COUNT);
                    p.end();
                    p.end();
                    self.end_packet()?;
                    self.watch_counters.insert(track_name, uuid);
                    uuid
                }
            };
            let delta = main.delta(health.end_ns);
            self.begin_packet(main, Some(delta));
            let p = &mut self.packet;
            p.begin(packet::TRACK_EVENT);
            p.varint(event::TYPE, event::COUNTER);
            p.varint(event::TRACK_UUID, uuid);
            p.int(event::COUNTER_VALUE, value as i64);
            p.end();
            self.end_packet()?;
        }
        Ok(())
    }
}

/// The entries of `args` (a JSON object) as debug annotations of the open
/// track event; names interned on `sequence`, nested values as
/// `dict_entries`/`array_values`.
fn json_notes<W: Write>(w: &mut PerfettoWriter<'_, W>, sequence: &mut Sequence, args: &Value) {
    let Value::Object(map) = args else {
        return;
    };
    for (key, value) in map {
        // An empty list has no value to write: left out, as null is.
        let empty = match value {
            Value::Array(items) => items.is_empty(),
            Value::Object(entries) => entries.is_empty(),
            other => other.is_null(),
        };
        if empty {
            continue;
        }
        let iid = sequence.annotation_name(&mut w.interned, key);
        w.packet.begin(event::DEBUG_ANNOTATIONS);
        w.packet.varint(annotation::NAME_IID, iid);
        json_value(&mut w.packet, value);
        w.packet.end();
    }
}

/// A JSON value into the open `DebugAnnotation` (its name already written).
pub(super) fn json_value(p: &mut Encoder, value: &Value) {
    match value {
        Value::Null => {}
        Value::Bool(b) => p.bool(annotation::BOOL_VALUE, *b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => p.varint(annotation::UINT_VALUE, u),
            (None, Some(i)) => p.int(annotation::INT_VALUE, i),
            _ => p.double(annotation::DOUBLE_VALUE, n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => p.string(annotation::STRING_VALUE, s),
        Value::Array(items) => {
            for item in items {
                p.begin(annotation::ARRAY_VALUES);
                json_value(p, item);
                p.end();
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                p.begin(annotation::DICT_ENTRIES);
                p.string(annotation::NAME, key);
                json_value(p, item);
                p.end();
            }
        }
    }
}
