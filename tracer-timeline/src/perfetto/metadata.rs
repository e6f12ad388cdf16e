//! The trace's metadata (lost events, tokio version, recording cost, the
//! summary's findings…): the debug annotations of one "rt-ebpf-trace"
//! instant at the end of the process track, after an instant for each flow
//! still open that ends it.

use std::io::Write;

use anyhow::Result;
use serde_json::Value;

use super::events::{string_note_iid, uint_note};
use super::proto::{annotation, event, packet};
use super::sequence::{Category, Name, Note};
use super::{PROCESS_UUID, PerfettoWriter};

impl<W: Write> PerfettoWriter<'_, W> {
    /// The metadata, as the debug annotations of an instant at the end of
    /// the trace on the process track.
    pub(super) fn metadata(&mut self, metadata: &Value) -> Result<()> {
        let mut main = std::mem::take(&mut self.main);
        let end_ns = self
            .tracks
            .iter()
            .flatten()
            .map(|thread| thread.sequence.last_ns())
            .chain([main.last_ns(), self.samples.last_ns()])
            .max()
            .unwrap_or(self.info.start_ns);
        let clamped: u64 = self
            .tracks
            .iter()
            .flatten()
            .map(|thread| thread.sequence.clamped)
            .chain([main.clamped, self.samples.clamped])
            .sum();
        let delta = main.delta(end_ns);
        // Every flow gets its end: a wake of a task not polled again before
        // the end points at an instant at the end of the process track,
        // which names the task (the wake does not, see `flows`).
        let mut delta = Some(delta);
        for (id, task_id) in self.flows.drain_open() {
            self.begin_packet(&main, Some(delta.take().unwrap_or(0)));
            let p = &mut self.packet;
            p.begin(packet::TRACK_EVENT);
            p.varint(event::TYPE, event::INSTANT);
            p.varint(event::TRACK_UUID, PROCESS_UUID);
            p.varint(event::NAME_IID, Name::NotPolled.iid());
            p.varint(event::CATEGORY_IIDS, Category::Tracer.iid());
            if task_id != 0 {
                uint_note(p, Note::TaskId, task_id);
            }
            p.varint(event::TERMINATING_FLOW_IDS_OLD, id);
            p.end();
            self.end_packet()?;
        }
        self.begin_packet(&main, Some(delta.unwrap_or(0)));
        let p = &mut self.packet;
        p.begin(packet::TRACK_EVENT);
        p.varint(event::TYPE, event::INSTANT);
        p.varint(event::TRACK_UUID, PROCESS_UUID);
        p.varint(event::NAME_IID, Name::Metadata.iid());
        p.varint(event::CATEGORY_IIDS, Category::Tracer.iid());
        let mut entries: Vec<(&str, &Value)> = match metadata {
            Value::Object(map) => map.iter().map(|(k, v)| (k.as_str(), v)).collect(),
            _ => Vec::new(),
        };
        let clamped_value = Value::from(clamped);
        entries.push(("timestamps_clamped", &clamped_value));
        for (key, value) in entries {
            let name_iid = main.annotation_name(&mut self.interned, key);
            let p = &mut self.packet;
            match value {
                Value::Number(n) if n.is_u64() => {
                    p.begin(event::DEBUG_ANNOTATIONS);
                    p.varint(annotation::NAME_IID, name_iid);
                    p.varint(annotation::UINT_VALUE, n.as_u64().unwrap_or(0));
                    p.end();
                }
                Value::Number(n) if n.is_i64() => {
                    p.begin(event::DEBUG_ANNOTATIONS);
                    p.varint(annotation::NAME_IID, name_iid);
                    p.int(annotation::INT_VALUE, n.as_i64().unwrap_or(0));
                    p.end();
                }
                Value::Bool(b) => {
                    p.begin(event::DEBUG_ANNOTATIONS);
                    p.varint(annotation::NAME_IID, name_iid);
                    p.bool(annotation::BOOL_VALUE, *b);
                    p.end();
                }
                Value::Null => {}
                other => {
                    let text = match other {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    let iid = main.string_value(&mut self.interned, &text);
                    string_note_iid(&mut self.packet, name_iid, iid);
                }
            }
        }
        self.packet.end();
        let result = self.end_packet();
        self.main = main;
        result
    }
}
