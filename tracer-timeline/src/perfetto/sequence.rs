//! One packet sequence's incremental state: its clock (timestamps are
//! deltas) and its interning tables.
//!
//! The fixed names (event names, categories, debug annotation names) are
//! interned in every sequence's first packet with fixed iids, so the hot
//! path writes constants; task type names, await points and other strings
//! are interned on first use.

use crate::FastMap;

use super::proto::{Encoder, clock, defaults, interned, packet};
use crate::symbols::Symbols;
use crate::task_types::TaskTypes;

/// Event names with fixed iids.
#[derive(Clone, Copy)]
pub enum Name {
    Park = 1,
    Wake,
    Spawn,
    TaskEnd,
    Unpark,
    Metadata,
    NotPolled,
    WakeByDriver,
    WakeByThread,
    WakeByTask,
}

const NAMES: [&str; 10] = [
    "park",
    "wake",
    "spawn",
    "task end",
    "unpark",
    "rt-ebpf-trace",
    "woken, not polled before the end",
    "wake (driver)",
    "wake (thread)",
    "wake (task)",
];

/// Task type names are interned from here on.
const FIRST_DYNAMIC_NAME: u64 = 64;

#[derive(Clone, Copy)]
pub enum Category {
    Blocking = 1,
    Spawn,
    TaskEnd,
    Unpark,
    Tracer,
    Finding,
    OffCpu,
    Health,
}

const CATEGORIES: [&str; 8] = [
    "blocking", "spawn", "task_end", "unpark", "tracer", "finding", "off_cpu", "health",
];

/// Debug annotation names with fixed iids.
#[derive(Clone, Copy)]
pub enum Note {
    TaskId = 1,
    TaskType,
    AwaitStack,
    Truncated,
    EndLost,
    WakerTaskId,
    SpawnerTaskId,
    CallSite,
    SpawnedAt,
    Polls,
    BusyNs,
    LongestPollNs,
    TimesWoken,
    DelayMaxNs,
    LifetimeNs,
    By,
    Header,
    PreemptedNs,
}

const NOTES: [&str; 18] = [
    "task_id",
    "task_type",
    "await_stack",
    "truncated",
    "end_lost",
    "waker_task_id",
    "spawner_task_id",
    "call_site",
    "spawned_at",
    "polls",
    "busy_ns",
    "longest_poll_ns",
    "times_woken",
    "delay_max_ns",
    "lifetime_ns",
    "by",
    "header",
    "preempted_ns",
];

/// The first line of an interned await stack that names the leaf primitive
/// the task waits on (`waits_on` in the JSON trace; see `await_stack`).
pub const WAITS_ON_PREFIX: &str = "waits on: ";

/// Other annotation names (the metadata's keys) are interned from here on.
const FIRST_DYNAMIC_NOTE: u64 = 64;

impl Name {
    pub fn iid(self) -> u64 {
        self as u64
    }
}

impl Category {
    pub fn iid(self) -> u64 {
        self as u64
    }
}

impl Note {
    pub fn iid(self) -> u64 {
        self as u64
    }
}

/// The incremental clock's unit. Why not 1 ns: a timestamp is the delta
/// from the sequence's previous packet, and on the HTTP benchmark flat out
/// most deltas are 0.2–16 µs, two varint bytes in ns; in 10 ns units a
/// third of them fit in one: 2.17 → 1.46 bytes a timestamp, 0.7 bytes an
/// event. 10 ns is far below what a probe costs (~1 µs a poll), so no
/// slice the trace can tell apart is merged. Perfetto's SDK offers the
/// same (`timestamp_unit_multiplier`); trace processor multiplies by the
/// snapshot's `unit_multiplier_ns`.
pub const TICK_NS: u64 = 10;

#[derive(Default)]
pub struct Sequence {
    pub id: u32,
    /// The incremental clock's value in ns (a multiple of [`TICK_NS`]): the
    /// last timestamp written.
    last_ns: u64,
    /// Outputs stamped at `last_ns` because they would have gone back in time.
    pub clamped: u64,
    /// By probe site: the interned name and full type name (0: not yet).
    task_names: Vec<u64>,
    task_types: Vec<Option<u64>>,
    /// By probe site: the interned `SourceLocation` naming the full type
    /// (0: not yet; `u64::MAX`: the site has no full type).
    task_locations: Vec<u64>,
    next_name: u64,
    /// `debug_annotation_string_values`, by text.
    strings: FastMap<String, u64>,
    /// By await chain (and, for a future inlined into the harness, the
    /// task's site, which names it): the interned `await_stack`.
    awaits: FastMap<(u32, u32), u64>,
    /// The same by (task id, await key, site), as polls ask for it: one
    /// lookup a poll instead of two (the symbols' and `awaits`). Only found
    /// stacks are kept, so it is bounded like the symbols' await points.
    await_of_poll: FastMap<(u64, u64, u32), u64>,
    notes: FastMap<String, u64>,
    /// Other event names (the watch tier's), by text.
    names: FastMap<String, u64>,
}

impl Sequence {
    pub fn new(id: u32, start_ns: u64) -> Self {
        Sequence {
            id,
            last_ns: start_ns - start_ns % TICK_NS,
            next_name: FIRST_DYNAMIC_NAME,
            ..Sequence::default()
        }
    }

    pub fn last_ns(&self) -> u64 {
        self.last_ns
    }

    /// The delta to write for an output at `ts_ns`, in ticks (the time
    /// rounded down to a tick); never negative.
    pub fn delta(&mut self, ts_ns: u64) -> u64 {
        let ts_ns = ts_ns - ts_ns % TICK_NS;
        if ts_ns < self.last_ns {
            self.clamped += 1;
            return 0;
        }
        let delta = (ts_ns - self.last_ns) / TICK_NS;
        self.last_ns = ts_ns;
        delta
    }

    /// The body of the sequence's first packet (between the packet's
    /// begin and end): cleared incremental state, defaults (the incremental
    /// clock; the thread's track), the fixed interned names, and the clock
    /// snapshot that anchors the incremental clock to `CLOCK_MONOTONIC`.
    pub fn write_start(
        &mut self,
        p: &mut Encoder,
        i: &mut Encoder,
        track_uuid: Option<u64>,
        primary_clock: bool,
    ) {
        p.varint(packet::TRUSTED_PACKET_SEQUENCE_ID, self.id as u64);
        p.varint(
            packet::SEQUENCE_FLAGS,
            packet::SEQ_INCREMENTAL_STATE_CLEARED,
        );
        p.begin(packet::TRACE_PACKET_DEFAULTS);
        p.varint(defaults::TIMESTAMP_CLOCK_ID, clock::SEQUENCE_INCREMENTAL);
        if let Some(uuid) = track_uuid {
            p.begin(defaults::TRACK_EVENT_DEFAULTS);
            p.varint(defaults::TRACK_UUID, uuid);
            p.end();
        }
        p.end();
        p.begin(packet::CLOCK_SNAPSHOT);
        p.begin(clock::CLOCKS);
        p.varint(clock::CLOCK_ID, clock::MONOTONIC);
        p.varint(clock::TIMESTAMP, self.last_ns);
        p.end();
        p.begin(clock::CLOCKS);
        p.varint(clock::CLOCK_ID, clock::SEQUENCE_INCREMENTAL);
        p.varint(clock::TIMESTAMP, self.last_ns / TICK_NS);
        p.bool(clock::IS_INCREMENTAL, true);
        p.varint(clock::UNIT_MULTIPLIER_NS, TICK_NS);
        p.end();
        if primary_clock {
            p.varint(clock::PRIMARY_TRACE_CLOCK, clock::MONOTONIC);
        }
        p.end();
        let tables: [(u32, &[&str]); 3] = [
            (interned::EVENT_NAMES, &NAMES),
            (interned::EVENT_CATEGORIES, &CATEGORIES),
            (interned::DEBUG_ANNOTATION_NAMES, &NOTES),
        ];
        for (field, names) in tables {
            for (index, name) in names.iter().enumerate() {
                entry(i, field, index as u64 + 1, name);
            }
        }
    }

    /// The event name iid of tasks of `site` (their short type name).
    pub fn task_name(&mut self, i: &mut Encoder, site: u32, types: &TaskTypes) -> u64 {
        let index = site as usize;
        if index >= self.task_names.len() {
            self.task_names.resize(index + 1, 0);
        }
        if self.task_names[index] == 0 {
            let iid = self.next_name;
            self.next_name += 1;
            entry(i, interned::EVENT_NAMES, iid, &types.short_name(Some(site)));
            self.task_names[index] = iid;
        }
        self.task_names[index]
    }

    /// The string iid of the full type name of tasks of `site`, if named.
    pub fn task_type(&mut self, i: &mut Encoder, site: u32, types: &TaskTypes) -> Option<u64> {
        let index = site as usize;
        if index >= self.task_types.len() {
            self.task_types.resize(index + 1, None);
        }
        if self.task_types[index].is_none() {
            let full = types
                .full_name(Some(site))
                .filter(|full| !full.is_empty())?;
            let iid = self.string_value(i, full);
            self.task_types[index] = Some(iid);
        }
        self.task_types[index]
    }

    /// The `SourceLocation` iid whose function name is the full type name
    /// of tasks of `site`, if named: how a poll carries its full type (see
    /// `event::SOURCE_LOCATION_IID`). Its iid is the site's index plus one.
    pub fn task_location(&mut self, i: &mut Encoder, site: u32, types: &TaskTypes) -> Option<u64> {
        let index = site as usize;
        if index >= self.task_locations.len() {
            self.task_locations.resize(index + 1, 0);
        }
        if self.task_locations[index] == 0 {
            self.task_locations[index] = match types.full_name(Some(site)).filter(|f| !f.is_empty())
            {
                Some(full) => {
                    let iid = site as u64 + 1;
                    i.begin(interned::SOURCE_LOCATIONS);
                    i.varint(interned::IID, iid);
                    i.string(interned::SOURCE_LOCATION_FUNCTION_NAME, full);
                    i.end();
                    iid
                }
                None => u64::MAX,
            };
        }
        Some(self.task_locations[index]).filter(|&iid| iid != u64::MAX)
    }

    /// The string iid of task `task_id`'s await stack at `key` (one frame a
    /// line, innermost first: its first frame is where the task waits), if
    /// known. When the chain's leaf primitive is known, the first line is
    /// `waits on: <kind>: <name>` (the JSON trace's `waits_on`): one string
    /// interned per chain costs nothing a poll, where an annotation of its
    /// own cost ~7 bytes a poll — 1.5 bytes an event on the HTTP benchmark,
    /// past the 20-byte budget (NOTES.md, "Trace format").
    pub fn await_stack(
        &mut self,
        i: &mut Encoder,
        symbols: &Symbols,
        types: &TaskTypes,
        site: u32,
        task_id: u64,
        key: u64,
    ) -> Option<u64> {
        if key == 0 {
            return None;
        }
        if let Some(&known) = self.await_of_poll.get(&(task_id, key, site)) {
            return Some(known);
        }
        let iid = self.intern_await_stack(i, symbols, types, site, task_id, key)?;
        self.await_of_poll.insert((task_id, key, site), iid);
        Some(iid)
    }

    fn intern_await_stack(
        &mut self,
        i: &mut Encoder,
        symbols: &Symbols,
        types: &TaskTypes,
        site: u32,
        task_id: u64,
        key: u64,
    ) -> Option<u64> {
        let (index, point) = symbols.await_point(task_id, key)?;
        let cache_key = (
            index,
            if point.inlined_into_harness {
                site
            } else {
                u32::MAX
            },
        );
        if let Some(&known) = self.awaits.get(&cache_key) {
            return Some(known);
        }
        let mut lines = Vec::new();
        if let Some(waits_on) = &point.waits_on {
            lines.push(format!("{WAITS_ON_PREFIX}{}", waits_on.label()));
        }
        lines.extend(point.stack(types.full_name(Some(site))));
        if lines.is_empty() {
            return None;
        }
        let stack = self.string_value(i, &lines.join("\n"));
        self.awaits.insert(cache_key, stack);
        Some(stack)
    }

    /// An event name iid for `text` (not one of the fixed ones).
    pub fn event_name(&mut self, i: &mut Encoder, text: &str) -> u64 {
        if let Some(&iid) = self.names.get(text) {
            return iid;
        }
        let iid = self.next_name;
        self.next_name += 1;
        self.names.insert(text.to_owned(), iid);
        entry(i, interned::EVENT_NAMES, iid, text);
        iid
    }

    /// A `debug_annotation_string_values` iid for `text`.
    pub fn string_value(&mut self, i: &mut Encoder, text: &str) -> u64 {
        if let Some(&iid) = self.strings.get(text) {
            return iid;
        }
        let iid = self.strings.len() as u64 + 1;
        self.strings.insert(text.to_owned(), iid);
        entry(i, interned::DEBUG_ANNOTATION_STRING_VALUES, iid, text);
        iid
    }

    /// A debug annotation name iid for `name` (not one of the fixed ones).
    pub fn annotation_name(&mut self, i: &mut Encoder, name: &str) -> u64 {
        if let Some(&iid) = self.notes.get(name) {
            return iid;
        }
        let iid = FIRST_DYNAMIC_NOTE + self.notes.len() as u64;
        self.notes.insert(name.to_owned(), iid);
        entry(i, interned::DEBUG_ANNOTATION_NAMES, iid, name);
        iid
    }
}

/// One interned entry: `{iid = 1, name/str = 2}` in `field`.
fn entry(i: &mut Encoder, field: u32, iid: u64, text: &str) {
    i.begin(field);
    i.varint(interned::IID, iid);
    i.string(interned::NAME, text);
    i.end();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed iids index the name tables (iids start at 1).
    #[test]
    fn fixed_iids_name_the_right_strings() {
        let name = |iid: u64| NAMES[iid as usize - 1];
        assert_eq!(name(Name::Park.iid()), "park");
        assert_eq!(name(Name::WakeByTask.iid()), "wake (task)");
        assert_eq!(NAMES.len() as u64, Name::WakeByTask.iid());
        assert_eq!(CATEGORIES[Category::Tracer.iid() as usize - 1], "tracer");
        assert_eq!(CATEGORIES[Category::Health.iid() as usize - 1], "health");
        assert_eq!(CATEGORIES.len() as u64, Category::Health.iid());
        let note = |iid: u64| NOTES[iid as usize - 1];
        assert_eq!(note(Note::TaskId.iid()), "task_id");
        assert_eq!(note(Note::EndLost.iid()), "end_lost");
        assert_eq!(note(Note::WakerTaskId.iid()), "waker_task_id");
        assert_eq!(note(Note::Header.iid()), "header");
        assert_eq!(note(Note::PreemptedNs.iid()), "preempted_ns");
        assert_eq!(NOTES.len() as u64, Note::PreemptedNs.iid());
        assert!(FIRST_DYNAMIC_NAME > NAMES.len() as u64);
        assert!(FIRST_DYNAMIC_NOTE > NOTES.len() as u64);
    }
}
