//! The thread tracks' track events: poll and park slices, and the spawn,
//! wake, task end and unpark instants, each with its debug annotations.
//!
//! Apart from [`super`] (framing, sequences, thread tracks, counters,
//! samples) because this is the part that decides what a click in the UI
//! shows and what each event costs: per request on the HTTP benchmark a
//! poll's end with its arguments, a driver's wake instant and the poll's
//! begin (NOTES.md, "Trace format", has the per-field bytes).

use std::io::Write;

use anyhow::Result;

use super::PerfettoWriter;
use super::proto::{Encoder, annotation, event, packet};
use super::sequence::{Category, Name, Note, Sequence};
use crate::output::{FlowId, Slice, SliceKind, SliceStart, Spawn, TaskEnd, Unpark, Wake, Waker};

impl<W: Write> PerfettoWriter<'_, W> {
    pub(super) fn slice_start(&mut self, start: &SliceStart) -> Result<()> {
        self.with_thread(start.tid, |w, thread| {
            let delta = thread.sequence.delta(start.ts_ns);
            w.begin_packet(&thread.sequence, Some(delta));
            let seq = &mut thread.sequence;
            let (p, i) = (&mut w.packet, &mut w.interned);
            p.begin(packet::TRACK_EVENT);
            p.varint(event::TYPE, event::SLICE_BEGIN);
            match start.kind {
                SliceKind::Poll { site, .. } => {
                    let name = seq.task_name(i, site, &w.info.types);
                    p.varint(event::NAME_IID, name);
                    // A poll has no category (two bytes a poll): only
                    // `spawn_blocking` work is marked.
                    if w.info.types.is_blocking(site) {
                        p.varint(event::CATEGORY_IIDS, Category::Blocking.iid());
                    }
                }
                // Its name says it all: no category (two bytes a park).
                SliceKind::Park => p.varint(event::NAME_IID, Name::Park.iid()),
            }
            if let Some(id) = start
                .woken_by
                .and_then(|flow| w.flows.end(flow, seq.last_ns()))
            {
                p.varint(event::TERMINATING_FLOW_IDS_OLD, id);
            }
            p.end();
            w.end_packet()
        })
    }

    pub(super) fn slice_end(&mut self, slice: &Slice) -> Result<()> {
        self.with_thread(slice.tid, |w, thread| {
            let delta = thread.sequence.delta(slice.end_ns);
            w.begin_packet(&thread.sequence, Some(delta));
            let seq = &mut thread.sequence;
            let (p, i) = (&mut w.packet, &mut w.interned);
            p.begin(packet::TRACK_EVENT);
            p.varint(event::TYPE, event::SLICE_END);
            if let SliceKind::Poll {
                site,
                task,
                task_id,
                await_key,
            } = slice.kind
            {
                if task_id != 0 {
                    uint_note(p, Note::TaskId, task_id);
                } else {
                    // The only way to tell tasks apart without an id.
                    p.begin(event::DEBUG_ANNOTATIONS);
                    p.varint(annotation::NAME_IID, Note::Header.iid());
                    p.varint(annotation::POINTER_VALUE, task);
                    p.end();
                }
                // The full type as the slice's source location: 3 bytes a
                // poll instead of a 7-byte `task_type` annotation.
                if let Some(iid) = seq.task_location(i, site, &w.info.types) {
                    p.varint(event::SOURCE_LOCATION_IID, iid);
                }
                // No `waits_at`: it is always the stack's first frame (six
                // bytes a poll, a fifth of the poll's end); `waits_on` is
                // the stack's first line when known (see `await_stack`).
                if let Some(stack) =
                    seq.await_stack(i, &w.info.symbols, &w.info.types, site, task_id, await_key)
                {
                    string_note(p, Note::AwaitStack, stack);
                }
            }
            if slice.preempted_ns > 0 {
                uint_note(p, Note::PreemptedNs, slice.preempted_ns);
            }
            if slice.truncated {
                bool_note(p, Note::Truncated);
            }
            if slice.end_lost {
                bool_note(p, Note::EndLost);
            }
            p.end();
            w.end_packet()
        })
    }

    /// An instant on `tid`'s track; `notes` adds its debug annotations.
    /// `flow`: the flow it starts, and the id of the task it leads to.
    pub(super) fn instant(
        &mut self,
        tid: u32,
        ts_ns: u64,
        name: Name,
        category: Option<Category>,
        flow: Option<(FlowId, u64)>,
        notes: impl FnOnce(&mut Encoder, &mut Encoder, &mut Sequence),
    ) -> Result<()> {
        self.with_thread(tid, |w, thread| {
            let delta = thread.sequence.delta(ts_ns);
            w.begin_packet(&thread.sequence, Some(delta));
            let p = &mut w.packet;
            p.begin(packet::TRACK_EVENT);
            p.varint(event::TYPE, event::INSTANT);
            p.varint(event::NAME_IID, name.iid());
            if let Some(category) = category {
                p.varint(event::CATEGORY_IIDS, category.iid());
            }
            notes(&mut w.packet, &mut w.interned, &mut thread.sequence);
            if let Some((flow, task_id)) = flow {
                let id = w.flows.start(flow, thread.sequence.last_ns(), task_id);
                w.packet.varint(event::FLOW_IDS_OLD, id);
            }
            w.packet.end();
            w.end_packet()
        })
    }

    pub(super) fn spawn(&mut self, spawn: &Spawn) -> Result<()> {
        let info = self.info;
        let symbols = &info.symbols;
        self.instant(
            spawn.tid,
            spawn.ts_ns,
            Name::Spawn,
            Some(Category::Spawn),
            Some((spawn.flow, spawn.task_id)),
            |p, i, seq| {
                if spawn.task_id != 0 {
                    uint_note(p, Note::TaskId, spawn.task_id);
                }
                if let Some(at) = symbols.call_site(spawn.call_site) {
                    let iid = seq.string_value(i, at);
                    string_note(p, Note::SpawnedAt, iid);
                }
                if spawn.spawner_id != 0 {
                    uint_note(p, Note::SpawnerTaskId, spawn.spawner_id);
                }
                if spawn.call_site != 0 {
                    // An address: shown in hex, as JSON's "0x…" string.
                    p.begin(event::DEBUG_ANNOTATIONS);
                    p.varint(annotation::NAME_IID, Note::CallSite.iid());
                    p.varint(annotation::POINTER_VALUE, spawn.call_site);
                    p.end();
                }
            },
        )
    }

    pub(super) fn wake(&mut self, wake: &Wake) -> Result<()> {
        let Some(flow) = wake.flow else {
            return Ok(());
        };
        if wake.in_poll {
            // Nested in the waking poll, which says who woke.
            return self.instant(
                wake.tid,
                wake.ts_ns,
                Name::Wake,
                None,
                Some((flow, wake.task_id)),
                |_, _, _| {},
            );
        }
        // Who woke is in the name (a fixed iid: most wakes on a server are
        // the I/O driver's, one per request); the woken task's id and type
        // are on the poll the flow leads to (7 bytes a request saved; see
        // `flows` for a flow that ends elsewhere).
        let name = match wake.waker {
            Waker::Driver => Name::WakeByDriver,
            Waker::Thread => Name::WakeByThread,
            Waker::Task { .. } => Name::WakeByTask,
        };
        let flow = Some((flow, wake.task_id));
        self.instant(wake.tid, wake.ts_ns, name, None, flow, |p, _, _| {
            if let Waker::Task { task_id } = wake.waker
                && task_id != 0
            {
                uint_note(p, Note::WakerTaskId, task_id);
            }
        })
    }

    pub(super) fn task_end(&mut self, end: &TaskEnd) -> Result<()> {
        let types = &self.info.types;
        let stats = &end.stats;
        self.instant(
            end.tid,
            end.ts_ns,
            Name::TaskEnd,
            Some(Category::TaskEnd),
            None,
            |p, i, seq| {
                if stats.task_id != 0 {
                    uint_note(p, Note::TaskId, stats.task_id);
                }
                if let Some(iid) = stats.site.and_then(|site| seq.task_type(i, site, types)) {
                    string_note(p, Note::TaskType, iid);
                }
                if stats.spawner_id != 0 {
                    uint_note(p, Note::SpawnerTaskId, stats.spawner_id);
                }
                uint_note(p, Note::Polls, stats.polls);
                uint_note(p, Note::BusyNs, stats.busy_ns);
                uint_note(p, Note::LongestPollNs, stats.longest_poll_ns);
                uint_note(p, Note::TimesWoken, stats.times_woken);
                uint_note(p, Note::DelayMaxNs, stats.delay_max_ns);
                uint_note(
                    p,
                    Note::LifetimeNs,
                    end.ts_ns.saturating_sub(stats.first_seen_ns),
                );
            },
        )
    }

    pub(super) fn unpark(&mut self, unpark: &Unpark) -> Result<()> {
        self.instant(
            unpark.tid,
            unpark.ts_ns,
            Name::Unpark,
            Some(Category::Unpark),
            None,
            |p, i, seq| waker_notes(p, i, seq, Note::By, unpark.unparker),
        )
    }
}

pub(super) fn uint_note(p: &mut Encoder, note: Note, value: u64) {
    p.begin(event::DEBUG_ANNOTATIONS);
    p.varint(annotation::NAME_IID, note.iid());
    p.varint(annotation::UINT_VALUE, value);
    p.end();
}

pub(super) fn bool_note(p: &mut Encoder, note: Note) {
    p.begin(event::DEBUG_ANNOTATIONS);
    p.varint(annotation::NAME_IID, note.iid());
    p.bool(annotation::BOOL_VALUE, true);
    p.end();
}

pub(super) fn string_note(p: &mut Encoder, note: Note, string_iid: u64) {
    string_note_iid(p, note.iid(), string_iid);
}

pub(super) fn string_note_iid(p: &mut Encoder, name_iid: u64, string_iid: u64) {
    p.begin(event::DEBUG_ANNOTATIONS);
    p.varint(annotation::NAME_IID, name_iid);
    p.varint(annotation::STRING_VALUE_IID, string_iid);
    p.end();
}

/// "driver", "thread" or "task" in `note`, and the waking task's id.
pub(super) fn waker_notes(
    p: &mut Encoder,
    i: &mut Encoder,
    seq: &mut Sequence,
    note: Note,
    waker: Waker,
) {
    let label = match waker {
        Waker::Task { .. } => "task",
        Waker::Driver => "driver",
        Waker::Thread => "thread",
    };
    let iid = seq.string_value(i, label);
    string_note(p, note, iid);
    if let Waker::Task { task_id } = waker
        && task_id != 0
    {
        uint_note(p, Note::WakerTaskId, task_id);
    }
}
