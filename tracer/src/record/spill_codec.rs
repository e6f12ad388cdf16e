//! The spill file's record format: each event in ~13 bytes instead of its
//! 56 in memory.
//!
//! Why: the spill is written to the page cache while recording and read
//! back after the stop, and after the stop the kernel also frees every page
//! of it when the file is closed. At 56 bytes an event that freeing alone
//! was ~8 % of rendering's CPU (5 s of the HTTP benchmark: 66 MB of spill,
//! ext4's `block_invalidate_folio`), and reading the bytes back ~6 %. Most
//! fields are zero, repeat the previous event's, or are small: a poll's
//! start is its time (a delta from the previous event's), its site, its
//! task's header and id; a park is its time. Measured on that benchmark:
//! 13.3 bytes an event (5 s flat out, 1.39 M events: 18.5 MB of spill
//! where the raw events took 78). Encoding costs the drain a few ns
//! an event, less than copying the 56 bytes through the page cache did.
//!
//! A record: a little-endian `u16` header, then the time as a zigzag varint
//! delta from the previous record's, then, in this order, each field the
//! header marks present as a varint: the tid (when it differs from the
//! previous record's), the kind (when it does not fit the header), the
//! site, task header, task id, other task id, address and padding (when
//! not zero; the task header and the address as 8 little-endian bytes). Header bits 0–3: the kind, or [`KIND_ESCAPE`]; bits 4–11:
//! the presence flags. Everything round-trips exactly, unknown kinds
//! included (the timeline counts those).

use tracer_common::Event;

/// The most bytes one record takes: the header and nine 10-byte varints.
pub const MAX_RECORD: usize = 2 + 9 * 10;

/// Header kind value meaning "the kind follows as a varint".
const KIND_ESCAPE: u16 = 15;
const TID: u16 = 1 << 4;
const KIND: u16 = 1 << 5;
const SITE: u16 = 1 << 6;
const TASK: u16 = 1 << 7;
const TASK_ID: u16 = 1 << 8;
const OTHER: u16 = 1 << 9;
const ADDR: u16 = 1 << 10;
const PAD: u16 = 1 << 11;
/// Fields written as 8 little-endian bytes, not varints: addresses, whose
/// varints are 6–7 bytes anyway and slow to read back byte by byte.
const FIXED: u16 = TASK | ADDR;

/// What a record is relative to: the previous record's time and thread.
#[derive(Default)]
pub struct Context {
    ts_ns: u64,
    tid: u32,
}

/// Appends `event`'s record to `out`.
pub fn encode(context: &mut Context, event: &Event, out: &mut Vec<u8>) {
    let mut header = if event.kind < KIND_ESCAPE as u32 {
        event.kind as u16
    } else {
        KIND_ESCAPE | KIND
    };
    let optional: [(u16, u64); 6] = [
        (SITE, event.site as u64),
        (TASK, event.task),
        (TASK_ID, event.task_id),
        (OTHER, event.other_task_id),
        (ADDR, event.addr),
        (PAD, event._pad as u64),
    ];
    if event.tid != context.tid {
        header |= TID;
    }
    for (flag, value) in optional {
        if value != 0 {
            header |= flag;
        }
    }
    out.extend_from_slice(&header.to_le_bytes());
    let delta = event.ts_ns.wrapping_sub(context.ts_ns) as i64;
    varint(out, ((delta << 1) ^ (delta >> 63)) as u64);
    if header & TID != 0 {
        varint(out, event.tid as u64);
    }
    if header & KIND != 0 {
        varint(out, event.kind as u64);
    }
    for (flag, value) in optional {
        if header & flag == 0 {
        } else if flag & FIXED != 0 {
            out.extend_from_slice(&value.to_le_bytes());
        } else {
            varint(out, value);
        }
    }
    context.ts_ns = event.ts_ns;
    context.tid = event.tid;
}

/// Reads one record from the start of `bytes` into `event` (in place: the
/// reader's own event, not a 56-byte value returned through an `Option`,
/// which cost a store-forwarding stall per event on the render path) and
/// returns the bytes it took, or `None` if `bytes` ends inside it (or it is
/// malformed; `event` is then left half written).
#[inline]
pub fn decode(context: &mut Context, bytes: &[u8], event: &mut Event) -> Option<usize> {
    let mut reader = Reader { bytes, at: 2 };
    let header = u16::from_le_bytes([*bytes.first()?, *bytes.get(1)?]);
    let zigzag = reader.varint()?;
    let delta = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
    event.ts_ns = context.ts_ns.wrapping_add(delta as u64);
    event.tid = context.tid;
    event.kind = (header & 0xf) as u32;
    if header & TID != 0 {
        event.tid = reader.varint()? as u32;
    }
    if header & KIND != 0 {
        event.kind = reader.varint()? as u32;
    }
    let mut field = |flag: u16| -> Option<u64> {
        if header & flag == 0 {
            Some(0)
        } else if flag & FIXED != 0 {
            reader.fixed()
        } else {
            reader.varint()
        }
    };
    event.site = field(SITE)? as u32;
    event.task = field(TASK)?;
    event.task_id = field(TASK_ID)?;
    event.other_task_id = field(OTHER)?;
    event.addr = field(ADDR)?;
    event._pad = field(PAD)? as u32;
    context.ts_ns = event.ts_ns;
    context.tid = event.tid;
    Some(reader.at)
}

#[inline]
fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    #[inline]
    fn varint(&mut self) -> Option<u64> {
        let first = *self.bytes.get(self.at)?;
        if first < 0x80 {
            self.at += 1;
            return Some(first as u64);
        }
        self.long_varint()
    }

    #[inline]
    fn fixed(&mut self) -> Option<u64> {
        let bytes = self.bytes.get(self.at..self.at + 8)?;
        self.at += 8;
        Some(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }

    fn long_varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.at)?;
            self.at += 1;
            value |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Some(value);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(events: &[Event]) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut context = Context::default();
        for event in events {
            let before = bytes.len();
            encode(&mut context, event, &mut bytes);
            assert!(bytes.len() - before <= MAX_RECORD);
        }
        let mut context = Context::default();
        let mut at = 0;
        for event in events {
            let mut decoded = Event::default();
            let used = decode(&mut context, &bytes[at..], &mut decoded).expect("a whole record");
            assert_eq!(&decoded, event);
            at += used;
        }
        assert_eq!(at, bytes.len());
        bytes
    }

    #[test]
    fn every_field_round_trips_at_its_extremes() {
        let full = Event {
            ts_ns: u64::MAX,
            tid: u32::MAX,
            kind: u32::MAX,
            site: u32::MAX,
            _pad: u32::MAX,
            task: u64::MAX,
            task_id: u64::MAX,
            other_task_id: u64::MAX,
            addr: u64::MAX,
        };
        let events = [
            Event::default(),
            full,
            Event { ts_ns: 5, ..full },
            Event {
                ts_ns: 3,
                tid: 9,
                kind: 14,
                ..Event::default()
            },
            Event {
                kind: 15,
                ..Event::default()
            },
        ];
        let bytes = round_trip(&events);
        assert_eq!(bytes[..3], [0, 0, 0], "all zero: a header and a 0 delta");
    }

    #[test]
    fn a_typical_stream_is_small() {
        // A worker's request: wake in park, park end, poll start and end.
        let mut events = Vec::new();
        let mut ts = 1_000_000_000u64;
        for i in 0..1000u64 {
            let task = 0x7f3a_1c00_0000 + (i % 32) * 0x100;
            let tid = 4000 + (i % 2) as u32;
            let mut next = |kind: u32, task: u64, task_id: u64, addr: u64| {
                ts += 900;
                Event {
                    ts_ns: ts,
                    tid,
                    kind,
                    task,
                    task_id,
                    addr,
                    ..Event::default()
                }
            };
            events.push(next(6, task, 0, 0));
            events.push(next(4, 0, 0, 0));
            events.push(next(1, task, 100 + i % 32, 0));
            events.push(next(2, 0, 0, 0x5555_1234_5678));
            events.push(next(3, 0, 0, 0));
        }
        let bytes = round_trip(&events);
        let per_event = bytes.len() as f64 / events.len() as f64;
        assert!(per_event < 12.0, "{per_event} bytes an event");
    }

    #[test]
    fn a_cut_record_is_not_read() {
        let mut bytes = Vec::new();
        let event = Event {
            ts_ns: 1 << 40,
            task: 0x7f00_0000_0000,
            ..Event::default()
        };
        encode(&mut Context::default(), &event, &mut bytes);
        for cut in 0..bytes.len() {
            let mut event = Event::default();
            let decoded = decode(&mut Context::default(), &bytes[..cut], &mut event);
            assert_eq!(decoded, None);
        }
    }
}

/// `rounds` × 5 events shaped like the HTTP benchmark's (a wake, an unpark,
/// a poll's start and end, a park; two threads, 32 tasks), for the
/// measurements here and in `spill`.
#[cfg(test)]
pub(super) fn http_shaped_events(rounds: u64) -> impl Iterator<Item = Event> {
    let mut ts = 1_000_000_000u64;
    (0..rounds).flat_map(move |i| {
        let task = 0x7f3a_1c00_0000 + (i % 32) * 0x100;
        [
            (6, task, 0, 0),
            (4, 0, 0, 0),
            (1, task, 100 + i % 32, 0),
            (2, 0, 0, 0x5555_1234_5678),
            (3, 0, 0, 0),
        ]
        .map(|(kind, task, task_id, addr)| {
            ts += 300 + (i * 7919) % 700;
            Event {
                ts_ns: ts,
                tid: 4000 + (i % 2) as u32,
                kind,
                site: (i % 2) as u32,
                task,
                task_id,
                addr,
                ..Event::default()
            }
        })
    })
}

/// How fast records decode (`cargo test --release -p rt-ebpf-trace --lib --
/// --ignored --nocapture decode_rate`).
#[test]
#[ignore]
fn decode_rate() {
    let mut bytes = Vec::new();
    let mut context = Context::default();
    let mut count = 0u64;
    for event in http_shaped_events(400_000) {
        encode(&mut context, &event, &mut bytes);
        count += 1;
    }
    let started = std::time::Instant::now();
    let mut context = Context::default();
    let mut at = 0;
    let mut sum = 0u64;
    while at < bytes.len() {
        let mut event = Event::default();
        let used = decode(&mut context, &bytes[at..], &mut event).unwrap();
        sum = sum.wrapping_add(event.task ^ event.ts_ns);
        at += used;
    }
    let took = started.elapsed();
    println!(
        "{count} events, {:.1} bytes an event, {:.1} ns an event to decode ({sum})",
        bytes.len() as f64 / count as f64,
        took.as_nanos() as f64 / count as f64
    );
}
