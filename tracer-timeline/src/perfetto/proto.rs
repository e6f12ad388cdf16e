//! The subset of Perfetto's trace protobuf schema the writer uses, and a
//! small encoder for it.
//!
//! Why hand-written: the trace uses ~60 fields of ~15 messages; an encoder
//! of varints and length-delimited fields is ~100 lines and compiles in no
//! time, where prost + protox would add two proc-macro-heavy dependency
//! trees to a 2-core build. Field numbers come from Perfetto's protos
//! (`protos/perfetto/trace/...`, named in each module below with the message
//! and field names) and are checked by decoding every trace the integration
//! tests write against Perfetto's own compiled schema (the `perfetto` Python
//! package, `tests/support/check_pftrace.py`).

/// Protobuf wire types.
const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;

/// `trace.proto`: `Trace`.
pub mod trace {
    /// `repeated TracePacket packet = 1`.
    pub const PACKET: u32 = 1;
}

/// `trace_packet.proto`: `TracePacket`.
pub mod packet {
    pub const TIMESTAMP: u32 = 8;
    pub const TRUSTED_PACKET_SEQUENCE_ID: u32 = 10;
    pub const TRACK_EVENT: u32 = 11;
    pub const INTERNED_DATA: u32 = 12;
    pub const SEQUENCE_FLAGS: u32 = 13;
    pub const CLOCK_SNAPSHOT: u32 = 6;
    pub const TRACE_PACKET_DEFAULTS: u32 = 59;
    pub const TRACK_DESCRIPTOR: u32 = 60;
    pub const PERF_SAMPLE: u32 = 66;
    /// `SequenceFlags.SEQ_INCREMENTAL_STATE_CLEARED`.
    pub const SEQ_INCREMENTAL_STATE_CLEARED: u64 = 1;
}

/// `trace_packet_defaults.proto`: `TracePacketDefaults`, and
/// `track_event/track_event.proto`: `TrackEventDefaults`.
pub mod defaults {
    pub const TIMESTAMP_CLOCK_ID: u32 = 58;
    pub const TRACK_EVENT_DEFAULTS: u32 = 11;
    /// `TrackEventDefaults.track_uuid`.
    pub const TRACK_UUID: u32 = 11;
}

/// `clock_snapshot.proto`: `ClockSnapshot` and `ClockSnapshot.Clock`.
pub mod clock {
    pub const CLOCKS: u32 = 1;
    pub const PRIMARY_TRACE_CLOCK: u32 = 2;
    pub const CLOCK_ID: u32 = 1;
    pub const TIMESTAMP: u32 = 2;
    pub const IS_INCREMENTAL: u32 = 3;
    pub const UNIT_MULTIPLIER_NS: u32 = 4;
    /// `BuiltinClock.BUILTIN_CLOCK_MONOTONIC`: what `bpf_ktime_get_ns` reads.
    pub const MONOTONIC: u64 = 3;
    /// The first sequence-scoped clock id (64..=127).
    pub const SEQUENCE_INCREMENTAL: u64 = 64;
}

/// `track_event/track_descriptor.proto`: `TrackDescriptor`, with
/// `ProcessDescriptor`, `ThreadDescriptor` and `CounterDescriptor`.
pub mod track {
    pub const UUID: u32 = 1;
    pub const NAME: u32 = 2;
    pub const PROCESS: u32 = 3;
    pub const THREAD: u32 = 4;
    pub const PARENT_UUID: u32 = 5;
    pub const COUNTER: u32 = 8;
    pub const CHILD_ORDERING: u32 = 11;
    pub const SIBLING_ORDER_RANK: u32 = 12;
    /// `ChildTracksOrdering.EXPLICIT`: children by `sibling_order_rank`.
    pub const ORDERING_EXPLICIT: u64 = 3;
    /// `ProcessDescriptor.pid`, `.process_name`.
    pub const PROCESS_PID: u32 = 1;
    pub const PROCESS_NAME: u32 = 6;
    /// `ThreadDescriptor.pid`, `.tid`, `.thread_name`.
    pub const THREAD_PID: u32 = 1;
    pub const THREAD_TID: u32 = 2;
    pub const THREAD_NAME: u32 = 5;
    /// `CounterDescriptor.unit`; `Unit.UNIT_COUNT`.
    pub const COUNTER_UNIT: u32 = 3;
    pub const UNIT_COUNT: u64 = 2;
}

/// `track_event/track_event.proto`: `TrackEvent`.
pub mod event {
    pub const CATEGORY_IIDS: u32 = 3;
    pub const DEBUG_ANNOTATIONS: u32 = 4;
    pub const TYPE: u32 = 9;
    pub const NAME_IID: u32 = 10;
    pub const TRACK_UUID: u32 = 11;
    pub const COUNTER_VALUE: u32 = 30;
    /// An interned `Callstack` of the slice or instant (a watch finding's
    /// stack); trace processor's `ParseCallstack` reads it.
    pub const CALLSTACK_IID: u32 = 56;
    /// An interned `SourceLocation`: trace processor turns it into the
    /// slice's `source.function_name` (and `source.file_name`,
    /// `source.line_number`) args (`AddSourceLocationArgs`,
    /// track_event_event_importer.h). A poll's full task type, 3 bytes
    /// where a string debug annotation takes 7.
    pub const SOURCE_LOCATION_IID: u32 = 34;
    /// `repeated uint64 flow_ids_old = 36` and `terminating_flow_ids_old =
    /// 42`: deprecated for the fixed64 `flow_ids` (47) and
    /// `terminating_flow_ids` (48), which cost 9 bytes an id where these
    /// varints take 3–4 for our small sequential ids. Trace processor reads
    /// both (`MaybeParseTrackEventFlows` in `track_event_event_importer.h`
    /// takes the new field when present, else the old one).
    pub const FLOW_IDS_OLD: u32 = 36;
    pub const TERMINATING_FLOW_IDS_OLD: u32 = 42;
    /// `Type`.
    pub const SLICE_BEGIN: u64 = 1;
    pub const SLICE_END: u64 = 2;
    pub const INSTANT: u64 = 3;
    pub const COUNTER: u64 = 4;
}

/// `track_event/debug_annotation.proto`: `DebugAnnotation`.
pub mod annotation {
    pub const NAME_IID: u32 = 1;
    pub const BOOL_VALUE: u32 = 2;
    pub const UINT_VALUE: u32 = 3;
    pub const INT_VALUE: u32 = 4;
    pub const DOUBLE_VALUE: u32 = 5;
    pub const STRING_VALUE: u32 = 6;
    pub const POINTER_VALUE: u32 = 7;
    /// The name of a nested entry (`dict_entries`), not interned.
    pub const NAME: u32 = 10;
    pub const DICT_ENTRIES: u32 = 11;
    pub const ARRAY_VALUES: u32 = 12;
    pub const STRING_VALUE_IID: u32 = 17;
}

/// `interned_data/interned_data.proto`: `InternedData`; the entries are
/// `EventCategory`/`EventName`/`DebugAnnotationName` (`iid = 1, name = 2`)
/// and `InternedString` (`iid = 1, str = 2`).
pub mod interned {
    pub const EVENT_CATEGORIES: u32 = 1;
    pub const EVENT_NAMES: u32 = 2;
    pub const DEBUG_ANNOTATION_NAMES: u32 = 3;
    pub const FUNCTION_NAMES: u32 = 5;
    pub const FRAMES: u32 = 6;
    pub const CALLSTACKS: u32 = 7;
    pub const MAPPING_PATHS: u32 = 17;
    pub const SOURCE_PATHS: u32 = 18;
    pub const MAPPINGS: u32 = 19;
    pub const DEBUG_ANNOTATION_STRING_VALUES: u32 = 29;
    pub const SOURCE_LOCATIONS: u32 = 4;
    pub const IID: u32 = 1;
    pub const NAME: u32 = 2;
    /// `SourceLocation.function_name` (`iid` = 1 and `file_name` = 2 as in
    /// the other entries).
    pub const SOURCE_LOCATION_FUNCTION_NAME: u32 = 3;
}

/// `profiling/profile_common.proto`: `Frame`, `Callstack`, `Mapping`.
pub mod profile {
    pub const FRAME_IID: u32 = 1;
    pub const FRAME_FUNCTION_NAME_ID: u32 = 2;
    pub const FRAME_MAPPING_ID: u32 = 3;
    pub const FRAME_REL_PC: u32 = 4;
    pub const FRAME_SOURCE_PATH_IID: u32 = 5;
    pub const FRAME_LINE_NUMBER: u32 = 6;
    pub const CALLSTACK_IID: u32 = 1;
    /// `repeated uint64 frame_ids`, outermost ("bottom") frame first.
    pub const CALLSTACK_FRAME_IDS: u32 = 2;
    pub const MAPPING_IID: u32 = 1;
    pub const MAPPING_PATH_STRING_IDS: u32 = 7;
}

/// `profiling/profile_packet.proto`: `PerfSample`.
pub mod perf_sample {
    pub const PID: u32 = 2;
    pub const TID: u32 = 3;
    pub const CALLSTACK_IID: u32 = 4;
}

/// A protobuf message being written. Nested messages are written in place
/// after a one-byte length, filled in when they end: nearly all are under
/// 128 bytes, so that byte is the whole varint; a longer one moves its bytes
/// to make room. (Inserting the prefix at every end instead moved every
/// message's bytes, ~4 moves a packet: `memmove` was ~6 % of rendering.)
#[derive(Default)]
pub struct Encoder {
    pub buf: Vec<u8>,
    open: Vec<usize>,
}

impl Encoder {
    pub fn with_capacity(bytes: usize) -> Self {
        Encoder {
            buf: Vec::with_capacity(bytes),
            open: Vec::new(),
        }
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.open.clear();
    }

    #[inline]
    fn tag(&mut self, field: u32, wire_type: u8) {
        self.raw_varint(((field as u64) << 3) | wire_type as u64);
    }

    #[inline]
    fn raw_varint(&mut self, mut value: u64) {
        // Most values here (tags, deltas, iids, lengths) are one byte.
        if value < 0x80 {
            self.buf.push(value as u8);
            return;
        }
        while value >= 0x80 {
            self.buf.push(value as u8 | 0x80);
            value >>= 7;
        }
        self.buf.push(value as u8);
    }

    #[inline]
    pub fn varint(&mut self, field: u32, value: u64) {
        self.tag(field, VARINT);
        self.raw_varint(value);
    }

    /// An `int64`/`int32` field (negative values take ten bytes).
    #[inline]
    pub fn int(&mut self, field: u32, value: i64) {
        self.varint(field, value as u64);
    }

    /// A `double` field.
    pub fn double(&mut self, field: u32, value: f64) {
        self.tag(field, I64);
        self.buf.extend_from_slice(&value.to_le_bytes());
    }

    #[inline]
    pub fn bool(&mut self, field: u32, value: bool) {
        self.varint(field, value as u64);
    }

    pub fn bytes(&mut self, field: u32, value: &[u8]) {
        self.tag(field, LEN);
        self.raw_varint(value.len() as u64);
        self.buf.extend_from_slice(value);
    }

    pub fn string(&mut self, field: u32, value: &str) {
        self.bytes(field, value.as_bytes());
    }

    /// Opens a nested message in `field`; close it with [`end`](Self::end).
    #[inline]
    pub fn begin(&mut self, field: u32) {
        self.tag(field, LEN);
        // The length's first byte; see the type's docs.
        self.buf.push(0);
        self.open.push(self.buf.len());
    }

    /// Closes the innermost open message: fills in its length.
    #[inline]
    pub fn end(&mut self) {
        let start = self.open.pop().expect("end() without begin()");
        let len = self.buf.len() - start;
        if len < 0x80 {
            self.buf[start - 1] = len as u8;
        } else {
            self.long_length(start, len);
        }
    }

    /// A length of two bytes or more: moves the message to make room.
    #[cold]
    fn long_length(&mut self, start: usize, len: usize) {
        let mut prefix = [0u8; 10];
        let mut n = 0;
        let mut value = len as u64;
        while value >= 0x80 {
            prefix[n] = value as u8 | 0x80;
            value >>= 7;
            n += 1;
        }
        prefix[n] = value as u8;
        n += 1;
        // One byte is already there: make room for the others.
        let extra = n - 1;
        self.buf.resize(self.buf.len() + extra, 0);
        self.buf.copy_within(start..start + len, start + extra);
        self.buf[start - 1..start - 1 + n].copy_from_slice(&prefix[..n]);
    }

    /// Whether a nested message is open.
    pub fn is_open(&self) -> bool {
        !self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_protobuf() {
        let mut enc = Encoder::default();
        enc.varint(1, 150);
        assert_eq!(enc.buf, [0x08, 0x96, 0x01]);
        enc.clear();
        enc.begin(3);
        enc.varint(1, 150);
        enc.end();
        assert_eq!(enc.buf, [0x1a, 0x03, 0x08, 0x96, 0x01]);
        enc.clear();
        enc.string(2, "testing");
        assert_eq!(enc.buf, b"\x12\x07testing");
        enc.clear();
        enc.varint(36, 300);
        assert_eq!(enc.buf, [0xa0, 0x02, 0xac, 0x02]);
    }

    #[test]
    fn lengths_at_the_one_byte_boundary_are_exact() {
        // 127 bytes of content fit the reserved byte; 128 need a second.
        for (content, prefix) in [(125, vec![0x7f]), (126, vec![0x80, 0x01])] {
            let mut enc = Encoder::default();
            enc.begin(1);
            enc.bytes(2, &vec![9; content]);
            enc.end();
            assert_eq!(&enc.buf[1..1 + prefix.len()], &prefix[..]);
            assert_eq!(enc.buf.len(), 1 + prefix.len() + 2 + content);
            assert_eq!(enc.buf[1 + prefix.len()..][..2], [0x12, content as u8]);
        }
    }

    #[test]
    fn long_nested_messages_get_multi_byte_lengths() {
        let mut enc = Encoder::default();
        enc.begin(1);
        enc.begin(2);
        enc.bytes(3, &[7; 200]);
        enc.end();
        enc.end();
        assert!(!enc.is_open());
        // outer: tag, len 206 (2 bytes); inner: tag, len 203 (2 bytes); field: tag, len 200 (2 bytes)
        assert_eq!(
            &enc.buf[..8],
            &[0x0a, 0xce, 0x01, 0x12, 0xcb, 0x01, 0x1a, 0xc8]
        );
        assert_eq!(enc.buf.len(), 3 + 3 + 3 + 200);
    }
}
